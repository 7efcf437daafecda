"""Tests for ``sgn_lab.theory``: every closed form against a Monte-Carlo simulation.

Each prediction is checked against the recursion or the data it describes, simulated here (or
driven through the optimizer in ``sgn_lab.optim``), never against itself or another closed
form; the only theory-against-theory checks are limits (small lr, the stability edge, the 1-D
case of the d-dimensional solver), labelled as such.

Statistics. Simulations advance R independent chains together as an (R, d) array; each chain's
time average after a burn-in is one independent sample, so the standard error (SE) comes from
the spread over chains, whatever the autocorrelation inside a chain. A prediction passes when
it lies within Z_MAX = 5 SE of the estimate, entry by entry; several tests also check that a
wrong prediction (the small-lr formula, a constant-noise model, the other sampling scheme) is
rejected by the same data, so that the tolerance is known to be tight enough to matter.
Seeds are fixed. Burn-ins are chosen from the spectral radius of each recursion (transients
below 1e-10 of the stationary level).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import scipy.linalg
import torch

from sgn_lab import theory
from sgn_lab.optim import PNM, CovarianceNoiseSGD, GaussianNoiseSGD, SymmetricNoiseSGD
from sgn_lab.optim.pnm import pnm_noise_factor

Z_MAX = 5.0
DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def rotated(eigenvalues: list[float], seed: int) -> np.ndarray:
    """Q diag(λ) Qᵀ with a seeded random rotation Q: a non-diagonal SPD matrix."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues),) * 2))
    return q @ np.diag(eigenvalues) @ q.T


H3 = rotated([0.5, 1.0, 2.0], seed=0)
C3 = rotated([0.3, 1.0, 2.5], seed=1)


# --------------------------------------------------------------------------------------------
# statistics helpers
# --------------------------------------------------------------------------------------------


def mean_se(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 of independent samples and its standard error."""
    n = samples.shape[0]
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / math.sqrt(n)


def ratio_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Ratio of means ā/b̄ of paired per-chain samples, SE by the delta method."""
    r = a.mean() / b.mean()
    return float(r), float((a - r * b).std(ddof=1) / (math.sqrt(a.size) * abs(b.mean())))


def independent_ratio_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Ratio of means of two independent samples, SE by the delta method."""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    r = float(ma / mb)
    return r, abs(r) * math.sqrt(float((sa / ma) ** 2 + (sb / mb) ** 2))


def z_scores(estimate: np.ndarray, se: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    se = np.asarray(se, dtype=np.float64)
    assert np.all(se > 0), "a standard error is zero: the simulation has no spread"
    return np.abs(np.asarray(estimate) - np.asarray(prediction)) / se


def assert_within(estimate, se, prediction, label: str) -> None:
    z = z_scores(estimate, se, prediction)
    assert np.all(z < Z_MAX), (
        f"{label}: max |z| = {z.max():.2f} >= {Z_MAX}\nestimate\n{estimate}\nSE\n{se}\n"
        f"prediction\n{prediction}"
    )


def assert_rejected(estimate, se, prediction, label: str) -> None:
    """The data must tell this (wrong) prediction apart: the tolerance is tight enough."""
    z = z_scores(estimate, se, prediction)
    assert np.max(z) > Z_MAX, f"{label}: the simulation cannot distinguish it (max |z| {z.max()})"


def outer_samples(x: np.ndarray) -> np.ndarray:
    """(K, d) centred samples -> (K, d, d) products x xᵀ, whose mean is the covariance."""
    return x[:, :, None] * x[:, None, :]


# --------------------------------------------------------------------------------------------
# simulations, written out from the optimizers' update rules
# --------------------------------------------------------------------------------------------


class ChainStats:
    """Per-chain time averages of θθᵀ, |Δθ|² and Δθ_{t+1}·Δθ_t over the measured steps."""

    def __init__(self, chains: int, dim: int) -> None:
        self.theta_outer = np.zeros((chains, dim, dim))
        self.update_sq = np.zeros(chains)
        self.update_lag1 = np.zeros(chains)
        self.count = 0
        self._previous: np.ndarray | None = None

    def add(self, theta: np.ndarray, update: np.ndarray, measure: bool) -> None:
        if measure:
            self.theta_outer += theta[:, :, None] * theta[:, None, :]
            self.update_sq += np.einsum("rd,rd->r", update, update)
            # The previous update is from the stationary regime too (burn-in precedes it).
            if self._previous is not None:
                self.update_lag1 += np.einsum("rd,rd->r", update, self._previous)
            self.count += 1
        self._previous = update

    def finish(self) -> ChainStats:
        self.theta_outer /= self.count
        self.update_sq /= self.count
        self.update_lag1 /= self.count
        return self


def gaussian_noise(rng: np.random.Generator, C: np.ndarray, chains: int) -> np.ndarray:
    return rng.standard_normal((chains, C.shape[0])) @ np.linalg.cholesky(C).T


def simulate_heavy_ball(
    H: np.ndarray, C: np.ndarray, lr: float, momentum: float, *, chains: int, burn: int,
    steps: int, seed: int,
) -> ChainStats:
    """torch-SGD heavy ball v ← βv + g, θ ← θ − ηv, g = Hθ + ξ, ξ ~ N(0, C), from θ = v = 0."""
    rng = np.random.default_rng(seed)
    d = H.shape[0]
    theta, v = np.zeros((chains, d)), np.zeros((chains, d))
    stats = ChainStats(chains, d)
    for t in range(burn + steps):
        g = theta @ H + gaussian_noise(rng, C, chains)
        v = momentum * v + g
        update = -lr * v
        theta = theta + update
        stats.add(theta, update, t >= burn)
    return stats.finish()


def simulate_pnm_numpy(
    h: float, c: float, lr: float, beta0: float, beta1: float, *, chains: int, burn: int,
    steps: int, seed: int,
) -> ChainStats:
    """1-D PNM written out: the buffer of t's parity m ← β1²m + (1−β1²)g, then
    θ ← θ − η((1+β0)m_t − β0m_{t−1})/sqrt((1+β0)² + β0²)."""
    rng = np.random.default_rng(seed)
    gamma = (1 + beta0) ** 2 + beta0**2
    theta = np.zeros((chains, 1))
    buffers = [np.zeros((chains, 1)), np.zeros((chains, 1))]
    stats = ChainStats(chains, 1)
    for t in range(1, burn + steps + 1):
        g = h * theta + math.sqrt(c) * rng.standard_normal((chains, 1))
        buffers[t % 2] = beta1**2 * buffers[t % 2] + (1 - beta1**2) * g
        update = -lr * ((1 + beta0) * buffers[t % 2] - beta0 * buffers[(t + 1) % 2])
        update /= math.sqrt(gamma)
        theta = theta + update
        stats.add(theta, update, t > burn)
    return stats.finish()


def simulate_pnm_torch(
    H: np.ndarray, C: np.ndarray, lr: float, beta0: float, beta1: float, *, chains: int,
    burn: int, steps: int, seed: int,
) -> ChainStats:
    """sgn_lab.optim.PNM itself on an (R, d) tensor: PNM is elementwise, so rows are R
    independent chains; p.grad = Hθ + ξ is set by hand each step."""
    rng = np.random.default_rng(seed)
    d = H.shape[0]
    p = torch.zeros((chains, d), dtype=DT, requires_grad=True)
    opt = PNM([p], lr=lr, betas=(beta1, beta0))
    Ht = torch.from_numpy(H)
    stats = ChainStats(chains, d)
    for t in range(burn + steps):
        with torch.no_grad():
            before = p.detach().clone()
            p.grad = before @ Ht + torch.from_numpy(gaussian_noise(rng, C, chains))
        opt.step()
        theta = p.detach().numpy().copy()
        stats.add(theta, theta - before.numpy(), t >= burn)
    return stats.finish()


def simulate_online_linreg(
    H: np.ndarray, noise_std: float, batch: int, lr: float, momentum: float, *, chains: int,
    burn: int, steps: int, seed: int,
) -> ChainStats:
    """(Momentum) SGD on ½(xᵀw − y)² with a fresh minibatch of B samples x ~ N(0, H),
    y = xᵀw* + ε every step; w* = 0, so θ = δ. Gradients x(xᵀδ − ε) computed per sample."""
    rng = np.random.default_rng(seed)
    d = H.shape[0]
    root = np.linalg.cholesky(H)
    delta, v = np.zeros((chains, d)), np.zeros((chains, d))
    stats = ChainStats(chains, d)
    for t in range(burn + steps):
        x = rng.standard_normal((chains, batch, d)) @ root.T
        eps = noise_std * rng.standard_normal((chains, batch))
        residual = np.einsum("rbd,rd->rb", x, delta) - eps
        g = (x * residual[..., None]).mean(axis=1)
        v = momentum * v + g
        update = -lr * v
        delta = delta + update
        stats.add(delta, update, t >= burn)
    return stats.finish()


# --------------------------------------------------------------------------------------------
# minibatch noise: real minibatches from a fixed finite data set
# --------------------------------------------------------------------------------------------

N_DATA, BATCH, DRAWS = 12, 4, 40_000


def finite_dataset(seed: int = 2) -> np.ndarray:
    """N per-sample 'gradients' in 3-D, correlated and off-centre."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N_DATA, 3)) @ np.array(
        [[1.0, 0.5, 0.0], [0.0, 1.0, -0.7], [0.3, 0.0, 0.6]]
    ) + np.array([1.0, -2.0, 0.5])


