"""Rule of the convolutions ``F.conv1d``, ``conv2d`` and ``conv3d``.

The weight's per-sample gradient is Σ over output positions of δ ⊗ the input patch there:
an Outer term by im2col, or a Dense term from one weight-gradient convolution with the
samples as groups, whichever is cheaper; the bias's is δ summed over positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from sgn_lab.grads.rules.registry import Op, Plan, register
from sgn_lab.grads.terms import Dense, Outer, Term, compute_dtype, outer_route


@register(F.conv1d, F.conv2d, F.conv3d,
          slots=("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
          bias=None, stride=1, padding=0, dilation=1, groups=1)
def convolution(op: Op) -> Plan:
    """A convolution: g_i(W) = Σ_t δ_it ⊗ (the input patch at output position t), by im2col
    (an Outer term) or by one weight-gradient convolution with the samples as groups (Dense);
    g_i(b) = Σ_t δ_it per output channel."""
    takes = tuple(slot for slot in ("weight", "bias") if slot in op.params)
    weight = op.operands["weight"]
    spatial = weight.dim() - 2
    geometry = {key: _expand(op.operands[key], spatial) for key in ("stride", "dilation")}
    padding, groups = op.operands["padding"], op.operands["groups"]
    kernel, weight_shape = tuple(weight.shape[2:]), tuple(weight.shape)

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        x, delta = saved["input"], signal
        if x.dim() == spatial + 2:  # an input without a batch axis
            x, delta = x.unsqueeze(1), delta.unsqueeze(1)
        x, pad = _explicit_padding(x, padding, kernel, geometry["dilation"])
        out: dict[str, Term] = {}
        if "weight" in takes:
            out["weight"] = _conv_weight(x, delta, weight_shape, pad, groups, **geometry)
        if "bias" in takes:
            out["bias"] = Dense(delta.sum(dim=(1, *range(3, delta.dim()))), "conv")
        return out

    return Plan(takes, {}, ("input",) if "weight" in takes else (), "input", terms)


def _expand(value: int | tuple[int, ...], spatial: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,) * spatial


def _explicit_padding(x: Tensor, padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
                      ) -> tuple[Tensor, tuple[int, ...]]:
    """Integer padding; ``"same"`` becomes an explicit pad (asymmetric when the span is odd)."""
    if padding == "valid":
        return x, (0,) * len(kernel)
    if padding != "same":
        return x, _expand(padding, len(kernel))
    pads: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]  # torch puts the extra one on the right
    batch = x.shape[:2]
    padded = F.pad(x.reshape(-1, *x.shape[2:]), pads)
    return padded.reshape(*batch, *padded.shape[1:]), (0,) * len(kernel)


_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}


def _conv_weight(x: Tensor, delta: Tensor, weight_shape: tuple[int, ...], padding: tuple[int, ...],
                 groups: int, stride: tuple[int, ...], dilation: tuple[int, ...]) -> Term:
    """x (n, B, C_in, *space), δ (n, B, C_out, *space'): the weight's term, the cheaper way.

    The grouped weight-gradient kernel is slow with few input channels per group (measured:
    2x slower than im2col + bmm at 3 channels, 2x faster at 32), so im2col is kept for those
    and for the ghost route, which needs the im2col factors.
    """
    n, batch, channels = x.shape[:3]
    c_out, spatial = weight_shape[0], len(weight_shape) - 2
    dtype = compute_dtype(delta)
    x, delta = x.to(dtype), delta.to(dtype)
    if groups == 1 and spatial <= 2:
        positions_ = batch * delta[0, 0, 0].numel()
        fan_in = math.prod(weight_shape[1:])
        ghost = outer_route(n, positions_, c_out, fan_in, delta.element_size()) == "ghost"
        if ghost or channels < 8:
            return _im2col(x, delta, weight_shape, padding, stride, dilation)
    grads = _WEIGHT_GRAD[spatial](
        x.transpose(0, 1).reshape(batch, n * channels, *x.shape[3:]),
        (n * c_out, *weight_shape[1:]),
        delta.transpose(0, 1).reshape(batch, n * c_out, *delta.shape[3:]),
        stride=stride, padding=padding, dilation=dilation, groups=n * groups,
    )
    return Dense(grads.reshape(n, -1), "conv")


def _im2col(x: Tensor, delta: Tensor, weight_shape: tuple[int, ...], padding: tuple[int, ...],
            stride: tuple[int, ...], dilation: tuple[int, ...]) -> Outer:
    n, batch = x.shape[:2]
    flat_x = x.reshape(n * batch, *x.shape[2:])
    kernel = weight_shape[2:]
    if len(kernel) == 1:  # as a 2-D convolution of height 1
        flat_x = flat_x.unsqueeze(-2)
        kernel, padding = (1, *kernel), (0, *padding)
        stride, dilation = (1, *stride), (1, *dilation)
    columns = F.unfold(flat_x, kernel, dilation=dilation, padding=padding, stride=stride)
    right = columns.transpose(1, 2).reshape(n, -1, columns.shape[1])
    left = delta.reshape(n * batch, weight_shape[0], -1).transpose(1, 2)
    return Outer(left.reshape(n, -1, weight_shape[0]), right, "conv")


