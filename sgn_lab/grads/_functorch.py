"""The few functorch internals the recording pass needs, in one place.

The Gram path runs the model under ``torch.func.vmap``. Inside, a tensor that carries the
sample axis is a functorch ``BatchedTensor``: a wrapper around a physical tensor with one more
dimension, the sample axis, at a position that vmap's batching rules track through every
operation (sequence-first layouts, reshapes, broadcasts). Reading that position, and making a
new batched tensor from a plain one, needs ``torch._C._functorch``, which torch does not
document; nothing else in sgn_lab touches it.
"""

from __future__ import annotations

import torch
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
    return _functorch._add_batch_dim(value.expand(n, *value.shape), 0, level)


def batched_linear(operands: dict, level: int) -> Tensor | None:
    """``F.linear`` of a batched input with plain weight and bias as one fused call, or None.

    vmap's rule for linear runs a matmul and then adds the bias; the physical input with its
    sample axis first is just more leading axes to ``F.linear``, which fuses the two.
    """
    x, weight, bias = operands.get("input"), operands.get("weight"), operands.get("bias")
    if not is_batched(x, level) or _functorch.is_batchedtensor(weight) or (
            isinstance(bias, Tensor) and _functorch.is_batchedtensor(bias)):
        return None
    tensor, axis = physical(x)
    out = torch.nn.functional.linear(tensor.movedim(axis, 0), weight, bias)
    return _functorch._add_batch_dim(out, 0, level)


_ATTENTION_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                   "enable_gqa")


def batched_attention(args: tuple, kwargs: dict, level: int) -> Tensor | None:
    """``F.scaled_dot_product_attention`` on batched q, k, v as one call, or None.

    vmap has no batching rule for the CPU attention kernel and falls back to one call per
    sample; the kernel takes any number of leading batch axes, so the sample axis can simply
    be one more. Only without dropout (vmap's own draws could not be reproduced) and when q,
    k and v all carry the samples; None means: call it as usual.
    """
    bound = dict(zip(_ATTENTION_ARGS, args, strict=False)) | kwargs
    q, k, v = (bound.get(name) for name in _ATTENTION_ARGS[:3])
    if bound.get("dropout_p", 0.0) or not all(is_batched(t, level) for t in (q, k, v)):
        return None
    mask = bound.get("attn_mask")
    if isinstance(mask, Tensor):
        if is_batched(mask, level):
            tensor, axis = physical(mask)
            mask = tensor.movedim(axis, 0)
            mask = mask.reshape(mask.shape[0], *([1] * (q.dim() - mask.dim() + 1)),
                                *mask.shape[1:])
        elif _functorch.is_batchedtensor(mask):
            return None
    qkv = [t.movedim(axis, 0) for t, axis in (physical(t) for t in (q, k, v))]
    lead = qkv[0].shape[:-3]
    merge = len(lead) > 1 and all(t.shape[:-3] == lead for t in qkv)
    if merge:
        # The CPU's fused kernel takes 4-D inputs only (5-D ones run the unfused math kernel,
        # about twice as slow): the sample axis joins the batch axis and is split off after.
        qkv = [t.reshape(-1, *t.shape[-3:]) for t in qkv]
        if isinstance(mask, Tensor):
            mask = mask.reshape((1,) * (len(lead) + 3 - mask.dim()) + tuple(mask.shape))
            mask = mask.expand(*lead, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])
    out = torch.nn.functional.scaled_dot_product_attention(
        *qkv, attn_mask=mask,
        is_causal=bool(bound.get("is_causal", False)), scale=bound.get("scale"),
        enable_gqa=bool(bound.get("enable_gqa", False)))
    if merge:
        out = out.reshape(*lead, *out.shape[1:])
    return _functorch._add_batch_dim(out, 0, level)