@pytest.mark.parametrize("replacement", [False, True])
def test_minibatch_noise_covariance_matches_real_minibatches(replacement: bool) -> None:
    data = finite_dataset()
    S = np.cov(data.T)  # unbiased, divisor N − 1
    G = data.mean(axis=0)
    rng = np.random.default_rng(3)
    if replacement:
        index = rng.integers(0, N_DATA, size=(DRAWS, BATCH))
    else:
        index = np.argsort(rng.random((DRAWS, N_DATA)), axis=1)[:, :BATCH]
    batch_means = data[index].mean(axis=1)
    estimate, se = mean_se(outer_samples(batch_means - G))

    predicted = theory.minibatch_noise_covariance(
        S, BATCH, dataset_size=N_DATA, replacement=replacement
    )
    assert_within(estimate, se, predicted, f"Cov[g_B], replacement={replacement}")
    trace = theory.minibatch_noise_trace(
        float(np.trace(S)), BATCH, dataset_size=N_DATA, replacement=replacement
    )
    t_est, t_se = mean_se(np.einsum("kii->k", outer_samples(batch_means - G)))
    assert_within(t_est, t_se, trace, "tr Cov[g_B]")
    # The other sampling scheme's prediction is rejected by the same draws.
    other = theory.minibatch_noise_trace(
        float(np.trace(S)), BATCH, dataset_size=N_DATA, replacement=not replacement
    )
    assert_rejected(t_est, t_se, other, "the other sampling scheme")


def test_minibatch_noise_covariance_infinite_population() -> None:
    """N = None: i.i.d. draws from a population of covariance S give S/B."""
    rng = np.random.default_rng(4)
    S = C3
    draws = gaussian_noise(rng, S, DRAWS * BATCH).reshape(DRAWS, BATCH, 3).mean(axis=1)
    estimate, se = mean_se(outer_samples(draws))
    assert_within(estimate, se, theory.minibatch_noise_covariance(S, BATCH), "S/B")


