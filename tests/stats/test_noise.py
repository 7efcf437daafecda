"""SGN statistics against numpy, Monte Carlo and the closed form of Gaussian linear regression."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sgn_lab.grads import flatten_grads, per_sample_grads
from sgn_lab.stats.noise import (
    NoiseStats,
    isotropic_spectrum,
    minibatch_factor,
    noise_stats,
    powerlaw_fit,
)


def numpy_spectrum(G: np.ndarray) -> np.ndarray:
    """Non-zero eigenvalues of the unbiased covariance, descending, straight from numpy."""
    S = np.atleast_2d(np.cov(G, rowvar=False))
    lam = np.linalg.eigvalsh(S)[::-1]
    return lam[lam > lam[0] * max(G.shape) * np.finfo(np.float64).eps]


@pytest.mark.parametrize("n,d", [(50, 8), (30, 200), (64, 64)])
def test_moments_and_spectrum_match_numpy(n, d):
    rng = np.random.default_rng(0)
    scales = np.logspace(-1, 1, d)
    G = rng.standard_normal((n, d)) * scales + rng.standard_normal(d)
    r = noise_stats(torch.from_numpy(G), shape=False)

    S = np.cov(G, rowvar=False)
    np.testing.assert_allclose(r.mean.numpy(), G.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(r.diag_variance.numpy(), np.diag(S), rtol=1e-10)
    assert r.trace == pytest.approx(np.trace(S), rel=1e-10)
    lam = numpy_spectrum(G)
    assert r.eigenvalues.shape == lam.shape == (min(n - 1, d),)
    np.testing.assert_allclose(r.eigenvalues.numpy(), lam, rtol=1e-8, atol=1e-12 * lam[0])

    p = lam / lam.sum()
    assert r.effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-8)
    assert r.participation_ratio == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-8)
    assert r.stable_rank == pytest.approx(lam.sum() / lam[0], rel=1e-8)
    assert r.top1_energy == pytest.approx(p[0], rel=1e-8)
    assert r.top5_energy == pytest.approx(p[:5].sum(), rel=1e-8)
    assert r.top10_energy == pytest.approx(p[:10].sum(), rel=1e-8)

    mean_sq = float(G.mean(axis=0) @ G.mean(axis=0))
    assert r.mean_sq_norm == pytest.approx(mean_sq, rel=1e-12)
    assert r.grad_sq_norm == pytest.approx(mean_sq - np.trace(S) / n, rel=1e-10)
    assert r.noise_scale == pytest.approx(np.trace(S) / (mean_sq - np.trace(S) / n), rel=1e-10)


def test_float32_input_is_accumulated_in_float64():
    rng = np.random.default_rng(1)
    G = (rng.standard_normal((40, 300)) + 1e3).astype(np.float32)  # large mean: cancellation
    r = noise_stats(torch.from_numpy(G), shape=False)
    assert r.mean.dtype == r.eigenvalues.dtype == torch.float64
    S = np.cov(G.astype(np.float64), rowvar=False)
    assert r.trace == pytest.approx(np.trace(S), rel=1e-10)
    np.testing.assert_allclose(r.eigenvalues.numpy(), numpy_spectrum(G.astype(np.float64)),
                               rtol=1e-7)


def test_gram_streaming_over_column_blocks(monkeypatch):
    # Force several column blocks: the Gram matrix accumulated block by block must be exact.
    import sgn_lab.stats.noise as noise

    monkeypatch.setattr(noise, "_BLOCK_ELEMENTS", 7 * 20)
    rng = np.random.default_rng(2)
    G = rng.standard_normal((20, 103))
    r = noise_stats(torch.from_numpy(G), shape=False)
    np.testing.assert_allclose(r.eigenvalues.numpy(), numpy_spectrum(G), rtol=1e-9)
    np.testing.assert_allclose(r.diag_variance.numpy(), G.var(axis=0, ddof=1), rtol=1e-10)


@pytest.mark.parametrize("replacement", [False, True])
def test_minibatch_trace_matches_monte_carlo_of_actual_batches(replacement):
    # Fixed data set of N per-sample gradients; draw real minibatches and measure their noise.
    N, d, B, R = 40, 3, 8, 40_000
    rng = np.random.default_rng(3)
    G = rng.standard_normal((N, d)) * np.array([1.0, 2.0, 0.5])
    r = noise_stats(torch.from_numpy(G), batch_size=B, dataset_size=N, replacement=replacement,
                    shape=False)
    if replacement:
        idx = rng.integers(0, N, size=(R, B))
    else:
        idx = np.argsort(rng.random((R, N)), axis=1)[:, :B]
    means = G[idx].mean(axis=1)
    sq = ((means - G.mean(axis=0)) ** 2).sum(axis=1)  # exact full-data mean is known here
    se = sq.std(ddof=1) / math.sqrt(R)
    assert abs(sq.mean() - r.minibatch_trace) < 5 * se
    if r.grad_sq_norm > 0:
        assert r.noise_to_signal == pytest.approx(r.minibatch_trace / r.grad_sq_norm)
    else:  # |G|² estimated ≤ 0 (zero-mean data): no meaningful ratio
        assert math.isnan(r.noise_to_signal) and math.isnan(r.noise_scale)


def test_minibatch_factor_closed_forms_and_errors():
    assert minibatch_factor(8) == 1 / 8
    assert minibatch_factor(8, dataset_size=40) == pytest.approx(1 / 8 - 1 / 40)
    assert minibatch_factor(8, dataset_size=40, replacement=True) == pytest.approx(39 / 40 / 8)
    assert minibatch_factor(40, dataset_size=40) == 0.0  # full batch: no noise
    with pytest.raises(ValueError, match="batch_size.*-3"):
        minibatch_factor(-3)
    with pytest.raises(ValueError, match="batch_size=50 exceeds dataset_size=40"):
        minibatch_factor(50, dataset_size=40)


def test_unbiased_grad_norm_and_noise_scale_by_monte_carlo():
    # g_i ~ N(G, Σ): E[|ḡ|² - tr(S)/n] = |G|², while |ḡ|² alone is biased up by tr(Σ)/n.
    d, n, R = 5, 10, 4000
    rng = np.random.default_rng(4)
    true_mean = np.full(d, 0.3)
    scales = np.array([0.5, 1.0, 1.5, 2.0, 2.5])
    estimates, naive = [], []
    for _ in range(R):
        r = noise_stats(torch.from_numpy(true_mean + rng.standard_normal((n, d)) * scales),
                        shape=False)
        estimates.append(r.grad_sq_norm)
        naive.append(r.mean_sq_norm)
    target = true_mean @ true_mean
    se = np.std(estimates, ddof=1) / math.sqrt(R)
    assert abs(np.mean(estimates) - target) < 5 * se
    bias = (scales**2).sum() / n
    assert abs(np.mean(naive) - target - bias) < 5 * np.std(naive, ddof=1) / math.sqrt(R)


def gaussian_powerlaw_sample(n, d, s, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * np.arange(1, d + 1) ** (-s / 2)


@pytest.mark.parametrize("n,d,s", [(2000, 200, 1.0), (2000, 200, 1.5), (500, 5000, 2.0)])
def test_powerlaw_exponent_recovered_within_sampling_error(n, d, s):
    r = noise_stats(torch.from_numpy(gaussian_powerlaw_sample(n, d, s, seed=5)), shape=False)
    k = np.arange(r.powerlaw_kmin, r.powerlaw_kmax + 1)
    # Each top sample eigenvalue has relative error ≈ sqrt(2/n); a least-squares slope over m
    # points in log k has standard error σ_y / (sqrt(m)·std(log k)).
    se = math.sqrt(2 / n) / (math.sqrt(k.size) * np.log(k).std())
    assert abs(r.powerlaw_exponent - s) < 5 * se, (r.powerlaw_exponent, se)
    assert r.powerlaw_r2 > 0.99


def test_powerlaw_fit_exact_on_exact_power_law():
    lam = torch.arange(1, 101, dtype=torch.float64) ** -1.3 * 7.0
    fit = powerlaw_fit(lam, window=(3, 60))
    assert fit.exponent == pytest.approx(1.3, rel=1e-12)
    assert math.exp(fit.intercept) == pytest.approx(7.0, rel=1e-10)
    assert (fit.k_min, fit.k_max) == (3, 60) and fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"window \(5, 5\)"):
        powerlaw_fit(lam, window=(5, 5))


def test_isotropic_reference_has_equal_trace_and_matches_isotropic_data():
    n, d = 200, 1000
    rng = np.random.default_rng(6)
    iso_data = rng.standard_normal((n, d)) * 0.1
    r = noise_stats(torch.from_numpy(iso_data), shape=False)
    # tr of the reference: (n-1)·d·σ²·χ²-like spread, relative sd sqrt(2/((n-1)d)).
    ref_trace = float(r.isotropic_eigenvalues.sum())
    assert abs(ref_trace / r.trace - 1) < 5 * math.sqrt(2 / ((n - 1) * d)) * math.sqrt(2)
    # On isotropic data the measured anisotropy equals the reference up to sampling error.
    assert r.effective_rank == pytest.approx(r.isotropic_effective_rank, rel=0.02)
    assert r.participation_ratio == pytest.approx(r.isotropic_participation_ratio, rel=0.05)
    # On anisotropic data it is far below.
    aniso = noise_stats(torch.from_numpy(gaussian_powerlaw_sample(n, d, 1.5, seed=7)),
                        shape=False)
    assert aniso.effective_rank < 0.2 * aniso.isotropic_effective_rank


def test_isotropic_bartlett_draw_has_the_wishart_law_of_direct_sampling():
    # dim >= n uses the Bartlett decomposition; compare with explicitly drawn Gaussian data.
    n, d, R = 12, 20, 600
    rng = np.random.default_rng(8)
    bartlett = np.array([isotropic_spectrum(float(d), d, n, seed=s).numpy() for s in range(R)])
    direct = np.array([numpy_spectrum(rng.standard_normal((n, d))) for _ in range(R)])
    for k in (0, n // 2, n - 2):  # largest, middle, smallest non-zero eigenvalue
        a, b = bartlett[:, k], direct[:, k]
        se = math.sqrt(a.var(ddof=1) / R + b.var(ddof=1) / R)
        assert abs(a.mean() - b.mean()) < 5 * se, (k, a.mean(), b.mean())


def test_isotropic_spectrum_is_seeded():
    a = isotropic_spectrum(3.0, 500, 50, seed=1)
    assert torch.equal(a, isotropic_spectrum(3.0, 500, 50, seed=1))
    assert not torch.equal(a, isotropic_spectrum(3.0, 500, 50, seed=2))


def test_gaussian_linear_regression_covariance_matches_closed_form():
    """x ~ N(0, H), y = xᵀw* + ε: Σ(w) = (σ² + δᵀHδ)H + HδδᵀH for the loss ½(xᵀw - y)²."""
    d, n, sigma = 4, 40_000, 0.5
    gen = torch.Generator().manual_seed(9)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    H = A @ A.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    delta = torch.tensor([1.0, -0.5, 0.8, 0.3], dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(H).T
    y = x @ w_star + sigma * torch.randn(n, generator=gen, dtype=torch.float64)

    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])

    def loss_fn(out, t):
        return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()

    G = flatten_grads(per_sample_grads(model, loss_fn, x, y))
    r = noise_stats(G, shape=False)
    Hd = H @ delta
    Sigma = (sigma**2 + delta @ Hd) * H + torch.outer(Hd, Hd)

    C = (G - G.mean(0)).numpy()
    # Standard errors from the data's own fourth moments: entry (j,k) of S is a mean of
    # c_j c_k over n samples.
    prods = C[:, :, None] * C[:, None, :]
    se = prods.std(axis=0, ddof=1) / math.sqrt(n)
    np.testing.assert_array_less(np.abs(r.mean.numpy() - Hd.numpy()),
                                 5 * C.std(axis=0, ddof=1) / math.sqrt(n))
    np.testing.assert_array_less(np.abs(r.diag_variance.numpy() - np.diag(Sigma)),
                                 5 * np.diag(se))
    trace_se = (C**2).sum(axis=1).std(ddof=1) / math.sqrt(n)
    assert abs(r.trace - float(Sigma.trace())) < 5 * trace_se
    # Weyl: |λ̂_k - λ_k| <= ||Ŝ - Σ||_2 <= ||Ŝ - Σ||_F, whose size is sqrt(Σ_jk se_jk²).
    lam = np.linalg.eigvalsh(Sigma.numpy())[::-1]
    np.testing.assert_array_less(np.abs(r.eigenvalues.numpy() - lam),
                                 5 * math.sqrt((se**2).sum()))
    # Leaving out the rank-one term HδδᵀH would be detected: it is far outside the bound.
    assert abs(float(Sigma.trace()) - float((sigma**2 + delta @ Hd) * H.trace())) > 10 * trace_se


def test_per_layer_breakdown():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 2, (30,))
    g = per_sample_grads(model, nn.functional.cross_entropy, x, y)
    r = noise_stats(g, shape=False)
    table = r.layers.set_index("name")
    assert list(table.index) == ["0.weight", "0.bias", "2.weight", "2.bias", "0", "2"]
    assert set(table["kind"]) == {"parameter", "module"}
    for name, G in g.items():
        Gn = G.reshape(30, -1).numpy()
        assert table.loc[name, "trace"] == pytest.approx(np.trace(np.atleast_2d(
            np.cov(Gn, rowvar=False))), rel=1e-10)
        np.testing.assert_allclose(r.layer_eigenvalues[name].numpy(), numpy_spectrum(Gn),
                                   rtol=1e-8, atol=1e-14)
    module0 = np.concatenate([g["0.weight"].reshape(30, -1), g["0.bias"]], axis=1)
    np.testing.assert_allclose(r.layer_eigenvalues["0"].numpy(), numpy_spectrum(module0),
                               rtol=1e-8)
    params = table[table["kind"] == "parameter"]
    assert params["trace"].sum() == pytest.approx(r.trace, rel=1e-10)
    assert params["trace_fraction"].sum() == pytest.approx(1.0)
    assert table.loc["0", "trace"] == pytest.approx(
        table.loc["0.weight", "trace"] + table.loc["0.bias", "trace"], rel=1e-10)


def test_to_dict_is_a_flat_row_keyed_by_attribute_names():
    r = noise_stats(torch.randn(20, 7, dtype=torch.float64), batch_size=4)
    row = r.to_dict()
    for key in ("trace", "noise_scale", "effective_rank", "participation_ratio", "stable_rank",
                "powerlaw_exponent", "isotropic_effective_rank", "tail_index", "kurtosis",
                "minibatch_trace", "noise_to_signal", "n", "dim", "noise_scale_se",
                "grad_sq_norm_se"):
        assert row[key] == getattr(r, key) or math.isnan(getattr(r, key)), key
    assert all(isinstance(v, int | float) for v in row.values())
    assert "mean" not in row and "eigenvalues" not in row and "layers" not in row
    assert isinstance(r, NoiseStats)


def test_no_batch_size_gives_nan_minibatch_figures():
    r = noise_stats(torch.randn(10, 3, dtype=torch.float64), shape=False)
    assert math.isnan(r.minibatch_trace) and math.isnan(r.noise_to_signal)
    assert math.isnan(r.batch_size)


def test_zero_noise_gives_empty_spectrum_and_nan_ranks():
    G = torch.ones(6, 4, dtype=torch.float64)
    r = noise_stats(G)
    assert r.trace == 0.0 and r.eigenvalues.numel() == 0
    assert math.isnan(r.effective_rank) and math.isnan(r.tail_index)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="n=1"):
        noise_stats(torch.randn(1, 3))
    G = torch.randn(10, 3)
    G[7, 1] = float("nan")
    with pytest.raises(ValueError, match="sample 7"):
        noise_stats(G)
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        noise_stats(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="batch_size.*0"):
        noise_stats(torch.randn(10, 3), batch_size=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    G = torch.randn(64, 500, dtype=torch.float32)
    a, b = noise_stats(G, shape=False), noise_stats(G.cuda(), shape=False)
    assert b.mean.device.type == "cpu"
    np.testing.assert_allclose(a.eigenvalues.numpy(), b.eigenvalues.numpy(), rtol=1e-6)
    assert a.trace == pytest.approx(b.trace, rel=1e-9)


def test_noise_stats_from_a_gram_matrix_equals_from_gradients():
    rng = np.random.default_rng(11)
    G = torch.from_numpy(rng.standard_normal((30, 200)) + 0.5)
    full = noise_stats(G, batch_size=5, dataset_size=100)
    fast = noise_stats(gram=G @ G.T, dim=200, batch_size=5, dataset_size=100)
    for key, value in full.to_dict().items():
        if key in ("tail_index", "normality_pvalue", "normality_reject_fraction", "kurtosis"):
            assert math.isnan(getattr(fast, key))  # per-coordinate figures need gradients
        else:
            assert getattr(fast, key) == pytest.approx(value, rel=1e-9, nan_ok=True), key
    np.testing.assert_allclose(fast.eigenvalues.numpy(), full.eigenvalues.numpy(), rtol=1e-9)
    assert fast.mean.numel() == 0 and fast.diag_variance.numel() == 0
    given = noise_stats(gram=G @ G.T, dim=200, mean=G.mean(0), diag_variance=G.var(0))
    assert torch.allclose(given.mean, full.mean) and given.mean_sq_norm == pytest.approx(
        full.mean_sq_norm, rel=1e-12)
    with pytest.raises(ValueError, match="not both"):
        noise_stats(G, gram=G @ G.T, dim=200)
    with pytest.raises(ValueError, match="dim=None"):
        noise_stats(gram=G @ G.T)
    with pytest.raises(ValueError, match=r"square .*\(30, 200\)"):
        noise_stats(gram=G, dim=200)


def leave_one_out(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|G|² and B_simple recomputed from scratch on each of the n leave-one-out samples."""
    signal, scale = [], []
    for k in range(len(G)):
        rest = np.delete(G, k, axis=0)
        trace = np.var(rest, axis=0, ddof=1).sum()
        g2 = rest.mean(0) @ rest.mean(0) - trace / len(rest)
        signal.append(g2)
        scale.append(trace / g2)
    return np.array(signal), np.array(scale)


