"""The registries the recording pass reads, and the types a rule is written with.

``RULES``: for each torch function, the rule that states the per-sample gradient of a
parameter operand (:class:`Rule`, registered by :func:`register`). A rule is called, during
the recording pass, on a call that has a trainable parameter among its operands (:class:`Op`).
It returns a :class:`Plan`: which parameter operands it takes, which operands its formula
needs, and a function that turns those operands and the signal δ (the gradient of each
sample's loss at the call's output) into one term per parameter
(:mod:`sgn_lab.grads.terms`). A parameter operand the rule does not take goes to the ``vmap``
route (a per-sample copy of the parameter) with the rule's reason.

``BATCHED``: torch functions that vmap batches slowly, with an implementation that runs them
once on the physical tensors (the sample axis as one more batch axis), for calls without a
parameter operand; a rule's own ``batched`` does the same for the calls the rule takes.
``EXPANDED``: torch functions vmap cannot batch at all (fused recurrent kernels), with the same
computation written out in plain operations, which the pass then sees one by one.

Every tensor a rule's ``terms`` receives has the samples first: the recording pass runs the
model under ``vmap``, which knows where each tensor's sample axis is (sequence-first inputs,
reshapes, broadcasts), and moves it to the front. An operand without a sample axis (a
position-id table, a buffer) is given one by the pass before the operation runs (the plan's
``sample`` operand), so the signal at the output is per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sgn_lab.grads.terms import Term

TermsFn = Callable[[dict[str, Any], Tensor], dict[str, Term]]
# (args, kwargs, vmap level) -> the call's batched output, or None: run the call as usual.
BatchedFn = Callable[[tuple, dict, int], Tensor | None]


@dataclass(frozen=True)
class Op:
    """One call: its operands by slot name (list items as ``"slot.i"``) and its parameters."""

    name: str
    operands: dict[str, Any]
    params: dict[str, str]  # slot -> name of the trainable parameter in that slot


@dataclass(frozen=True)
class Plan:
    """What a rule does with one call.

    ``takes``: the parameter slots whose terms ``terms`` returns; ``declined``: reasons for
    the parameter slots it leaves to the vmap route; ``keep``: operand slots ``terms`` reads
    (saved with the samples first, detached); ``sample``: the operand to give a sample axis
    when no operand has one.
    """

    takes: tuple[str, ...] = ()
    declined: dict[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = ()
    sample: str | None = None
    terms: TermsFn | None = None


@dataclass(frozen=True)
class Rule:
    """A registered rule: its operands' slot names and defaults, its ``plan`` function, and
    optionally a fused ``batched`` implementation of the calls it takes."""

    name: str
    slots: tuple[str, ...]
    defaults: dict[str, Any]
    plan: Callable[[Op], Plan]
    batched: BatchedFn | None = None

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Operands by slot name, defaults filled in, list operands also item by item."""
        operands = dict(self.defaults)
        operands.update(zip(self.slots, args, strict=False))
        operands.update(kwargs)
        for slot, value in list(operands.items()):
            if isinstance(value, list | tuple):
                operands.update({f"{slot}.{i}": item for i, item in enumerate(value)})
        return operands


RULES: dict[Callable, Rule] = {}
BATCHED: dict[Callable, BatchedFn] = {}
EXPANDED: dict[Callable, Callable[..., Any]] = {}


def register(*funcs: Callable, slots: tuple[str, ...], batched: BatchedFn | None = None,
             **defaults: Any) -> Callable:
    """Register ``plan`` as the rule of every torch function in ``funcs`` (``torch.add`` and
    ``Tensor.add`` are different functions); ``defaults`` are the operands' defaults."""

    def decorate(plan: Callable[[Op], Plan]) -> Callable[[Op], Plan]:
        for func in funcs:
            RULES[func] = Rule(plan.__name__, slots, defaults, plan, batched)
        return plan

    return decorate
