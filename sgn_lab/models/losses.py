"""The losses of tasks: one mean over samples, so that a sample's share is the same on every path.

Every loss here is mean-reduced over the samples of a batch: the per-sample gradients of
:func:`sgn_lab.per_sample_grads` (each sample run as a batch of one), the Gram path and a
training step all see the same per-sample loss ℓ_i and the batch loss (1/n) Σ ℓ_i.

For token sequences the per-sample loss is the mean over that sample's *real* targets,

    ℓ_i = (1/|R_i|) Σ_{t ∈ R_i} CE(logits_it, y_it),   R_i = {t : y_it ≠ IGNORE_INDEX},

and the batch loss is (1/n) Σ_i ℓ_i, the mean of the per-sample losses. That is not the mean
over all real tokens of the batch, (Σ_i Σ_{t∈R_i} CE) / Σ_i |R_i|, which weights a sample by
its length: the two agree only when every sample has as many real targets (fixed windows).
The per-sample mean keeps ℓ_i a function of sample i alone, so the batch gradient is the mean
of the per-sample gradients that the SGN statistics are built from.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.nn import functional as F

LossFn = Callable[[Tensor, Tensor], Tensor]

IGNORE_INDEX = -100
"""A target that takes no part in the loss: padding, and the last real position of a padded
language sample (it has no next token). torch's ``cross_entropy`` default ``ignore_index``."""

LOSS_AVERAGE = ("mean over samples of per-sample losses; a token sequence's loss is the mean "
                "over its real (not IGNORE_INDEX) targets")
"""What the built-in losses average, in words: stored as ``loss_average`` in a task's ``info``
and in the callbacks' ``config.json``."""


def half_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """½ mean squared error, so that the SGN of linear regression has its textbook form.

    ``outputs`` (n, 1) or (n,) and ``targets`` (n,) give ``mean_i ½(f(x_i) - y_i)²``.
    """
    return 0.5 * (outputs.reshape(targets.shape) - targets).pow(2).mean()


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross entropy of sequences: the mean over samples of each sample's mean over
    its real targets.

    ``logits`` (n, T, V) and ``targets`` (n, T) int64 give (1/n) Σ_i ℓ_i with
    ℓ_i = mean over {t : targets_it ≠ IGNORE_INDEX} of CE(logits_it, targets_it) (module
    docstring). A sample without any real target has ℓ_i = 0 (no division by zero). Without
    ignored targets (fixed windows of T tokens) this is mean_i mean_t CE, which is also the
    mean over all n·T tokens, so unpadded tasks keep their loss up to rounding.

    The same arithmetic for every sample, without data-dependent Python branches, so it runs
    under ``torch.func.vmap`` (per-sample gradients, the Gram path).
    """
    if logits.dim() != targets.dim() + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"token_cross_entropy takes logits (n, T, V) and targets (n, T); got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")  # 0 where ignored
    per_token = per_token.reshape(targets.shape)
    real = (targets != IGNORE_INDEX).sum(dim=-1)
    per_sample = per_token.sum(dim=-1) / real.clamp(min=1).to(per_token.dtype)
    return per_sample.mean()


def loss_average(loss_fn: LossFn) -> str:
    """What ``loss_fn`` averages over a batch, in words: :data:`LOSS_AVERAGE` for the built-in
    losses (cross entropy, ½ MSE, :func:`token_cross_entropy`); for any other loss, that its
    own reduction decides (a sample's loss is then ``loss_fn`` on a batch of that one sample)."""
    if loss_fn in (token_cross_entropy, F.cross_entropy, half_mse):
        return LOSS_AVERAGE
    return ("the user's loss_fn and its own reduction over a batch; a sample's loss is loss_fn "
            "on a batch of one")


def loss_for(num_classes: int, *, sequence: bool = False) -> LossFn:
    """Cross entropy for classification (num_classes > 0), ½ MSE for regression, and the
    next-token cross entropy for sequence targets (``sequence=True``)."""
    if sequence:
        return token_cross_entropy
    return F.cross_entropy if num_classes > 0 else half_mse
