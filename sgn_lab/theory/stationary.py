"""The stationary covariance of SGD and heavy-ball momentum on a quadratic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgn_lab import checks
from sgn_lab.theory.inputs import (
    NoiseModel,
    checked_curvature,
    checked_noise,
    spectral_radius,
)


@dataclass(frozen=True, eq=False)
class Stationary:
    """Stationary second moments of an optimizer on a noisy quadratic (all d×d, float64).

    ``parameter_covariance``: Cov θ_t, the long-horizon fluctuation. ``update_covariance``:
    Cov Δθ_t with Δθ_t = θ_{t+1} − θ_t, the per-step update noise. ``update_lag1_covariance``:
    Cov(Δθ_{t+1}, Δθ_t), symmetrised. ``noise_covariance``: the gradient-noise covariance C at
    stationarity (C(P) for a state-dependent model). For PNM, whose buffers alternate, the
    moments are the same at odd and even steps (see :func:`pnm_stationary`), so no parity
    average is needed. Arrays are read-only.
    """

    parameter_covariance: np.ndarray
    update_covariance: np.ndarray
    update_lag1_covariance: np.ndarray
    noise_covariance: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("parameter_covariance", "update_covariance", "update_lag1_covariance",
                     "noise_covariance"):
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.array(value, dtype=np.float64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def parameter_trace(self) -> float:
        """tr Cov θ = E|θ − θ*|² at stationarity."""
        return float(np.trace(self.parameter_covariance))

    @property
    def update_trace(self) -> float:
        """tr Cov Δθ = E|Δθ|² at stationarity (the mean update is zero)."""
        return float(np.trace(self.update_covariance))

    @property
    def update_lag1_correlation(self) -> float:
        """tr Cov(Δθ_{t+1}, Δθ_t) / tr Cov Δθ: < 0 when consecutive updates partly cancel."""
        return float(np.trace(self.update_lag1_covariance)) / self.update_trace


def _from_upper(upper: np.ndarray, d: int) -> np.ndarray:
    """The symmetric d×d matrix whose upper triangle (row-major) is ``upper``."""
    P = np.zeros((d, d))
    P[np.triu_indices(d)] = upper
    return P + np.triu(P, 1).T


def _affine_fixed_point(
    solve: Callable[[np.ndarray], np.ndarray],
    model: NoiseModel,
    d: int,
    lr_text: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve P = solve(C(P)) for a noise model C affine in P; return (P, C(P)).

    ``solve`` is linear (noise covariance ↦ stationary θ-covariance). With P written in the
    basis E_ij = e_i e_jᵀ + e_j e_iᵀ (i < j), E_ii = e_i e_iᵀ, whose coordinates are the upper
    triangle of P, the fixed point is the linear system (I − M) p = t0, M's columns being
    solve(C(E_k) − C(0)). M maps PSD matrices to PSD matrices, so the second-moment recursion
    converges iff its spectral radius is < 1 (given a stable linear part): otherwise the
    state-dependent noise feeds itself and the second moment diverges. Cost: d(d+1)/2
    evaluations of C and of ``solve``, and one dense solve with d(d+1)/2 unknowns.
    """
    iu = np.triu_indices(d)
    C0 = checks.symmetric("C(0)", model(np.zeros((d, d))), d, psd=True)
    responses, columns = [], []
    for i, j in zip(*iu, strict=True):
        E = np.zeros((d, d))
        E[i, j] = E[j, i] = 1.0
        L = checks.symmetric("C(P)", model(E), d) - C0
        responses.append(L)
        columns.append(solve(L)[iu])
    # C must be affine in P: the basis responses have to predict C at a generic P.
    rng = np.random.default_rng(0)
    R = rng.standard_normal((d, d))
    R = R + R.T
    predicted = C0 + sum(R[i, j] * L for (i, j), L in zip(zip(*iu, strict=True), responses,
                                                           strict=True))
    actual = checks.symmetric("C(P)", model(R), d)
    if not np.allclose(actual, predicted, rtol=1e-8, atol=1e-12 * max(np.abs(actual).max(), 1)):
        raise ValueError("C must be affine in P = E[θθᵀ], got a noise model that is not")
    M = np.stack(columns, axis=1)
    # Stability without an eigen-decomposition of M (O(d⁶)): M is cone-preserving (a valid
    # model maps PSD P to PSD C, so its linear part does too), hence ρ(M) < 1 iff the fixed point
    # driven by a positive definite forcing, here solve(I), is itself positive definite
    # (Perron–Frobenius for cones: Mx <= x − t with t interior forces ρ(M) < 1; conversely
    # Σ_k M^k t >= t).
    forcing = np.stack([solve(C0)[iu], solve(np.eye(d))[iu]], axis=1)
    try:
        p, p_probe = np.linalg.solve(np.eye(M.shape[0]) - M, forcing).T
        stable = bool(np.linalg.eigvalsh(_from_upper(p_probe, d))[0] > 0)
    except np.linalg.LinAlgError:
        stable = False
    if not stable:
        gain = f" {spectral_radius(M):.6g}" if M.shape[0] <= 1500 else ""
        raise ValueError(
            f"{lr_text} is past the mean-square stability bound for this state-dependent noise "
            f"(the noise feeds back on the fluctuation with a gain{gain} >= 1: the second "
            "moment diverges)"
        )
    P = _from_upper(p, d)
    return P, model(P)