def jackknife_se(values: np.ndarray) -> float:
    n = len(values)
    return math.sqrt((n - 1) / n * ((values - values.mean()) ** 2).sum())


@pytest.mark.parametrize("n,d", [(12, 5), (40, 300)])
def test_jackknife_errors_match_an_explicit_leave_one_out_loop(n, d):
    rng = np.random.default_rng(n)
    G = rng.standard_normal((n, d)) + 0.8
    signal, scale = leave_one_out(G)
    stats = noise_stats(torch.from_numpy(G), shape=False)
    assert stats.grad_sq_norm_se == pytest.approx(jackknife_se(signal), rel=1e-9)
    assert stats.noise_scale_se == pytest.approx(jackknife_se(scale), rel=1e-9)
    fast = noise_stats(gram=torch.from_numpy(G @ G.T), dim=d)
    assert fast.grad_sq_norm_se == pytest.approx(stats.grad_sq_norm_se, rel=1e-9)
    assert fast.noise_scale_se == pytest.approx(stats.noise_scale_se, rel=1e-9)


def test_jackknife_error_matches_the_spread_over_independent_draws():
    # R independent probes of the same distribution: the standard deviation of B_simple across
    # them is what the jackknife estimates from one probe. The Monte Carlo standard deviation
    # has relative error ≈ 1/sqrt(2(R-1)); allow four of those.
    rng = np.random.default_rng(3)
    n, d, R = 200, 20, 300
    mu, scales = np.full(d, 0.3), np.linspace(0.5, 2.0, d)
    draws = [noise_stats(torch.from_numpy(mu + scales * rng.standard_normal((n, d))),
                         shape=False) for _ in range(R)]
    tolerance = 4 / math.sqrt(2 * (R - 1))
    for value, error in (("noise_scale", "noise_scale_se"), ("grad_sq_norm", "grad_sq_norm_se")):
        spread = np.std([getattr(s, value) for s in draws], ddof=1)
        estimate = np.mean([getattr(s, error) for s in draws])
        assert abs(estimate / spread - 1) < tolerance, (value, estimate, spread)