# --------------------------------------------------------------------------------------------
# Gaussian linear regression
# --------------------------------------------------------------------------------------------


def test_linreg_gradient_covariance_matches_per_sample_gradients() -> None:
    rng = np.random.default_rng(5)
    delta, sigma, K = np.array([0.7, -0.4, 1.1]), 0.6, 200_000
    x = rng.standard_normal((K, 3)) @ np.linalg.cholesky(H3).T
    eps = sigma * rng.standard_normal(K)
    g = x * (x @ delta - eps)[:, None]  # per-sample gradient of ½(xᵀw − y)²
    m_est, m_se = mean_se(g)
    assert_within(m_est, m_se, H3 @ delta, "E g = Hδ")
    estimate, se = mean_se(outer_samples(g - H3 @ delta))
    predicted = theory.linreg_gradient_covariance(H3, delta, sigma)
    assert_within(estimate, se, predicted, "Σ(w)")
    # Dropping the ∇L∇Lᵀ = HδδᵀH term (keeping 2L·H alone) is rejected by the same data.
    assert_rejected(estimate, se, predicted - np.outer(H3 @ delta, H3 @ delta), "2L·H only")


def test_linreg_noise_model_averages_over_delta() -> None:
    """C(P) = E_δ[Σ(δ)]/B with a non-Gaussian δ of second moment P (Rademacher coordinates)."""
    rng = np.random.default_rng(6)
    K, B, sigma = 100_000, 3, 0.5
    root_p = np.linalg.cholesky(C3 * 0.2)
    P = root_p @ root_p.T
    delta = rng.choice([-1.0, 1.0], size=(K, 3)) @ root_p.T  # E δδᵀ = P exactly
    x = rng.standard_normal((K, B, 3)) @ np.linalg.cholesky(H3).T
    eps = sigma * rng.standard_normal((K, B))
    g = (x * (np.einsum("kbd,kd->kb", x, delta) - eps)[..., None]).mean(axis=1)
    xi = g - delta @ H3  # minibatch noise around the full gradient Hδ
    estimate, se = mean_se(outer_samples(xi))
    model = theory.linreg_noise_model(H3, sigma, B)
    assert_within(estimate, se, model(P), "C(P)")
    # The first-draft spec's 2·HPH is rejected.
    assert_rejected(estimate, se, model(P) + H3 @ P @ H3 / B, "2·HPH variant")


# --------------------------------------------------------------------------------------------
# SGD / heavy ball on a quadratic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("momentum", "lr", "burn", "steps"),
    [(0.0, 0.5, 200, 2000), (0.9, 0.3, 600, 3000)],
)
def test_sgd_stationary_covariance_matches_simulation(
    momentum: float, lr: float, burn: int, steps: int
) -> None:
    stats = simulate_heavy_ball(H3, C3, lr, momentum, chains=500, burn=burn, steps=steps, seed=7)
    estimate, se = mean_se(stats.theta_outer)
    exact = theory.sgd_stationary_covariance(H3, C3, lr, momentum=momentum)
    assert_within(estimate, se, exact, f"Cov θ, momentum={momentum}")
    # At these lrs (ηλ_max = 1.0 and 0.6) the small-lr formula is measurably off.
    small = theory.small_lr_stationary_covariance(H3, C3, lr / (1 - momentum))
    t_est, t_se = mean_se(np.einsum("rii->r", stats.theta_outer))
    assert_rejected(t_est, t_se, np.trace(small), "small-lr limit at finite lr")

    full = theory.heavy_ball_stationary(H3, C3, lr, momentum=momentum)
    u_est, u_se = mean_se(stats.update_sq)
    assert_within(u_est, u_se, full.update_trace, "E|Δθ|²")
    r, r_se = ratio_se(stats.update_lag1, stats.update_sq)
    assert_within(r, r_se, full.update_lag1_correlation, "lag-1 correlation of updates")


@pytest.mark.parametrize(("momentum", "lr"), [(0.0, 1.2), (0.5, 1.0), (0.9, 1.0)])
def test_sgd_stationary_variance_1d_matches_simulation(momentum: float, lr: float) -> None:
    h, c = 1.0, 0.7
    stats = simulate_heavy_ball(
        np.array([[h]]), np.array([[c]]), lr, momentum, chains=2000, burn=400, steps=1500, seed=8
    )
    estimate, se = mean_se(stats.theta_outer[:, 0, 0])
    assert_within(estimate, se, theory.sgd_stationary_variance_1d(h, c, lr, momentum=momentum),
                  "1-D stationary variance")


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("lr_h", [1e-3, 0.1, 1.0, 1.9])
def test_1d_closed_form_is_the_1d_case_of_the_solver(momentum: float, lr_h: float) -> None:
    """Limit/consistency check (theory against theory): d = 1 of the exact solver."""
    h, c = 2.0, 0.3
    lr = lr_h / h
    closed = theory.sgd_stationary_variance_1d(h, c, lr, momentum=momentum)
    solver = theory.sgd_stationary_covariance([[h]], [[c]], lr, momentum=momentum)
    assert solver.shape == (1, 1)
    assert solver[0, 0] == pytest.approx(closed, rel=1e-10)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_small_lr_limit_is_approached_at_rate_lr(momentum: float) -> None:
    """Limit check: exact/small-lr trace ratio → 1 with |ratio − 1| ∝ lr."""
    gaps = []
    for lr in (1e-2, 1e-3, 1e-4):
        exact = theory.sgd_stationary_covariance(H3, C3, lr, momentum=momentum)
        small = theory.small_lr_stationary_covariance(H3, C3, lr / (1 - momentum))
        gaps.append(np.trace(exact) / np.trace(small) - 1)
        assert np.allclose(exact, small, rtol=3 * lr * 2.0 / (1 - momentum) + 1e-9)
    assert all(g > 0 for g in gaps)
    assert gaps[0] / gaps[1] == pytest.approx(10, rel=0.1)
    assert gaps[1] / gaps[2] == pytest.approx(10, rel=0.1)


