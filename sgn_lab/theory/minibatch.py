"""Minibatch gradient noise against the batch size, with and without replacement."""

from __future__ import annotations

from typing import Any

import numpy as np

from sgn_lab import checks
from sgn_lab.stats.noise import minibatch_factor


def minibatch_noise_covariance(
    S: Any,
    batch_size: int,
    *,
    dataset_size: int | None = None,
    replacement: bool = False,
) -> np.ndarray:
    """Covariance of the mean gradient of a minibatch of B samples: c·S.

    S is the unbiased per-sample gradient covariance of the N samples (divisor N−1). Sampling
    without replacement, Cov[g_B] = (1/B − 1/N)·S (the finite-population correction of survey
    sampling: the covariance of two distinct draws is −S/N). With replacement the B draws are
    i.i.d. from the empirical distribution, whose covariance is (N−1)/N·S, so
    Cov[g_B] = (1 − 1/N)·S/B. Without N (an infinite data set) both are S/B. The factor c is
    :func:`sgn_lab.stats.noise.minibatch_factor`, the single place it is defined. See McCandlish et
    al. 2018 (arXiv 1812.06162), Appendix A.

    Parameters
    ----------
    S
        (d, d) symmetric positive semi-definite per-sample covariance.
    batch_size, dataset_size, replacement
        B, N (None: infinite) and the sampling scheme.
    """
    S = checks.symmetric("S", S, psd=True)
    return minibatch_factor(batch_size, dataset_size=dataset_size, replacement=replacement) * S


def minibatch_noise_trace(
    trace: float,
    batch_size: int,
    *,
    dataset_size: int | None = None,
    replacement: bool = False,
) -> float:
    """tr Cov[g_B] = c·tr(S), the trace of :func:`minibatch_noise_covariance`."""
    trace = checks.number("trace", trace, 0, inclusive=True)
    return minibatch_factor(batch_size, dataset_size=dataset_size, replacement=replacement) * trace
