"""Tests for sgn_lab.minibatch_noise_shape: the shape of the minibatch noise g_B − ḡ.

Every random input comes from a fixed seed, so each test is deterministic; the statistical
tolerances are derived from the sample sizes (each docstring says how), as in test_tails.py:
5 standard errors, so that a correct implementation fails with probability below ~1e-6.

The pool. The R draws of one B come from one pool of n rows. Two draws share B²/n rows on
average, a fraction B/n of each, so their noise values are dependent, with a correlation of
the order of rho ~ B/n. A statistic averaged over the R draws then has its variance inflated
by about 1 + (R − 1)·rho ~ 1 + R·B/n over that of R independent minibatch-noise samples, and
the tolerances take the standard error of i.i.d. samples times sqrt(1 + R·B/n)
(``_inflation``). The pools here hold n >= 2·R·max(B) rows, so that factor stays below
sqrt(1.5). (With n ~ R, as in a probe of n = 256 and R = 256 draws at B = 64, the draws are
far from independent; that is a property of the measurement, documented in
minibatch_noise_shape, not something these tests could bound.)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import sgn_lab
import sgn_lab.stats.tails as tails
from sgn_lab.stats.tails import MINIBATCH_SHAPE_COLUMNS, minibatch_noise_shape, shape_stats

R = 2048  # draws: at R = 2048 the std standardisation's bias on alpha-hat is negligible
D = 50  # coordinates: R·D ~ 1e5 pooled values, se(1/alpha-hat) ~ 0.012 (test_tails.py)
SIZES = (1, 4, 16)
N = 2 * R * max(SIZES)  # the pool: R·B/n <= 1/2 at every B


def _inflation(draws: int, B: int, n: int) -> float:
    """Factor on an i.i.d. standard error for R draws of B rows sharing a pool of n (above)."""
    return math.sqrt(1 + draws * B / n)


def _inv_alpha_se(x: np.ndarray | torch.Tensor) -> float:
    """Standard error of 1/alpha-hat from the sample itself (see test_tails._inv_alpha_se):
    sd over the K2 blocks of log|Y_i| − mean_j log|X_ij|, over sqrt(K2) and log K1."""
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[x != 0]
    k1 = round(math.sqrt(x.size))
    k2 = x.size // k1
    blocks = x[: k1 * k2].reshape(k2, k1)
    d = np.log(np.abs(blocks.sum(axis=1))) - np.log(np.abs(blocks)).mean(axis=1)
    return float(d.std(ddof=1) / math.sqrt(k2) / math.log(k1))


def _pooled(noise: np.ndarray, seed: int) -> np.ndarray:
    """The values shape_stats pools: standardised per coordinate, in a random order."""
    z = (noise - noise.mean(axis=0)) / noise.std(axis=0, ddof=1)
    return np.random.default_rng(seed).permutation(z.ravel())


def _stable(alpha: float, size: tuple[int, ...], seed: int) -> np.ndarray:
    """Symmetric alpha-stable values by the Chambers-Mallows-Stuck formula (exact; what
    scipy.stats.levy_stable draws, at a fraction of its time for millions of values)."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(-np.pi / 2, np.pi / 2, size)
    w = rng.exponential(size=size)
    return (np.sin(alpha * v) / np.cos(v) ** (1 / alpha)
            * (np.cos((1 - alpha) * v) / w) ** ((1 - alpha) / alpha))


def _table(G: np.ndarray, sizes=SIZES, draws: int = R, **kwargs) -> pd.DataFrame:
    table = minibatch_noise_shape(torch.as_tensor(G), sizes, draws=draws, **kwargs)
    assert list(table.columns) == list(MINIBATCH_SHAPE_COLUMNS)
    assert list(table["batch_size"]) == list(sizes)
    return table.set_index("batch_size")


# --- the draws themselves ---------------------------------------------------------------------


