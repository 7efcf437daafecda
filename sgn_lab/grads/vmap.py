"""Per-sample gradients through ``torch.func``.

For a model with parameters θ, a data set of n samples and the usual mean-reduced loss, the
per-sample gradient of sample i is ``g_i = ∇θ ℓ(f(x_i), y_i)``. They are computed by vectorising
``grad`` of a single-sample loss over the batch with ``vmap``; ``functional_call`` runs the
model with the parameters as explicit inputs. Module hooks are never used here: hooks break
``torch.func`` transforms (the hook-based Gram fast path lives elsewhere).
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from sgn_lab.checks import NonFiniteError
from sgn_lab.grads.consistency import (
    CHECK_SAMPLES,
    check_independent,
    check_samples_option,
    checked,
    remember,
    structure,
)
from sgn_lab.grads.hf_masks import traceable_masks
from sgn_lab.grads.recurrent import Recurrence
from sgn_lab.models.wrapped import unwrapped

LossFn = Callable[[Tensor, Tensor], Tensor]
Inputs = Tensor | Sequence[Tensor]

# chunk_size=None: all samples at once while G fits in _WHOLE_BYTES; beyond, chunks whose
# gradients fit in _CHUNK_BYTES (small allocations reuse their pages, while every fresh n × d
# one page-faults its whole size), of at least _MIN_CHUNK samples.
_WHOLE_BYTES = 256 * 2**20
_CHUNK_BYTES = 32 * 2**20
_MIN_CHUNK = 8

BATCHNORM_POLICIES = ("error", "eval")


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    chunk_size: int | None = None,
    *,
    batchnorm: str = "error",
    seed: int | None = None,
    verify: int | None = None,
    samples: str = "independent",
) -> dict[str, Tensor]:
    """Gradient of each sample's loss with respect to every trainable parameter.

    Parameters
    ----------
    model
        Any module with a functional forward (Linear, Conv, norms, attention, embeddings,
        dropout, residual blocks, ...). Only parameters with ``requires_grad`` are
        differentiated; frozen ones and buffers are passed through unchanged.
    loss_fn
        ``loss_fn(outputs, targets)`` -> scalar, the usual mean-reduced loss. It is called on
        one sample at a time (a batch of one), so ``g[name][i]`` is the gradient of the loss of
        sample i alone.
    inputs
        Tensor of shape (n, ...) or a sequence of such tensors (passed to the model as
        positional arguments). Moved to the model's device.
    targets
        Tensor of shape (n, ...).
    chunk_size
        Number of samples vectorised at once; bounds the working memory to about
        ``chunk_size`` × (activations + d). ``None``: all n at once while the (n, d) gradients
        fit in 256 MiB; beyond, as many as keep one chunk's gradients within 32 MiB (at least
        8 samples), copied into one (n, d) matrix (small chunks reuse their memory, a fresh
        n × d one page-faults its whole size). The result does not depend on it, except for
        random layers: each chunk draws its own dropout masks, so a seeded result is
        reproducible for a given ``chunk_size`` (and, with None, for the same n and d).
    batchnorm
        What to do with BatchNorm layers in train mode, whose batch statistics couple the
        samples so that no per-sample gradient exists: ``"error"`` (default) refuses;
        ``"eval"`` uses their running statistics for this computation (their train/eval flag
        is restored afterwards). Replacing them by GroupNorm is the other choice; see
        :func:`batchnorm_to_groupnorm`.
    seed
        Seed for random layers such as dropout, which draw independent randomness for each
        sample. ``None`` uses (and advances) torch's global generator; an integer makes the
        draws reproducible without touching the global generator.
    verify
        The consistency check (:func:`~sgn_lab.grads.consistency.check_independent`): the
        batched forward of a few samples against their batch-of-one passes, which catches a
        forward pass that mixes samples. ``None`` (default): on the first call for a model
        (again when its structure changes), on ``CHECK_SAMPLES`` samples; k > 0: on every
        call, on the first k samples; 0: never.
    samples
        ``"independent"`` (default): a forward pass that mixes samples is a
        :class:`~sgn_lab.grads.consistency.SampleMixingError`; ``"batch-of-one"``: the
        gradients of each sample alone are what is wanted, and mixing is a warning.

    Returns
    -------
    dict
        name -> Tensor of shape (n, *param.shape), in ``model.named_parameters()`` order, with
        the parameters' dtype and device. When the parameters share a dtype and a device, the
        tensors are views into one (n, d) matrix, which :func:`flatten_grads` returns without
        a copy.
    """
    model = unwrapped(model)
    xs = _as_tuple(inputs)
    n = _num_samples(xs, targets)
    check_samples_option(samples)
    if verify is not None and (isinstance(verify, bool) or not isinstance(verify, int)
                               or verify < 0):
        raise ValueError(f"verify must be an integer >= 0 or None, got {verify!r}")
    if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
            or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")

    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no parameter with requires_grad=True")
    refuse_max_norm(model)
    if chunk_size is None:
        row_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
        chunk_size = n if n * row_bytes <= _WHOLE_BYTES else max(
            _MIN_CHUNK, _CHUNK_BYTES // max(1, row_bytes))
    chunk_size = int(chunk_size)
    fixed = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    fixed.update({k: b.detach() for k, b in model.named_buffers()})
    device = next(iter(trainable.values())).device
    xs = tuple(x.to(device) for x in xs)
    targets = targets.to(device)

    def sample_loss(params: dict[str, Tensor], *args: Tensor) -> Tensor:
        *sample_inputs, target = args
        outputs = functional_call(
            model, (params, fixed), tuple(x.unsqueeze(0) for x in sample_inputs)
        )
        loss = loss_fn(outputs, target.unsqueeze(0))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar (a mean-reduced loss); for one sample it "
                f"returned shape {shape}"
            )
        return loss

    in_dims = (None,) + (0,) * (len(xs) + 1)
    compute = vmap(grad_and_value(sample_loss), in_dims=in_dims, randomness="different")
    key = (*structure("grads", model, loss_fn, xs, targets), samples)
    if verify is None:
        verify = 0 if checked(model, key) else CHECK_SAMPLES
    with _batchnorm_policy(model, batchnorm):
        grads = _computed(model, loss_fn, xs, targets, trainable, compute, chunk_size, seed,
                          device)
        if verify:
            check_independent(model, loss_fn, xs, targets, samples=samples, count=verify)
            remember(model, key)
    return grads


def _computed(model, loss_fn, xs, targets, trainable, compute, chunk_size, seed, device):
    """The per-sample gradients: vmap in chunks, or the last resort where vmap refuses."""
    n = targets.shape[0]
    with _seeded(seed, device):
        try:
            with recurrence(model), traceable_masks():
                if chunk_size >= n:  # one chunk: vmap's own output, no copy
                    grads, losses = compute(trainable, *xs, targets)
                    check_finite(losses, grads)
                    return dict(grads)
                out = _output(trainable, n)
                for start in range(0, n, chunk_size):
                    stop = min(start + chunk_size, n)
                    grads, losses = compute(trainable, *(x[start:stop] for x in xs),
                                            targets[start:stop])
                    check_finite(losses, grads, offset=start)
                    for k, g in grads.items():
                        out[k][start:stop] = g
                return out
        except RuntimeError as refusal:  # vmap cannot transform some module: the last resort
            pick = slice(0, min(2, n))

            def attempt() -> None:
                with recurrence(model), traceable_masks():
                    compute(trainable, *(x[pick] for x in xs), targets[pick])

            return last_resort(model, loss_fn, xs, targets, refusal, attempt)[0]


class LastResortWarning(UserWarning):
    """vmap cannot transform a module: per-sample gradients by per-sample backward passes."""


def last_resort(model: nn.Module, loss_fn: LossFn, xs: tuple[Tensor, ...], targets: Tensor,
                refusal: RuntimeError, attempt: Callable[[], object]
                ) -> tuple[dict[str, Tensor], str]:
    """Per-sample gradients by one ordinary backward pass per sample, after vmap refused.

    For models vmap cannot transform: fused kernels without batching rules, in-place updates
    of buffers, data-dependent Python control flow, activation checkpointing. Each sample runs
    alone (a batch of one) from the same buffers, which are restored afterwards; the result is
    exact, at the cost of n passes. One :class:`LastResortWarning` names the module that vmap
    could not get through and why. The vmap transform spans the whole forward pass, so every
    trainable parameter takes this route. If the first sample fails here too, the error is the
    model's own and vmap's is raised. ``attempt()`` repeats what vmap refused on two samples,
    to find the module (:func:`culprit`). Returns the gradients and what vmap refused.
    """
    where, why = culprit(model, attempt, refusal)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out = _output({k: p.detach() for k, p in params.items()}, targets.shape[0])
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    # .backward() rather than autograd.grad, which reentrant checkpointing refuses; the
    # parameters' own .grad is put back afterwards.
    kept = {k: p.grad for k, p in params.items()}
    try:
        for i in range(targets.shape[0]):
            _restore(model, buffers)
            for p in params.values():
                p.grad = None
            try:
                loss = loss_fn(model(*(x[i:i + 1] for x in xs)), targets[i:i + 1])
            except Exception:
                if i == 0:
                    raise refusal from None
                raise
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return a scalar (a mean-reduced loss)")
            loss.backward()
            for k, p in params.items():
                out[k][i] = 0.0 if p.grad is None else p.grad
            check_finite(loss.detach().reshape(1), {k: out[k][i:i + 1] for k in params},
                         offset=i)
            if i == 0:
                warnings.warn(f"vmap cannot transform {where} ({why}); per-sample gradients "
                              "come from one backward pass per sample: exact, slower",
                              LastResortWarning, stacklevel=3)
    finally:
        _restore(model, buffers)
        for k, p in params.items():
            p.grad = kept[k]
    return out, f"vmap cannot transform {where}: {why}"


def culprit(model: nn.Module, attempt: Callable[[], object], refusal: RuntimeError
            ) -> tuple[str, str]:
    """("module 'name' (Type)", reason): the innermost module running when vmap raised.

    ``attempt()`` runs again what vmap refused, on two samples, with forward hooks that keep
    the stack of the modules running (forward hooks do not disturb vmap); the module on top
    of it when the error escaped is the one vmap could not get through. An error outside
    every module's forward (in the backward pass): the model.
    """
    stack: list[str] = []

    def enter(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            stack.append(name)
        return hook

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        attempt()
        where = "the model"
    except Exception:  # noqa: BLE001 — the same refusal, now located
        where = f"module '{stack[-1]}' ({type(model.get_submodule(stack[-1])).__name__})" if (
            stack and stack[-1]) else "the model"
    finally:
        for handle in handles:
            handle.remove()
    reason = str(refusal).strip().splitlines()[0] if str(refusal).strip() else type(
        refusal).__name__
    return where, reason[:200]


def _restore(model: nn.Module, buffers: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])


def _output(trainable: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """Empty per-sample gradients: column blocks of one (n, d) matrix where dtypes allow."""
    params = list(trainable.values())
    if len({(p.dtype, p.device) for p in params}) > 1:
        return {k: p.new_empty((n, *p.shape)) for k, p in trainable.items()}
    flat = params[0].new_empty((n, sum(p.numel() for p in params)))
    out, offset = {}, 0
    for k, p in trainable.items():
        out[k] = flat[:, offset:offset + p.numel()].view(n, *p.shape)
        offset += p.numel()
    return out


def flatten_grads(grads: dict[str, Tensor]) -> Tensor:
    """Concatenate per-sample gradients into one (n, d) matrix, in the dict's order.

    When they are the column blocks of one (n, d) matrix in order (as
    :func:`per_sample_grads` returns them), that matrix itself is returned: no copy.
    """
    if not grads:
        raise ValueError("flatten_grads got an empty dict of gradients")
    sizes = {k: g.shape[0] for k, g in grads.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"per-sample gradients disagree on the number of samples: {sizes}")
    whole = _whole(list(grads.values()))
    if whole is not None:
        return whole
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def _whole(grads: list[Tensor]) -> Tensor | None:
    """The (n, d) matrix whose consecutive column blocks ``grads`` are, if they are."""
    base = grads[0]._base
    if base is None or base.dim() != 2 or not base.is_contiguous():
        return None
    offset = base.storage_offset()
    for g in grads:
        if (g._base is not base or g.storage_offset() != offset or g.shape[0] != base.shape[0]
                or (g.dim() > 1 and g.stride(0) != base.stride(0))
                or not g[0].is_contiguous()):
            return None
        offset += g[0].numel()
    return base if offset == base.storage_offset() + base.shape[1] else None


def check_finite(losses: Tensor, grads: dict[str, Tensor], *, offset: int = 0) -> None:
    """Raise a :class:`~sgn_lab.checks.NonFiniteError` (a ValueError) naming the first sample
    (and parameter) with a NaN or inf."""
    bad = ~torch.isfinite(losses)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise NonFiniteError(f"non-finite loss {losses[i].item()} for sample {offset + i}")
    for name, g in grads.items():
        rows = g.reshape(g.shape[0], -1)
        # A row's sum is finite when all its entries are (one read of G, no n×d mask); a
        # non-finite sum is then checked entry by entry, since finite values can overflow it.
        suspect = (~torch.isfinite(rows.sum(dim=1))).nonzero()[:, 0]
        if len(suspect):
            bad = suspect[~torch.isfinite(rows[suspect]).all(dim=1)]
            if len(bad):
                i = int(bad[0])
                raise NonFiniteError(
                    f"non-finite gradient for sample {offset + i} in parameter '{name}'"
                )


def refuse_max_norm(model: nn.Module) -> None:
    """A ValueError for an embedding with max_norm, which no per-sample route supports."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.max_norm is not None
                and module.weight.requires_grad):
            raise max_norm_error(name, module.max_norm)


