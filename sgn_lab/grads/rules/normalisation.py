"""Rules of the normalisation layers: layer norm, RMS norm and group norm.

Their affine weight's per-sample gradient is Σ δ ⊙ x̂ and their bias's Σ δ over the axes the
affine parameters are broadcast on (Dense terms), with x̂ recomputed from the saved input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from sgn_lab.grads.rules.registry import Op, Plan, register
from sgn_lab.grads.rules.shapes import reduce_to
from sgn_lab.grads.terms import Dense, Term, compute_dtype


@register(F.layer_norm, torch.layer_norm, slots=("input", "normalized_shape", "weight", "bias",
                                                 "eps"),
          weight=None, bias=None, eps=1e-5)
def layer_norm(op: Op) -> Plan:
    """y = x̂ ⊙ γ + β over the last axes: g_i(γ) = Σ_t δ_it ⊙ x̂_it, g_i(β) = Σ_t δ_it."""
    shape = tuple(op.operands["normalized_shape"])

    def normalise(x: Tensor) -> Tensor:  # x̂ by the layer's own fused kernel, without γ, β
        return F.layer_norm(x, shape, None, None, op.operands["eps"])

    return _affine_plan(op, normalise, lambda signal: shape)


@register(F.rms_norm, torch.rms_norm, slots=("input", "normalized_shape", "weight", "eps"),
          weight=None, eps=None)
def rms_norm(op: Op) -> Plan:
    """y = x / rms(x) ⊙ γ over the last axes: g_i(γ) = Σ_t δ_it ⊙ x̂_it."""
    shape, eps = tuple(op.operands["normalized_shape"]), op.operands["eps"]
    eps_ = torch.finfo(op.operands["input"].dtype).eps if eps is None else eps

    def normalise(x: Tensor) -> Tensor:
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps_)

    return _affine_plan(op, normalise, lambda signal: shape)


@register(F.group_norm, torch.group_norm, slots=("input", "num_groups", "weight", "bias", "eps"),
          weight=None, bias=None, eps=1e-5)
def group_norm(op: Op) -> Plan:
    """x (B, C, *space) normalised per sample and group: per channel, as for layer_norm."""
    groups, eps = op.operands["num_groups"], op.operands["eps"]

    def normalise(x: Tensor) -> Tensor:
        grouped = x.reshape(*x.shape[:2], groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        var = grouped.var(dim=-1, keepdim=True, unbiased=False)
        return ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)

    def channel_shape(signal: Tensor) -> tuple[int, ...]:
        return (signal.shape[2],) + (1,) * (signal.dim() - 3)  # channels, broadcast over space

    return _affine_plan(op, normalise, channel_shape)


def _affine_plan(op: Op, normalise: Callable[[Tensor], Tensor],
                 affine_shape: Callable[[Tensor], tuple[int, ...]]) -> Plan:
    """g_i(weight) = Σ δ ⊙ x̂ and g_i(bias) = Σ δ, over the axes the affine is broadcast on.

    x̂ is recomputed from the saved input (samples first) in the model's precision (at least
    float32), as the layer computes it.
    """
    takes = tuple(slot for slot in ("weight", "bias") if slot in op.params)

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        dtype = compute_dtype(signal)
        delta = signal.to(dtype)
        shape = affine_shape(signal)
        out: dict[str, Term] = {}
        if "weight" in takes:
            x = saved["input"].to(dtype)
            out["weight"] = Dense(reduce_to(delta * normalise(x), shape), op.name)
        if "bias" in takes:
            out["bias"] = Dense(reduce_to(delta, shape), op.name)
        return out

    return Plan(takes, {}, ("input",) if "weight" in takes else (), "input", terms)


