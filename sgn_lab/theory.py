"""Closed-form predictions for stochastic gradient noise (SGN) and the optimizers that shape it.

What it covers (formulas and sources: ``THEORY.md``):

- minibatch noise: Cov[g_B] = c·S with or without replacement (:func:`minibatch_noise_covariance`);
- Gaussian linear regression: the exact per-sample gradient covariance Σ(w) and the
  state-dependent minibatch noise it induces along an SGD trajectory
  (:func:`linreg_gradient_covariance`, :func:`linreg_noise_model`);
- stationary fluctuations on a quadratic ½θᵀHθ with gradient noise of covariance C: exact for
  SGD, heavy-ball momentum (torch SGD) and PNM, from the discrete Lyapunov equation of the
  linear recursion, plus the small-learning-rate (Ornstein–Uhlenbeck) limit and the 1-D closed
  forms (:func:`sgd_stationary_covariance`, :func:`heavy_ball_stationary`,
  :func:`pnm_stationary`, :func:`small_lr_stationary_covariance`,
  :func:`sgd_stationary_variance_1d`);
- PNM's per-step noise: the noise factor Γ, the update-noise ratio against momentum and the
  lag-1 correlation of consecutive updates (:func:`pnm_noise_factor`,
  :func:`pnm_update_noise_ratio`, :func:`pnm_lag1_autocorrelation`);
- noise injection: Gaussian, covariance noise (Wen et al. 2020) and S-SGD on a quadratic.

The key message. The PNM paper predicts (1+β0)²+β0² times more noise than momentum at equal
effective step. That holds per step; consecutive PNM updates are anti-correlated, so over many
steps on a quadratic the stationary fluctuation stays close to SGD's at the same effective
learning rate. :func:`pnm_stationary` gives both numbers exactly (per-step update covariance and
long-horizon parameter covariance), so a measurement can be compared with each.

Conventions: numpy float64 arrays in and out (torch tensors are accepted and converted);
the quadratic has its minimum at 0 and gradient g_t = Hθ_t + ξ_t, E[ξ_t | past] = 0,
Cov[ξ_t | past] = C. C may also be a callable P ↦ C(P), affine in the second moment
P = E[θθᵀ], for state-dependent noise (:func:`linreg_noise_model`): the second-moment recursion
then still closes and the stationary solvers solve its fixed point exactly. Invalid input
raises ValueError naming the offending value; so does a learning rate past the stability bound.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgn_lab.noise import minibatch_factor
from sgn_lab.optim.pnm import pnm_noise_factor

__all__ = [
    "NoiseModel",
    "Stationary",
    "covariance_noise_target",
    "heavy_ball_max_lr",
    "heavy_ball_stationary",
    "injected_noise_covariance",
    "linreg_gradient_covariance",
    "linreg_noise_model",
    "minibatch_noise_covariance",
    "minibatch_noise_trace",
    "pnm_lag1_autocorrelation",
    "pnm_max_lr",
    "pnm_noise_factor",
    "pnm_stationary",
    "pnm_update_noise_ratio",
    "sgd_stationary_covariance",
    "sgd_stationary_variance_1d",
    "small_lr_stationary_covariance",
    "symmetric_noise_gradient_quadratic",
]

NoiseModel = Callable[[np.ndarray], np.ndarray]
"""State-dependent gradient-noise covariance: P = E[θθᵀ] (d×d) ↦ C(P) (d×d), affine in P."""

_SYM_TOL = 1e-10  # relative asymmetry / negativity tolerated in symmetric (PSD) inputs


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _as_array(x: Any, name: str) -> np.ndarray:
    """float64 copy of an array-like or torch tensor (detached, on the CPU); must be finite."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid {name}: cannot convert {type(x).__name__} to an array") from err
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"invalid {name}: contains non-finite values")
    return arr


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"invalid {name}: {value!r} (must be a real number)")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"invalid {name}: {value!r} (must be finite)")
    return value


def _positive(value: Any, name: str) -> float:
    v = _scalar(value, name)
    if v <= 0:
        raise ValueError(f"invalid {name}: {value!r} (must be > 0)")
    return v


def _nonnegative(value: Any, name: str) -> float:
    v = _scalar(value, name)
    if v < 0:
        raise ValueError(f"invalid {name}: {value!r} (must be >= 0)")
    return v


def _unit_interval(value: Any, name: str) -> float:
    v = _scalar(value, name)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"invalid {name}: {value!r} (must lie in [0, 1))")
    return v


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"invalid {name}: {value!r} (must be a positive integer)")
    return int(value)


