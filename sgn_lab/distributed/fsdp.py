"""Sharded models (FSDP2, ``torch.distributed.fsdp.fully_shard``): sharding a model for
training, measuring its SGN, and the noise scale of its gradient reduce-scatter.

Training. :func:`shard_blocks` applies ``fully_shard`` to each block of a model and then to
the model itself: each rank then holds 1/N of every parameter, gradient and optimizer state.
The blocks are the classes one names, else a Hugging Face model's ``_no_split_modules``
(its transformer blocks), else the parameterised children of the model's largest
``nn.Sequential`` or ``nn.ModuleList`` (the layers of the built-in MLP, the residual blocks
of the ResNet).

Measuring. Every per-sample route runs the model's forward pass under ``torch.func.vmap``
(or the recording pass), where FSDP's block-by-block gathering cannot run: its hooks issue
collectives and autograd functions inside the transform. :func:`gathered` therefore
all-gathers the parameters (not the gradients, not the optimizer state) for the duration of a
measurement and measures a plain view of the model: the same modules, names and parameter
values, FSDP's hooks and classes left out. The probe set is split over the ranks as under DDP
(:func:`sgn_lab.distributed.split_gram`), so each rank's share of the per-sample work and of
its memory falls with N; the gathered parameters are one copy of the model per rank, freed
when the measurement ends. Every rank must make the call: the gathering is collective.

Refused, each with a message: FSDP1 (``FullyShardedDataParallel``, whose flat parameters
hide the per-parameter structure), and tensor parallelism (parameters that stay DTensors
after the gathering).

Noise scale. :class:`ShardedNoiseScale` is :class:`~sgn_lab.distributed.GradientNoiseScale`
for FSDP: each rank's squared norm of its whole local gradient is read as autograd
accumulates it into the gathered parameters, before the reduce-scatter; the squared norm of
the averaged gradient is the sum over ranks of each rank's shard's.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from sgn_lab.distributed.gns import GradientNoiseScale

__all__ = ["ShardedNoiseScale", "block_names", "fsdp_units", "gathered", "is_sharded",
           "shard_blocks"]

TENSOR_PARALLEL = ("parameters that stay DTensors once FSDP has gathered them (tensor "
                   "parallelism), e.g. {name!r}, are not supported: per-sample gradients need "
                   "each parameter whole on one rank; shard the model with fully_shard alone, "
                   "or use DDP")
FSDP1 = ("FullyShardedDataParallel (FSDP1) is not supported: its flat parameters hide the "
         "per-parameter structure; shard with torch.distributed.fsdp.fully_shard (FSDP2), or "
         "use DDP")
# model -> its plain view (:func:`_view`), for as long as the model lives.
_VIEWS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
# The models inside gathered(): their gathered Parameters' gradients are a measurement's.
_GATHERED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# Module attributes holding hooks, and those that flag a hook id of another dict.
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to, in module order; a
    ValueError for FSDP1."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(FSDP1)
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """True for a model with ``fully_shard`` applied to it or to one of its modules."""
    return bool(fsdp_units(model))


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


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """A plain view of an FSDP2 model with its parameters gathered whole on this rank.

    The view has the model's modules (their own classes, FSDP's hooks left out), parameter
    names and values, and shares its buffers; the parameters are FSDP's own gathered ones, so
    nothing is copied beyond the all-gather. On leaving, the units that were sharded on entry
    are sharded again. Collective: every rank must enter. A model without FSDP units is
    yielded as it is.
    """
    units = fsdp_units(model)
    if not units:
        yield model
        return
    sharded = [unit for unit in units if _holds_shards(unit)]
    outermost = model not in _GATHERED
    try:
        _GATHERED.add(model)
        for unit in sharded:
            unit.unshard()
        yield _view(model)
    finally:
        for unit in sharded:
            unit.reshard()
        if outermost:
            _GATHERED.discard(model)


def _view(model: nn.Module) -> nn.Module:
    """The plain view of a gathered model, made once: FSDP keeps its gathered Parameters
    across gatherings (their storage is freed and refilled), so the view stays the same
    object, and the per-sample functions' first-call checks, kept per model, hold for it."""
    view = _VIEWS.get(model)
    if view is None or not _same_tensors(view, model):
        view = _plain(model, {})
        for name, p in view.named_parameters():
            if isinstance(p, DTensor):
                raise ValueError(TENSOR_PARALLEL.format(name=name))
        _VIEWS[model] = view
    return view