def _modal_kernels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-noise kernels (θ, update, lag-1) of a recursion that is diagonal in H's eigenbasis.

    Mode i (eigenvalue h_i of H, coordinate θ̃_i = v_iᵀθ) has an s-dimensional state z̃_i with
    z̃_i ← a_i z̃_i + b_i ξ̃_i, θ̃_i its first entry, and Cov(ξ̃_i, ξ̃_j) = C̃_ij (C̃ = VᵀCV).
    The cross-covariance block G_ij·C̃_ij = Cov(z̃_i, z̃_j) solves the s×s Stein equation
    G = a_i G a_jᵀ + b_i b_jᵀ, i.e. (I − a_i ⊗ a_j) vec G = vec(b_i b_jᵀ) (row-major vec).
    With d_i = a_i[0] − e_0 and f_i = b_i[0] (Δθ̃_i = d_i·z̃_i + f_i ξ̃_i), the returned (d, d)
    kernels K satisfy Cov(θ̃_i, θ̃_j) = C̃_ij K_θ, Cov(Δθ̃_i, Δθ̃_j) = C̃_ij K_Δ and
    Cov(Δθ̃_{t+1,i}, Δθ̃_{t,j}) = C̃_ij K_lag, with
    K_Δ = d_iᵀ G d_j + f_i f_j and K_lag = d_iᵀ a_i G d_j + (d_i·b_i) f_j
    (ξ_{t+1} is uncorrelated with everything at step t).
    """
    d, s, _ = a.shape
    dvec = a[:, 0, :].copy()
    dvec[:, 0] -= 1.0
    f = b[:, 0]
    k_theta, k_update, k_lag = (np.empty((d, d)) for _ in range(3))
    eye = np.eye(s * s)
    rows = max(1, 2**16 // (d * s**4))  # bound the (rows, d, s², s²) working array
    for start in range(0, d, rows):
        ai = a[start : start + rows]
        kron = np.einsum("imp,jnq->ijmnpq", ai, a).reshape(len(ai), d, s * s, s * s)
        rhs = np.einsum("im,jn->ijmn", b[start : start + rows], b).reshape(len(ai), d, s * s)
        G = np.linalg.solve(eye - kron, rhs[..., None])[..., 0].reshape(len(ai), d, s, s)
        di = dvec[start : start + rows]
        block = slice(start, start + rows)
        k_theta[block] = G[:, :, 0, 0]
        k_update[block] = np.einsum("im,ijmn,jn->ij", di, G, dvec) + np.outer(f[block], f)
        lead = np.einsum("im,imp->ip", di, ai)  # d_iᵀ a_i
        k_lag[block] = np.einsum("ip,ijpq,jq->ij", lead, G, dvec) + np.outer(
            np.einsum("im,im->i", di, b[block]), f
        )
    return k_theta, k_update, k_lag


def modal_stationary(
    H: np.ndarray,
    a_of_h: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    C: np.ndarray | NoiseModel,
    lr_text: str,
    bound_text: str,
) -> Stationary:
    """Exact stationary moments of a linear recursion whose matrices are polynomials in H.

    The stacked recursion z_{t+1} = A z_t + B ξ_t has Σ = Cov z solving the discrete Lyapunov
    equation Σ = AΣAᵀ + BCBᵀ (ξ_t is conditionally mean zero given z_t, so the cross terms
    vanish). Every block of A and B is a polynomial in H, so in H's eigenbasis H = V diag(h) Vᵀ
    the recursion splits into one small system per eigenvalue (``a_of_h(h)`` returns the
    (d, s, s) mode matrices and (d, s) noise inputs) and the Lyapunov equation into one s×s
    Stein equation per pair of modes (:func:`_modal_kernels`). This is the same solution as
    ``scipy.linalg.solve_discrete_lyapunov`` on the (s·d)-dimensional stacked state, at
    O(d²s⁶ + d³) cost, which keeps state-dependent noise (a fixed point over d(d+1)/2
    unknowns) affordable.
    """
    h, V = np.linalg.eigh(H)
    a, b = a_of_h(h)
    rho = float(np.abs(np.linalg.eigvals(a)).max())
    if rho >= 1.0:
        raise ValueError(
            f"{lr_text} is past the stability bound {bound_text} (spectral radius of the "
            f"recursion {rho:.6g} >= 1): no stationary distribution"
        )
    k_theta, k_update, k_lag = _modal_kernels(a, b)

    def through(kernel: np.ndarray, Cn: np.ndarray) -> np.ndarray:
        """V((VᵀCV) ∘ K)Vᵀ: from noise covariance to a second moment in θ's coordinates."""
        out = V @ ((V.T @ Cn @ V) * kernel) @ V.T
        return 0.5 * (out + out.T)

    d = H.shape[0]
    if callable(C):
        _, Cst = _affine_fixed_point(lambda Cn: through(k_theta, Cn), C, d, lr_text)
        Cst = checks.symmetric("C(P)", Cst, d, psd=True)
    else:
        Cst = C
    return Stationary(
        parameter_covariance=through(k_theta, Cst),
        update_covariance=through(k_update, Cst),
        update_lag1_covariance=through(k_lag, Cst),  # symmetrised by through()
        noise_covariance=Cst,
    )


