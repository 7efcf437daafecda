"""Batched tensors: the few functorch internals the per-sample passes need, in one place.

The Gram path runs the model under ``torch.func.vmap``. Inside, a tensor that carries the
sample axis is a functorch ``BatchedTensor``: a wrapper around a physical tensor with one more
dimension, the sample axis, at a position that vmap's batching rules track through every
operation (sequence-first layouts, reshapes, broadcasts). Reading that position, and making a
new batched tensor from a plain one, needs ``torch._C._functorch``, which torch does not
document; nothing else in sgn_lab touches it. The recording pass and the rules' fused
batched implementations (:mod:`sgn_lab.grads.rules.linear`, ``rules.attention``) read
batched tensors through the functions here.
"""

from __future__ import annotations

import torch._C._functorch as _functorch
from torch import Tensor


def current_level() -> int:
    """The level of the innermost running vmap (call inside the vmapped function)."""
    level = _functorch.maybe_current_level()
    if level is None:
        raise RuntimeError("current_level() called outside vmap")
    return level


def is_batched(value: object, level: int) -> bool:
    """Whether ``value`` is a tensor that carries the sample axis of the vmap at ``level``."""
    return (
        isinstance(value, Tensor)
        and _functorch.is_batchedtensor(value)
        and _functorch.maybe_get_level(value) == level
    )


def physical(value: Tensor) -> tuple[Tensor, int]:
    """The physical tensor behind a batched tensor and the position of its sample axis."""
    return _functorch.get_unwrapped(value), _functorch.maybe_get_bdim(value)


def is_batched_by_vmap(value: Tensor) -> bool:
    """Whether ``value`` carries a vmap's batch axis at any level, under any other functorch
    transform (``grad`` wraps the tensors it differentiates)."""
    while _functorch.is_functorch_wrapped_tensor(value):
        if _functorch.is_batchedtensor(value):
            return True
        value = _functorch.get_unwrapped(value)
    return False


def innermost(value: Tensor) -> Tensor:
    """The plain tensor under every vmap level of a batched tensor (itself when plain)."""
    while _functorch.is_batchedtensor(value):
        value = _functorch.get_unwrapped(value)
    return value


def sample_first(value: Tensor) -> Tensor:
    """The physical tensor of a batched tensor, detached, with the sample axis moved first."""
    tensor, axis = physical(value)
    return tensor.detach().movedim(axis, 0)


def broadcast_to_samples(value: Tensor, n: int, level: int) -> Tensor:
    """``value`` as a batched tensor whose n samples all hold it: an expanded view, no copy.

    The physical tensor ``value.expand(n, ...)`` stays in the autograd graph, so the gradient
    at it is the gradient of each sample's loss with respect to its own copy of ``value``.
    """
    return with_sample_axis(value.expand(n, *value.shape), level)


def is_batched_at_any_level(value: object) -> bool:
    """Whether ``value`` is a batched tensor of any vmap level (a plain tensor is not)."""
    return isinstance(value, Tensor) and _functorch.is_batchedtensor(value)


def with_sample_axis(tensor: Tensor, level: int) -> Tensor:
    """The batched tensor of the vmap at ``level`` whose sample axis is ``tensor``'s first."""
    return _functorch._add_batch_dim(tensor, 0, level)