def test_solvers_equal_scipy_lyapunov_on_the_stacked_state() -> None:
    """Implementation check (same equations, different algebra): the mode-by-mode solution
    equals scipy's discrete/continuous Lyapunov solvers on the stacked state; for PNM the
    stacked state is the spec's period-2 system (θ, m_odd, m_even), solved through the
    two-step map and averaged over parity, which also checks that the time-invariant
    relabelling used by ``pnm_stationary`` is exact."""
    d, I, Z = 3, np.eye(3), np.zeros((3, 3))
    lr, beta = 0.4, 0.7
    A = np.block([[I - lr * H3, -lr * beta * I], [H3, beta * I]])
    B = np.vstack([-lr * I, I])
    sigma = scipy.linalg.solve_discrete_lyapunov(A, B @ C3 @ B.T)
    hb = theory.heavy_ball_stationary(H3, C3, lr, momentum=beta)
    np.testing.assert_allclose(hb.parameter_covariance, sigma[:d, :d], rtol=1e-9, atol=1e-12)
    D = A[:d] - np.hstack([I, Z])
    np.testing.assert_allclose(hb.update_covariance, D @ sigma @ D.T + B[:d] @ C3 @ B[:d].T,
                               rtol=1e-9, atol=1e-12)

    np.testing.assert_allclose(
        theory.small_lr_stationary_covariance(H3, C3, 0.3),
        scipy.linalg.solve_continuous_lyapunov(H3, 0.3 * C3), rtol=1e-9, atol=1e-12,
    )

    lr, beta0, beta1 = 0.5, 1.0, 0.8
    k, a = lr / math.sqrt(pnm_noise_factor(beta0)), beta1**2

    def parity_step(odd: bool) -> tuple[np.ndarray, np.ndarray]:
        # (θ, m_odd, m_even): refresh the buffer of this parity, then step θ.
        pos, neg = (1, 2) if odd else (2, 1)
        A = np.zeros((3 * d, 3 * d))
        B = np.zeros((3 * d, d))
        blk = [slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)]
        A[blk[pos], blk[0]] = (1 - a) * H3
        A[blk[pos], blk[pos]] = a * I
        A[blk[neg], blk[neg]] = I
        B[blk[pos]] = (1 - a) * I
        A[blk[0]] = -k * (1 + beta0) * A[blk[pos]] + k * beta0 * np.eye(3 * d)[blk[neg]]
        A[blk[0], blk[0]] += I
        B[blk[0]] = -k * (1 + beta0) * B[blk[pos]]
        return A, B

    (A1, B1), (A2, B2) = parity_step(True), parity_step(False)
    two_step = A2 @ A1
    noise = A2 @ B1 @ C3 @ B1.T @ A2.T + B2 @ C3 @ B2.T
    even = scipy.linalg.solve_discrete_lyapunov(two_step, noise)
    odd = A1 @ even @ A1.T + B1 @ C3 @ B1.T
    pnm = theory.pnm_stationary(H3, C3, lr, beta0=beta0, beta1=beta1)
    np.testing.assert_allclose(odd[:d, :d], even[:d, :d], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pnm.parameter_covariance, 0.5 * (even + odd)[:d, :d], rtol=1e-9,
                               atol=1e-12)


def test_linreg_mean_square_bound_1d() -> None:
    """Edge check against a hand derivation: 1-D, B = 1, E[x⁴] = 3h², so
    E δ'² = (1 − 2ηh + 3η²h²) E δ² + η²σ²h: stationary ησ²/(2 − 3ηh), bound ηh < 2/3 (not 2)."""
    model = theory.linreg_noise_model([[1.0]], 0.5, 1)
    for lr in (0.3, 0.6, 0.666):
        exact = theory.sgd_stationary_covariance([[1.0]], model, lr)[0, 0]
        assert exact == pytest.approx(lr * 0.25 / (2 - 3 * lr), rel=1e-8)
    with pytest.raises(ValueError, match=r"lr=0\.6667"):
        theory.sgd_stationary_covariance([[1.0]], model, 0.6667)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_state_dependent_linreg_noise_matches_online_sgd(momentum: float) -> None:
    sigma, B = 0.5, 2
    lr = 0.3 * (1 - momentum)
    stats = simulate_online_linreg(
        H3, sigma, B, lr, momentum, chains=1000, burn=400, steps=2000, seed=9
    )
    estimate, se = mean_se(stats.theta_outer)
    model = theory.linreg_noise_model(H3, sigma, B)
    exact = theory.sgd_stationary_covariance(H3, model, lr, momentum=momentum)
    assert_within(estimate, se, exact, f"E δδᵀ, online linreg, momentum={momentum}")
    # Ignoring the state dependence (noise σ²H/B at the optimum) is rejected.
    frozen = theory.sgd_stationary_covariance(H3, sigma**2 * H3 / B, lr, momentum=momentum)
    t_est, t_se = mean_se(np.einsum("rii->r", stats.theta_outer))
    assert_rejected(t_est, t_se, np.trace(frozen), "noise frozen at the optimum")
    # The stationary noise reported is C at the fixed point.
    full = theory.heavy_ball_stationary(H3, model, lr, momentum=momentum)
    np.testing.assert_allclose(full.noise_covariance, model(full.parameter_covariance))


