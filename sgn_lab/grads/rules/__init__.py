"""The per-sample gradient of a parameter at each torch operation it enters: one rule each,
one file per family of operations.

- :mod:`~sgn_lab.grads.rules.registry`: ``Op``, ``Plan``, ``Rule``, ``register`` and the
  registries the recording pass reads (``RULES``, ``BATCHED``, ``EXPANDED``);
- :mod:`~sgn_lab.grads.rules.shapes`: shape helpers the rules share (``positions``,
  ``reduce_to``, ``align``);
- :mod:`~sgn_lab.grads.rules.aliases`: casts, transposes, scalings and slices of a parameter,
  which the rules treat as the parameter;
- the families: ``linear`` (linear, matmul, addmm, baddbmm), ``convolution``, ``embedding``,
  ``normalisation`` (layer, RMS and group norm), ``elementwise`` (add, sub, mul, cat),
  ``attention`` (scaled dot-product attention, batched in one call) and ``recurrent`` (RNN,
  LSTM and GRU written out step by step).

To support a new operation, write one function in its family's file and decorate it with
:func:`register` for the torch functions that reach it (``torch.add`` and ``Tensor.add`` are
different functions). Importing this package imports every family, which registers them.
"""

from sgn_lab.grads.rules import (  # noqa: F401 — imported to register their rules
    attention,
    convolution,
    elementwise,
    embedding,
    linear,
    normalisation,
    recurrent,
)
from sgn_lab.grads.rules.registry import (
    BATCHED,
    EXPANDED,
    RULES,
    BatchedFn,
    Op,
    Plan,
    Rule,
    TermsFn,
    register,
)
from sgn_lab.grads.rules.shapes import positions, reduce_to
from sgn_lab.grads.terms import Dense, Outer, Rows, Term

__all__ = [
    "BATCHED",
    "EXPANDED",
    "RULES",
    "BatchedFn",
    "Dense",
    "Op",
    "Outer",
    "Plan",
    "Rows",
    "Rule",
    "Term",
    "TermsFn",
    "positions",
    "reduce_to",
    "register",
]
