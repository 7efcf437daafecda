"""The SGN of Gaussian linear regression, Σ(w) = (σ² + δᵀHδ)H + HδδᵀH, and its average."""

from __future__ import annotations

from typing import Any

import numpy as np

from sgn_lab import checks
from sgn_lab.stats.noise import minibatch_factor
from sgn_lab.theory._inputs import (
    NoiseModel,
)


def linreg_gradient_covariance(H: Any, delta: Any, noise_std: float) -> np.ndarray:
    """Per-sample gradient covariance Σ(w) of Gaussian linear regression (exact).

    Model: x ~ N(0, H), y = xᵀw* + ε with ε ~ N(0, σ²) independent of x, loss ℓ = ½(xᵀw − y)²,
    δ = w − w*. The per-sample gradient is g = x(xᵀδ − ε), with mean E g = Hδ. Its second
    moment splits into E[x xᵀδ δᵀx xᵀ] + σ² E[x xᵀ]; Isserlis' theorem for the Gaussian fourth
    moment gives E[x xᵀ A x xᵀ] = tr(AH)·H + 2·HAH for symmetric A, so with A = δδᵀ::

        E[g gᵀ] = (δᵀHδ)·H + 2·HδδᵀH + σ²·H,
        Σ(w) = E[g gᵀ] − Hδ δᵀH = (σ² + δᵀHδ)·H + HδδᵀH = 2L(w)·H + ∇L ∇Lᵀ,

    with L(w) = ½(δᵀHδ + σ²). (Without the ½ in the loss, Σ is 4× larger.)

    Parameters
    ----------
    H
        (d, d) input covariance E[x xᵀ] (symmetric positive semi-definite).
    delta
        (d,) displacement w − w*.
    noise_std
        σ >= 0, the label-noise standard deviation.
    """
    H = checks.symmetric("H", H, psd=True)
    delta = checks.array("delta", delta)
    if delta.shape != (H.shape[0],):
        raise ValueError(f"delta must have shape ({H.shape[0]},), got {delta.shape}")
    sigma = checks.number("noise_std", noise_std, 0, inclusive=True)
    grad = H @ delta  # ∇L = Hδ
    return (sigma**2 + float(delta @ grad)) * H + np.outer(grad, grad)


def linreg_noise_model(H: Any, noise_std: float, batch_size: int) -> NoiseModel:
    """State-dependent minibatch noise of online linear regression, as a function of P = E[δδᵀ].

    Each step draws a fresh minibatch of B i.i.d. samples, so given the current δ the minibatch
    gradient noise has covariance Σ(δ)/B (:func:`linreg_gradient_covariance`; 1/B is
    :func:`~sgn_lab.stats.noise.minibatch_factor` with an infinite data set). Averaging Σ(δ)
    over the distribution of δ with second moment P = E[δδᵀ] (tr(H δδᵀ) = δᵀHδ, both terms linear)::

        C(P) = E[Σ(δ)]/B = ((σ² + tr(HP))·H + HPH) / B.

    (The first-draft spec had 2·HPH here: the 2 belongs to E[ggᵀ], before the mean's HδδᵀH is
    subtracted.) The noise is conditionally mean zero and its conditional covariance is linear
    in δδᵀ, so the second-moment recursion of a linear optimizer closes on P, with no Gaussian
    assumption on θ: pass the returned callable as ``C`` to :func:`sgd_stationary_covariance`,
    :func:`heavy_ball_stationary`, :func:`pnm_stationary` or
    :func:`small_lr_stationary_covariance`. At stationarity E δ = 0, so P is the covariance.

    Parameters
    ----------
    H
        (d, d) input covariance (= the Hessian of the population loss).
    noise_std
        σ >= 0, label-noise standard deviation.
    batch_size
        B, fresh samples per step.
    """
    H = checks.symmetric("H", H, psd=True)
    sigma2 = checks.number("noise_std", noise_std, 0, inclusive=True) ** 2
    factor = minibatch_factor(checks.integer("batch_size", batch_size, 1))
    d = H.shape[0]

    def noise_covariance(P: np.ndarray) -> np.ndarray:
        P = checks.symmetric("P", P, d)
        return factor * ((sigma2 + float(np.sum(H * P))) * H + H @ P @ H)

    return noise_covariance
