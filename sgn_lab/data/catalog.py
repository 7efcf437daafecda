"""The names of the tasks and their help, defined once and light (no torch): the config's
schema and ``sgn-lab --help`` read them here, the loaders (:mod:`sgn_lab.data.tasks`) too."""

from __future__ import annotations

TASKS = ("digits", "gaussian-mixture", "linreg", "markov", "mnist1d", "teacher-student")
"""Names of the built-in tasks."""

FILE_TASK_HELP: dict[str, tuple[str, str]] = {
    "npz": ("npz:PATH", "arrays x, y (optional x_test, y_test) of a .npz file"),
    "cifar10": ("cifar10:DIR", "the CIFAR-10 python batches in a folder"),
    "text": ("text:PATH", "next-token windows of a UTF-8 text file"),
    "jsonl": ("jsonl:PATH", "examples of different lengths, one JSON object a line (a text "
              "field; a label field for classification), padded"),
    "hfdata": ("hfdata:DIR", "the same from a datasets folder written by save_to_disk"),
}
"""The file tasks, the registry :func:`~sgn_lab.data.tasks.load_task` dispatches on:
prefix -> (form, help)."""

FILE_TASKS = tuple(FILE_TASK_HELP)
"""Prefixes of task strings that read user data: ``npz:PATH``, ``cifar10:FOLDER``,
``text:PATH``, ``jsonl:PATH`` and ``hfdata:DIR``."""

_EXAMPLE_OPTIONS = ("text_field", "label_field", "classes", "context", "tokens", "tokenizer",
                    "padding")
FILE_TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "npz": (), "cifar10": ("standardize",), "text": ("context", "tokens"),
    "jsonl": _EXAMPLE_OPTIONS, "hfdata": _EXAMPLE_OPTIONS,
}
"""The options of each file task, in order: its loader's keyword arguments
(:func:`~sgn_lab.data.tasks.file_task_options` reads them from the loaders; a test checks
that the two agree)."""


class DataWarning(UserWarning):
    """The data were changed on loading (examples longer than ``context`` truncated), or are
    fewer than asked for (a probe set larger than the training set): said once, on one line."""


def task_help() -> str:
    """The help of a task option, from :data:`TASKS`, :data:`FILE_TASK_HELP` and
    :data:`FILE_TASK_OPTIONS`."""
    files = "; ".join(
        f"{form}: {text}" + (f" (options: {', '.join(options)})" if options else "")
        for kind, (form, text) in FILE_TASK_HELP.items()
        for options in [FILE_TASK_OPTIONS[kind]])
    return (f"Task: {', '.join(TASKS)} (options as linreg:dim=50); {files}; or your own "
            "pkg.module:callable. File tasks take their options from --task-options k=v,k=v.")
