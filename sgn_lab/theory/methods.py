"""Noise injection, covariance noise and S-SGD on a quadratic."""

from __future__ import annotations

from typing import Any

import numpy as np

from sgn_lab import checks
from sgn_lab.stats.noise import minibatch_factor


def injected_noise_covariance(sigma: float, dim: int) -> np.ndarray:
    """σ²·I_d: the covariance :class:`~sgn_lab.optim.GaussianNoiseSGD` adds to the gradient noise.

    The injected σz, z ~ N(0, I), is independent of the minibatch noise, so covariances add:
    total = Cov[g_B] + σ²I (the "injected random noise" baseline of Xie et al. 2021).
    """
    sigma = checks.number("sigma", sigma, 0, inclusive=True)
    return sigma**2 * np.eye(checks.integer("dim", dim, 1))


def covariance_noise_target(
    S: Any,
    small_batch: int,
    large_batch: int,
    *,
    dataset_size: int | None = None,
    total: bool = False,
) -> np.ndarray:
    """Covariance of the noise that :class:`~sgn_lab.optim.CovarianceNoiseSGD` adds: c·S.

    c = 1/B_S − 1/B_L. Wen et al. (AISTATS 2020, arXiv 1902.08234): a large batch B_L has
    noise (1/B_L − 1/N)·S (without replacement from N; N = ∞: S/B_L); adding independent noise
    of covariance c·S gives the total (1/B_S − 1/N)·S, the noise of a batch of B_S. The
    injected part is the same for every N (the 1/N cancels), so ``dataset_size`` only enters
    ``total=True``, which returns that total. Given the B_L per-sample gradients, the
    optimizer's ξ has covariance c·Ŝ with Ŝ their unbiased sample covariance; E Ŝ = S for a
    sample drawn without replacement, so the total holds on average over batches.
    """
    S = checks.symmetric("S", S, psd=True)
    small = checks.integer("small_batch", small_batch, 1)
    large = checks.integer("large_batch", large_batch, 1)
    if small >= large:
        raise ValueError(
            f"small_batch must be smaller than large_batch={large_batch!r}, got {small_batch!r}"
        )
    if dataset_size is not None and checks.integer("dataset_size", dataset_size, 1) < large:
        raise ValueError(
            f"dataset_size must be >= large_batch={large_batch!r}, got {dataset_size!r}"
        )
    if total:
        return minibatch_factor(small, dataset_size=dataset_size) * S
    return (minibatch_factor(small) - minibatch_factor(large)) * S


def symmetric_noise_gradient_quadratic(H: Any, theta: Any, eps: Any) -> np.ndarray:
    """S-SGD's averaged gradient on the quadratic ½θᵀHθ: ½[H(θ+ε) + H(θ−ε)] = Hθ.

    The gradient is linear, so the ε terms cancel exactly: on a quadratic S-SGD (Sung et al.
    2020, arXiv 2009.02479) adds no first-order noise, whatever ε; on other losses the
    leftover is the even term ½∇³L[ε, ε] + O(|ε|⁴). Computed literally as the average (not as
    Hθ), for comparison with the optimizer. ``theta`` and ``eps``: (d,) or a batch (..., d).
    """
    H = checks.symmetric("H", H)
    theta = checks.array("theta", theta)
    eps = checks.array("eps", eps)
    d = H.shape[0]
    if theta.ndim == 0 or theta.shape[-1] != d:
        raise ValueError(f"theta's last axis must have size {d}, got shape {theta.shape}")
    if eps.shape != theta.shape:
        raise ValueError(f"eps must have theta's shape {theta.shape}, got {eps.shape}")
    return 0.5 * ((theta + eps) @ H + (theta - eps) @ H)