def _symmetric(M: Any, name: str, dim: int | None = None, *, psd: bool = False) -> np.ndarray:
    """A d×d symmetric (optionally positive semi-definite) float64 matrix, symmetrised exactly."""
    A = _as_array(M, name)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"invalid {name}: shape {A.shape} (must be a square matrix)")
    if dim is not None and A.shape[0] != dim:
        raise ValueError(f"invalid {name}: shape {A.shape} (must be ({dim}, {dim}))")
    scale = max(float(np.abs(A).max()), 1e-300)
    if np.abs(A - A.T).max() > _SYM_TOL * scale:
        raise ValueError(f"invalid {name}: not symmetric")
    A = 0.5 * (A + A.T)
    if psd and A.size:
        low = float(np.linalg.eigvalsh(A)[0])
        if low < -_SYM_TOL * scale * A.shape[0]:
            raise ValueError(
                f"invalid {name}: not positive semi-definite (smallest eigenvalue {low:.6g})"
            )
    return A


def _curvature(H: Any) -> np.ndarray:
    """H symmetric positive definite: a stationary distribution needs every direction curved."""
    H = _symmetric(H, "H")
    if H.shape[0] == 0:
        raise ValueError("invalid H: empty matrix")
    low = float(np.linalg.eigvalsh(H)[0])
    if low <= 0:
        raise ValueError(
            f"invalid H: not positive definite (smallest eigenvalue {low:.6g}); along flat or "
            "negative directions the fluctuation has no stationary distribution"
        )
    return H


def _noise(C: Any, dim: int) -> np.ndarray | NoiseModel:
    """A fixed noise covariance (checked now) or a state-dependent model (checked when solved)."""
    if callable(C) and not hasattr(C, "shape"):
        return C
    return _symmetric(C, "C", dim, psd=True)


def _spectral_radius(A: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(A)).max()) if A.size else 0.0


# --------------------------------------------------------------------------------------------
# minibatch noise
# --------------------------------------------------------------------------------------------


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
    :func:`sgn_lab.noise.minibatch_factor`, the single place it is defined. See McCandlish et
    al. 2018 (arXiv 1812.06162) and ``THEORY.md``, "Minibatch noise".

    Parameters
    ----------
    S
        (d, d) symmetric positive semi-definite per-sample covariance.
    batch_size, dataset_size, replacement
        B, N (None: infinite) and the sampling scheme.
    """
    S = _symmetric(S, "S", psd=True)
    return minibatch_factor(batch_size, dataset_size=dataset_size, replacement=replacement) * S


def minibatch_noise_trace(
    trace: float,
    batch_size: int,
    *,
    dataset_size: int | None = None,
    replacement: bool = False,
) -> float:
    """tr Cov[g_B] = c·tr(S), the trace of :func:`minibatch_noise_covariance`."""
    trace = _nonnegative(trace, "trace")
    return minibatch_factor(batch_size, dataset_size=dataset_size, replacement=replacement) * trace


# --------------------------------------------------------------------------------------------
# Gaussian linear regression
# --------------------------------------------------------------------------------------------


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
    H = _symmetric(H, "H", psd=True)
    delta = _as_array(delta, "delta")
    if delta.shape != (H.shape[0],):
        raise ValueError(f"invalid delta: shape {delta.shape} (must be ({H.shape[0]},))")
    sigma = _nonnegative(noise_std, "noise_std")
    grad = H @ delta  # ∇L = Hδ
    return (sigma**2 + float(delta @ grad)) * H + np.outer(grad, grad)


def linreg_noise_model(H: Any, noise_std: float, batch_size: int) -> NoiseModel:
    """State-dependent minibatch noise of online linear regression, as a function of P = E[δδᵀ].

    Each step draws a fresh minibatch of B i.i.d. samples, so given the current δ the minibatch
    gradient noise has covariance Σ(δ)/B (:func:`linreg_gradient_covariance`; 1/B is
    :func:`~sgn_lab.noise.minibatch_factor` with an infinite data set). Averaging Σ(δ) over the
    distribution of δ with second moment P = E[δδᵀ] (tr(H δδᵀ) = δᵀHδ, both terms linear)::

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
    H = _symmetric(H, "H", psd=True)
    sigma2 = _nonnegative(noise_std, "noise_std") ** 2
    factor = minibatch_factor(_positive_int(batch_size, "batch_size"))
    d = H.shape[0]

    def noise_covariance(P: np.ndarray) -> np.ndarray:
        P = _symmetric(P, "P", d)
        return factor * ((sigma2 + float(np.sum(H * P))) * H + H @ P @ H)

    return noise_covariance