def heavy_ball_max_lr(H: Any, momentum: float = 0.0) -> float:
    """Largest stable lr of heavy ball on a quadratic: η < 2(1+β)/λ_max(H) (SGD: 2/λ_max).

    Per eigenvalue h the recursion has characteristic polynomial z² − (1 + β − ηh)z + β, whose
    roots stay inside the unit circle iff |β| < 1 and 0 < ηh < 2(1+β) (Jury's criterion).
    """
    H = checked_curvature(H)
    beta = checks.coefficient("momentum", momentum)
    return 2.0 * (1.0 + beta) / float(np.linalg.eigvalsh(H)[-1])


def heavy_ball_stationary(H: Any, C: Any, lr: float, *, momentum: float = 0.0) -> Stationary:
    """Exact stationary moments of torch-SGD heavy ball on a noisy quadratic (β = 0: SGD).

    Recursion (``torch.optim.SGD``, no dampening; the first step's v = g is v_0 = 0)::

        g_t = Hθ_t + ξ_t,   v_{t+1} = β v_t + g_t,   θ_{t+1} = θ_t − η v_{t+1}.

    On the stacked state z = (θ, v) this is z_{t+1} = A z_t + B ξ_t with
    A = [[I − ηH, −ηβ I], [H, βI]], B = [[−ηI], [I]]; the stationary covariance solves the
    discrete Lyapunov equation Σ = AΣAᵀ + BCBᵀ (solved exactly mode by mode in H's
    eigenbasis, see :func:`modal_stationary`; the same as
    ``scipy.linalg.solve_discrete_lyapunov`` on the stacked state, which the tests check)
    and exists iff A's spectral radius is < 1, i.e. η·λ_max(H) < 2(1+β) (see
    :func:`heavy_ball_max_lr`). Exact at any lr; the small-lr limit is
    :func:`small_lr_stationary_covariance` with η_eff = η/(1−β). The 1-D case is
    :func:`sgd_stationary_variance_1d` (Liu, Ziyin & Ueda, ICML 2021, derived it in d dims for
    commuting H and C). Here Δθ_t = −ηv_{t+1}.

    Parameters
    ----------
    H
        (d, d) symmetric positive definite Hessian.
    C
        (d, d) gradient-noise covariance, or a :data:`NoiseModel` P ↦ C(P) affine in
        P = E[θθᵀ] (state-dependent noise, e.g. :func:`linreg_noise_model`), whose fixed point
        is then solved exactly.
    lr
        η > 0.
    momentum
        β in [0, 1).

    Raises
    ------
    ValueError
        Bad input, or lr past the stability bound (naming lr).
    """
    H = checked_curvature(H)
    d = H.shape[0]
    C = checked_noise(C, d)
    eta = checks.number("lr", lr, 0)
    beta = checks.coefficient("momentum", momentum)

    def modes(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Per eigenvalue h: (θ̃, ṽ) ← [[1 − ηh, −ηβ], [h, β]] (θ̃, ṽ) + [−η, 1] ξ̃.
        a = np.zeros((h.size, 2, 2))
        a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = 1 - eta * h, -eta * beta, h, beta
        return a, np.tile([-eta, 1.0], (h.size, 1))

    bound = heavy_ball_max_lr(H, beta)
    return modal_stationary(
        H, modes, C, f"lr={lr!r}", f"lr < 2(1+momentum)/λ_max(H) = {bound:.6g}"
    )


def sgd_stationary_covariance(H: Any, C: Any, lr: float, *, momentum: float = 0.0) -> np.ndarray:
    """Exact stationary covariance of θ for SGD / torch heavy ball on a noisy quadratic.

    The ``parameter_covariance`` of :func:`heavy_ball_stationary` (see there for the
    derivation: discrete Lyapunov equation of the recursion on (θ, v)). ``C`` may be a matrix
    or a state-dependent :data:`NoiseModel`. Raises ValueError naming lr when
    η·λ_max(H) >= 2(1+β).
    """
    return heavy_ball_stationary(H, C, lr, momentum=momentum).parameter_covariance.copy()


def small_lr_stationary_covariance(H: Any, C: Any, effective_lr: float) -> np.ndarray:
    """Small-learning-rate limit of the stationary covariance: HP + PH = η_eff·C.

    In the continuous-time (Ornstein–Uhlenbeck) approximation dθ = −η_eff Hθ dt + η_eff C^½ dW
    with one unit of time per step, the stationary covariance solves the continuous Lyapunov
    equation HP + PH = η_eff·C (Mandt, Hoffman & Blei 2017), solved in H's eigenbasis, where it
    reads P̃_ij = η_eff·C̃_ij/(h_i + h_j) (``scipy.linalg.solve_continuous_lyapunov`` gives the
    same). It is the leading order in η of
    the exact discrete one: for SGD in 1-D, ηc/(h(2 − ηh)) = ηc/(2h)·(1 + ηh/2 + O(η²)). For
    heavy ball use η_eff = η/(1−β); for PNM η_eff = η/√Γ. A :data:`NoiseModel` C(P) is solved
    at its fixed point HP + PH = η_eff·C(P).
    """
    H = checked_curvature(H)
    d = H.shape[0]
    C = checked_noise(C, d)
    eta = checks.number("effective_lr", effective_lr, 0)
    # In H's eigenbasis the equation is diagonal: P̃_ij = η·C̃_ij/(h_i + h_j).
    h, V = np.linalg.eigh(H)
    kernel = eta / (h[:, None] + h[None, :])

    def solve(Cn: np.ndarray) -> np.ndarray:
        P = V @ ((V.T @ Cn @ V) * kernel) @ V.T
        return 0.5 * (P + P.T)

    if callable(C):
        P, _ = _affine_fixed_point(solve, C, d, f"effective_lr={effective_lr!r}")
        return P
    return solve(C)


def sgd_stationary_variance_1d(h: float, c: float, lr: float, *, momentum: float = 0.0) -> float:
    """Exact stationary variance of SGD / heavy ball on ½hθ² with gradient-noise variance c.

    SGD: θ' = (1 − ηh)θ − ηξ gives v = (1 − ηh)²v + η²c, so v = ηc/(h(2 − ηh)).
    Heavy ball (θ, v) as in :func:`heavy_ball_stationary`: solving the 2×2 Lyapunov equation
    gives v = ηc(1+β)/((1−β)·h·(2(1+β) − ηh)) (Liu, Ziyin & Ueda, ICML 2021). Both tend to
    η_eff·c/(2h) as η → 0 and diverge at the stability bound ηh = 2(1+β).
    """
    h = checks.number("h", h, 0)
    c = checks.number("c", c, 0, inclusive=True)
    eta = checks.number("lr", lr, 0)
    beta = checks.coefficient("momentum", momentum)
    if eta * h >= 2.0 * (1.0 + beta):
        raise ValueError(
            f"lr={lr!r} is past the stability bound lr < 2(1+momentum)/h = "
            f"{2.0 * (1.0 + beta) / h:.6g}: no stationary distribution"
        )
    return eta * c * (1.0 + beta) / ((1.0 - beta) * h * (2.0 * (1.0 + beta) - eta * h))
