"""The module to measure inside a data-parallel wrapper, and the wrappers we cannot measure."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (DDP's hooks would break the vmap and Gram passes), or
    the model itself, an FSDP2 model included (its parameters' names and shapes are the
    unsharded ones).

    Refused with a ValueError: FSDP1 (``FullyShardedDataParallel``) and tensor parallelism,
    which hold a parameter in pieces that no gathering makes whole on one rank.
    """
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from sgn_lab.distributed.fsdp import TENSOR_PARALLEL, fsdp_units

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if not fsdp_units(model):
        sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
        if sharded:
            raise ValueError(TENSOR_PARALLEL.format(name=sharded[0]))
    return model


@contextlib.contextmanager
def measured(model: nn.Module) -> Iterator[nn.Module]:
    """The module whose per-sample gradients are computed, for the duration of the block:
    :func:`unwrapped`, and an FSDP2 model's parameters gathered
    (:func:`sgn_lab.distributed.fsdp.gathered`, collective: every rank must enter)."""
    from sgn_lab.distributed.fsdp import gathered

    with gathered(unwrapped(model)) as module:
        yield module
