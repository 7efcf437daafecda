"""SGN statistics over many samples in chunks, with memory bounded by the chunk size.

The per-sample gradients g_1..g_n (d parameters each) are never held as one (n, d) matrix: they
are computed ``chunk_size`` samples at a time with :func:`sgn_lab.per_sample_grads` and folded
into running statistics (memory is bounded by a chunk size, never by n×d).

Moments (:func:`streaming_moments`)
    The mean ḡ, diag(S) and tr S are exact (float64) in O(chunk_size·d + d) memory. Chunks are
    combined with the parallel update of Chan, Golub & LeVeque (1979): a chunk B of n_B samples
    with mean m_B and sums of squared deviations M_B joins the running (n_A, m_A, M_A) as

        δ = m_B − m_A,   m = m_A + δ·n_B/n,   M = M_A + M_B + δ²·n_A·n_B/n,   n = n_A + n_B,

    with M_B computed two-pass inside the chunk. The textbook one-pass form Σg² − n·ḡ² subtracts
    two numbers of size n·ḡ² to get one of size (n−1)·S_jj, so it loses about
    log10(ḡ_j²/S_jj) digits (all of them in float32 once |ḡ_j| > 10³·sqrt(S_jj)); the update
    above only ever subtracts quantities of the size of the deviations themselves.

Spectrum (:func:`streaming_noise_stats`)
    ``gram="exact"``: the n×n Gram K_ij = g_i·g_j in n² float64 memory, block by block over pairs
    of sample chunks, then :func:`sgn_lab.noise_stats` on it: everything as exact as from the
    full (n, d) matrix. ``gram="sketch"``: a Johnson–Lindenstrauss sketch z_i = R g_i ∈ R^k in
    O(k² + chunk_size·(d + k)) memory for n too large for n²; the top of the spectrum to about
    sqrt(2/k) and the ranks with a known downward bias (see :func:`streaming_noise_stats`),
    compared with the isotropic reference seen through the same sketch
    (:func:`sketched_isotropic_spectrum`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from sgn_lab import checks
from sgn_lab.grads import per_sample_gram
from sgn_lab.grads.common import as_tuple, num_samples, trainable_dim
from sgn_lab.grads.vmap import per_sample_grads
from sgn_lab.seeds import Purpose, derive
from sgn_lab.stats.noise import (
    NoiseStats,
    jackknife_from_gram,
    magnitudes,
    minibatch_factor,
    noise_stats,
    nonzero_descending,
    spectrum_summary,
    wishart_factor,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
Inputs = Tensor | Sequence[Tensor]

GRAM_METHODS = ("auto", "exact", "sketch")
DEFAULT_MAX_GRAM_BYTES = 2 * 2**30  # "auto" keeps the exact n×n Gram up to n = 16384
# Float64 working block when streaming over columns of a chunk (32 MiB).
_BLOCK_ELEMENTS = 2**22
# Entries of one column block of the projection R (32 MiB in float64): a block is k × w with
# w = _SKETCH_BLOCK_ELEMENTS // k columns, so R (k × d) is never materialised whole.
_SKETCH_BLOCK_ELEMENTS = 2**22
_TAIL_FIELDS = ("tail_index", "normality_pvalue", "normality_reject_fraction", "kurtosis")
_F64 = torch.float64


@dataclass(frozen=True)
class Moments:
    """Exact first and second moments of n per-sample gradients in d dimensions.

    ``mean`` (d,) = ḡ and ``diag_variance`` (d,) = diag(S), the unbiased per-coordinate variance
    (float64, CPU, in ``model.named_parameters()`` order, as :func:`sgn_lab.flatten_grads`);
    ``trace`` = tr S = Σ_j S_jj.
    """

    n: int
    dim: int
    mean: Tensor = field(repr=False)
    diag_variance: Tensor = field(repr=False)
    trace: float


def streaming_moments(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    chunk_size: int = 256,
    batchnorm: str = "error",
    seed: int | None = None,
) -> Moments:
    """Mean ḡ, diag(S) and tr S of the per-sample gradients in one pass over chunks.

    Parameters
    ----------
    model, loss_fn, inputs, targets, batchnorm
        As for :func:`sgn_lab.per_sample_grads`; g_i is the gradient of sample i's loss alone.
    chunk_size
        Samples whose per-sample gradients are held at once.
    seed
        Seeds random layers such as dropout: chunk c draws with a seed derived from
        (``seed``, c), so a seeded result is reproducible for a given ``chunk_size``. ``None``
        uses (and advances) torch's global generator.

    Returns
    -------
    Moments
        Exact float64 statistics: chunks are merged with the parallel (Chan et al.) update of
        the mean and of the sums of squared deviations, never with Σg² − n·ḡ² (see the module
        docstring), so the result agrees with :func:`sgn_lab.noise_stats` on the whole (n, d)
        matrix to rounding (about 1e-15 relative per merge) for any chunking.

    Notes
    -----
    Memory: one chunk of per-sample gradients (chunk_size·d in the model's dtype), a float64
    working block of at most 2^22 entries, and the float64 accumulators (2·d). Time: one
    per-sample-gradient pass over the n samples.
    """
    checks.integer("chunk_size", chunk_size, 1)
    if seed is not None:
        checks.integer("seed", seed, 0)
    xs = as_tuple(inputs)
    n = num_samples(xs, targets)
    checks.samples("n", n)
    moments = _MomentAccumulator(trainable_dim(model), _model_device(model))
    for index, (lo, hi) in enumerate(_chunk_bounds(n, chunk_size)):
        moments.add(_chunk_grads(model, loss_fn, xs, targets, lo, hi, batchnorm, seed, index))
    return moments.result()


def streaming_noise_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    chunk_size: int = 256,
    gram: str = "auto",
    sketch_dim: int = 1024,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    replacement: bool = False,
    powerlaw_window: tuple[int, int] | None = None,
    batchnorm: str = "error",
    seed: int = 0,
) -> NoiseStats:
    """:func:`sgn_lab.noise_stats` of the per-sample gradients, streamed over chunks of samples.

    Parameters
    ----------
    model, loss_fn, inputs, targets, batchnorm
        As for :func:`sgn_lab.per_sample_grads`.
    chunk_size
        Samples whose per-sample gradients (or, on the Gram fast path, activations) are held at
        once; see Memory.
    gram
        How the spectrum of S is obtained: ``"exact"`` (the n×n Gram), ``"sketch"`` (a k×k
        sketched covariance) or ``"auto"``: ``"exact"`` when the float64 Gram, 8·n² bytes,
        fits in ``max_gram_bytes``, else ``"sketch"``.
    sketch_dim
        k, the dimension of the sketch (``"sketch"`` only).
    max_gram_bytes
        Memory budget for ``"auto"``. The eigendecomposition inside
        :func:`sgn_lab.noise_stats` needs about four more n×n float64 working copies.
    batch_size, dataset_size, replacement, powerlaw_window
        As for :func:`sgn_lab.noise_stats`.
    seed
        Seeds the projection R, the isotropic reference and random layers (dropout), which
        draw per chunk from a seed derived from (``seed``, chunk), so the chunks recomputed by
        ``"exact"`` see the same masks every time.

    Returns
    -------
    NoiseStats
        Always exact, from :func:`streaming_moments` folded in during the same pass: ``trace``,
        ``mean``, ``diag_variance``, ``mean_sq_norm``, ``grad_sq_norm``, ``noise_scale``,
        ``minibatch_trace``, ``noise_to_signal``; ``n`` and ``dim`` are the true n and d. The
        shape figures (tail index, normality, kurtosis) are NaN, as for ``noise_stats(gram=)``.

        ``"exact"``: everything else is exact too.

        ``"sketch"``: ``eigenvalues`` (at most min(k, n−1) of them) and every figure derived
        from them (``effective_rank``, ``participation_ratio``, ``stable_rank``,
        ``top{1,5,10}_energy`` as fractions of the sketched total, ``powerlaw_*``) are those of
        the sketched covariance R S Rᵀ; the ``isotropic_*`` reference is what the same sketch
        reports for isotropic noise N(0, tr S/d · I_d) with the exact tr S, the true d and the
        same n and k (:func:`sketched_isotropic_spectrum`), so that both sides of the
        comparison carry the same sketching bias.

    Exact Gram
        K is filled block by block over pairs of sample chunks (a, b), C = ⌈n/chunk_size⌉ of
        them: K[a, b] needs both chunks' gradients (or activations) at once. When no dropout
        layer is active, K comes from :func:`sgn_lab.per_sample_gram` with ``chunk_size``: one
        recording pass per pair, on the 2·chunk_size samples of a ∪ b: C(C−1)/2
        forward/backward passes (n²/c sample-passes for c = chunk_size, instead of n), never a
        chunk × d matrix; the moments take one more per-sample-gradient pass. Otherwise the
        per-sample gradients are recomputed chunk-pairwise: for each chunk a, G_a (c × d)
        once, and for each b > a, G_b again, K[a, b] = G_a G_bᵀ: C + C(C−1)/2
        per-sample-gradient passes (about n²/(2c) per-sample gradients) and n²·d
        multiply-adds, as unchunked. Memory: n² float64 for K, plus 2·chunk_size samples of
        activations (Gram path) or 2·chunk_size·d gradient entries.

    Sketch
        z_i = R g_i with R (k × d) of i.i.d. N(0, 1/k) entries, drawn on the fly in column
        blocks of at most 2^22 entries from a ``torch.Generator`` seeded from (``seed``,
        parameter, block), so R is the same for every chunk and every ``chunk_size``; then
        the mean and the k×k scatter of the z_i, merged across chunks with the Chan update.
        Memory: O(k² + chunk_size·(d + k) + d + 2^22), whatever n; time: one
        per-sample-gradient pass plus n·d·k multiply-adds and ⌈n/c⌉·k·d normal draws.

        Accuracy. The sketched covariance R S Rᵀ has the non-zero spectrum of
        S^{1/2} RᵀR S^{1/2} = (1/k) Σ_{j≤k} y_j y_jᵀ with y_j = S^{1/2} r_j ~ N(0, S): the
        sketch is the second moment of k Gaussian draws from the measured S, so it behaves like
        a covariance estimated from k samples. With λ_i the eigenvalues of S (the exact ones
        that ``"exact"`` reports):

        - E tr(R S Rᵀ) = tr S, with relative spread sqrt(2/(k·PR)) (PR the participation
          ratio): the reason ``trace`` is reported from the exact moments instead.
        - Top eigenvalues (perturbation of RᵀR = I + E, E_ii ~ N(0, 2/k),
          E_ij ~ N(0, 1/k)): λ̃_i/λ_i − 1 ≈ N(b_i, 2/k) with
          b_i = (1/k) Σ_{j≠i} λ_j/(λ_i − λ_j), for eigenvalues whose gaps are large next to
          λ_i·sqrt(2/k). For the top one b_1 >= (tr S − λ_1)/(k·λ_1): the tail mass inflates
          it, while the fluctuation sqrt(2/k) (4.4% at k = 1024, 8.8% at k = 256) is the
          Johnson–Lindenstrauss distortion of one direction's norm and does not shrink with n.
        - Participation ratio, from E tr(R S Rᵀ)² = (1 + 1/k)·tr S² + (tr S)²/k:
          PR̃ ≈ k·PR/(k + 1 + PR), biased low by about PR/k.
        - Effective rank (no closed form): biased low, by −c·sqrt(er/k) with c about 0.3 to 0.7
          in measurements on power-law spectra λ_j ∝ j^-s (s from 0.5 to 2, d = 2000,
          n = 1200 and 4000), spread about sqrt(2/k) from seed to seed; it can never exceed k.
          The heuristic reason is Marchenko–Pastur: a bulk of about er comparable eigenvalues
          seen through k draws spreads over (1 ± sqrt(er/k))², which lowers the entropy.

        Measured with this implementation (d = 2000, n = 1200 Gaussian rows with population
        λ_j ∝ j^-s; mean ± sd over 10 seeds of R of the relative error against the exact
        statistics of the same rows; the power-law exponent itself, default window)::

            s    k     λ_1            eff. rank      part. ratio    powerlaw exponent
            1.0  256   +0.03 ± 0.05   −0.52 ± 0.01   −0.14 ± 0.04   0.87 (exact 0.94)
            1.0  1024  +0.00 ± 0.04   −0.20 ± 0.01   −0.03 ± 0.03   0.90 (exact 0.94)
            1.5  256   +0.00 ± 0.06   −0.15 ± 0.04   −0.02 ± 0.05   1.46 (exact 1.48)
            1.5  1024  −0.01 ± 0.04   −0.04 ± 0.03   +0.01 ± 0.04   1.47 (exact 1.48)

        (predicted: λ_1 bias b_1 = +0.036, +0.009, +0.008, +0.002; PR bias −0.14, −0.04,
        −0.03, −0.01; exact effective ranks 203 and 20, so sqrt(er/k) = 0.89, 0.45, 0.28,
        0.14). tests/test_streaming.py asserts these bounds: λ_1..λ_3 within b_i ± 3·sqrt(2/k),
        the effective rank within [−0.7, −0.3]·sqrt(er/k) ± 2·sqrt(2/k), PR within
        ± 3·sqrt(2/k) of the prediction.

        The sketch is for the top of the spectrum and for comparisons made at one k; a larger
        k (or ``"exact"`` where n² fits) is the remedy for a flat spectrum with er near k.

    Raises
    ------
    ValueError
        A ``chunk_size`` < 1, ``sketch_dim`` < 2, unknown ``gram``, ``max_gram_bytes`` < 1,
        negative ``seed``, n < 2 samples, or a bad ``batch_size``/``dataset_size``; each names
        the value.
    """
    checks.integer("chunk_size", chunk_size, 1)
    checks.choice("gram", gram, GRAM_METHODS)
    checks.integer("sketch_dim", sketch_dim, 2)
    checks.integer("max_gram_bytes", max_gram_bytes, 1)
    checks.integer("seed", seed, 0)
    xs = as_tuple(inputs)
    n = num_samples(xs, targets)
    checks.samples("n", n)
    if batch_size is not None:  # fail before the pass over the data, not after it
        minibatch_factor(batch_size, dataset_size=dataset_size, replacement=replacement)
    method = gram
    if method == "auto":
        method = "exact" if 8 * n * n <= max_gram_bytes else "sketch"
    dim = trainable_dim(model)
    scalars = {
        "batch_size": batch_size,
        "dataset_size": dataset_size,
        "replacement": replacement,
        "powerlaw_window": powerlaw_window,
    }

    if method == "exact":
        K, moments = _exact_gram(model, loss_fn, xs, targets, chunk_size, batchnorm, seed)
        stats = noise_stats(
            gram=K, dim=dim, mean=moments.mean, diag_variance=moments.diag_variance,
            seed=seed, **scalars,
        )
        # The isotropic spectrum is linear in the trace: rescale it to the streamed trace,
        # which (unlike the trace of the centred Gram C K C) loses no digits to a large mean.
        scale = moments.trace / stats.trace if stats.trace > 0 else 1.0
        return dataclasses.replace(
            stats,
            **_magnitudes(moments, batch_size, dataset_size, replacement, K),
            isotropic_eigenvalues=stats.isotropic_eigenvalues * scale,
        )

    moments, eigenvalues = _sketch(
        model, loss_fn, xs, targets, chunk_size, batchnorm, seed, int(sketch_dim)
    )
    isotropic = sketched_isotropic_spectrum(moments.trace, dim, n, int(sketch_dim), seed=seed)
    spectrum = spectrum_summary(eigenvalues, window=powerlaw_window)
    reference = spectrum_summary(isotropic, window=powerlaw_window)
    iso_fields = {
        f.name: reference[f.name.removeprefix("isotropic_")]
        for f in dataclasses.fields(NoiseStats)
        if f.name.startswith("isotropic_") and f.name != "isotropic_eigenvalues"
    }
    return NoiseStats(
        n=n,
        dim=dim,
        **_magnitudes(moments, batch_size, dataset_size, replacement),
        **spectrum,
        **iso_fields,
        **dict.fromkeys(_TAIL_FIELDS, math.nan),
        eigenvalues=eigenvalues,
        isotropic_eigenvalues=isotropic,
    )


def sketched_isotropic_spectrum(
    trace: float, dim: int, n: int, sketch_dim: int, *, seed: int = 0
) -> Tensor:
    """What the k-dimensional sketch reports for n draws of isotropic noise N(0, trace/dim·I).

    The reference for a sketched spectrum: the descending non-zero eigenvalues of R Ŝ Rᵀ, where
    Ŝ is the unbiased sample covariance of n draws of N(0, σ² I_d), σ² = trace/dim, and R
    (k × d) has i.i.d. N(0, 1/k) entries. Given R the sketched draws are N(0, σ² R Rᵀ), so
    (n−1)·R Ŝ Rᵀ = Σ^{1/2} W₂ Σ^{1/2} with Σ = σ² R Rᵀ, R Rᵀ = W₁/k, W₁ ~ Wishart_k(d, I)
    and W₂ ~ Wishart(n−1, I) independent; with W₁ = A₁A₁ᵀ and W₂ = A₂A₂ᵀ (Bartlett factors,
    or plain Gaussian matrices when the degrees of freedom are fewer than the dimension) the
    eigenvalues are σ²/(k(n−1)) times the squared singular values of A₁A₂. Exact in
    distribution, in O(k²) memory and O(k³) time whatever n and d (``isotropic_spectrum``
    itself would need n² or n·d). For d ≫ k and n ≫ k it is close to
    ``isotropic_spectrum(trace, k, n)``: about k eigenvalues near trace/k.
    """
    for name, value, least in (("dim", dim, 1), ("n", n, 2), ("sketch_dim", sketch_dim, 1)):
        checks.integer(name, value, least)
    rng = np.random.default_rng(seed)
    a1 = wishart_factor(rng, int(sketch_dim), int(dim))
    a2 = wishart_factor(rng, a1.shape[1], int(n) - 1)
    b = torch.from_numpy(a1) @ torch.from_numpy(a2)
    # eig(B Bᵀ) rather than svd(B): several times faster, and only the eigenvalues above the
    # rounding cut-off (relative accuracy eps at the top) are kept either way. torch, not numpy:
    # it keeps to torch's thread setting (numpy's BLAS threads thrash on a shared machine).
    squared = torch.linalg.eigvalsh(b @ b.T)
    eigenvalues = squared * (trace / dim / (sketch_dim * (n - 1)))
    return nonzero_descending(eigenvalues, max(n, sketch_dim))


# --- accumulators -------------------------------------------------------------------------


class _MomentAccumulator:
    """Per-coordinate count, mean and sum of squared deviations, merged chunk by chunk."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=_F64, device=device)
        self.m2 = torch.zeros(dim, dtype=_F64, device=device)

    def add(self, grads: dict[str, Tensor]) -> None:
        rows = _rows(grads)
        total = self.count + rows
        width = max(1, _BLOCK_ELEMENTS // rows)
        for _, _, start, block in _column_blocks(grads, width):
            stop = start + block.shape[1]
            x = block.to(_F64)
            chunk_mean = x.mean(dim=0)
            chunk_m2 = (x - chunk_mean).square_().sum(dim=0)  # two-pass inside the chunk
            delta = chunk_mean - self.mean[start:stop]
            self.mean[start:stop] += delta * (rows / total)
            self.m2[start:stop] += chunk_m2 + delta.square() * (self.count * rows / total)
        self.count = total

    def result(self) -> Moments:
        diag_variance = (self.m2 / (self.count - 1)).cpu()
        return Moments(
            n=self.count,
            dim=self.dim,
            mean=self.mean.cpu(),
            diag_variance=diag_variance,
            trace=float(diag_variance.sum()),
        )


class _SketchAccumulator:
    """Mean and k×k scatter of z_i = R g_i, with R drawn block by block from derived seeds."""

    def __init__(self, k: int, seed: int, device: torch.device) -> None:
        self.k = k
        self.seed = seed
        self.device = device
        # Column width of one block of R; fixed by k alone, so R never depends on the chunking.
        self.width = max(1, _SKETCH_BLOCK_ELEMENTS // k)
        self.generator = torch.Generator(device=device)
        self.count = 0
        self.mean = torch.zeros(k, dtype=_F64, device=device)
        self.scatter = torch.zeros((k, k), dtype=_F64, device=device)

    def project(self, grads: dict[str, Tensor]) -> Tensor:
        """(rows, k) sketches of a chunk of per-sample gradients, in float64."""
        z = torch.zeros((_rows(grads), self.k), dtype=_F64, device=self.device)
        for param, block_index, _, block in _column_blocks(grads, self.width):
            R = self._projection_block(param, block_index, block.shape[1])
            z.addmm_(block.to(_F64), R.T)
        return z

    def add(self, grads: dict[str, Tensor]) -> None:
        z = self.project(grads)
        rows = z.shape[0]
        total = self.count + rows
        chunk_mean = z.mean(dim=0)
        centred = z - chunk_mean
        delta = chunk_mean - self.mean
        self.mean += delta * (rows / total)
        # Matrix form of the Chan update: M = M_A + M_B + δδᵀ·n_A·n_B/n.
        self.scatter += centred.T @ centred
        self.scatter += torch.outer(delta, delta) * (self.count * rows / total)
        self.count = total

    def eigenvalues(self) -> Tensor:
        cov = self.scatter / (self.count - 1)
        cov = (cov + cov.T) / 2  # exact symmetry for eigvalsh
        return nonzero_descending(torch.linalg.eigvalsh(cov), max(self.count, self.k))

    def _projection_block(self, param: int, block_index: int, width: int) -> Tensor:
        # One generator, reseeded per block: the block depends only on (seed, param, block).
        self.generator.manual_seed(derive(self.seed, Purpose.PROJECTION, param, block_index))
        R = torch.randn(
            (self.k, width), generator=self.generator, dtype=_F64, device=self.device
        )
        return R.mul_(1.0 / math.sqrt(self.k))


# --- the two spectrum paths ---------------------------------------------------------------


def _exact_gram(
    model: nn.Module,
    loss_fn: LossFn,
    xs: tuple[Tensor, ...],
    targets: Tensor,
    chunk_size: int,
    batchnorm: str,
    seed: int,
) -> tuple[Tensor, Moments]:
    """The uncentred (n, n) float64 Gram K_ij = g_i·g_j and the exact moments."""
    n = targets.shape[0]
    bounds = _chunk_bounds(n, chunk_size)
    device = _model_device(model)

    if not _dropout_active(model):
        moments = streaming_moments(
            model, loss_fn, xs, targets, chunk_size=chunk_size, batchnorm=batchnorm, seed=seed
        )
        K = per_sample_gram(model, loss_fn, xs, targets, batchnorm=batchnorm,
                            chunk_size=chunk_size)
        return K, moments

    K = torch.zeros((n, n), dtype=_F64, device=device)
    accumulator = _MomentAccumulator(trainable_dim(model), device)
    for a, (a0, a1) in enumerate(bounds):
        G_a = _chunk_grads(model, loss_fn, xs, targets, a0, a1, batchnorm, seed, a)
        accumulator.add(G_a)
        K[a0:a1, a0:a1] = cross_gram(G_a, G_a)
        for b in range(a + 1, len(bounds)):
            b0, b1 = bounds[b]
            # Recomputed rather than stored: keeping every G_b would be the n×d matrix again.
            G_b = _chunk_grads(model, loss_fn, xs, targets, b0, b1, batchnorm, seed, b)
            block = cross_gram(G_a, G_b)
            K[a0:a1, b0:b1] = block
            K[b0:b1, a0:a1] = block.T
    return K, accumulator.result()


def _sketch(
    model: nn.Module,
    loss_fn: LossFn,
    xs: tuple[Tensor, ...],
    targets: Tensor,
    chunk_size: int,
    batchnorm: str,
    seed: int,
    k: int,
) -> tuple[Moments, Tensor]:
    """Exact moments and the sketched eigenvalues, from one pass over the chunks."""
    device = _model_device(model)
    moments = _MomentAccumulator(trainable_dim(model), device)
    sketch = _SketchAccumulator(k, seed, device)
    for index, (lo, hi) in enumerate(_chunk_bounds(targets.shape[0], chunk_size)):
        grads = _chunk_grads(model, loss_fn, xs, targets, lo, hi, batchnorm, seed, index)
        moments.add(grads)
        sketch.add(grads)
    return moments.result(), sketch.eigenvalues()


def _dropout_active(model: nn.Module) -> bool:
    """Whether a dropout layer draws masks: blocks of K from separate passes would then belong
    to different gradients, while the per-sample path reseeds each chunk and stays consistent
    (per_sample_gram also refuses a chunked pass that draws random numbers)."""
    dropout = nn.modules.dropout._DropoutNd
    return any(isinstance(m, dropout) and m.training and m.p > 0 for m in model.modules())


def cross_gram(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    """G_a G_bᵀ in float64, streamed over column blocks (no float64 copy of a whole chunk)."""
    rows_a, rows_b = _rows(a), _rows(b)
    width = max(1, _BLOCK_ELEMENTS // max(rows_a, rows_b))
    out = torch.zeros((rows_a, rows_b), dtype=_F64, device=next(iter(a.values())).device)
    for (_, _, _, block_a), (_, _, _, block_b) in zip(
        _column_blocks(a, width), _column_blocks(b, width), strict=True
    ):
        out.addmm_(block_a.to(_F64), block_b.to(_F64).T)
    return out


# --- helpers ------------------------------------------------------------------------------


def _magnitudes(
    moments: Moments, batch_size: int | None, dataset_size: int | None, replacement: bool,
    gram: Tensor | None = None,
) -> dict[str, object]:
    """The NoiseStats fields that come from the exact moments (noise_stats's formulas); the
    jackknife errors from the exact Gram when there is one (NaN with a sketch)."""
    errors = jackknife_from_gram(gram) if gram is not None else (math.nan, math.nan)
    return {
        **magnitudes(moments.trace, float(moments.mean @ moments.mean), moments.n, errors,
                     batch_size=batch_size, dataset_size=dataset_size, replacement=replacement),
        "mean": moments.mean,
        "diag_variance": moments.diag_variance,
    }


def _chunk_grads(
    model: nn.Module,
    loss_fn: LossFn,
    xs: tuple[Tensor, ...],
    targets: Tensor,
    lo: int,
    hi: int,
    batchnorm: str,
    seed: int | None,
    index: int,
) -> dict[str, Tensor]:
    chunk_seed = None if seed is None else derive(seed, Purpose.CHUNK, index)
    return per_sample_grads(
        model, loss_fn, [x[lo:hi] for x in xs], targets[lo:hi],
        batchnorm=batchnorm, seed=chunk_seed,
    )


def _column_blocks(grads: dict[str, Tensor], width: int) -> Iterator[tuple[int, int, int, Tensor]]:
    """(parameter index, block index, first column in the flat d, view) over column blocks.

    Blocks never straddle two parameters, so a block's identity (parameter, block index) does
    not depend on the other parameters or on the number of rows.
    """
    offset = 0
    for param, g in enumerate(grads.values()):
        flat = g.reshape(g.shape[0], -1)
        for block_index, lo in enumerate(range(0, flat.shape[1], width)):
            yield param, block_index, offset + lo, flat[:, lo : lo + width]
        offset += flat.shape[1]


def _chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]


def _rows(grads: dict[str, Tensor]) -> int:
    return next(iter(grads.values())).shape[0]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.requires_grad:
            return p.device
    raise ValueError("the model has no parameter with requires_grad=True")
