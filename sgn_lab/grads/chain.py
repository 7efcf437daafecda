"""The plain recording pass of a chain: an ``nn.Sequential`` whose sample axis is provably 0.

The recording pass (:mod:`sgn_lab.grads.record`) runs the model under ``vmap`` because in
general nothing else establishes where each tensor's sample axis is. For one family of models
the structure itself establishes it: an ``nn.Sequential`` (the class itself, nested ones
included) of modules each of which maps every sample's row to that sample's row alone —
``nn.Linear`` on the last axis, elementwise activations, ``nn.Flatten`` from axis 1 on,
dropout that draws nothing. Its forward pass is the composition of those modules, so in a
plain batched pass the samples stay on axis 0 from the input to the output and never meet.
Such a chain (the MLPs the peers' Hadamard kernels are built for) is recorded without vmap and
without a ``TorchFunctionMode``: one batched forward pass that keeps each Linear's input and
its output's autograd edge, the per-sample losses as ``loss_fn`` on each sample alone (vmap of
the loss only), and one backward pass to the edges. The terms are those of the linear rule of
:mod:`sgn_lab.grads.rules.linear`, the same functions the vmap pass applies.

The conditions are checked on every call, by exact type (a subclass may override
``forward``); anything else — a hook anywhere, a module or option outside the list, a
parameter shared by two layers, an input modified in place later, a parameter of another
module, randomness — returns None and the call takes the vmap pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.func import vmap
from torch.nn import functional as F
from torch.nn.modules import module as module_hooks

from sgn_lab.grads.batched import is_batched_at_any_level
from sgn_lab.grads.common import LossFn, check_finite, one_sample_loss
from sgn_lab.grads.record import Recording, output_edge
from sgn_lab.grads.rng import rng_changed, rng_state, set_rng_state
from sgn_lab.grads.rules import RULES, Op
from sgn_lab.grads.terms import Term

ROW_WISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink,
)
"""Parameter-free modules that act on each element alone, or on a sample's row alone."""

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def chain_layers(model: nn.Module) -> list[nn.Module] | None:
    """The leaf modules of ``model`` in the order its forward pass calls them, or None when
    ``model`` is not a chain whose samples provably stay on axis 0 and apart (module doc)."""
    if any(getattr(module_hooks, name, None) for name in _GLOBAL_HOOKS):
        return None
    layers: list[nn.Module] = []
    seen: set[int] = set()
    for m in _leaves(model):
        if m is None or id(m) in seen or _has_hooks(m) or not _row_wise(m):
            return None
        seen.add(id(m))
        layers.append(m)
    return layers


def _leaves(model: nn.Module) -> Iterator[nn.Module | None]:
    """Leaf modules of nested ``nn.Sequential``s, with None for anything else."""
    if type(model) is nn.Sequential and not _has_hooks(model):
        if any(True for _ in model.parameters(recurse=False)):
            yield None
        for child in model:
            yield from _leaves(child)
    else:
        yield model if not list(model.children()) else None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or "forward" in m.__dict__)


def _row_wise(m: nn.Module) -> bool:
    kind = type(m)
    if kind is nn.Linear:  # its weight and bias its own registered parameters, not tensors
        return all(m._parameters.get(slot) is getattr(m, slot) for slot in ("weight", "bias")
                   if getattr(m, slot) is not None)  # derived from others elsewhere
    if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(False)):
        return False
    if kind in ROW_WISE:  # in place too: each edge is taken before the next layer runs
        return True
    if kind is nn.Flatten:
        return m.start_dim >= 1 and (m.end_dim == -1 or m.end_dim >= m.start_dim)
    if kind in _DROPOUTS:
        return not m.training or m.p == 0
    return False