def max_norm_error(name: str, max_norm: float) -> ValueError:
    return ValueError(
        f"the embedding '{name}' has max_norm={max_norm}: it renormalises its weight in place "
        "in every forward pass, so a sample's gradient depends on the samples run before it, "
        "and no per-sample route supports it; renormalise once (torch.embedding_renorm_) and "
        "set max_norm=None for the measurement")


def trainable_dim(model: nn.Module) -> int:
    """Number of scalar parameters with requires_grad: the d of the (n, d) gradient matrix."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` (any dimension, SyncBatchNorm included)."""
    batchnorm = nn.modules.batchnorm._BatchNorm
    return [(k, m) for k, m in model.named_modules() if isinstance(m, batchnorm)]


def batchnorm_to_groupnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """A copy of ``model`` with every BatchNorm layer replaced by GroupNorm.

    GroupNorm normalises within each sample, so per-sample gradients exist. A layer with C
    channels gets the largest number of groups that divides C, is at most ``num_groups`` and
    leaves at least two channels in each group (a group of one channel normalises a flat
    BatchNorm1d input to a constant); affine weights are copied with their dtype and device.
    This changes the model (its function and its training dynamics): it is an explicit
    choice, never applied silently. The input model is left untouched.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    new = copy.deepcopy(model)
    for name, bn in batchnorm_modules(new):
        channels = bn.num_features
        groups = max(
            g for g in range(1, min(num_groups, channels) + 1)
            if channels % g == 0 and (channels // g >= 2 or g == 1)
        )
        gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
        if bn.affine:
            gn.to(device=bn.weight.device, dtype=bn.weight.dtype)
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, gn)
    return new


@contextlib.contextmanager
def _batchnorm_policy(model: nn.Module, policy: str) -> Iterator[None]:
    if policy not in BATCHNORM_POLICIES:
        raise ValueError(f"unknown batchnorm policy {policy!r}; choose one of {BATCHNORM_POLICIES}")
    coupled = [(k, m) for k, m in batchnorm_modules(model) if m.training or m.running_mean is None]
    for k, m in coupled:
        if m.running_mean is None:
            raise ValueError(
                f"BatchNorm layer '{k}' keeps no running statistics (track_running_stats=False), "
                "so it always normalises with batch statistics, which couple the samples; "
                "replace it with sgn_lab.batchnorm_to_groupnorm(model)"
            )
        if policy == "error":
            raise ValueError(
                f"BatchNorm layer '{k}' is in train mode: its batch statistics couple the samples, "
                "so per-sample gradients do not exist. Choose batchnorm='eval' (use its running "
                "statistics), sgn_lab.batchnorm_to_groupnorm(model) (replace it by GroupNorm), "
                "or put it in eval mode yourself."
            )
    try:
        for _, m in coupled:
            m.eval()
        yield
    finally:
        for _, m in coupled:
            m.train()


def recurrence(model: nn.Module) -> contextlib.AbstractContextManager:
    """Recurrent layers written out step by step (vmap cannot batch torch's fused kernels)."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return Recurrence()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not xs or not all(isinstance(x, Tensor) for x in xs):
        raise TypeError("inputs must be a Tensor or a non-empty sequence of Tensors")
    return xs


def _num_samples(xs: tuple[Tensor, ...], targets: Tensor) -> int:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
    lengths = [x.shape[0] if x.dim() > 0 else None for x in xs]
    n = targets.shape[0] if targets.dim() > 0 else None
    if n is None or any(m != n for m in lengths):
        raise ValueError(
            f"inputs and targets must have the same number of samples along dim 0; got inputs "
            f"{[tuple(x.shape) for x in xs]} and targets {tuple(targets.shape)}"
        )
    if n == 0:
        raise ValueError("got 0 samples")
    return n

