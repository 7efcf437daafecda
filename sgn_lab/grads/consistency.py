"""Whether the per-sample routes compute what the model's batched forward computes.

Both per-sample routes run every sample as a batch of one (``vmap`` in
:func:`sgn_lab.per_sample_grads` and the Gram path, the last-resort loop): g_i is the
gradient of ℓ_i = ℓ(f(x_i), y_i) with the sample alone. That is the gradient of sample i's
share of the batch loss (1/n) Σ_i ℓ_i only when the forward pass treats samples
independently. A forward that mixes them — ``h - h.mean(0)``, batch statistics computed in
one's own functional code, in-batch negatives, a padding mask that changes the model — gives
per-sample gradients of batches of one, and nothing in them shows it.

:func:`check_independent` makes it visible at the cost of one training step on k samples:
k batch-of-one passes give ℓ_i and g_i, one batched pass of the same k samples gives each
sample's loss within the batch ℓ_i^B and the gradient of the batch loss ∇(1/k) Σ_i ℓ_i^B.
Independence means ℓ_i^B = ℓ_i for every i and ∇(1/k) Σ ℓ_i^B = ḡ = (1/k) Σ g_i, to the
rounding of the lowest precision the forward computes in. Each sample's loss within the
batch is ``loss_fn`` on that sample's slice of the batched outputs, when every output tensor
has the k samples first; otherwise the batch loss ``loss_fn(outputs, targets)`` is compared
with (1/k) Σ ℓ_i, which also needs ``loss_fn`` to be a mean over samples.

The first call of each public per-sample function on a model runs the check (``verify=None``,
the default); it is then remembered for that model as long as its structure (parameters,
modules, train/eval flag, the kinds of inputs and the loss) stays the same. The memory is a
weak reference: it never keeps a model alive.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sgn_lab.grads.common import LossFn, one_sample_loss, scalar_loss
from sgn_lab.grads.rng import rng_changed, rng_state
from sgn_lab.models.modes import restored_modes

SAMPLES = ("independent", "batch-of-one")
"""What a caller asks per-sample gradients to be: ``independent`` (of the batch's loss; a
forward that mixes samples is a :class:`SampleMixingError`) or ``batch-of-one`` (each
sample's gradient with the sample alone, knowingly; mixing is a :class:`SampleMixingWarning`)."""

CHECK_SAMPLES = 8
"""Samples of the consistency check (k); fewer when the call has fewer."""

# Relative error accepted between the batched and the batch-of-one passes, by the lowest
# precision the forward computes in.
_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
_RTOL_LOW = 3e-2  # bfloat16, float16

_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = weakref.WeakKeyDictionary()


class SampleMixingError(ValueError):
    """The forward pass mixes samples, so per-sample gradients are those of batches of one."""


class SampleMixingWarning(UserWarning):
    """As :class:`SampleMixingError`, where the caller asked for batch-of-one gradients."""


def checked(model: nn.Module, key: tuple) -> bool:
    """Whether the checks of ``key`` (:func:`structure`) already passed on ``model``."""
    return key in _CHECKED.get(model, ())


def remember(model: nn.Module, key: tuple) -> None:
    _CHECKED.setdefault(model, set()).add(key)


def structure(route: str, model: nn.Module, loss_fn: LossFn, xs: tuple[Tensor, ...],
              targets: Tensor) -> tuple:
    """What a first-call check depends on: the route, the parameters (names, shapes, dtypes,
    devices, which are trainable), the modules' types and train flags, the inputs' and
    targets' dtypes and ranks (not their sizes: padded batches vary in length), the loss."""
    return (
        route,
        tuple((name, tuple(p.shape), p.dtype, p.device, p.requires_grad)
              for name, p in model.named_parameters()),
        tuple((type(m).__qualname__, m.training) for m in model.modules()),
        tuple((x.dtype, x.dim()) for x in (*xs, targets)),
        getattr(loss_fn, "__module__", None),
        getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__),
    )


def check_samples_option(samples: str) -> str:
    if samples not in SAMPLES:
        raise ValueError(f"samples must be one of {', '.join(SAMPLES)}; got {samples!r}")
    return samples


def check_independent(model: nn.Module, loss_fn: LossFn, xs: tuple[Tensor, ...],
                      targets: Tensor, *, samples: str = "independent",
                      count: int = CHECK_SAMPLES) -> None:
    """Raise :class:`SampleMixingError` (warn, with ``samples="batch-of-one"``) when the
    batched forward of the first ``count`` samples disagrees with their batch-of-one passes.

    Parameters, their ``.grad``, buffers, train/eval flags and torch's random state are as
    before afterwards. A forward that draws random numbers (dropout) is checked in eval mode,
    where it draws none; one that still draws is reported as not checkable (a warning).
    """
    k = min(int(count), targets.shape[0])
    if k < 2:
        return
    xs, targets = tuple(x[:k] for x in xs), targets[:k]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with _untouched(model, params, targets.device):
        found = _compare(model, loss_fn, xs, targets, params)
        if found == "random":
            model.eval()
            found = _compare(model, loss_fn, xs, targets, params)
    if found == "random":
        warnings.warn("could not check that the forward pass treats samples independently: "
                      "it draws random numbers in eval mode too", SampleMixingWarning,
                      stacklevel=3)
        return
    if found is None:
        return
    text = (f"the forward pass mixes samples: {found}, so per-sample gradients are those of "
            "batches of one, not shares of the batch's gradient (h - h.mean(0), batch "
            "statistics, in-batch negatives?)")
    if samples == "batch-of-one":
        warnings.warn(text, SampleMixingWarning, stacklevel=3)
        return
    raise SampleMixingError(f"{text}; if batch-of-one gradients are what you want, pass "
                            "samples='batch-of-one'")


