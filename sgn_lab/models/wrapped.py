"""The module to measure inside a data-parallel wrapper, and the wrappers we cannot measure.

- DDP: its ``module``.
- FSDP2 (``torch.distributed.fsdp.fully_shard``): every per-sample route runs the model's
  forward pass under ``torch.func.vmap`` (or the recording pass), where FSDP's block-by-block
  gathering cannot run (its hooks issue collectives and autograd functions inside the
  transform). :func:`gathered` therefore all-gathers the parameters (not the gradients, not
  the optimizer state) for the duration of a measurement and yields a plain view of the
  model: the same modules, names and parameter values, FSDP's hooks and classes left out.
  Every rank must enter it: the gathering is collective. (Sharding a model for training:
  :mod:`sgn_lab.distributed.fsdp`.)
- Refused, each with a message: FSDP1 (``FullyShardedDataParallel``, whose flat parameters
  hide the per-parameter structure) and tensor parallelism (parameters that stay DTensors
  after the gathering: a per-sample gradient is never whole on one rank).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

TENSOR_PARALLEL = ("parameters that stay DTensors once FSDP has gathered them (tensor "
                   "parallelism), e.g. {name!r}, are not supported: per-sample gradients need "
                   "each parameter whole on one rank; shard the model with fully_shard alone, "
                   "or use DDP")
FSDP1 = ("FullyShardedDataParallel (FSDP1) is not supported: its flat parameters hide the "
         "per-parameter structure; shard with torch.distributed.fsdp.fully_shard (FSDP2), or "
         "use DDP")
# model -> its plain view (:func:`_view`), for as long as the model lives.
_VIEWS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
# The models inside gathered(): their gathered Parameters' gradients are a measurement's
# (:func:`gathering`).
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


def gathering(model: nn.Module | None) -> bool:
    """Whether ``model`` is inside :func:`gathered` now: the gradients autograd accumulates
    into its gathered parameters are then a measurement's, not training's."""
    return model is not None and model in _GATHERED


def _view(model: nn.Module) -> nn.Module:
    """The plain view of a gathered model, made once: FSDP keeps its gathered Parameters
    across gatherings (their storage is freed and refilled), so the view stays the same
    object, and the per-sample functions' first-call checks, kept per model, hold for it."""
    from torch.distributed.tensor import DTensor

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
    from torch.distributed.tensor import DTensor

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


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (DDP's hooks would break the vmap and Gram passes), or
    the model itself, an FSDP2 model included (its parameters' names and shapes are the
    unsharded ones).

    Refused with a ValueError: FSDP1 and tensor parallelism (module docstring).
    """
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

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
    :func:`unwrapped`, and an FSDP2 model's parameters gathered (:func:`gathered`,
    collective: every rank must enter)."""
    with gathered(unwrapped(model)) as module:
        yield module
