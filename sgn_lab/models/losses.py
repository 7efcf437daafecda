"""The losses of tasks: one mean over samples, so that a sample's share is the same on every path.

Every loss here is mean-reduced over the samples of a batch: the per-sample gradients of
:func:`sgn_lab.per_sample_grads` (each sample run as a batch of one), the Gram path and a
training step all see the same per-sample loss ℓ_i and the batch loss (1/n) Σ ℓ_i.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.nn import functional as F

LossFn = Callable[[Tensor, Tensor], Tensor]


def half_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """½ mean squared error, so that the SGN of linear regression has its textbook form.

    ``outputs`` (n, 1) or (n,) and ``targets`` (n,) give ``mean_i ½(f(x_i) - y_i)²``.
    """
    return 0.5 * (outputs.reshape(targets.shape) - targets).pow(2).mean()


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross entropy of sequences: one sample is one window of T tokens.

    ``logits`` (n, T, V) and ``targets`` (n, T) int64 give ``mean_i mean_t CE(logits_it,
    targets_it)``: each window's per-token losses averaged, then the windows averaged. All
    windows of a task have the same length T, so this is also the mean over all n·T tokens.
    """
    if logits.dim() != targets.dim() + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"token_cross_entropy takes logits (n, T, V) and targets (n, T); got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def loss_for(num_classes: int, *, sequence: bool = False) -> LossFn:
    """Cross entropy for classification (num_classes > 0), ½ MSE for regression, and the
    next-token cross entropy for sequence targets (``sequence=True``)."""
    if sequence:
        return token_cross_entropy
    return F.cross_entropy if num_classes > 0 else half_mse
