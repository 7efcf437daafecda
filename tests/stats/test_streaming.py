"""Streaming statistics: exact moments and Gram over chunks, and the accuracy of the sketch."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sgn_lab.grads.gram as gram
import sgn_lab.stats.streaming as streaming
from sgn_lab.grads import flatten_grads, per_sample_grads
from sgn_lab.stats.noise import noise_stats
from sgn_lab.stats.streaming import (
    Moments,
    sketched_isotropic_spectrum,
    streaming_moments,
    streaming_noise_stats,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sum_loss(outputs, targets):
    """With nn.Linear(d, 1, bias=False) the per-sample gradient of this loss is the input row."""
    return outputs.sum()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


class Scaled(nn.Module):
    """A learned scale (a parameter multiplied with activations) and optional dropout."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.lin = nn.Linear(5, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.lin(x)) * self.scale))


def classification_data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def reference(model, x, y, loss_fn=F.cross_entropy, **kwargs):
    """noise_stats on the whole (n, d) matrix of per-sample gradients."""
    G = flatten_grads(per_sample_grads(model, loss_fn, x, y))
    return noise_stats(G, shape=False, **kwargs)


def record_calls(monkeypatch, name, module=streaming):
    """Spy on module.<name>: the list of sample counts it was called with."""
    original = getattr(module, name)
    sizes = []

    def spy(model, loss_fn, inputs, targets, *args, **kwargs):
        sizes.append(int(targets.shape[0]))
        return original(model, loss_fn, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return sizes


# --- moments ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 23])
def test_moments_equal_noise_stats(chunk_size):
    model, (x, y) = mlp(), classification_data()
    ref = reference(model, x, y)
    m = streaming_moments(model, F.cross_entropy, x, y, chunk_size=chunk_size)
    assert isinstance(m, Moments) and (m.n, m.dim) == (23, ref.dim)
    assert m.mean.dtype == m.diag_variance.dtype == torch.float64
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(m.diag_variance, ref.diag_variance, rtol=1e-10, atol=0)
    assert m.trace == pytest.approx(ref.trace, rel=1e-10)


def test_float32_large_mean_offset_is_not_cancelled():
    # g_i = x_i: coordinates with mean 1e5 and standard deviation about 1, stored in float32.
    n, d = 200, 30
    g = torch.Generator().manual_seed(1)
    x = (1e5 + torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    ref = noise_stats(x, shape=False)  # two-pass in float64 over the whole (n, d) matrix
    m = streaming_moments(nn.Linear(d, 1, bias=False), sum_loss, x, torch.zeros(n), chunk_size=7)
    error = float(((m.diag_variance - ref.diag_variance).abs() / ref.diag_variance).max())
    assert error < 1e-10
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=0)

    # The textbook one-pass formula, even accumulated in float64, loses ~10 of the 16 digits.
    X = x.double()
    naive = ((X * X).sum(0) - n * X.mean(0) ** 2) / (n - 1)
    naive_error = float(((naive - ref.diag_variance).abs() / ref.diag_variance).max())
    assert naive_error > 1e-8 and naive_error > 1e3 * max(error, 1e-14), (naive_error, error)


def test_chunks_bound_the_samples_per_pass(monkeypatch):
    sizes = record_calls(monkeypatch, "per_sample_grads")
    model, (x, y) = mlp(), classification_data()
    streaming_moments(model, F.cross_entropy, x, y, chunk_size=7)
    assert sizes == [7, 7, 7, 2]

    sizes.clear()
    streaming_noise_stats(model, F.cross_entropy, x, y, chunk_size=7, gram="sketch", sketch_dim=4)
    assert sizes == [7, 7, 7, 2]  # one pass: moments and sketch share each chunk

    sizes.clear()  # per-sample path of "exact" (dropout): chunk a once, later chunks per a
    dropout = Scaled(dropout=0.2).double().train()
    streaming_noise_stats(dropout, F.cross_entropy, x, y, chunk_size=7, gram="exact")
    assert max(sizes) == 7 and len(sizes) == 4 + 4 * 3 // 2

    sizes.clear()
    pairs = record_calls(monkeypatch, "record_chain", gram)  # once per pass
    streaming_noise_stats(model, F.cross_entropy, x, y, chunk_size=7, gram="exact")
    assert sizes == [7, 7, 7, 2]  # the moments pass; the Gram path needs no per-sample grads
    assert pairs == [14, 14, 9, 14, 9, 9]  # one recording pass per pair of chunks (a, b), a < b


def test_seeded_dropout_is_reproducible_per_chunk():
    model, (x, y) = Scaled(dropout=0.5).double(), classification_data()
    model.train()
    a = streaming_moments(model, F.cross_entropy, x, y, chunk_size=5, seed=3)
    b = streaming_moments(model, F.cross_entropy, x, y, chunk_size=5, seed=3)
    c = streaming_moments(model, F.cross_entropy, x, y, chunk_size=5, seed=4)
    assert torch.equal(a.diag_variance, b.diag_variance)
    assert not torch.equal(a.diag_variance, c.diag_variance)


# --- exact Gram ---------------------------------------------------------------------------


def assert_same_stats(r, ref, rtol=1e-9):
    assert (r.n, r.dim) == (ref.n, ref.dim)
    assert r.trace == pytest.approx(ref.trace, rel=rtol)
    assert r.eigenvalues.shape == ref.eigenvalues.shape
    top = float(ref.eigenvalues[0])
    torch.testing.assert_close(r.eigenvalues, ref.eigenvalues, rtol=rtol, atol=rtol * top)
    for name in (
        "effective_rank",
        "participation_ratio",
        "stable_rank",
        "top1_energy",
        "top5_energy",
        "powerlaw_exponent",
        "mean_sq_norm",
        "grad_sq_norm",
        "noise_scale",
        "minibatch_trace",
        "noise_to_signal",
        "isotropic_effective_rank",
        "isotropic_participation_ratio",
    ):
        expected = pytest.approx(getattr(ref, name), rel=rtol, nan_ok=True)
        assert getattr(r, name) == expected, name
    torch.testing.assert_close(r.isotropic_eigenvalues, ref.isotropic_eigenvalues, rtol=rtol,
                               atol=rtol * top)
    torch.testing.assert_close(r.mean, ref.mean, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(r.diag_variance, ref.diag_variance, rtol=1e-10, atol=0)


@pytest.mark.parametrize("chunk_size", [5, 23])
@pytest.mark.parametrize("kind", ["mlp", "scaled"])
def test_exact_equals_unchunked(kind, chunk_size, monkeypatch):
    model = mlp() if kind == "mlp" else Scaled().double()
    pairs = record_calls(monkeypatch, "record_chain", gram)  # once per pass
    x, y = classification_data()
    ref = reference(model, x, y, batch_size=4, dataset_size=100)
    r = streaming_noise_stats(
        model, F.cross_entropy, x, y, chunk_size=chunk_size, gram="exact",
        batch_size=4, dataset_size=100,
    )
    assert_same_stats(r, ref)
    chunks = math.ceil(23 / chunk_size)
    assert len(pairs) == (1 if chunks == 1 else chunks * (chunks - 1) // 2)
    assert math.isnan(r.tail_index)  # shape figures need the (n, d) matrix


def test_exact_with_dropout_recomputes_the_same_chunks():
    # Active dropout: the Gram is built chunk-pairwise from per-sample gradients with a seed per
    # chunk, so a chunk recomputed for every pair sees the same masks and K is one Gram: its
    # centred trace equals the exact streamed trace.
    model, (x, y) = Scaled(dropout=0.3).double(), classification_data()
    model.train()
    r = streaming_noise_stats(model, F.cross_entropy, x, y, chunk_size=4, gram="exact", seed=2)
    assert float(r.eigenvalues.sum()) == pytest.approx(r.trace, rel=1e-9)
    assert bool((r.eigenvalues > 0).all())


def test_auto_picks_exact_when_the_gram_fits():
    model, (x, y) = mlp(), classification_data()
    fits = streaming_noise_stats(model, F.cross_entropy, x, y, sketch_dim=4,
                                 max_gram_bytes=8 * 23**2)
    assert fits.eigenvalues.numel() == 22
    assert_same_stats(fits, reference(model, x, y))
    sketched = streaming_noise_stats(model, F.cross_entropy, x, y, sketch_dim=4,
                                     max_gram_bytes=8 * 23**2 - 1)
    assert sketched.eigenvalues.numel() == 4
    assert sketched.trace == pytest.approx(fits.trace, rel=1e-12)


# --- sketch -------------------------------------------------------------------------------

D, N, EXPONENT = 2000, 1200, 1.0


@pytest.fixture(scope="module")
def power_law():
    """Gaussian rows with population covariance diag(j^-s), j = 1..d, and their exact stats."""
    g = torch.Generator().manual_seed(0)
    scales = torch.arange(1, D + 1, dtype=torch.float64) ** (-EXPONENT / 2)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * scales
    return x, noise_stats(x, shape=False)


def sketch_of(x, k, seed=0, chunk_size=256):
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    return streaming_noise_stats(
        model, sum_loss, x, torch.zeros(x.shape[0]), gram="sketch", sketch_dim=k, seed=seed,
        chunk_size=chunk_size,
    )


def documented_errors(r, exact, k):
    """Errors of the sketch and the bounds streaming_noise_stats documents for them."""
    lam, sigma = exact.eigenvalues, math.sqrt(2 / k)
    out = {}
    for i in range(3):
        others = torch.cat([lam[:i], lam[i + 1 :]])
        bias = float((others / (lam[i] - others)).sum()) / k
        error = float(r.eigenvalues[i] / lam[i]) - 1
        out[f"lambda_{i + 1}"] = (error, bias - 3 * sigma, bias + 3 * sigma)
    er = exact.effective_rank
    root = math.sqrt(er / k)
    out["effective_rank"] = (
        r.effective_rank / er - 1, -0.7 * root - 2 * sigma, -0.3 * root + 2 * sigma
    )
    pr = exact.participation_ratio
    predicted = k * pr / (k + 1 + pr)
    out["participation_ratio"] = (r.participation_ratio / predicted - 1, -3 * sigma, 3 * sigma)
    return out


@pytest.mark.parametrize("k", [256, 1024])
def test_sketch_accuracy_on_a_power_law_spectrum(power_law, k):
    x, exact = power_law
    r = sketch_of(x, k)
    # Exact fields are exact, whatever the sketch.
    assert (r.n, r.dim) == (N, D)
    assert r.trace == pytest.approx(exact.trace, rel=1e-10)
    torch.testing.assert_close(r.diag_variance, exact.diag_variance, rtol=1e-10, atol=0)
    torch.testing.assert_close(r.mean, exact.mean, rtol=1e-10, atol=1e-14)
    assert r.mean_sq_norm == pytest.approx(exact.mean_sq_norm, rel=1e-10)
    assert r.eigenvalues.numel() == k
    # Sketched fields within the documented accuracy.
    errors = documented_errors(r, exact, k)
    for name, (error, low, high) in errors.items():
        assert low <= error <= high, (name, error, (low, high), errors)


@pytest.mark.slow
@pytest.mark.parametrize("exponent", [1.0, 1.5])
@pytest.mark.parametrize("k", [256, 1024])
def test_sketch_accuracy_over_seeds(k, exponent):
    g = torch.Generator().manual_seed(5)
    scales = torch.arange(1, D + 1, dtype=torch.float64) ** (-exponent / 2)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * scales
    exact = noise_stats(x, shape=False)
    runs = [documented_errors(sketch_of(x, k, seed=seed), exact, k) for seed in range(8)]
    for name in runs[0]:
        errors = np.array([run[name][0] for run in runs])
        low, high = runs[0][name][1:]
        assert ((errors >= low) & (errors <= high)).all(), (name, errors, (low, high))
    # On average the top eigenvalue's error is the predicted bias, within its standard error.
    lambda_1 = np.array([run["lambda_1"][0] for run in runs])
    bias = (runs[0]["lambda_1"][1] + runs[0]["lambda_1"][2]) / 2
    assert abs(lambda_1.mean() - bias) <= 3 * math.sqrt(2 / k / len(runs)), lambda_1


def test_sketch_matches_the_projection_applied_directly():
    # Reassemble R from its blocks by sketching the identity (row j of the result is R e_j),
    # then compare with the eigenvalues of R S Rᵀ formed in one piece.
    d, n, k = 300, 40, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 2.0
    r = sketch_of(x, k, seed=7, chunk_size=9)
    accumulator = streaming._SketchAccumulator(k, 7, torch.device("cpu"))
    R = accumulator.project({"weight": torch.eye(d, dtype=torch.float64)[:, None, :]}).T
    S = torch.from_numpy(np.cov(x.numpy(), rowvar=False))
    expected = torch.linalg.eigvalsh(R @ S @ R.T).flip(0)
    torch.testing.assert_close(r.eigenvalues, expected, rtol=1e-10, atol=1e-12 * float(expected[0]))


def test_sketch_is_deterministic_under_the_seed():
    d, n, k = 300, 40, 16
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a, b = sketch_of(x, k, seed=0), sketch_of(x, k, seed=0)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.isotropic_eigenvalues, b.isotropic_eigenvalues)
    other = sketch_of(x, k, seed=1)
    assert not torch.allclose(a.eigenvalues, other.eigenvalues, rtol=1e-3)
    # R is drawn per (seed, parameter, column block), never per chunk: the chunking is free.
    rechunked = sketch_of(x, k, seed=0, chunk_size=7)
    torch.testing.assert_close(rechunked.eigenvalues, a.eigenvalues, rtol=1e-10, atol=0)


def test_sketch_never_allocates_k_by_d(monkeypatch):
    d, k, n = 100_000, 64, 6
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(n, dtype=torch.long)
    shapes = []
    randn = torch.randn

    def spy(*args, **kwargs):
        out = randn(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "randn", spy)
    model = nn.Linear(d, 2)  # parameters of 2·d and 2 entries: blocks never straddle them
    r = streaming_noise_stats(model, F.cross_entropy, x, y, gram="sketch", sketch_dim=k,
                              chunk_size=4)
    assert r.dim == 2 * d + 2 and r.eigenvalues.numel() == min(k, n - 1)
    width = streaming._SKETCH_BLOCK_ELEMENTS // k
    full, rest = divmod(2 * d, width)
    per_chunk = [(k, width)] * full + [(k, rest), (k, 2)]
    assert shapes == per_chunk * 2  # two chunks, the same blocks of R for each
    assert max(a * b for a, b in shapes) <= streaming._SKETCH_BLOCK_ELEMENTS < k * r.dim
    # For a 10M-parameter model with k = 1024 a block is 1024 × 4096: 4M entries, not 10G.
    assert streaming._SketchAccumulator(1024, 0, torch.device("cpu")).width == 4096


def test_sketch_preserves_norms_in_expectation():
    # E|R g|² = |g|² (R with N(0, 1/k) entries), also across the column blocks of R.
    d, k = 20_000, 256
    x = torch.randn(8, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    accumulator = streaming._SketchAccumulator(k, 0, torch.device("cpu"))
    accumulator.width = 3000  # several blocks per row
    z = accumulator.project({"w": x})
    ratio = (z * z).sum(1) / (x * x).sum(1)
    assert float((ratio - 1).abs().max()) < 4 * math.sqrt(2 / k)


# --- the sketched isotropic reference -----------------------------------------------------


@pytest.mark.parametrize("d,n,k", [(300, 200, 32), (20, 200, 32), (300, 12, 32)])
def test_sketched_isotropic_spectrum_matches_simulation(d, n, k):
    """The Bartlett construction against sketching isotropic draws directly, on average."""
    rng = np.random.default_rng(0)
    trace, reps = 3.0, 300
    simulated, constructed = [], []
    for rep in range(reps):
        X = rng.standard_normal((n, d)) * math.sqrt(trace / d)
        R = rng.standard_normal((k, d)) / math.sqrt(k)
        Z = (X - X.mean(0)) @ R.T
        cov = torch.from_numpy(Z.T @ Z / (n - 1))
        simulated.append(torch.linalg.eigvalsh(cov).flip(0).numpy())
        constructed.append(sketched_isotropic_spectrum(trace, d, n, k, seed=rep).numpy())
    rank = min(d, n - 1, k)
    assert all(c.size == rank for c in constructed)
    sim = np.stack(simulated)[:, :rank].mean(0)
    con = np.stack(constructed).mean(0)
    assert con.sum() == pytest.approx(trace, rel=0.02)  # E tr = tr S
    np.testing.assert_allclose(con, sim, rtol=0.06)


def test_isotropic_reference_uses_the_exact_trace_and_the_true_dimension():
    d, n, k = 600, 300, 32
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    r = sketch_of(x, k, seed=11)
    expected = sketched_isotropic_spectrum(r.trace, d, n, k, seed=11)
    torch.testing.assert_close(r.isotropic_eigenvalues, expected, rtol=0, atol=0)
    # Isotropic data measured through the sketch looks like its reference.
    assert r.effective_rank == pytest.approx(r.isotropic_effective_rank, rel=0.03)
    assert float(r.eigenvalues[0]) == pytest.approx(float(expected[0]), rel=0.15)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"chunk_size": 0}, "chunk_size.*0"),
        ({"chunk_size": 2.5}, "chunk_size.*2.5"),
        ({"chunk_size": True}, "chunk_size.*True"),
        ({"sketch_dim": 1}, "sketch_dim.*1"),
        ({"gram": "fast"}, "'fast'"),
        ({"max_gram_bytes": 0}, "max_gram_bytes.*0"),
        ({"seed": -1}, "seed.*-1"),
        ({"batch_size": 0}, "batch_size.*0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    model, (x, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match=match):
        streaming_noise_stats(model, F.cross_entropy, x, y, **kwargs)


def test_bad_moment_arguments_are_named():
    model, (x, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match="chunk_size.*-3"):
        streaming_moments(model, F.cross_entropy, x, y, chunk_size=-3)
    with pytest.raises(ValueError, match="n=1"):
        streaming_moments(model, F.cross_entropy, x[:1], y[:1])
    with pytest.raises(ValueError, match="n=1"):
        streaming_noise_stats(model, F.cross_entropy, x[:1], y[:1])
    with pytest.raises(ValueError, match="dim.*0"):
        sketched_isotropic_spectrum(1.0, 0, 10, 4)
