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
The task a callable returns is checked and split by :mod:`sgn_lab.data.user_tasks`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from sgn_lab.data.split import Task


_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


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
                         f"{first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - user code: any error becomes one line
        raise ValueError(f"{what} {reference!r}: importing {module_name} failed: "
                         f"{first_line(exc)}") from None
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
        raise ValueError(f"{what} {reference!r} raised {first_line(exc)}") from None


def user_model(reference: str, task: Task, *, options: Mapping[str, Any]) -> nn.Module:
    """The model ``reference`` makes for ``task`` (see the model protocol above)."""
    from torch import nn  # here, not above: the CLI's help reads is_reference without torch

    function = import_callable(reference, what="model")
    offered = {"input_shape": task.input_shape, "num_outputs": task.num_classes or 1,
               "task": task}
    model = call(function, reference, what="model", options=options, offered=offered)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {reference!r} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