def test_state_dependent_noise_past_mean_square_bound_raises_and_diverges() -> None:
    """lr = 0.6, B = 1: the linear part is stable (ηλ_max = 1.2 < 2), the second moment is not."""
    model = theory.linreg_noise_model(H3, 0.5, 1)
    with pytest.raises(ValueError, match=r"lr=0\.6"):
        theory.sgd_stationary_covariance(H3, model, 0.6)
    theory.sgd_stationary_covariance(H3, 0.25 * H3, 0.6)  # constant noise: fine
    stats = simulate_online_linreg(H3, 0.5, 1, 0.6, 0.0, chains=200, burn=0, steps=300, seed=10)
    assert np.mean(np.einsum("rii->r", stats.theta_outer)) > 1e6


# --------------------------------------------------------------------------------------------
# PNM
# --------------------------------------------------------------------------------------------


def test_pnm_noise_factor_is_the_optimizers() -> None:
    assert theory.pnm_noise_factor is pnm_noise_factor
    assert theory.pnm_noise_factor(1.0) == 5.0


@pytest.mark.parametrize("beta0", [0.0, 1.0, 3.0])
def test_pnm_stationary_matches_pnm_optimizer(beta0: float) -> None:
    """The PNM optimizer at half its stability bound ((η/√Γ)λ_max = 1/(1+2β0))."""
    beta1 = 0.9
    lr = math.sqrt(pnm_noise_factor(beta0)) / (2.0 * (1 + 2 * beta0))  # k·λ_max(H3) = 1/(1+2β0)
    stats = simulate_pnm_torch(
        H3, C3, lr, beta0, beta1, chains=1000, burn=500, steps=2500, seed=11
    )
    exact = theory.pnm_stationary(H3, C3, lr, beta0=beta0, beta1=beta1)

    estimate, se = mean_se(stats.theta_outer)
    assert_within(estimate, se, exact.parameter_covariance, f"Cov θ, β0={beta0}")
    p_est, p_se = mean_se(np.einsum("rii->r", stats.theta_outer))
    assert_within(p_est, p_se, exact.parameter_trace, "parameter_trace")
    u_est, u_se = mean_se(stats.update_sq)
    assert_within(u_est, u_se, exact.update_trace, "update_trace")
    r, r_se = ratio_se(stats.update_lag1, stats.update_sq)
    assert_within(r, r_se, exact.update_lag1_correlation, "update_lag1_correlation")
    if beta0 > 0:
        # At this finite lr the small-lr correlation is measurably off: the exact one is needed.
        assert_rejected(r, r_se, theory.pnm_lag1_autocorrelation(beta0, beta1), "small-lr ρ₁")


def test_pnm_long_horizon_close_to_sgd_while_updates_are_noisier() -> None:
    """The key message, simulated: PNM (β0 = 1, β1 = 0.9), SGD at η/√Γ and torch heavy ball
    (β = β1) at the same effective lr, 1-D, (η/√Γ)·h = 0.1. Long-horizon variance close to
    SGD's; per-step update variance ≈ 10× momentum's; updates anti-correlated."""
    h, c, k, beta0, beta1 = 1.0, 1.0, 0.1, 1.0, 0.9
    gamma = (1 + beta0) ** 2 + beta0**2
    run = dict(chains=3000, burn=500, steps=2500)
    pnm = simulate_pnm_numpy(h, c, k * math.sqrt(gamma), beta0, beta1, seed=12, **run)
    sgd = simulate_heavy_ball(np.array([[h]]), np.array([[c]]), k, 0.0, seed=13, **run)
    hb = simulate_heavy_ball(np.array([[h]]), np.array([[c]]), k * (1 - beta1), beta1, seed=14,
                             **run)
    p_exact = theory.pnm_stationary([[h]], [[c]], k * math.sqrt(gamma), beta0=beta0, beta1=beta1)
    s_exact = theory.heavy_ball_stationary([[h]], [[c]], k)
    hb_exact = theory.heavy_ball_stationary([[h]], [[c]], k * (1 - beta1), momentum=beta1)

    param_ratio, param_se = independent_ratio_se(pnm.theta_outer[:, 0, 0], sgd.theta_outer[:, 0, 0])
    assert_within(param_ratio, param_se, p_exact.parameter_trace / s_exact.parameter_trace,
                  "PNM/SGD parameter variance")
    assert 0.8 < param_ratio < 1.0  # ≈ 0.876: close to SGD's

    update_ratio, update_se = independent_ratio_se(pnm.update_sq, hb.update_sq)
    assert_within(update_ratio, update_se, p_exact.update_trace / hb_exact.update_trace,
                  "PNM/momentum update variance")
    assert update_ratio > 5  # ≈ 10.6: several times momentum's per-step noise

    r, r_se = ratio_se(pnm.update_lag1, pnm.update_sq)
    assert_within(r, r_se, p_exact.update_lag1_correlation, "PNM lag-1 correlation (1-D)")
    assert r < -0.7


