"""Tasks for measurement runs: built-in data made on this machine, and user data from files.

``tasks``  the task strings (``mnist1d``, ``linreg:dim=50``, ``npz:PATH``, ...), load_task and
           the built-in tasks
``files``  user data: ``npz:PATH`` and ``cifar10:FOLDER``
``language``  language tasks: ``text:PATH`` and the synthetic ``markov`` language; one sample
           is one window of T tokens
``split``  the seeded train/test split, the validation hold-out and the Task they make
"""

from sgn_lab.data.files import (
    CIFAR10_CLASSES,
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    load_cifar10,
    load_npz,
)
from sgn_lab.data.language import TOKEN_KINDS, load_text, markov_entropy_rate, markov_stationary
from sgn_lab.data.split import DEFAULT_TEST_FRACTION, Task, hold_out_validation
from sgn_lab.data.tasks import FILE_TASKS, TASKS, load_task

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_TEST_FILE",
    "CIFAR10_TRAIN_FILES",
    "DEFAULT_TEST_FRACTION",
    "FILE_TASKS",
    "TASKS",
    "TOKEN_KINDS",
    "Task",
    "hold_out_validation",
    "load_cifar10",
    "load_npz",
    "load_task",
    "load_text",
    "markov_entropy_rate",
    "markov_stationary",
]
