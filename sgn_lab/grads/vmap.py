"""Per-sample gradients through ``torch.func``: the reference route.

For a model with parameters θ, a data set of n samples and the usual mean-reduced loss, the
per-sample gradient of sample i is ``g_i = ∇θ ℓ(f(x_i), y_i)``. They are computed by vectorising
``grad`` of a single-sample loss over the batch with ``vmap``; ``functional_call`` runs the
model with the parameters as explicit inputs, in chunks of samples when the (n, d) result is
large. Recurrent layers run step by step (:mod:`sgn_lab.grads.rules.recurrent`), since vmap
cannot batch torch's fused kernels. Where vmap refuses a model altogether,
:func:`last_resort` takes one ordinary backward pass per sample and :func:`culprit` names the
module vmap could not get through (found with forward hooks, which do not disturb vmap).

The Gram path (:mod:`sgn_lab.grads.gram`) checks itself against this route (``verify=``) and
takes it for parameters with a use its recording pass could not see. What both routes share
(input checks, BatchNorm policy, seeding, the (n, d) layout) lives in
:mod:`sgn_lab.grads.common`.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from sgn_lab.grads.common import (
    Inputs,
    LossFn,
    as_tuple,
    batchnorm_policy,
    check_finite,
    num_samples,
    one_sample_loss,
    refuse_max_norm,
    seeded,
)
from sgn_lab.grads.consistency import (
    CHECK_SAMPLES,
    check_independent,
    check_samples_option,
    checked,
    remember,
    structure,
)
from sgn_lab.grads.hf_masks import traceable_masks
from sgn_lab.grads.rules.recurrent import Recurrence
from sgn_lab.models.wrapped import measured

# chunk_size=None: all samples at once while G fits in _WHOLE_BYTES; beyond, chunks whose
# gradients fit in _CHUNK_BYTES (small allocations reuse their pages, while every fresh n × d
# one page-faults its whole size), of at least _MIN_CHUNK samples.
_WHOLE_BYTES = 256 * 2**20
_CHUNK_BYTES = 32 * 2**20
_MIN_CHUNK = 8


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
    xs = as_tuple(inputs)
    n = num_samples(xs, targets)
    check_samples_option(samples)
    if verify is not None and (isinstance(verify, bool) or not isinstance(verify, int)
                               or verify < 0):
        raise ValueError(f"verify must be an integer >= 0 or None, got {verify!r}")
    if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
            or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    with measured(model) as module:
        return _grads(module, loss_fn, xs, targets, n, chunk_size, batchnorm, seed, verify,
                      samples)


def _grads(model, loss_fn, xs, targets, n, chunk_size, batchnorm, seed, verify, samples):
    """:func:`per_sample_grads` on the module to measure, its options checked."""
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
        return one_sample_loss(loss_fn(outputs, target.unsqueeze(0)))

    in_dims = (None,) + (0,) * (len(xs) + 1)
    compute = vmap(grad_and_value(sample_loss), in_dims=in_dims, randomness="different")
    key = (*structure("grads", model, loss_fn, xs, targets), samples)
    if verify is None:
        verify = 0 if checked(model, key) else CHECK_SAMPLES
    with batchnorm_policy(model, batchnorm):
        grads = _computed(model, loss_fn, xs, targets, trainable, compute, chunk_size, seed,
                          device)
        if verify:
            check_independent(model, loss_fn, xs, targets, samples=samples, count=verify)
            remember(model, key)
    return grads


def _computed(model, loss_fn, xs, targets, trainable, compute, chunk_size, seed, device):
    """The per-sample gradients: vmap in chunks, or the last resort where vmap refuses."""
    n = targets.shape[0]
    with seeded(seed, device):
        try:
            with recurrence(model), traceable_masks(), kept_tensors(model):
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


@contextlib.contextmanager
def kept_tensors(model: nn.Module) -> Iterator[None]:
    """Every module's own parameter and buffer objects as they were, afterwards.

    ``functional_call`` swaps them in and out by path; a module registered under two paths
    (``nn.Sequential(a, b, a)``) is swapped twice, and torch 2.13 then restores the swapped-in
    tensor as the module's "original": plain tensors where Parameters were.
    """
    tables = [t for m in model.modules() for t in (m._parameters, m._buffers)
              if isinstance(t, dict)]  # a ScriptModule's tables are not (and are not swapped)
    kept = [(table, dict(table)) for table in tables]
    try:
        yield
    finally:
        for table, values in kept:
            table.update(values)


def recurrence(model: nn.Module) -> contextlib.AbstractContextManager:
    """Recurrent layers written out step by step (vmap cannot batch torch's fused kernels)."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return Recurrence()
    return contextlib.nullcontext()


