"""User code by reference: ``--model pkg.module:callable`` and ``--task pkg.module:callable``.

A reference names a module (imported from the working directory, then ``PYTHONPATH`` and the
installed packages) and a callable in it. Its keyword arguments come from the config
(``[model] options = {...}``, ``[task] options = {...}``, or ``--model-options k=v,k=v``).

The model protocol
    ``make_model(**options)`` returns a ``torch.nn.Module`` whose ``forward(x)`` takes a batch
    of inputs (n, ...) and returns what the task's loss takes. If the callable has parameters
    named ``input_shape`` (one sample's shape), ``num_outputs`` (classes, vocabulary size, or
    1 for regression) or ``task`` (the :class:`~sgn_lab.data.Task`), they are filled in.

The task protocol
    ``make_task(**options)`` (with ``seed=`` if it takes one) returns a
    :class:`~sgn_lab.data.Task`, or a mapping with

    - ``train`` (required): an ``(inputs, targets)`` pair of tensors or arrays, or a
      ``torch.utils.data.Dataset`` whose items are ``(input, target)`` pairs (read once into
      tensors: the probe draws its samples by index);
    - ``test`` (optional, same kinds): without it, a seeded ``test_fraction`` of ``train`` is
      held out, as for the built-in tasks;
    - ``loss`` (optional): ``loss(outputs, targets)``, mean-reduced over samples; default:
      cross entropy for class labels, next-token cross entropy for token sequences (n, T),
      ½ MSE for real-valued targets;
    - ``num_classes`` (optional): 0 for regression; default: integer targets are classes
      ``0 .. max + 1``, real-valued targets regression.

Every failure (no such module, no such attribute, options the callable does not take, an
exception inside it, a result of the wrong kind) is one ValueError naming the reference.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sgn_lab.data.split import DEFAULT_TEST_FRACTION, Task, _assemble, subset

_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
TASK_KEYS = ("train", "test", "loss", "num_classes")


def is_reference(text: str) -> bool:
    """Whether ``text`` reads ``pkg.module:callable``."""
    return isinstance(text, str) and _REFERENCE.fullmatch(text) is not None


def import_callable(reference: str, *, what: str) -> Callable[..., Any]:
    """The callable ``reference`` names (``pkg.module:attr.attr``), imported with the working
    directory first on the module path."""
    if not is_reference(reference):
        raise ValueError(f"{what} {reference!r} is no reference of the form pkg.module:callable")
    module_name, _, attribute = reference.partition(":")
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:  # as `python -m` would: the user's own modules, from where they run
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ValueError(f"{what} {reference!r}: no module named {exc.name!r} in the "
                             "working directory or on PYTHONPATH") from None
        raise ValueError(f"{what} {reference!r}: importing {module_name} failed: "
                         f"{_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - user code: any error becomes one line
        raise ValueError(f"{what} {reference!r}: importing {module_name} failed: "
                         f"{_first_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what} {reference!r}: {module_name} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what} {reference!r} is a {type(target).__name__}, not a callable")
    return target


def call(function: Callable[..., Any], reference: str, *, what: str,
         options: Mapping[str, Any], offered: Mapping[str, Any]) -> Any:
    """``function(**options, **offered)``, ``offered`` only where the signature takes them;
    options it does not take, and any exception it raises, become one ValueError."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass the options only
        parameters = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    kwargs = dict(options)
    for name, value in offered.items():
        if name in parameters and name not in kwargs:
            kwargs[name] = value
    if parameters and not takes_any:
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            raise ValueError(f"{what} {reference!r} takes no option(s) {', '.join(unknown)}; "
                             f"its parameters are {', '.join(parameters) or 'none'}")
    try:
        return function(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code: any error becomes one line
        raise ValueError(f"{what} {reference!r} raised {_first_line(exc)}") from None


def user_model(reference: str, task: Task, *, options: Mapping[str, Any]) -> nn.Module:
    """The model ``reference`` makes for ``task`` (see the model protocol above)."""
    function = import_callable(reference, what="model")
    offered = {"input_shape": task.input_shape, "num_outputs": task.num_classes or 1,
               "task": task}
    model = call(function, reference, what="model", options=options, offered=offered)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {reference!r} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


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
    task = _assemble(reference, x, y, classes, {"reference": reference}, rng=rng,
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
                             f"{_first_line(exc)}") from None
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
