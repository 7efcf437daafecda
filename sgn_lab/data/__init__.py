"""Tasks for measurement runs: built-in data made on this machine, and user data from files.

``tasks``  the task strings (``mnist1d``, ``linreg:dim=50``, ``npz:PATH``, ...), load_task and
           the built-in tasks
``files``  user data: ``npz:PATH`` and ``cifar10:FOLDER``
``language``  language tasks: ``text:PATH`` and the synthetic ``markov`` language; one sample
           is one window of T tokens
``examples``  examples of different lengths: ``jsonl:PATH`` and ``hfdata:DIR``, padded with
           ``PAD_ID`` (-1) in x (attention mask ``x >= 0``) and ``IGNORE_INDEX`` (-100) in y;
           one sample is one example, its loss the mean over its real tokens
``split``  the seeded train/test split, the validation hold-out and the Task they make
"""

from sgn_lab.data.examples import (
    PAD_ID,
    PADDING_SIDES,
    DataWarning,
    attention_mask,
    load_hfdata,
    load_jsonl,
    load_tokenizer,
    padded_batch,
)
from sgn_lab.data.files import (
    CIFAR10_CLASSES,
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    load_cifar10,
    load_npz,
)
from sgn_lab.data.language import TOKEN_KINDS, load_text, markov_entropy_rate, markov_stationary
from sgn_lab.data.split import DEFAULT_TEST_FRACTION, Task, hold_out_validation
from sgn_lab.data.tasks import FILE_TASK_HELP, FILE_TASKS, TASKS, load_task, task_help
from sgn_lab.models.losses import IGNORE_INDEX, LOSS_AVERAGE

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_TEST_FILE",
    "CIFAR10_TRAIN_FILES",
    "DEFAULT_TEST_FRACTION",
    "FILE_TASKS",
    "FILE_TASK_HELP",
    "IGNORE_INDEX",
    "LOSS_AVERAGE",
    "PADDING_SIDES",
    "PAD_ID",
    "TASKS",
    "TOKEN_KINDS",
    "DataWarning",
    "Task",
    "attention_mask",
    "hold_out_validation",
    "load_cifar10",
    "load_hfdata",
    "load_jsonl",
    "load_npz",
    "load_task",
    "load_text",
    "load_tokenizer",
    "padded_batch",
    "markov_entropy_rate",
    "markov_stationary",
    "task_help",
]
