"""Hugging Face attention masks under ``vmap``: the mask built, never skipped by its values.

transformers turns a 2-D padding mask (n, T) into the 4-D mask its attention reads
(``transformers.masking_utils``). Before it builds one, it reads the mask's values to see
whether it may skip it: with no padding, a causal model can pass ``is_causal=True`` to
``scaled_dot_product_attention`` and an encoder needs no mask at all
(``padding_mask.all()``). Under ``torch.func.vmap`` every sample runs as a batch of one, and
a Python ``if`` on one sample's values is data-dependent control flow that vmap refuses:
before this, a padded batch sent the whole model to the per-sample loop.

transformers already has the answer for code that cannot read values: under tracing
(``torch.compile``, ``torch.export``, ``torch.jit``, fx) its ``is_tracing(mask)`` is true and
the mask is always built, never skipped, which gives the same attention by construction
(skipping is only an optimisation of a mask that masks nothing beyond causality). While
:func:`traceable_masks` is active, ``is_tracing(t)`` is also true for a tensor that vmap
batches — and only for such a tensor: every other call, inside or outside our passes, gets
transformers' own answer. The functions are put back when the context ends; the user's
model is never touched.

The equality with the model's own forward is not assumed: the first call of the per-sample
routes on a model compares each sample's loss under vmap with its loss in the model's
ordinary batched forward (:mod:`sgn_lab.grads.consistency`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

from sgn_lab.grads.batched import is_batched_by_vmap

_SOURCE = "transformers.utils.import_utils"


@contextlib.contextmanager
def traceable_masks() -> Iterator[None]:
    """Within the context, transformers treats a vmap-batched tensor as a traced one.

    Nothing happens where transformers has not been imported. Safe to nest: an inner context
    finds the functions already replaced and leaves them to the outer one.
    """
    source = sys.modules.get(_SOURCE)
    original = getattr(source, "is_tracing", None)
    if original is None:
        yield
        return
    replacement = _tracing_or_batched(original)
    patched = [module for name, module in list(sys.modules.items())
               if name.startswith("transformers") and module is not None
               and getattr(module, "is_tracing", None) is original]
    for module in patched:
        module.is_tracing = replacement
    try:
        yield
    finally:
        for module in patched:
            module.is_tracing = original


def _tracing_or_batched(original: Callable[..., bool]) -> Callable[..., bool]:
    def is_tracing(tensor: Any = None) -> bool:
        return original(tensor) or (isinstance(tensor, Tensor) and is_batched_by_vmap(tensor))

    return is_tracing