def test_each_draw_is_a_uniform_subset_centred_on_the_mean_of_all_rows(monkeypatch):
    """With G the identity (row i = e_i), a noise sample plus 1/n is the draw's weight vector:
    exactly B entries 1/B (B distinct rows: without replacement) and 0 elsewhere (centred on
    the mean 1/n of all n rows). Over R draws the count c_i of draws holding row i has mean
    R·B/n; T = Σ_i (c_i − R·B/n)² / (R·B/n) has mean n(1 − B/n) (Var c_i = R p (1 − p), p =
    B/n) and, like a chi-square, a standard deviation about sqrt(2n)(1 − p): 5 of those either
    side. Sizes above n/2 take the path that draws the rows left out; B = 1 and 39 (one row
    picked) sum by gathers, B = 3 and 25 by the 0/1 matrix."""
    n, draws = 40, 400
    captured = []

    def spy(noise, **kwargs):
        captured.append(noise.clone())
        return shape_stats(noise, **kwargs)

    monkeypatch.setattr(tails, "shape_stats", spy)
    sizes = [1, 3, 25, 39]
    minibatch_noise_shape(torch.eye(n), sizes, draws=draws, seed=5)
    for B, noise in zip(sizes, captured, strict=True):
        assert noise.shape == (draws, n) and noise.dtype == torch.float64
        w = noise + 1 / n
        in_draw = (w - 1 / B).abs() < 1e-12
        assert ((w.abs() < 1e-12) | in_draw).all(), B
        assert (in_draw.sum(dim=1) == B).all(), B
        p = B / n
        counts = in_draw.sum(dim=0).double()
        t = float(((counts - draws * p) ** 2).sum() / (draws * p))
        spread = 5 * math.sqrt(2 * n) * (1 - p)
        assert abs(t - n * (1 - p)) < spread, (B, t)
        distinct = len({tuple(row.nonzero().ravel().tolist()) for row in in_draw})
        assert distinct > min(draws, math.comb(n, B)) // 2, B  # not one subset repeated


@pytest.mark.parametrize(("n", "k"), [(16, 2), (6, 3), (10, 4)])
def test_subsets_are_uniform_on_both_paths(n, k):
    """Sparse (8k <= n: redrawn repeats) and dense (8k > n: permutations) subsets: each of the
    m = C(n, k) subsets is drawn about R/m times. Pearson's statistic over the m cells is
    chi-square with m − 1 degrees of freedom: mean m − 1, sd sqrt(2(m − 1)); 5 sd either side
    (a rule that never drew some subsets, or favoured low indices, lands far outside)."""
    m = math.comb(n, k)
    draws = 200 * m
    picks = tails._uniform_subsets(n, k, draws, torch.Generator().manual_seed(n + k))
    assert picks.shape == (draws, k)
    rows = picks.sort(dim=1).values
    assert (rows[:, 1:] != rows[:, :-1]).all()  # k distinct rows in each
    codes = (rows * torch.tensor([n**i for i in range(k)])).sum(dim=1)
    counts = torch.unique(codes, return_counts=True)[1].double()
    assert len(counts) == m
    chi2 = float(((counts - 200) ** 2).sum() / 200)
    assert abs(chi2 - (m - 1)) < 5 * math.sqrt(2 * (m - 1)), chi2


# --- tail index -------------------------------------------------------------------------------


def test_symmetric_stable_noise_keeps_its_alpha_at_every_batch_size():
    """Every noise value is exactly symmetric alpha-stable, whatever B: g_B − ḡ = (1/B − 1/n)
    Σ_{i in S} x_i − (1/n) Σ_{i not in S} x_i is a linear combination of n independent
    symmetric alpha-stable values. So 1/alpha-hat is within 5 standard errors of 1/alpha at
    every B; the standard error is that of R·D i.i.d. values standardised and pooled the same
    way, times the pool's inflation (module docstring). R = 2048 draws keep the bias of the
    std standardisation (test_tails.py: alpha-hat ~ 1.7 at 64 rows) far below that error."""
    alpha = 1.5
    table = _table(_stable(alpha, (N, D), seed=21), seed=1)
    se = _inv_alpha_se(_pooled(_stable(alpha, (R, D), seed=22), seed=23))
    for B, alpha_hat in table["tail_index"].items():
        tolerance = 5 * se * _inflation(R, B, N)
        assert abs(1 / alpha_hat - 1 / alpha) < tolerance, (B, alpha_hat, se)


def test_gaussian_noise_has_alpha_two_and_looks_gaussian_at_every_batch_size():
    """Gaussian per-sample noise: every noise value is exactly Gaussian, so alpha-hat is 2
    within 5 (inflated) standard errors; the sample excess kurtosis has se sqrt(24/R) (and a
    mean over projections at most that); isotropic noise makes the m = 32 projection tests
    nearly independent, so the rejected fraction is about Binomial(m, 0.05) / m."""
    G = np.random.default_rng(24).standard_normal((N, D))
    table = _table(G, seed=2)
    se = _inv_alpha_se(_pooled(np.random.default_rng(25).standard_normal((R, D)), 26))
    for B, row in table.iterrows():
        inflation = _inflation(R, B, N)
        assert abs(1 / row["tail_index"] - 1 / 2) < 5 * se * inflation, (B, row["tail_index"])
        assert abs(row["kurtosis"]) < 5 * math.sqrt(24 / R) * inflation, B
        assert row["normality_reject_fraction"] <= 0.05 + 5 * math.sqrt(0.05 * 0.95 / 32), B