def _same_tensors(view: nn.Module, model: nn.Module) -> bool:
    def listed(m: nn.Module) -> list[tuple[str, int]]:
        return ([(name, id(t)) for name, t in m.named_parameters(remove_duplicate=False)]
                + [(name, id(t)) for name, t in m.named_buffers(remove_duplicate=False)]
                + [(name, type(u).__name__.removeprefix("FSDP"))
                   for name, u in m.named_modules(remove_duplicate=False)])

    return listed(view) == listed(model)


def _holds_shards(unit: nn.Module) -> bool:
    """Whether the parameters ``unit`` manages (those not under a nested unit) are sharded
    now; a unit kept gathered (``reshard_after_forward=False``) is left so on leaving."""
    return any(isinstance(p, DTensor) for p in _managed(unit))


def _managed(unit: nn.Module) -> Iterator[Tensor]:
    from torch.distributed.fsdp import FSDPModule

    yield from unit.parameters(recurse=False)
    for child in unit.children():
        if not isinstance(child, FSDPModule):
            yield from _managed(child)


def _plain(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """``module`` as its original class, without FSDP's hooks, sharing its tensors; a module
    registered twice gives one view."""
    from torch.distributed.fsdp import FSDPModule

    if id(module) in memo:
        return memo[id(module)]
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    view = object.__new__(cls)
    memo[id(module)] = view
    # FSDP's own attributes (its state, which refers back to the model) stay behind.
    state = {key: value for key, value in module.__dict__.items()
             if not key.startswith(("__composable_api_state_key", "_is_fsdp", "_fsdp"))}
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_modules"] = {key: None if child is None else _plain(child, memo)
                         for key, child in module._modules.items()}
    kept: set[int] = set()
    for attribute in _HOOKS:
        hooks = OrderedDict((key, hook) for key, hook in module.__dict__[attribute].items()
                            if not _from_fsdp(hook))
        kept |= set(hooks)
        state[attribute] = hooks
    for attribute in _HOOK_FLAGS:
        state[attribute] = OrderedDict((key, flag) for key, flag
                                       in module.__dict__[attribute].items() if key in kept)
    view.__dict__.update(state)
    return view


def _from_fsdp(hook: Any) -> bool:
    owner = getattr(hook, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("torch.distributed.fsdp")


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
        super().__init__(batch_size, **options)
        self._shards = [p for p in model.parameters() if p.requires_grad]
        if not all(isinstance(p, DTensor) for p in self._shards):
            raise ValueError("ShardedNoiseScale needs a model sharded with fully_shard "
                             "(its parameters are DTensors)")
        self._handles = []
        owner = weakref.ref(model)

        def local(index: int, p: Tensor) -> None:
            if owner() not in _GATHERED:  # not a measurement's backward pass on the view
                self.record_local(index, p.grad.detach())

        with gathered(model) as view:  # FSDP keeps these gathered Parameters across steps
            for index, p in enumerate(q for q in view.parameters() if q.requires_grad):
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda q, index=index: local(index, q)))

    def step(self, batch_size: int | None = None) -> dict[str, Any] | None:
        for index, p in enumerate(self._shards):
            if p.grad is not None and self._local:
                self.record_global(index, p.grad.to_local().detach())
        return super().step(batch_size)

    def remove(self) -> None:
        """Stop reading the gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _global_norm(self, summed: float, ranks: float) -> float:
        return summed  # each rank holds a disjoint shard of the averaged gradient
