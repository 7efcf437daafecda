"""Rules of the matrix products: ``F.linear``, ``matmul``/``mm``, ``addmm`` and ``baddbmm``.

A 2-D parameter factor states its per-sample gradient as an Outer term (Σ over positions of
δ ⊗ the other factor); an added bias as a Dense term. :func:`batched_linear` runs the calls
the linear rule takes as one fused kernel on the physical input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from sgn_lab.grads.batched import is_batched, is_batched_at_any_level, physical, with_sample_axis
from sgn_lab.grads.rules.registry import Op, Plan, TermsFn, register
from sgn_lab.grads.rules.shapes import positions, reduce_to
from sgn_lab.grads.terms import Dense, Outer, Term


def batched_linear(args: tuple, kwargs: dict, level: int) -> Tensor | None:
    """``F.linear`` of a batched input with plain weight and bias as one fused call, or None.

    vmap's rule for linear runs a matmul and then adds the bias; the physical input with its
    sample axis first is just more leading axes. Those are flattened into rows here: on an
    input of more than three axes ``F.linear`` itself falls back to a matmul and a separate
    add of the bias, a pass over the whole output (BERT's FFN: 2 ms of a 100 ms step).
    """
    bound = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
    x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
    if not is_batched(x, level) or is_batched_at_any_level(weight) or (
            is_batched_at_any_level(bias)):
        return None
    tensor, axis = physical(x)
    tensor = tensor.movedim(axis, 0)
    rows = F.linear(tensor.reshape(-1, tensor.shape[-1]), weight, bias)  # addmm with a bias
    return with_sample_axis(rows.view(*tensor.shape[:-1], *weight.shape[:-1]), level)


@register(F.linear, slots=("input", "weight", "bias"), batched=batched_linear, bias=None)
def linear(op: Op) -> Plan:
    """y = x Wᵀ + b on the last axis: g_i(W) = Σ_t δ_it ⊗ x_it, g_i(b) = Σ_t δ_it."""
    takes, declined = [], {}
    if "weight" in op.params:
        if op.operands["weight"].dim() == 2:
            takes.append("weight")
        else:
            declined["weight"] = "a linear weight that is not 2-D"
    bias_shape = tuple(op.operands["bias"].shape) if "bias" in op.params else ()
    if "bias" in op.params:
        takes.append("bias")

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        out: dict[str, Term] = {}
        delta = positions(signal)
        if "weight" in takes:
            out["weight"] = Outer(delta, positions(saved["input"]), "linear")
        if "bias" in takes:  # one position: the same view of δ as the weight's (one δ δᵀ)
            single = delta.shape[1] == 1 and bias_shape == (delta.shape[2],)
            out["bias"] = Dense(delta[:, 0] if single else reduce_to(signal, bias_shape),
                                "linear")
        return out

    keep = ("input",) if "weight" in takes else ()
    return Plan(tuple(takes), declined, keep, "input", terms)


def _matrix_factor(op: Op, left: str, right: str) -> tuple[dict, dict, str]:
    """Terms of y = L @ R when one factor is a 2-D parameter and the other carries samples.

    Parameter on the right (k, m): g_i = Σ_t l_it ⊗ δ_it over the rows t of L. On the left
    (p, k): g_i = Σ_t δ_it ⊗ r_it over the columns t of R and δ (every batch axis too).
    """
    both = left in op.params and right in op.params
    takes, declined = {}, {}
    for slot, other in ((right, left), (left, right)):
        if slot not in op.params:
            continue
        if both:
            declined[slot] = "a product of two parameters"
        elif op.operands[slot].dim() != 2:
            declined[slot] = f"a {op.operands[slot].dim()}-D parameter factor of {op.name}"
        else:
            takes[slot] = other
    sample = next(iter(takes.values()), left if left not in op.params else right)
    return takes, declined, sample


def _matrix_terms(takes: dict[str, str], right_slot: str, scale: Any, op: str) -> TermsFn:
    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        out: dict[str, Term] = {}
        for slot, other in takes.items():
            factor = saved[other] * scale if scale != 1 else saved[other]
            if slot == right_slot:
                out[slot] = Outer(positions(factor), positions(signal), op)
            elif factor.dim() == 2:  # a vector operand: one position
                out[slot] = Outer(signal.unsqueeze(1), factor.unsqueeze(1), op)
            else:
                out[slot] = Outer(positions(signal.transpose(-1, -2)),
                                  positions(factor.transpose(-1, -2)), op)
        return out

    return terms


@register(torch.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm, slots=("input", "other"))
def matmul(op: Op) -> Plan:
    """y = A @ B with a 2-D parameter factor (a Linear written as a product, HF's Conv1D)."""
    takes, declined, sample = _matrix_factor(op, "input", "other")
    terms = _matrix_terms(takes, "other", 1, "matmul")
    return Plan(tuple(takes), declined, tuple(takes.values()), sample, terms)


@register(torch.addmm, torch.Tensor.addmm, slots=("input", "mat1", "mat2", "beta", "alpha"),
          beta=1, alpha=1)
def addmm(op: Op) -> Plan:
    """y = β·c + α·(A B): A, B as in :func:`matmul` scaled by α; g_i(c) = β Σ_t δ_it."""
    takes, declined, sample = _matrix_factor(op, "mat1", "mat2")
    alpha, beta = op.operands["alpha"], op.operands["beta"]
    product = _matrix_terms(takes, "mat2", alpha, "addmm")
    bias_shape = tuple(op.operands["input"].shape) if "input" in op.params else None

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        out = product(saved, signal)
        if bias_shape is not None:
            out["input"] = Dense(reduce_to(signal, bias_shape) * beta, "addmm")
        return out

    slots = (*takes, "input") if bias_shape is not None else tuple(takes)
    return Plan(slots, declined, tuple(takes.values()), sample, terms)


@register(torch.baddbmm, torch.Tensor.baddbmm,
          slots=("input", "batch1", "batch2", "beta", "alpha"), beta=1, alpha=1)
def baddbmm(op: Op) -> Plan:
    """y = β·c + α·(A B) batched: only the added c (a bias) is taken, g_i(c) = β Σ δ."""
    declined = {slot: "a factor of a batched matrix product"
                for slot in ("batch1", "batch2") if slot in op.params}
    if "input" not in op.params:
        return Plan((), declined, (), "batch1")
    bias_shape, beta = tuple(op.operands["input"].shape), op.operands["beta"]

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        return {"input": Dense(reduce_to(signal, bias_shape) * beta, "baddbmm")}

    return Plan(("input",), declined, (), "batch1", terms)
