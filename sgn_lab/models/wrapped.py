"""The module to measure inside a data-parallel wrapper, and the wrappers we cannot measure."""

from __future__ import annotations

from torch import nn


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (DDP's hooks would break the vmap and Gram passes), or
    the model itself; a model with sharded parameters is a ValueError.

    FSDP (either API) and tensor parallelism hold each parameter in pieces on different ranks,
    so a per-sample gradient is never whole on one rank: not supported yet.
    """
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    fsdp = _fsdp_classes()
    if any(isinstance(m, fsdp) for m in model.modules()):
        raise ValueError("FSDP-sharded models are not supported yet: measure the SGN of the "
                         "unsharded model (DDP or one process), e.g. on a checkpoint")
    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(f"parameters sharded as DTensors (tensor parallelism or FSDP2), e.g. "
                         f"{sharded[0]!r}, are not supported yet: measure the SGN of the "
                         "unsharded model (DDP or one process)")
    return model


def _fsdp_classes() -> tuple[type, ...]:
    from torch.distributed import fsdp

    return tuple(c for c in (getattr(fsdp, "FullyShardedDataParallel", None),
                             getattr(fsdp, "FSDPModule", None)) if c is not None)
