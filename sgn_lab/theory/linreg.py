"""The SGN of Gaussian linear regression, Σ(w) = (σ² + δᵀHδ)H + HδδᵀH, and its average; its
noise scales B_noise and B_simple, and the exact expected-loss curve of online SGD."""

from __future__ import annotations

from typing import Any

import numpy as np

from sgn_lab import checks
from sgn_lab.stats.noise import minibatch_factor
from sgn_lab.theory.inputs import (
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


def linreg_noise_scales(H: Any, delta: Any, noise_std: float) -> tuple[float, float]:
    """McCandlish et al.'s noise scales of Gaussian linear regression at w = w* + δ (exact).

    With G = ∇L = Hδ and Σ(w) = 2L·H + GGᵀ (:func:`linreg_gradient_covariance`),
    L = ½(δᵀHδ + σ²)::

        B_noise  = tr(HΣ)/(GᵀHG) = 2L·tr(H²)/(GᵀHG) + 1,
        B_simple = tr Σ/|G|²     = 2L·tr H/|G|² + 1.

    B_noise is the batch size at which the optimal SGD step makes half the progress of the
    full-batch step (arXiv 1812.06162, eq. 2.8); B_simple is its estimate that ignores the
    curvature (equal when H ∝ I). Returns (B_noise, B_simple); infinite at the minimum with
    σ > 0 (G = 0), NaN at G = 0 with σ = 0.
    """
    H = checks.symmetric("H", H, psd=True)
    delta = checks.array("delta", delta)
    if delta.shape != (H.shape[0],):
        raise ValueError(f"delta must have shape ({H.shape[0]},), got {delta.shape}")
    sigma = checks.number("noise_std", noise_std, 0, inclusive=True)
    grad = H @ delta
    two_loss = float(delta @ grad) + sigma**2
    curved, squared = float(grad @ H @ grad), float(grad @ grad)
    with np.errstate(divide="ignore", invalid="ignore"):
        b_noise = np.float64(two_loss * float(np.sum(H * H))) / curved + 1.0
        b_simple = np.float64(two_loss * float(np.trace(H))) / squared + 1.0
    return float(b_noise), float(b_simple)


def linreg_steps_to_loss(
    H: Any,
    delta: Any,
    noise_std: float,
    lr: Any,
    batch_size: int,
    target: float,
    *,
    max_steps: int,
) -> np.ndarray:
    """Steps until the *expected* loss of online SGD falls to ``target`` (exact recursion).

    Plain SGD θ ← θ − η·g_B from w = w* + δ, each step on a fresh minibatch of B samples of
    Gaussian linear regression. The second moment P_t = E[δ_t δ_tᵀ] obeys exactly
    (:func:`linreg_noise_model`)::

        P_{t+1} = (I − ηH) P_t (I − ηH) + (η²/B)·((σ² + tr(HP_t))·H + HP_tH),

    and E L_t = ½(tr(HP_t) + σ²). In the eigenbasis of H only the diagonal p of P enters the
    loss and its recursion is closed, p' = (1 − ηλ)²p + (η²/B)((σ² + λ·p)λ + λ²p), O(d) per
    step. Returns, per lr (``lr`` a number or an array), the first t >= 1 with E L_t <= target,
    ``inf`` if that does not happen within ``max_steps`` (too small a step, a divergent one, or
    a target below the noise floor of this lr and batch).
    """
    H = checks.symmetric("H", H, psd=True)
    delta = checks.array("delta", delta)
    if delta.shape != (H.shape[0],):
        raise ValueError(f"delta must have shape ({H.shape[0]},), got {delta.shape}")
    sigma2 = checks.number("noise_std", noise_std, 0, inclusive=True) ** 2
    batch = checks.integer("batch_size", batch_size, 1)
    target = checks.number("target", target)
    max_steps = checks.integer("max_steps", max_steps, 1)
    rates = np.atleast_1d(np.asarray(lr, dtype=np.float64))
    for value in rates:
        checks.number("lr", float(value), 0)
    lam, vectors = np.linalg.eigh(H)
    p = np.tile((vectors.T @ delta) ** 2, (rates.size, 1))  # (lrs, d)
    eta = rates[:, None]
    steps = np.full(rates.size, np.inf)
    start = 0.5 * (float(p[0] @ lam) + sigma2)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, max_steps + 1):
            driven = sigma2 + p @ lam  # σ² + tr(HP), (lrs,)
            p = (1 - eta * lam) ** 2 * p + eta**2 / batch * (driven[:, None] * lam + lam**2 * p)
            loss = 0.5 * (p @ lam + sigma2)
            steps[np.isinf(steps) & (loss <= target)] = t
            alive = np.isinf(steps) & np.isfinite(loss) & (loss < 1e6 * max(start, 1e-300))
            if not alive.any():
                break
    return steps