def _compare(model, loss_fn, xs, targets, params) -> str | None:
    """What differs between the batch-of-one and the batched passes (None: nothing), or
    ``"random"`` when the passes drew random numbers."""
    start = rng_state(targets.device)
    k = targets.shape[0]
    losses, grads = [], []
    for i in range(k):
        loss = one_sample_loss(loss_fn(model(*(x[i:i + 1] for x in xs)), targets[i:i + 1]))
        losses.append(loss.detach())
        grads.append(_flat_grad(loss, params))
    with _Precision() as precision:
        batched = model(*xs)
    within = _losses_within(batched, loss_fn, targets)
    if rng_changed(start, targets.device):
        return "random"
    alone = torch.stack(losses).double()
    mean_grad = torch.stack(grads).mean(dim=0)
    rtol = _RTOL.get(precision.lowest(params), _RTOL_LOW)
    loss_scale = float(alone.abs().max()) + torch.finfo(torch.float64).tiny
    if within is not None:
        values = within.detach().double()
        errors = (values - alone).abs() / loss_scale
        i = int(errors.argmax())
        if not float(errors[i]) <= rtol:
            return (f"sample {i}'s loss is {float(values[i]):.6g} in a batch of {k} and "
                    f"{float(alone[i]):.6g} alone")
        batch_loss = within.mean()
    else:
        batch_loss = scalar_loss(loss_fn(batched, targets))
        value = float(batch_loss.detach())
        if not abs(value - float(alone.mean())) / loss_scale <= rtol:
            return (f"the loss of a batch of {k} is {value:.6g}, the mean of their "
                    f"losses alone {float(alone.mean()):.6g} (or loss_fn is not a mean over "
                    "samples)")
    grad_scale = float(torch.stack(grads).norm(dim=1).mean()) + torch.finfo(torch.float64).tiny
    error = float((_flat_grad(batch_loss, params) - mean_grad).norm()) / grad_scale
    if not error <= rtol:
        return (f"the gradient of the loss of a batch of {k} differs from the mean of their "
                f"gradients alone by {error:.2g} relative")
    return None


def _losses_within(outputs: object, loss_fn: LossFn, targets: Tensor) -> Tensor | None:
    """Each sample's loss within the batch: ``loss_fn`` on its slice of every output tensor,
    when all of them have the k samples first; else None."""
    k = targets.shape[0]
    leaves, spec = _pytree.tree_flatten(outputs)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != k for t in tensors):
        return None
    losses = []
    for i in range(k):
        piece = [leaf[i:i + 1] if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        try:
            loss = loss_fn(_pytree.tree_unflatten(piece, spec), targets[i:i + 1])
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None  # the outputs' first axis is not the samples after all
        losses.append(one_sample_loss(loss))
    return torch.stack(losses)


def _flat_grad(loss: Tensor, params: dict[str, Tensor]) -> Tensor:
    """∇loss over the trainable parameters as one float64 vector (zeros where unused).

    ``backward`` rather than ``autograd.grad``, which reentrant checkpointing refuses; the
    caller keeps and restores the parameters' own ``.grad``.
    """
    for p in params.values():
        p.grad = None
    if loss.requires_grad:
        loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      .double() for p in params.values()])


class _Precision(TorchDispatchMode):
    """The lowest floating dtype any operation of a forward computes in.

    A float64 model may compute parts in float32 (Hugging Face's RMSNorm and rotary
    embeddings cast to float32 and back), and then two exact computations of the same
    gradient differ by float32's rounding, not float64's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.seen.add(t.dtype)
        return out

    def lowest(self, params: dict[str, Tensor]) -> torch.dtype:
        dtypes = self.seen | {p.dtype for p in params.values()}
        return min(dtypes, key=lambda t: torch.finfo(t).bits)


@contextlib.contextmanager
def _untouched(model: nn.Module, params: dict[str, Tensor], device: torch.device):
    """Parameters' ``.grad``, buffers, train flags and the random state put back."""
    kept = {name: p.grad for name, p in params.items()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [device] if device.type == "cuda" else []
    try:
        with restored_modes(model), torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
        for name, p in params.items():
            p.grad = kept[name]