def test_a_non_positive_grad_norm_estimate_gives_nan_not_a_negative_noise_scale():
    # Zero-mean noise: the unbiased |G|² estimate is negative about half the time.
    rng = np.random.default_rng(0)
    seen = False
    for _ in range(20):
        G = torch.from_numpy(rng.standard_normal((16, 10)))
        s = noise_stats(G, batch_size=4, shape=False)
        if s.grad_sq_norm <= 0:
            seen = True
            assert math.isnan(s.noise_scale) and math.isnan(s.noise_scale_se)
            assert math.isnan(s.noise_to_signal)
            assert s.grad_sq_norm_se > 0  # the estimate and its error stay reported
        else:
            assert s.noise_scale > 0
    assert seen


def test_noise_scale_error_is_infinite_when_a_leave_one_out_signal_is_not_positive():
    # A weak mean: the full-sample |G|² is positive, but without one of the samples it is not.
    # The ratio is then undetermined and its error is reported as infinite.
    G = np.random.default_rng(1).standard_normal((10, 4)) + 0.3
    signal, _ = leave_one_out(G)
    assert (signal <= 0).any()
    s = noise_stats(torch.from_numpy(G), shape=False)
    assert s.grad_sq_norm > 0 and s.noise_scale > 0
    assert s.noise_scale_se == math.inf


def test_jackknife_needs_three_samples():
    s = noise_stats(torch.tensor([[1.0, 2.0], [2.0, 1.5]], dtype=torch.float64), shape=False)
    assert math.isnan(s.grad_sq_norm_se) and math.isnan(s.noise_scale_se)