# --------------------------------------------------------------------------------------------
# stationary fluctuations on a quadratic
# --------------------------------------------------------------------------------------------


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
    C0 = _symmetric(model(np.zeros((d, d))), "C(0)", d, psd=True)
    responses, columns = [], []
    for i, j in zip(*iu, strict=True):
        E = np.zeros((d, d))
        E[i, j] = E[j, i] = 1.0
        L = _symmetric(model(E), "C(P)", d) - C0
        responses.append(L)
        columns.append(solve(L)[iu])
    # C must be affine in P: the basis responses have to predict C at a generic P.
    rng = np.random.default_rng(0)
    R = rng.standard_normal((d, d))
    R = R + R.T
    predicted = C0 + sum(R[i, j] * L for (i, j), L in zip(zip(*iu, strict=True), responses,
                                                           strict=True))
    actual = _symmetric(model(R), "C(P)", d)
    if not np.allclose(actual, predicted, rtol=1e-8, atol=1e-12 * max(np.abs(actual).max(), 1)):
        raise ValueError("invalid C: a noise model must be affine in P = E[θθᵀ]")
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
        gain = f" {_spectral_radius(M):.6g}" if M.shape[0] <= 1500 else ""
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


def _modal_stationary(
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
        Cst = _symmetric(Cst, "C(P)", d, psd=True)
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
    H = _curvature(H)
    beta = _unit_interval(momentum, "momentum")
    return 2.0 * (1.0 + beta) / float(np.linalg.eigvalsh(H)[-1])


def pnm_max_lr(H: Any, beta0: float = 1.0) -> float:
    """Largest stable lr of PNM on a quadratic: (η/√Γ)·λ_max(H) < 2/(1+2β0), for any β1.

    Per eigenvalue h, with k = η/√Γ and a = β1², the recursion on (θ, m_{t−1}, m_{t−2}) has
    characteristic polynomial (z − 1)(z² − a) + kh(1−a)((1+β0)z² − β0 z). At z = −1 it vanishes
    exactly when kh = 2/(1+2β0), independently of a: the real root leaves the unit circle
    through −1 there. Checked numerically (``tests/test_theory.py``): for β0 in [0, 3] and
    β1 in [0, 0.99] no complex pair crosses earlier, so the bound is exact.
    """
    H = _curvature(H)
    beta0 = _nonnegative(beta0, "beta0")
    return 2.0 * math.sqrt(pnm_noise_factor(beta0)) / ((1.0 + 2.0 * beta0)
                                                       * float(np.linalg.eigvalsh(H)[-1]))


def heavy_ball_stationary(H: Any, C: Any, lr: float, *, momentum: float = 0.0) -> Stationary:
    """Exact stationary moments of torch-SGD heavy ball on a noisy quadratic (β = 0: SGD).

    Recursion (``torch.optim.SGD``, no dampening; the first step's v = g is v_0 = 0)::

        g_t = Hθ_t + ξ_t,   v_{t+1} = β v_t + g_t,   θ_{t+1} = θ_t − η v_{t+1}.

    On the stacked state z = (θ, v) this is z_{t+1} = A z_t + B ξ_t with
    A = [[I − ηH, −ηβ I], [H, βI]], B = [[−ηI], [I]]; the stationary covariance solves the
    discrete Lyapunov equation Σ = AΣAᵀ + BCBᵀ (solved exactly mode by mode in H's
    eigenbasis, see :func:`_modal_stationary`; the same as
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
    H = _curvature(H)
    d = H.shape[0]
    C = _noise(C, d)
    eta = _positive(lr, "lr")
    beta = _unit_interval(momentum, "momentum")

    def modes(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Per eigenvalue h: (θ̃, ṽ) ← [[1 − ηh, −ηβ], [h, β]] (θ̃, ṽ) + [−η, 1] ξ̃.
        a = np.zeros((h.size, 2, 2))
        a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = 1 - eta * h, -eta * beta, h, beta
        return a, np.tile([-eta, 1.0], (h.size, 1))

    bound = heavy_ball_max_lr(H, beta)
    return _modal_stationary(
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
    H = _curvature(H)
    d = H.shape[0]
    C = _noise(C, d)
    eta = _positive(effective_lr, "effective_lr")
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
    h = _positive(h, "h")
    c = _nonnegative(c, "c")
    eta = _positive(lr, "lr")
    beta = _unit_interval(momentum, "momentum")
    if eta * h >= 2.0 * (1.0 + beta):
        raise ValueError(
            f"lr={lr!r} is past the stability bound lr < 2(1+momentum)/h = "
            f"{2.0 * (1.0 + beta) / h:.6g}: no stationary distribution"
        )
    return eta * c * (1.0 + beta) / ((1.0 - beta) * h * (2.0 * (1.0 + beta) - eta * h))


# --------------------------------------------------------------------------------------------
# PNM
# --------------------------------------------------------------------------------------------


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
    gamma = pnm_noise_factor(_nonnegative(beta0, "beta0"))
    beta1 = _unit_interval(beta1, "beta1")
    a = beta1**2
    if reference == "momentum":
        return gamma * (1.0 + beta1) ** 2 / (1.0 + a)
    if reference == "sgd":
        return gamma * (1.0 - a) / (1.0 + a)
    raise ValueError(f"invalid reference: {reference!r} (choose one of momentum, sgd)")


def pnm_lag1_autocorrelation(beta0: float, beta1: float) -> float:
    """Correlation of consecutive PNM updates, small-lr limit: −β0(1+β0)(1+β1²)/Γ (exact).

    With θ frozen and white noise, write u_t = (1+β0)m_t − β0m_{t−1}, m_t the buffer refreshed
    at step t. Buffers of opposite parity are independent (disjoint gradients) and
    Cov(m_{t+1}, m_{t−1}) = β1²·V (m_{t+1} = β1²m_{t−1} + fresh noise), V = Var m. So
    Cov(u_{t+1}, u_t) = −(1+β0)β0·β1²V − β0(1+β0)·V and Var u = ΓV, giving
    ρ₁ = −β0(1+β0)(1+β1²)/Γ: −0.724 at β0 = 1, β1 = 0.9; 0 at β0 = 0 (independent buffers,
    unlike EMA momentum, whose updates are positively correlated with ρ₁ = β1). ``THEORY.md``
    writes "≈": the formula is exact in this limit; finite lr adds O(ηh) through θ (see
    :func:`pnm_stationary`'s ``update_lag1_correlation`` for the exact finite-lr value).
    """
    beta0 = _nonnegative(beta0, "beta0")
    beta1 = _unit_interval(beta1, "beta1")
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
    solves Σ = AΣAᵀ + BCBᵀ (mode by mode, :func:`_modal_stationary`); updates and their lag-1
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
    H = _curvature(H)
    d = H.shape[0]
    C = _noise(C, d)
    eta = _positive(lr, "lr")
    beta0 = _nonnegative(beta0, "beta0")
    beta1 = _unit_interval(beta1, "beta1")
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
    return _modal_stationary(
        H, modes, C, f"lr={lr!r}", f"lr < 2·sqrt(Γ)/((1+2·beta0)·λ_max(H)) = {bound:.6g}"
    )


# --------------------------------------------------------------------------------------------
# noise injection
# --------------------------------------------------------------------------------------------


def injected_noise_covariance(sigma: float, dim: int) -> np.ndarray:
    """σ²·I_d: the covariance :class:`~sgn_lab.optim.GaussianNoiseSGD` adds to the gradient noise.

    The injected σz, z ~ N(0, I), is independent of the minibatch noise, so covariances add:
    total = Cov[g_B] + σ²I (the "injected random noise" baseline of Xie et al. 2021).
    """
    sigma = _nonnegative(sigma, "sigma")
    return sigma**2 * np.eye(_positive_int(dim, "dim"))


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
    S = _symmetric(S, "S", psd=True)
    small = _positive_int(small_batch, "small_batch")
    large = _positive_int(large_batch, "large_batch")
    if small >= large:
        raise ValueError(
            f"invalid small_batch: {small_batch!r} (must be smaller than large_batch="
            f"{large_batch!r})"
        )
    if dataset_size is not None and _positive_int(dataset_size, "dataset_size") < large:
        raise ValueError(
            f"invalid dataset_size: {dataset_size!r} (must be >= large_batch={large_batch!r})"
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
    H = _symmetric(H, "H")
    theta = _as_array(theta, "theta")
    eps = _as_array(eps, "eps")
    d = H.shape[0]
    if theta.ndim == 0 or theta.shape[-1] != d:
        raise ValueError(f"invalid theta: shape {theta.shape} (last axis must be {d})")
    if eps.shape != theta.shape:
        raise ValueError(f"invalid eps: shape {eps.shape} (must match theta's {theta.shape})")
    return 0.5 * ((theta + eps) @ H + (theta - eps) @ H)
