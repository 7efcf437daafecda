"""PNM on a quadratic: its noise factor, per-step noise, lag-1 correlation, stationary state."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sgn_lab import checks
from sgn_lab.optim.pnm import pnm_noise_factor
from sgn_lab.theory.inputs import (
    checked_curvature,
    checked_noise,
)
from sgn_lab.theory.stationary import (
    Stationary,
    modal_stationary,
)


def pnm_max_lr(H: Any, beta0: float = 1.0) -> float:
    """Largest stable lr of PNM on a quadratic: (η/√Γ)·λ_max(H) < 2/(1+2β0), for any β1.

    Per eigenvalue h, with k = η/√Γ and a = β1², the recursion on (θ, m_{t−1}, m_{t−2}) has
    characteristic polynomial (z − 1)(z² − a) + kh(1−a)((1+β0)z² − β0 z). At z = −1 it vanishes
    exactly when kh = 2/(1+2β0), independently of a: the real root leaves the unit circle
    through −1 there. Checked numerically (``tests/test_theory.py``): for β0 in [0, 3] and
    β1 in [0, 0.99] no complex pair crosses earlier, so the bound is exact.
    """
    H = checked_curvature(H)
    beta0 = checks.number("beta0", beta0, 0, inclusive=True)
    return 2.0 * math.sqrt(pnm_noise_factor(beta0)) / ((1.0 + 2.0 * beta0)
                                                       * float(np.linalg.eigvalsh(H)[-1]))


def pnm_update_noise_ratio(beta0: float, beta1: float, *, reference: str = "momentum") -> float:
    """Per-step update covariance of PNM relative to momentum (or SGD) at equal effective lr.

    Small-lr limit: θ frozen, white gradient noise of covariance C. Each PNM buffer
    m ← β1²m + (1−β1²)g sees every other gradient, so the two buffers hold disjoint sets of
    gradients and are exactly independent, each with covariance (1−β1²)²/(1−β1⁴)·C =
    (1−β1²)/(1+β1²)·C. The update η((1+β0)m_t − β0 m_{t−1})/√Γ therefore has covariance
    η²/Γ·Γ·(1−β1²)/(1+β1²)·C. EMA momentum m ← β1m + (1−β1)g, θ ← θ − η'm (equivalently
    torch heavy ball at lr η'(1−β1)) with the same drift, η' = η/√Γ, has update covariance
    η'²(1−β1)/(1+β1)·C. The ratio::

        momentum:  Γ·(1+β1)²/(1+β1²)      (≈ 2Γ = 9.97 at β0 = 1, β1 = 0.9)
        sgd:       Γ·(1−β1²)/(1+β1²)      (0.525 at β0 = 1, β1 = 0.9: smaller than SGD's)

    ``reference="sgd"`` compares with plain SGD at η' (update covariance η'²C). Xie et al.
    (ICML 2021, arXiv 2103.17182) state the Γ against one buffer; the extra (1+β1)²/(1+β1²) is
    the every-other-step averaging. Finite lr couples the buffers through θ and changes this
    by O(ηh).
    """
    gamma = pnm_noise_factor(checks.number("beta0", beta0, 0, inclusive=True))
    beta1 = checks.coefficient("beta1", beta1)
    reference = checks.choice("reference", reference, ("momentum", "sgd"))
    a = beta1**2
    if reference == "momentum":
        return gamma * (1.0 + beta1) ** 2 / (1.0 + a)
    return gamma * (1.0 - a) / (1.0 + a)


def pnm_lag1_autocorrelation(beta0: float, beta1: float) -> float:
    """Correlation of consecutive PNM updates, small-lr limit: −β0(1+β0)(1+β1²)/Γ (exact).

    With θ frozen and white noise, write u_t = (1+β0)m_t − β0m_{t−1}, m_t the buffer refreshed
    at step t. Buffers of opposite parity are independent (disjoint gradients) and
    Cov(m_{t+1}, m_{t−1}) = β1²·V (m_{t+1} = β1²m_{t−1} + fresh noise), V = Var m. So
    Cov(u_{t+1}, u_t) = −(1+β0)β0·β1²V − β0(1+β0)·V and Var u = ΓV, giving
    ρ₁ = −β0(1+β0)(1+β1²)/Γ: −0.724 at β0 = 1, β1 = 0.9; 0 at β0 = 0 (independent buffers,
    unlike EMA momentum, whose updates are positively correlated with ρ₁ = β1). The small-lr
    analysis writes "≈": the formula is exact in this limit; finite lr adds O(ηh) through θ (see
    :func:`pnm_stationary`'s ``update_lag1_correlation`` for the exact finite-lr value).
    """
    beta0 = checks.number("beta0", beta0, 0, inclusive=True)
    beta1 = checks.coefficient("beta1", beta1)
    return -beta0 * (1.0 + beta0) * (1.0 + beta1**2) / pnm_noise_factor(beta0)


def pnm_stationary(
    H: Any, C: Any, lr: float, *, beta0: float = 1.0, beta1: float = 0.9
) -> Stationary:
    """Exact stationary moments of PNM (:class:`sgn_lab.optim.PNM`) on a noisy quadratic.

    PNM at step t, with a = β1², k = η/√Γ, Γ = (1+β0)² + β0² (Xie et al., ICML 2021)::

        g_t = Hθ_t + ξ_t,  m_t = a·m_{t−2} + (1−a)·g_t  (the buffer of t's parity),
        θ_{t+1} = θ_t − k·((1+β0)·m_t − β0·m_{t−1}).

    The spec's route is the period-2 system on (θ, m_odd, m_even). Labelling the buffers by age
    instead, z_t = (θ_t, m_{t−1}, m_{t−2}), makes the map time-invariant (the refreshed buffer
    becomes "recent", the recent one "older"): z_{t+1} = A z_t + B ξ_t with::

        A = [[I − k(1+β0)(1−a)H,  kβ0 I,  −k(1+β0)a I],
             [(1−a)H,              0,      aI        ],
             [0,                   I,      0         ]],
        B = [[−k(1+β0)(1−a) I], [(1−a) I], [0]].

    θ's law does not depend on the buffers' names, so this is exact, and the stationary
    moments are the same at odd and even steps (the parity average is trivial). The covariance
    solves Σ = AΣAᵀ + BCBᵀ (mode by mode, :func:`modal_stationary`); updates and their lag-1
    covariance follow as in heavy ball.

    Stable iff (η/√Γ)·λ_max(H) < 2/(1+2β0) (:func:`pnm_max_lr`). For small ηh the parameter
    covariance is close to SGD's at η/√Γ (each gradient's total weight in θ is exactly
    η/√Γ), while the update covariance is :func:`pnm_update_noise_ratio` times momentum's and
    consecutive updates have correlation near :func:`pnm_lag1_autocorrelation`. In 1-D at
    β0 = 1, β1 = 0.9 and (η/√Γ)·h = 0.01 / 0.1: parameter variance 0.986 / 0.876 of SGD's at
    η/√Γ; update variance 10.1 / 11.4 times heavy ball's (β = 0.9) at equal effective lr;
    lag-1 correlation −0.730 / −0.779. The first step's zero buffers only matter transiently.

    Parameters
    ----------
    H, C
        As in :func:`heavy_ball_stationary` (C may be a state-dependent :data:`NoiseModel`).
    lr
        η > 0 (PNM's own lr; its drift is SGD's at η/√Γ).
    beta0, beta1
        β0 >= 0, β1 in [0, 1), as ``PNM(..., betas=(beta1, beta0))``.
    """
    H = checked_curvature(H)
    d = H.shape[0]
    C = checked_noise(C, d)
    eta = checks.number("lr", lr, 0)
    beta0 = checks.number("beta0", beta0, 0, inclusive=True)
    beta1 = checks.coefficient("beta1", beta1)
    k = eta / math.sqrt(pnm_noise_factor(beta0))
    a = beta1**2

    def modes(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Per eigenvalue h, the 3×3 version of A and B above on (θ̃, m̃_{t−1}, m̃_{t−2}).
        m = np.zeros((h.size, 3, 3))
        m[:, 0, 0] = 1 - k * (1 + beta0) * (1 - a) * h
        m[:, 0, 1] = k * beta0
        m[:, 0, 2] = -k * (1 + beta0) * a
        m[:, 1, 0] = (1 - a) * h
        m[:, 1, 2] = a
        m[:, 2, 1] = 1.0
        return m, np.tile([-k * (1 + beta0) * (1 - a), 1 - a, 0.0], (h.size, 1))

    bound = pnm_max_lr(H, beta0)
    return modal_stationary(
        H, modes, C, f"lr={lr!r}", f"lr < 2·sqrt(Γ)/((1+2·beta0)·λ_max(H)) = {bound:.6g}"
    )