def record_chain(model: nn.Module, loss_fn: LossFn, xs: tuple[Tensor, ...], targets: Tensor,
                 params: dict[str, Tensor]) -> Recording | None:
    """The recording of a chain by one plain batched pass, or None when ``model`` is not a
    chain (:func:`chain_layers`) or the pass cannot state every use; then take the vmap pass.
    """
    layers = chain_layers(model)
    if (layers is None or len(xs) != 1 or type(xs[0]) is not Tensor
            or is_batched_at_any_level(xs[0]) or is_batched_at_any_level(targets)):
        return None
    names = {id(p): name for name, p in params.items()}
    owned = [id(p) for m in layers for p in m.parameters(recurse=False)]
    if len(set(owned)) != len(owned) or not set(names) <= set(owned):
        return None  # a tied parameter, or a trainable one outside the layers
    n = targets.shape[0]
    state = rng_state(targets.device)
    h, uses = xs[0], []
    for m in layers:
        if type(m) is nn.Linear:
            if h.dim() < 2 or h.shape[0] != n:
                return None
            out = m(h)
            uses.append((m, h, h._version, output_edge(out), out))
            h = out
        else:
            h = m(h)
    if h.dim() < 1 or h.shape[0] != n:
        return None
    losses = _sample_losses(loss_fn, h, targets)
    if rng_changed(state, targets.device):  # the vmap pass draws per sample, from the start
        set_rng_state(state, targets.device)
        return None
    if any(a._version != v for _, a, v, _, _ in uses):
        return None  # an input modified in place after the layer read it
    terms = _terms(uses, losses, names)
    if terms is None:
        return None
    return Recording(terms, {}, [], False)


def _sample_losses(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """Each sample's loss, ``loss_fn`` on that sample alone, as the vmap pass defines it."""

    def one(output: Tensor, target: Tensor) -> Tensor:
        return one_sample_loss(loss_fn(output.unsqueeze(0), target.unsqueeze(0)))

    losses = _row_losses(loss_fn, outputs, targets)
    if losses is None:
        losses = vmap(one, randomness="different")(outputs, targets)
    check_finite(losses.detach(), {})
    return losses


_ELEMENTWISE_LOSSES = {nn.MSELoss: F.mse_loss, nn.L1Loss: F.l1_loss}
_FUNCTIONAL = ((F.cross_entropy, nn.CrossEntropyLoss), (F.mse_loss, nn.MSELoss),
               (F.l1_loss, nn.L1Loss))


def _row_losses(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor | None:
    """The per-sample losses of a built-in loss module in one batched call, where they equal
    ``loss_fn`` on a batch of one by the loss's definition; else None (vmap of ``loss_fn``).

    Cross-entropy of (n, C) logits without class weights: a batch of one's mean (or sum) is
    its one term; a target equal to ``ignore_index`` would make that mean 0/0, so such a
    batch takes vmap, which reports it. MSE and L1 of equal shapes: a batch of one's mean
    (sum) is the mean (sum) over that sample's elements.
    """
    for function, module in _FUNCTIONAL:
        if loss_fn is function:  # the functional form, with the module's defaults
            loss_fn = module()
    kind = type(loss_fn)
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        return None
    if kind is nn.CrossEntropyLoss and loss_fn.weight is None and outputs.dim() == 2:
        if not targets.is_floating_point() and (targets == loss_fn.ignore_index).any():
            return None
        return F.cross_entropy(outputs, targets, reduction="none",
                               label_smoothing=loss_fn.label_smoothing)
    if kind in _ELEMENTWISE_LOSSES and outputs.shape == targets.shape:
        each = _ELEMENTWISE_LOSSES[kind](outputs, targets, reduction="none").reshape(
            outputs.shape[0], -1)
        return each.mean(dim=1) if reduction == "mean" else each.sum(dim=1)
    return None


def _terms(uses: list[tuple[nn.Linear, Tensor, int, GradientEdge, Tensor]], losses: Tensor,
           names: dict[int, str]) -> dict[str, list] | None:
    """Each parameter's terms from the linear rule, or None if an edge got no signal."""
    rule = RULES[F.linear]
    ops = []
    for m, a, _, edge, out in uses:
        slots = {"weight": m.weight, "bias": m.bias}
        params = {slot: names[id(p)] for slot, p in slots.items()
                  if p is not None and id(p) in names}
        if params:
            op = Op("linear", {"input": a, **slots}, params)
            ops.append((rule.plan(op), params, a, edge, out))
    if not ops:
        return {}
    signals = torch.autograd.grad(losses.sum(), [edge for *_, edge, _ in ops],
                                  allow_unused=True)
    terms: dict[str, list[tuple[None, Term]]] = {}
    for (plan, params, a, _, out), signal in zip(ops, signals, strict=True):
        if signal is None or plan.declined or plan.terms is None:
            return None
        made = plan.terms({"input": a.detach()}, signal.detach().reshape(out.shape))
        for slot, term in made.items():
            terms.setdefault(params[slot], []).append((None, term))
    return terms
