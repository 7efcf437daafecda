"""Tasks for measurement runs: built-in data made on this machine, and user data from files.

``catalog``  the task names, the file tasks' registry, their help and DataWarning: light (no
           torch), read by the config's schema and ``sgn-lab --help``
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

from __future__ import annotations

from typing import TYPE_CHECKING

from sgn_lab.lazy import homes, lazy_exports

# Each public name -> the module that defines it, imported on first use (sgn_lab.lazy).
_HOME = {
    **homes("sgn_lab.data.catalog", (
        "FILE_TASKS", "FILE_TASK_HELP", "FILE_TASK_OPTIONS", "TASKS", "DataWarning", "task_help",
    )),
    **homes("sgn_lab.data.examples", (
        "PAD_ID", "PADDING_SIDES", "attention_mask", "load_hfdata", "load_jsonl",
        "load_tokenizer", "padded_batch",
    )),
    **homes("sgn_lab.data.files", (
        "CIFAR10_CLASSES", "CIFAR10_TEST_FILE", "CIFAR10_TRAIN_FILES", "load_cifar10", "load_npz",
    )),
    **homes("sgn_lab.data.language", (
        "TOKEN_KINDS", "load_text", "markov_entropy_rate", "markov_stationary",
    )),
    **homes("sgn_lab.data.split", ("DEFAULT_TEST_FRACTION", "Task", "hold_out_validation")),
    **homes("sgn_lab.data.tasks", ("load_task",)),
    **homes("sgn_lab.models.losses", ("IGNORE_INDEX", "LOSS_AVERAGE")),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOME)

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from sgn_lab.data.catalog import (
        FILE_TASK_HELP,
        FILE_TASK_OPTIONS,
        FILE_TASKS,
        TASKS,
        DataWarning,
        task_help,
    )
    from sgn_lab.data.examples import (
        PAD_ID,
        PADDING_SIDES,
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
    from sgn_lab.data.language import (
        TOKEN_KINDS,
        load_text,
        markov_entropy_rate,
        markov_stationary,
    )
    from sgn_lab.data.split import DEFAULT_TEST_FRACTION, Task, hold_out_validation
    from sgn_lab.data.tasks import load_task
    from sgn_lab.models.losses import IGNORE_INDEX, LOSS_AVERAGE
