"""Sharding a model with FSDP2 (``torch.distributed.fsdp.fully_shard``) for training, and the
noise scale of its gradient reduce-scatter.

Training. :func:`shard_blocks` applies ``fully_shard`` to each block of a model and then to
the model itself: each rank then holds 1/N of every parameter, gradient and optimizer state.
The blocks are the classes one names, else a Hugging Face model's ``_no_split_modules``
(its transformer blocks), else the parameterised children of the model's largest
``nn.Sequential`` or ``nn.ModuleList`` (the layers of the built-in MLP, the residual blocks
of the ResNet).

Measuring. The per-sample functions and the probe take the sharded model as it is: they
gather its parameters for the call (:func:`sgn_lab.models.wrapped.gathered`, where what FSDP
covers and refuses is said) and split the probe set over the ranks as under DDP
(:func:`sgn_lab.distributed.split_gram`).

Noise scale. :class:`ShardedNoiseScale` is :class:`~sgn_lab.distributed.GradientNoiseScale`
for FSDP: each rank's squared norm of its whole local gradient is read as autograd
accumulates it into the gathered parameters, before the reduce-scatter; the squared norm of
the averaged gradient is the sum over ranks of each rank's shard's.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from sgn_lab.distributed.gns import GradientNoiseScale
from sgn_lab.models.wrapped import gathered, gathering

__all__ = ["ShardedNoiseScale", "block_names", "shard_blocks"]


def block_names(model: nn.Module, blocks: Sequence[str] = ()) -> list[str]:
    """The qualified names of the modules :func:`shard_blocks` shards one by one.

    ``blocks``: class names (``"GPT2Block"``); none given: a Hugging Face model's
    ``_no_split_modules``, else the parameterised children of the model's largest
    ``nn.Sequential``/``nn.ModuleList`` (its layers). A class not found is a ValueError that
    lists the model's classes.
    """
    classes = tuple(blocks) or tuple(getattr(model, "_no_split_modules", None) or ())
    if classes:
        names = [name for name, m in model.named_modules()
                 if name and type(m).__name__ in classes]
        if not names and blocks:
            known = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(f"no module of class {', '.join(blocks)} in the model; its "
                             f"classes: {', '.join(known)}")
        if names:
            return _outermost(names)
    containers = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.Sequential | nn.ModuleList)]
    best: list[str] = []
    for name, container in containers:
        children = [f"{name}.{key}" if name else key
                    for key, child in container.named_children()
                    if any(True for _ in child.parameters())]
        if len(children) > len(best):
            best = children
    return best


def _outermost(names: list[str]) -> list[str]:
    """The names with no ancestor among them (a block inside a block is sharded with it)."""
    return [name for name in names
            if not any(name.startswith(other + ".") for other in names)]


def shard_blocks(model: nn.Module, *, blocks: Sequence[str] = (),
                 group: dist.ProcessGroup | None = None) -> list[str]:
    """``fully_shard`` each block of ``model`` (:func:`block_names`), then the model itself,
    over ``group`` (None: the default group); returns the blocks' names. The model is changed
    in place, as ``fully_shard`` does: build its optimizer afterwards."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD,
                                 device.type)
    names = block_names(model, blocks)
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return names


class ShardedNoiseScale(GradientNoiseScale):
    """B_simple from an FSDP2 model's training gradients, one row per optimizer step.

    As :class:`~sgn_lab.distributed.GradientNoiseScale` (the same options, estimates and
    :meth:`step`), with the norms read where FSDP has them: this rank's local gradient, whole,
    in the gathered parameters as autograd accumulates it (before the reduce-scatter), and the
    averaged gradient as the shards each rank holds after it. Call :meth:`step` on every rank
    after ``optimizer.step()`` (``scaler.step(optimizer)``, which has unscaled the shards by
    then; the local norms are divided by the scale s² they were read with). One backward pass
    per step (no accumulation without gradient synchronisation); ``Join`` does not apply to
    FSDP.
    """

    _global_scaled = False  # read from the shards after the scaler has unscaled them

    def __init__(self, model: nn.Module, batch_size: int, **options: Any) -> None:
        from torch.distributed.tensor import DTensor  # heavy: loaded by FSDP runs only

        super().__init__(batch_size, **options)
        self._shards = [p for p in model.parameters() if p.requires_grad]
        if not all(isinstance(p, DTensor) for p in self._shards):
            raise ValueError("ShardedNoiseScale needs a model sharded with fully_shard "
                             "(its parameters are DTensors)")
        self._handles = []
        owner = weakref.ref(model)

        def local(index: int, p: Tensor) -> None:
            if not gathering(owner()):  # not a measurement's backward pass on the view
                self.record_local(index, p.grad.detach())

        with gathered(model) as view:  # FSDP keeps these gathered Parameters across steps
            for index, p in enumerate(q for q in view.parameters() if q.requires_grad):
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda q, index=index: local(index, q)))

    def step(self, batch_size: int | None = None) -> dict[str, Any] | None:
        if self._local:  # a synchronised backward pass ran on this rank since the last step
            for index, p in enumerate(self._shards):
                if p.grad is not None:
                    self.record_global(index, p.grad.to_local().detach())
        return super().step(batch_size)

    def remove(self) -> None:
        """Stop reading the gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _global_norm(self, summed: float, ranks: float) -> float:
        return summed  # each rank holds a disjoint shard of the averaged gradient