def _t_means(B: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Means of B i.i.d. Student-t(3) values: the minibatch noise of an infinite pool."""
    return np.random.default_rng(seed).standard_t(3, size=(B, *shape)).mean(axis=0)


def test_student_t_noise_moves_towards_gaussian_tails_as_the_batch_grows():
    """Student-t (nu = 3) coordinates have finite variance: their minibatch means approach the
    Gaussian as B grows, and alpha-hat approaches 2. At B = 1 the Mohammadi estimator reads
    this finite-variance law as somewhat heavy: block sums of K1 values are nearly Gaussian,
    so 1/alpha-hat − 1/2 ~ (E log|N(0,1)| − E log|T/sd(T)|) / log K1 = 0.365 / log K1 ~ 0.055
    here (alpha-hat ~ 1.8), a small effect, hence R·d ~ 5e5 values (se ~ 0.006).

    (1) At each B, 1/alpha-hat matches that of R·d fresh i.i.d. means of B t-values (the noise
    of an infinite pool, standardised and pooled the same way) within 5 standard errors of
    the difference, sqrt((se·inflation)² + se²). (2) At B = 1 it lies more than 5 standard
    errors above 1/2 (heavier than Gaussian, ~9 expected); at the largest B it is within 5
    of 1/2 (Gaussian)."""
    draws, d = 512, 1024  # finite variance: no std-standardisation bias to keep R large for
    n = 2 * draws * max(SIZES)
    G = np.random.default_rng(27).standard_t(3, size=(n, d))
    table = _table(G, draws=draws, seed=3)
    inv = {B: 1 / a for B, a in table["tail_index"].items()}
    se = {}
    for B in SIZES:
        reference = _pooled(_t_means(B, (draws, d), seed=28 + B), seed=40 + B)
        se_iid = _inv_alpha_se(reference)
        se[B] = se_iid * _inflation(draws, B, n)
        inv_reference = 1 / sgn_lab.tail_index(reference)
        tolerance = 5 * math.hypot(se[B], se_iid)
        assert abs(inv[B] - inv_reference) < tolerance, (B, 1 / inv[B], 1 / inv_reference)
    first, last = SIZES[0], SIZES[-1]
    assert inv[first] - 0.5 > 5 * se[first], (inv, se)
    assert abs(inv[last] - 0.5) < 5 * se[last], (inv, se)


# --- kurtosis and normality -------------------------------------------------------------------


def _mean_laplace_kurtosis_variance(B: int) -> float:
    """Asymptotic n·Var of the sample excess kurtosis of a mean of B i.i.d. Laplace values.

    Laplace standardised to variance 1 has cumulants k4, k6, k8 = 3, 30, 630; a mean of B
    i.i.d. copies, standardised, has k4/B, k6/B², k8/B³. With the moments m4 = k4 + 3,
    m6 = k6 + 15 k4 + 15, m8 = k8 + 28 k6 + 35 k4² + 210 k4 + 105, the variance is
    m8 − 4 m4 m6 + 4 m4³ − m4² (test_tails.py: 1188 at B = 1, 24 for the Gaussian)."""
    k4, k6, k8 = 3 / B, 30 / B**2, 630 / B**3
    m4, m6 = k4 + 3, k6 + 15 * k4 + 15
    m8 = k8 + 28 * k6 + 35 * k4**2 + 210 * k4 + 105
    return m8 - 4 * m4 * m6 + 4 * m4**3 - m4**2


def test_laplace_noise_kurtosis_falls_as_one_over_b_and_normality_returns():
    """Multivariate Laplace per-sample noise (a Gaussian vector times sqrt(Exp(1)) per row):
    every projection of a row is exactly Laplace, excess kurtosis 3, and the projections of
    different rows are independent. A noise sample is Σ_i c_i x_i with c_i = 1/B − 1/n on
    the B drawn rows and −1/n on the others, so its projections have excess kurtosis
    3 Σ c⁴ / (Σ c²)² (= 3/B up to O(B/n)). The mean over projections of the sample kurtosis
    has at most the standard error of one, sqrt(V_B / R) (``_mean_laplace_kurtosis_variance``),
    inflated for the pool; 5 of those. R = 16384 draws make those bands (±1.4, ±0.45, ±0.3
    at B = 1, 4, 16) narrow enough to tell 3 from 3/4 and 3/4 from 0.

    Normality: at B = 1 the kurtosis z-score is 3 / sqrt(24/R) ~ 100, so every projection is
    rejected; at B = 16 it is still 0.19 / sqrt(24/R) ~ 5, so most are rejected too, but at
    B = 1024 (3/1024: z ~ 0.08, a rejection probability of ~0.05) the rejected fraction is
    back at the test level: within 5 binomial errors of m = 32 tests, inflated for their
    dependence. For Gaussian data the test statistics of two projections whose directions
    have cosine r are correlated like r³ (skewness) and r⁴ (kurtosis); random directions in
    d = 16 dimensions have r ~ 1/4, so the count's variance grows by at most 1 + 31/64 ~ 1.5."""
    draws, d, sizes = 16384, 16, (1, 4, 16)
    n = 2 * draws * max(sizes)
    rng = np.random.default_rng(29)
    G = rng.standard_normal((n, d)) * np.sqrt(rng.exponential(size=(n, 1)))
    table = _table(G, sizes, draws=draws, seed=4)
    for B, row in table.iterrows():
        c = np.r_[np.full(B, 1 / B - 1 / n), np.full(n - B, -1 / n)]
        expected = 3 * (c**4).sum() / (c**2).sum() ** 2
        se = math.sqrt(_mean_laplace_kurtosis_variance(B) / draws)
        tolerance = 5 * se * _inflation(draws, B, n)
        assert abs(row["kurtosis"] - expected) < tolerance, (B, row["kurtosis"], expected)
    assert table["kurtosis"].is_monotonic_decreasing
    assert (table["normality_reject_fraction"] > 0.8).all()
    # Far fewer draws at B = 1024 (R·B = n/2 still): the level, not the power, is tested.
    large = _table(G, (1024,), draws=256, seed=4).loc[1024]
    level = 0.05 + 5 * math.sqrt(0.05 * 0.95 / 32 * 1.5)
    assert large["normality_reject_fraction"] <= level


# --- arguments and determinism ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("G", "sizes", "draws", "match"),
    [
        (torch.zeros(10), [1], 16, r"2-D .*shape \(10,\)"),
        (torch.zeros(2, 3, 4), [1], 16, r"2-D .*shape \(2, 3, 4\)"),
        (torch.randn(10, 3), [10], 16, r"batch size 10 .*1 <= B < n = 10"),
        (torch.randn(10, 3), [4, 12], 16, r"batch size 12 "),
        (torch.randn(10, 3), [0], 16, r"batch size 0 "),
        (torch.randn(10, 3), [2.5], 16, r"batch size 2.5 "),
        (torch.randn(10, 3), [], 16, r"batch_sizes is empty"),
        (torch.randn(10, 3), [2], 7, r"draws must be an integer >= 8, got 7"),
        (torch.randn(10, 3), [2], 8.0, r"draws must be an integer >= 8, got 8.0"),
    ],
)
def test_bad_arguments_are_named(G, sizes, draws, match):
    with pytest.raises(ValueError, match=match):
        minibatch_noise_shape(G, sizes, draws=draws)


def test_the_same_seed_gives_the_same_table_and_rows_do_not_depend_on_the_others():
    G = torch.randn(300, 20, generator=torch.Generator().manual_seed(30))
    table = minibatch_noise_shape(G, [1, 4, 16], draws=64, seed=7)
    pd.testing.assert_frame_equal(minibatch_noise_shape(G, [1, 4, 16], draws=64, seed=7), table)
    pd.testing.assert_frame_equal(minibatch_noise_shape(G.double(), [1, 4, 16], draws=64,
                                                        seed=7), table)  # float32 -> 64: exact
    alone = minibatch_noise_shape(G, [16], draws=64, seed=7)
    pd.testing.assert_frame_equal(alone, table.iloc[[2]].reset_index(drop=True))
    other = minibatch_noise_shape(G, [1, 4, 16], draws=64, seed=8)
    assert (other["normality_pvalue"] != table["normality_pvalue"]).all()
    assert sgn_lab.minibatch_noise_shape is minibatch_noise_shape