@pytest.mark.slow
def test_pnm_long_horizon_at_small_lr_simulated() -> None:
    """Slow companion of the test above, at (η/√Γ)·h = 0.01 (relaxation ~100 steps): the
    simulated PNM/SGD variance ratio matches the exact 0.9855, and PNM/momentum updates ≈ 10."""
    h, c, k, beta0, beta1 = 1.0, 1.0, 0.01, 1.0, 0.9
    gamma = (1 + beta0) ** 2 + beta0**2
    run = dict(chains=3000, burn=3000, steps=30_000)
    pnm = simulate_pnm_numpy(h, c, k * math.sqrt(gamma), beta0, beta1, seed=24, **run)
    sgd = simulate_heavy_ball(np.array([[h]]), np.array([[c]]), k, 0.0, seed=25, **run)
    hb = simulate_heavy_ball(np.array([[h]]), np.array([[c]]), k * (1 - beta1), beta1, seed=26,
                             **run)
    p_exact = theory.pnm_stationary([[h]], [[c]], k * math.sqrt(gamma), beta0=beta0, beta1=beta1)
    s_exact = theory.heavy_ball_stationary([[h]], [[c]], k)
    hb_exact = theory.heavy_ball_stationary([[h]], [[c]], k * (1 - beta1), momentum=beta1)
    ratio, se = independent_ratio_se(pnm.theta_outer[:, 0, 0], sgd.theta_outer[:, 0, 0])
    assert_within(ratio, se, p_exact.parameter_trace / s_exact.parameter_trace, "PNM/SGD")
    ratio, se = independent_ratio_se(pnm.update_sq, hb.update_sq)
    assert_within(ratio, se, p_exact.update_trace / hb_exact.update_trace, "PNM/momentum")


def test_pnm_long_horizon_ratio_in_the_small_lr_limit() -> None:
    """Limit check of the exact solver: PNM/SGD variance at equal effective lr → 1 as ηh → 0
    (small-lr analysis: ≈ 0.99 at (η/√Γ)h = 0.01, ≈ 0.88 at 0.1), with a gap O(ηh)."""
    gamma = pnm_noise_factor(1.0)
    ratios = {}
    for kh in (1e-3, 1e-2, 1e-1):
        pnm = theory.pnm_stationary([[1.0]], [[1.0]], kh * math.sqrt(gamma))
        ratios[kh] = pnm.parameter_trace / theory.sgd_stationary_covariance([[1.0]], [[1.0]], kh)[
            0, 0
        ]
    assert ratios[1e-2] == pytest.approx(0.9855, abs=1e-3)
    assert ratios[1e-1] == pytest.approx(0.876, abs=1e-3)
    assert (1 - ratios[1e-2]) / (1 - ratios[1e-3]) == pytest.approx(10, rel=0.15)


@pytest.mark.parametrize(("beta0", "beta1"), [(1.0, 0.9), (3.0, 0.5), (0.5, 0.0)])
def test_pnm_small_lr_update_noise_and_lag1_against_simulation(beta0: float, beta1: float):
    """H = 0, so g_t = ξ_t whatever θ (θ effectively frozen): the small-lr limit is exact.
    PNM is the optimizer itself; EMA momentum m ← β1m + (1−β1)g, Δθ = −η'm with η' = η/√Γ
    is written out."""
    chains, burn, steps, lr = 2000, 400, 2000, 0.01
    zero = np.zeros((1, 1))
    pnm = simulate_pnm_torch(zero, np.eye(1), lr, beta0, beta1, chains=chains, burn=burn,
                             steps=steps, seed=15)
    rng = np.random.default_rng(16)
    lr_eff = lr / math.sqrt((1 + beta0) ** 2 + beta0**2)
    m = np.zeros(chains)
    ema_sq = np.zeros(chains)
    for t in range(burn + steps):
        m = beta1 * m + (1 - beta1) * rng.standard_normal(chains)
        if t >= burn:
            ema_sq += (lr_eff * m) ** 2
    ema_sq /= steps

    ratio, se = independent_ratio_se(pnm.update_sq, ema_sq)
    assert_within(ratio, se, theory.pnm_update_noise_ratio(beta0, beta1), "update noise ratio")
    sgd_ratio = float(pnm.update_sq.mean() / lr_eff**2)  # SGD's update variance is exactly η'²
    sgd_se = float(pnm.update_sq.std(ddof=1) / math.sqrt(chains) / lr_eff**2)
    assert_within(sgd_ratio, sgd_se, theory.pnm_update_noise_ratio(beta0, beta1, reference="sgd"),
                  "update noise ratio against SGD")
    r, r_se = ratio_se(pnm.update_lag1, pnm.update_sq)
    assert_within(r, r_se, theory.pnm_lag1_autocorrelation(beta0, beta1), "lag-1 correlation")


def test_pnm_small_lr_closed_forms_are_the_limit_of_the_exact_solver() -> None:
    """Limit check: at ηh → 0 the exact solver's ratio and correlation approach the closed
    forms (−0.724 and 9.97 at β0 = 1, β1 = 0.9), with gaps O(ηh)."""
    beta0, beta1 = 1.0, 0.9
    gamma = pnm_noise_factor(beta0)
    gaps = []
    for kh in (1e-3, 1e-4):
        pnm = theory.pnm_stationary([[1.0]], [[1.0]], kh * math.sqrt(gamma))
        hb = theory.heavy_ball_stationary([[1.0]], [[1.0]], kh * (1 - beta1), momentum=beta1)
        gaps.append(
            (
                pnm.update_lag1_correlation - theory.pnm_lag1_autocorrelation(beta0, beta1),
                pnm.update_trace / hb.update_trace - theory.pnm_update_noise_ratio(beta0, beta1),
            )
        )
    assert abs(gaps[1][0]) < 1e-3 and abs(gaps[1][1]) < 1e-2
    assert abs(gaps[0][0]) / abs(gaps[1][0]) == pytest.approx(10, rel=0.2)
    assert theory.pnm_lag1_autocorrelation(1.0, 0.9) == pytest.approx(-0.724)
    assert theory.pnm_update_noise_ratio(1.0, 0.9) == pytest.approx(9.9724, abs=1e-4)


# --------------------------------------------------------------------------------------------
# stability
# --------------------------------------------------------------------------------------------


