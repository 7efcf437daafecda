"""Tasks of one's own: ``--task pkg.module:callable`` made into a split, subsampled Task.

The task protocol (what the callable returns) is described in :mod:`sgn_lab.user`, which
imports the callable; this module checks what it returned and splits it like a built-in task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from sgn_lab.data.split import DEFAULT_TEST_FRACTION, Task, assemble_task, subset
from sgn_lab.user import call, first_line, import_callable

TASK_KEYS = ("train", "test", "loss", "num_classes")


def user_task(reference: str, *, seed: int, options: Mapping[str, Any],
              test_fraction: float | None = None, n_train: int | None = None,
              n_test: int | None = None) -> Task:
    """The task ``reference`` makes (see the task protocol above), split and subsampled with
    ``seed`` like a built-in task."""
    function = import_callable(reference, what="task")
    made = call(function, reference, what="task", options=options, offered={"seed": seed})
    rng = np.random.default_rng(seed)
    own_test = isinstance(made, Task) or (isinstance(made, Mapping)
                                          and made.get("test") is not None)
    if own_test and test_fraction is not None:
        raise ValueError(f"task {reference!r} returns its own test set; test_fraction "
                         f"{test_fraction!r} does not apply")
    if isinstance(made, Task):
        return _subsampled(made, rng, n_train=n_train, n_test=n_test)
    if not isinstance(made, Mapping):
        raise ValueError(f"task {reference!r} returned a {type(made).__name__}; return a "
                         f"sgn_lab.data.Task or a mapping with keys {', '.join(TASK_KEYS)}")
    unknown = sorted(set(made) - set(TASK_KEYS))
    if unknown or "train" not in made:
        raise ValueError(f"task {reference!r} returned keys {sorted(made)}; it takes "
                         f"{', '.join(TASK_KEYS)} (train required)")
    x, y = _pair(made["train"], reference, "train")
    test = _pair(made["test"], reference, "test") if made.get("test") is not None else None
    classes = _num_classes(made.get("num_classes"), y, test, reference)
    loss = made.get("loss")
    if loss is not None and not callable(loss):
        raise ValueError(f"task {reference!r}: loss is a {type(loss).__name__}, not a callable")
    if test is None and test_fraction is None:
        test_fraction = DEFAULT_TEST_FRACTION
    task = assemble_task(reference, x, y, classes, {"reference": reference}, rng=rng,
                     test_fraction=test_fraction, n_train=n_train, n_test=n_test,
                     x_test=None if test is None else test[0],
                     y_test=None if test is None else test[1], to_inputs=torch.as_tensor)
    return replace(task, loss=loss)


def _pair(data: Any, reference: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` as arrays from a pair or a Dataset of pairs."""
    if isinstance(data, torch.utils.data.Dataset):
        try:
            items = [data[i] for i in range(len(data))]
        except Exception as exc:  # noqa: BLE001 - user code
            raise ValueError(f"task {reference!r}: reading the {key} dataset raised "
                             f"{first_line(exc)}") from None
        if not items or not all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
            raise ValueError(f"task {reference!r}: the {key} dataset's items must be (input, "
                             "target) pairs")
        inputs = torch.stack([torch.as_tensor(i[0]) for i in items])
        targets = torch.stack([torch.as_tensor(i[1]) for i in items])
        data = (inputs, targets)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"task {reference!r}: {key} must be an (inputs, targets) pair or a "
                         f"torch Dataset, got a {type(data).__name__}")
    x, y = (np.asarray(torch.as_tensor(a).detach().cpu()) for a in data)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(f"task {reference!r}: {key} has {len(x) if x.ndim else 0} inputs but "
                         f"{len(y) if y.ndim else 0} targets")
    if len(x) < 2:
        raise ValueError(f"task {reference!r}: {key} needs at least 2 samples, got {len(x)}")
    return x, y


def _num_classes(given: Any, y: np.ndarray, test: tuple | None, reference: str) -> int:
    integer = np.issubdtype(y.dtype, np.integer)
    if given is None:
        if not integer:
            return 0
        labels = y if test is None else np.concatenate([y.ravel(), test[1].ravel()])
        return int(labels.max()) + 1
    if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 0:
        raise ValueError(f"task {reference!r}: num_classes must be an integer >= 0, got "
                         f"{given!r}")
    if given > 0 and not integer:
        raise ValueError(f"task {reference!r}: num_classes={given} but the targets are "
                         f"{y.dtype}, not class labels")
    if given == 0 and integer:
        raise ValueError(f"task {reference!r}: num_classes=0 (regression) but the targets are "
                         f"integers ({y.dtype}); give float targets or the number of classes")
    if given > 0 and (y.min() < 0 or y.max() >= given):
        raise ValueError(f"task {reference!r}: labels must lie in [0, {given}), got "
                         f"{y.min()}..{y.max()}")
    return int(given)


def _subsampled(task: Task, rng: np.random.Generator, *, n_train: int | None,
                n_test: int | None) -> Task:
    train = torch.as_tensor(subset(np.arange(len(task.x_train)), n_train, name="n_train",
                                   rng=rng))
    test = torch.as_tensor(subset(np.arange(len(task.x_test)), n_test, name="n_test", rng=rng))
    # replace: whatever else the task holds (its loss, a validation set of its own) is kept.
    return replace(task, x_train=task.x_train[train], y_train=task.y_train[train],
                   x_test=task.x_test[test], y_test=task.y_test[test])
