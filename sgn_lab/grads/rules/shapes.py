"""Shape helpers the rules share: positions, and reducing a signal to a broadcast operand.

Tensors here have the samples first. Shapes are those a single sample sees (its "logical"
shape); T counts the positions, every axis but the feature axis.
"""

from __future__ import annotations

import torch
from torch import Tensor


def positions(t: Tensor) -> Tensor:
    """(n, ..., features) -> (n, T, features): every axis between is a position."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def reduce_to(signal: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Per-sample gradient (n, numel) of a tensor of ``shape`` broadcast to the signal's shape."""
    n, out = signal.shape[0], signal.shape[1:]
    lead = len(out) - len(shape)
    if lead > 0:
        signal = signal.sum(dim=tuple(range(1, 1 + lead)))
    ones = tuple(1 + i for i, (size, full) in enumerate(zip(shape, signal.shape[1:], strict=True))
                 if size == 1 and full != 1)
    if ones:
        signal = signal.sum(dim=ones, keepdim=True)
    return signal.reshape(n, -1)


def align(t: Tensor, logical_dims: int) -> Tensor:
    """A samples-first tensor with singleton axes after the sample axis, to broadcast."""
    missing = logical_dims - (t.dim() - 1)
    return t.reshape(t.shape[0], *([1] * missing), *t.shape[1:]) if missing > 0 else t
