"""Attention: scaled dot-product attention on batched q, k, v as one fused call.

Attention holds no parameter of its own (its projections are linear layers, which have their
rules), so it has no rule; what it needs is speed. vmap has no batching rule for the CPU
attention kernel and falls back to one call per sample; :func:`batched_attention` runs it once
with the sample axis as one more batch axis, for the calls without a parameter operand
(``BATCHED``).
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from sgn_lab.grads.batched import is_batched, is_batched_at_any_level, physical, with_sample_axis
from sgn_lab.grads.rules.registry import BATCHED

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
        elif is_batched_at_any_level(mask):
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
    out = F.scaled_dot_product_attention(
        *qkv, attn_mask=mask,
        is_causal=bool(bound.get("is_causal", False)), scale=bound.get("scale"),
        enable_gqa=bool(bound.get("enable_gqa", False)))
    if merge:
        out = out.reshape(*lead, *out.shape[1:])
    return with_sample_axis(out, level)


BATCHED[F.scaled_dot_product_attention] = batched_attention