def pnm_noise_free_growth(kh: float, beta0: float, beta1: float, steps: int = 20_000) -> float:
    """|θ| after ``steps`` noise-free PNM steps on ½θ² (h = 1) from θ = 1, written out;
    ``kh`` = (η/√Γ)·h is the step size after PNM's division by √Γ."""
    theta, buffers = 1.0, [0.0, 0.0]
    for t in range(1, steps + 1):
        buffers[t % 2] = beta1**2 * buffers[t % 2] + (1 - beta1**2) * theta
        theta -= kh * ((1 + beta0) * buffers[t % 2] - beta0 * buffers[(t + 1) % 2])
        if abs(theta) > 1e12:
            break
    return abs(theta)


@pytest.mark.parametrize("beta0", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_pnm_stability_bound(beta0: float, beta1: float) -> None:
    """(η/√Γ)·h < 2/(1+2β0): the solver raises exactly past it, and the recursion diverges."""
    bound_kh = 2 / (1 + 2 * beta0)
    H = np.diag([0.5, 2.0])
    sqrt_gamma = math.sqrt(pnm_noise_factor(beta0))
    max_lr = theory.pnm_max_lr(H, beta0)
    assert max_lr == pytest.approx(bound_kh * sqrt_gamma / 2.0)
    theory.pnm_stationary(H, np.eye(2), max_lr * (1 - 1e-4), beta0=beta0, beta1=beta1)
    with pytest.raises(ValueError, match="lr="):
        theory.pnm_stationary(H, np.eye(2), max_lr * (1 + 1e-4), beta0=beta0, beta1=beta1)
    # No complex pair leaves the unit circle earlier: stable all the way up to the bound.
    for fraction in np.linspace(0.02, 0.99, 25):
        theory.pnm_stationary(H, np.eye(2), max_lr * fraction, beta0=beta0, beta1=beta1)
    # The recursion itself: decays just below, blows up just above.
    assert pnm_noise_free_growth(0.97 * bound_kh, beta0, beta1) < 1e-3
    assert pnm_noise_free_growth(1.03 * bound_kh, beta0, beta1) > 1e3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_heavy_ball_stability_bound(momentum: float) -> None:
    max_lr = theory.heavy_ball_max_lr(H3, momentum)
    assert max_lr == pytest.approx(2 * (1 + momentum) / 2.0)
    theory.sgd_stationary_covariance(H3, C3, max_lr * (1 - 1e-4), momentum=momentum)
    with pytest.raises(ValueError, match=r"lr=4\.0"):
        theory.sgd_stationary_covariance(H3, C3, 4.0, momentum=momentum)
    with pytest.raises(ValueError, match="lr="):
        theory.heavy_ball_stationary(H3, C3, max_lr * (1 + 1e-4), momentum=momentum)
    with pytest.raises(ValueError, match="lr="):
        theory.sgd_stationary_variance_1d(2.0, 1.0, max_lr * (1 + 1e-4), momentum=momentum)
    stats = simulate_heavy_ball(H3, 1e-6 * C3, max_lr * 1.05, momentum, chains=2, burn=0,
                                steps=300, seed=17)
    assert np.isfinite(stats.theta_outer).all() and stats.theta_outer.max() > 1.0


# --------------------------------------------------------------------------------------------
# noise injection
# --------------------------------------------------------------------------------------------


def test_injected_noise_covariance_matches_gaussian_noise_sgd() -> None:
    """GaussianNoiseSGD with zero gradient and lr = 1: the step is −σz; rows are samples."""
    sigma, K, d = 0.7, 20_000, 4
    p = torch.zeros((K, d), dtype=DT, requires_grad=True)
    p.grad = torch.zeros_like(p)
    GaussianNoiseSGD([p], lr=1.0, sigma=sigma, seed=18).step()
    noise = -p.detach().numpy()
    estimate, se = mean_se(outer_samples(noise))
    assert_within(estimate, se, theory.injected_noise_covariance(sigma, d), "σ²I")


def test_covariance_noise_target_matches_covariance_noise_sgd() -> None:
    """Fixed per-sample gradients: the optimizer's ξ has covariance (1/B_S − 1/B_L)·Ŝ."""
    n, small, large, K = 6, 2, 8, 6000
    per_sample = finite_dataset()[:n]
    S_hat = np.cov(per_sample.T)
    p = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = CovarianceNoiseSGD([p], lr=1.0, small_batch=small, large_batch=large, seed=20)
    grads = [torch.from_numpy(per_sample)]
    xi = np.empty((K, 3))
    for k in range(K):
        with torch.no_grad():
            p.zero_()
        opt.step(grads)
        xi[k] = -p.detach().numpy() - per_sample.mean(axis=0)  # step = −(ḡ + ξ)
    estimate, se = mean_se(outer_samples(xi))
    assert_within(estimate, se, theory.covariance_noise_target(S_hat, small, large), "c·Ŝ")


def test_covariance_noise_total_matches_small_batch_noise() -> None:
    """Large batches drawn without replacement from N samples, plus the injected noise: the
    total step noise is (1/B_S − 1/N)·S, the noise of a batch of B_S."""
    rng = np.random.default_rng(21)
    data = finite_dataset()
    N, small, large, K = N_DATA, 2, 8, 6000
    S, G = np.cov(data.T), data.mean(axis=0)
    p = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = CovarianceNoiseSGD([p], lr=1.0, small_batch=small, large_batch=large, seed=22)
    total = np.empty((K, 3))
    for k in range(K):
        index = rng.permutation(N)[:large]
        with torch.no_grad():
            p.zero_()
        opt.step([torch.from_numpy(data[index])])
        total[k] = -p.detach().numpy() - G
    estimate, se = mean_se(outer_samples(total))
    predicted = theory.covariance_noise_target(S, small, large, dataset_size=N, total=True)
    assert_within(estimate, se, predicted, "(1/B_S − 1/N)·S")
    np.testing.assert_allclose(predicted, theory.minibatch_noise_covariance(S, small,
                                                                             dataset_size=N))


def test_symmetric_noise_gradient_equals_s_sgd_on_a_quadratic() -> None:
    theta0 = np.array([0.3, -1.2, 0.8])
    p = torch.tensor(theta0, dtype=DT, requires_grad=True)
    Ht = torch.from_numpy(H3)
    points = []

    def closure() -> torch.Tensor:
        p.grad = None
        points.append(p.detach().numpy().copy())
        loss = 0.5 * p @ Ht @ p
        loss.backward()
        return loss

    SymmetricNoiseSGD([p], lr=0.1, noise=0.05, scale="absolute", seed=23).step(closure)
    plus, minus = points
    eps = 0.5 * (plus - minus)
    assert np.allclose(np.abs(eps), 0.05) and np.allclose(0.5 * (plus + minus), theta0)
    predicted = theory.symmetric_noise_gradient_quadratic(H3, theta0, eps)
    np.testing.assert_allclose(p.grad.numpy(), predicted, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(predicted, H3 @ theta0, rtol=1e-12)
    batch = theory.symmetric_noise_gradient_quadratic(H3, np.stack([theta0] * 2),
                                                      np.stack([eps, -eps]))
    np.testing.assert_allclose(batch, np.stack([H3 @ theta0] * 2), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# input checks and conversions
# --------------------------------------------------------------------------------------------


def test_accepts_torch_tensors() -> None:
    out = theory.sgd_stationary_covariance(torch.from_numpy(H3), torch.from_numpy(C3), 0.1)
    np.testing.assert_allclose(out, theory.sgd_stationary_covariance(H3, C3, 0.1))
    assert out.dtype == np.float64
    g = torch.tensor([1.0, 2.0], requires_grad=True)
    theory.linreg_gradient_covariance(torch.eye(2), g, 0.1)


def test_stationary_is_read_only_and_consistent() -> None:
    s = theory.pnm_stationary(H3, C3, 0.1)
    assert s.parameter_trace == pytest.approx(np.trace(s.parameter_covariance))
    with pytest.raises(ValueError):
        s.parameter_covariance[0, 0] = 1.0
    assert s.update_lag1_correlation == pytest.approx(
        np.trace(s.update_lag1_covariance) / np.trace(s.update_covariance)
    )


BAD_CALLS: list[tuple[Callable[[], object], str]] = [
    (lambda: theory.sgd_stationary_covariance(H3, C3, 0.0), "lr"),
    (lambda: theory.sgd_stationary_covariance(H3, C3, -0.1), "lr"),
    (lambda: theory.sgd_stationary_covariance(H3, C3, float("nan")), "lr"),
    (lambda: theory.sgd_stationary_covariance(H3, C3, 0.1, momentum=1.0), "momentum"),
    (lambda: theory.sgd_stationary_covariance(H3, C3[:2, :2], 0.1), "C"),
    (lambda: theory.sgd_stationary_covariance(H3, -C3, 0.1), "C"),
    (lambda: theory.sgd_stationary_covariance(H3 + np.triu(H3, 1), C3, 0.1), "H"),
    (lambda: theory.sgd_stationary_covariance(np.diag([1.0, 0.0, 2.0]), C3, 0.1), "H"),
    (lambda: theory.sgd_stationary_covariance(np.ones(3), C3, 0.1), "H"),
    (lambda: theory.sgd_stationary_covariance(H3, lambda P: P @ P, 0.1), "C"),
    (lambda: theory.small_lr_stationary_covariance(H3, C3, 0.0), "effective_lr"),
    (lambda: theory.sgd_stationary_variance_1d(0.0, 1.0, 0.1), "h"),
    (lambda: theory.sgd_stationary_variance_1d(1.0, -1.0, 0.1), "c"),
    (lambda: theory.pnm_stationary(H3, C3, 0.1, beta0=-1.0), "beta0"),
    (lambda: theory.pnm_stationary(H3, C3, 0.1, beta1=1.0), "beta1"),
    (lambda: theory.pnm_update_noise_ratio(1.0, 0.9, reference="adam"), "reference"),
    (lambda: theory.pnm_lag1_autocorrelation(1.0, -0.1), "beta1"),
    (lambda: theory.minibatch_noise_covariance(C3, 0), "batch_size"),
    (lambda: theory.minibatch_noise_covariance(C3, 5, dataset_size=4), "batch_size"),
    (lambda: theory.minibatch_noise_trace(-1.0, 4), "trace"),
    (lambda: theory.linreg_gradient_covariance(H3, np.ones(2), 0.1), "delta"),
    (lambda: theory.linreg_gradient_covariance(H3, np.ones(3), -0.1), "noise_std"),
    (lambda: theory.linreg_noise_model(H3, 0.1, 0), "batch_size"),
    (lambda: theory.linreg_noise_model(H3, 0.1, 2)(np.eye(2)), "P"),
    (lambda: theory.injected_noise_covariance(-0.1, 3), "sigma"),
    (lambda: theory.injected_noise_covariance(0.1, 0), "dim"),
    (lambda: theory.covariance_noise_target(C3, 8, 8), "small_batch"),
    (lambda: theory.covariance_noise_target(C3, 2, 8, dataset_size=4), "dataset_size"),
    (lambda: theory.symmetric_noise_gradient_quadratic(H3, np.ones(3), np.ones(2)), "eps"),
    (lambda: theory.symmetric_noise_gradient_quadratic(H3, np.ones(2), np.ones(2)), "theta"),
]


@pytest.mark.parametrize(("call", "name"), BAD_CALLS)
def test_bad_input_raises_value_error_naming_it(call: Callable[[], object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
