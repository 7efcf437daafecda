"""Rules of a parameter combined with activations elementwise: added or subtracted (a bias, a
position embedding), multiplied (a learned scale), concatenated (a class token)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sgn_lab.grads.rules.registry import Op, Plan, register
from sgn_lab.grads.rules.shapes import align, reduce_to
from sgn_lab.grads.terms import Dense, Term


@register(torch.add, torch.Tensor.add, torch.Tensor.add_, slots=("input", "other", "alpha"),
          alpha=1)
def add(op: Op) -> Plan:
    """y = x + α·P (a bias, a position embedding): g_i(P) = α Σ δ_i over the broadcast axes."""
    return _sum_plan(op, 1)


@register(torch.sub, torch.Tensor.sub, torch.Tensor.sub_, slots=("input", "other", "alpha"),
          alpha=1)
def sub(op: Op) -> Plan:
    """y = x − α·P: as :func:`add` with −α."""
    return _sum_plan(op, -1)


def _sum_plan(op: Op, sign: int) -> Plan:
    scales = {"input": 1, "other": sign * op.operands["alpha"]}
    shapes = {slot: tuple(op.operands[slot].shape) for slot in op.params}
    sample = next((slot for slot in ("input", "other") if slot not in op.params), None)

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        return {slot: Dense(reduce_to(signal, shape) * scales[slot], op.name)
                for slot, shape in shapes.items()}

    return Plan(tuple(shapes), {}, (), sample, terms)


@register(torch.mul, torch.Tensor.mul, torch.Tensor.mul_, slots=("input", "other"))
def mul(op: Op) -> Plan:
    """y = x ⊙ P (a learned scale): g_i(P) = Σ δ_i ⊙ x_i over the broadcast axes."""
    if len(op.params) == 2:
        return Plan((), {slot: "a product of two parameters" for slot in op.params}, (), None)
    slot = next(iter(op.params))
    other = "other" if slot == "input" else "input"
    if not isinstance(op.operands[other], Tensor):
        return Plan((), {slot: "scaled by a number, not by an activation"}, (), None)
    shape = tuple(op.operands[slot].shape)

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        x = align(saved[other], signal.dim() - 1)
        return {slot: Dense(reduce_to(signal * x, shape), "mul")}

    return Plan((slot,), {}, (other,), other, terms)


@register(torch.cat, torch.concat, torch.concatenate, slots=("tensors", "dim"), dim=0)
def cat(op: Op) -> Plan:
    """A parameter concatenated to activations (a class token): its slice of δ_i."""
    items = [value for key, value in op.operands.items() if key.startswith("tensors.")]
    dim = op.operands["dim"]
    slices, offset = {}, 0
    for i, item in enumerate(items):
        if item.dim() == 1 and item.shape[0] == 0:  # torch.cat skips legacy empty tensors
            continue
        size = item.shape[dim]
        if f"tensors.{i}" in op.params:
            slices[f"tensors.{i}"] = (offset, size)
        offset += size
    sample = next((f"tensors.{i}" for i in range(len(items)) if f"tensors.{i}" not in op.params),
                  None)
    axis = dim + 1 if dim >= 0 else dim  # the samples come first

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        n = signal.shape[0]
        return {slot: Dense(signal.narrow(axis, start, size).reshape(n, -1), "cat")
                for slot, (start, size) in slices.items()}

    return Plan(tuple(slices), {}, (), sample, terms)
