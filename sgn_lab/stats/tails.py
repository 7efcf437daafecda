"""Shape of the stochastic-gradient-noise distribution: tail index and Gaussianity.

The SGN samples are the rows of ``centred``, an ``(n, d)`` tensor of per-sample gradients minus
their mean. Two questions are asked of them:

* how heavy are the tails? -- the Mohammadi et al. tail-index estimator (as used by Simsekli et
  al., 2019, arXiv:1901.06053) on the pooled, per-coordinate standardised noise;
* how Gaussian are the random one-dimensional views of the raw noise an optimizer sees? --
  D'Agostino-Pearson tests and excess kurtosis of random projections (Panigrahi et al., 2019;
  Xie et al., 2023 report near-Gaussian SGN at moderate batch sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from sgn_lab.seeds import derive

__all__ = ["MINIBATCH_SHAPE_COLUMNS", "ShapeStats", "minibatch_noise_shape", "shape_stats",
           "standardize_noise", "tail_index"]

_MIN_TAIL_SAMPLES = 16
_MIN_NOISE_SAMPLES = 8
# normaltest's kurtosis z-test needs n >= 20 (scipy's documentation); Shapiro-Wilk does not.
_MIN_NORMALTEST_SAMPLES = 20
_ALPHA_LEVEL = 0.05
_EPS = 1e-12


def tail_index(x: torch.Tensor | np.ndarray, *, block_size: int | None = None) -> float:
    r"""Mohammadi et al. estimate of the tail index :math:`\alpha` of i.i.d. scalars.

    With :math:`K = K_1 K_2` samples :math:`X_j` cut into :math:`K_2` consecutive blocks of
    :math:`K_1`, and :math:`Y_i` the block sums,

    .. math::

        \frac{1}{\hat\alpha} = \frac{1}{\log K_1}\Big(\frac{1}{K_2}\sum_{i=1}^{K_2}\log|Y_i|
        - \frac{1}{K}\sum_{j=1}^{K}\log|X_j|\Big).

    For symmetric :math:`\alpha`-stable :math:`X` (:math:`0 < \alpha \le 2`), a sum of
    :math:`K_1` copies equals :math:`K_1^{1/\alpha} X` in law, so :math:`1/\hat\alpha` is
    unbiased for :math:`1/\alpha`; Gaussian samples give :math:`\alpha = 2`.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray of shape (K,)
        I.i.d. scalars, any real dtype; computed in float64. Values that are exactly zero are
        dropped first (their log is :math:`-\infty`); the order of the rest is kept, so shuffle
        beforehand if neighbouring values may be dependent.
    block_size : int, optional
        :math:`K_1`, between 2 and ``K // 2``, with ``K`` the number of non-zero values.
        Defaults to the integer nearest :math:`\sqrt{K}`. The last ``K mod K_1`` values are
        dropped so that :math:`K = K_1 K_2` exactly.

    Returns
    -------
    float
        :math:`\hat\alpha`. When :math:`1/\hat\alpha \le 0` -- sampling noise on tiny samples,
        or a block sum that cancels to exactly 0 -- returns ``inf``.

    Raises
    ------
    ValueError
        If ``x`` is not 1-D, holds NaN or infinite values, has fewer than 16 non-zero values,
        or ``block_size`` is out of range.

    Notes
    -----
    Only for stable laws is the estimate unbiased at every :math:`K_1`. For other laws it
    converges slowly (error of order :math:`1/\log K_1`): with :math:`K = 10^5`, Laplace samples
    give about 1.8 and uniform ones about 2.1, so a value somewhat below 2 does not by itself
    mean infinite variance.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(
            f"x has {bad.size} non-finite value(s); the first is x[{bad[0]}] = {x[bad[0]]}"
        )
    x = x[x != 0]
    k = x.size
    if k < _MIN_TAIL_SAMPLES:
        raise ValueError(f"need at least {_MIN_TAIL_SAMPLES} non-zero samples, got {k}")
    k1 = round(math.sqrt(k)) if block_size is None else block_size
    if not 2 <= k1 <= k // 2:
        raise ValueError(f"block_size={k1} must lie in [2, {k // 2}] for {k} non-zero samples")
    k2 = k // k1
    x = x[: k1 * k2]
    # A block sum can cancel to exactly 0 (discrete data); its log is -inf, so 1/alpha-hat is
    # -inf and the documented `inf` is returned.
    with np.errstate(divide="ignore"):
        log_y = np.log(np.abs(x.reshape(k2, k1).sum(axis=1)))
    inv_alpha = float(log_y.mean() - np.log(np.abs(x)).mean()) / math.log(k1)
    return 1.0 / inv_alpha if inv_alpha > 0 else math.inf


def _scale_and_keep(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate unbiased std of ``x`` (n, d) and the indices of the coordinates to keep."""
    std = x.std(dim=0)
    if std.numel() == 0:
        return std, torch.empty(0, dtype=torch.long)
    return std, torch.nonzero(std > eps * std.max(), as_tuple=True)[0]


def standardize_noise(centred: torch.Tensor, *, eps: float = _EPS) -> torch.Tensor:
    r"""Divide each coordinate of the gradient noise by its own standard deviation.

    Pooling raw coordinates whose scales differ mixes scales, and a scale mixture has heavier
    tails than any of its components: Gaussian coordinates with scales spread over a few orders
    of magnitude give a pooled tail index near 1 instead of 2. Standardising first makes the
    pooled values (nearly) identically distributed, which the tail-index estimator assumes.

    The sample std is computed from the very values it divides, so
    :math:`|z_{ik}| \le (n - 1)/\sqrt{n}` (Samuelson's inequality): for small ``n`` the
    standardised values of heavy-tailed noise are truncated, and a tail index computed from them
    is biased towards 2 (with ``n = 64``, symmetric 1.5-stable coordinates give about 1.7).

    Parameters
    ----------
    centred : torch.Tensor of shape (n, d)
        SGN samples: per-sample gradients minus their mean, any float dtype and device.
    eps : float, default=1e-12
        Coordinates whose unbiased std :math:`s_k` over the ``n`` samples satisfies
        :math:`s_k \le \varepsilon \max_l s_l` are dropped: they carry no noise (frozen or
        unused parameters) and would divide by zero. Round-off noise of a float32 input
        (relative size ~1e-7) is not detected as zero.

    Returns
    -------
    torch.Tensor of shape (n, d'), float64, on the CPU
        :math:`z_{ik} = x_{ik} / s_k` over the ``d' <= d`` kept coordinates, in their order.
    """
    if centred.ndim != 2:
        raise ValueError(f"centred must be 2-D (n, d), got shape {tuple(centred.shape)}")
    x = centred.detach().to(device="cpu", dtype=torch.float64)
    std, keep = _scale_and_keep(x, eps)
    return x[:, keep] / std[keep]


@dataclass(frozen=True)
class ShapeStats:
    r"""Shape of the SGN distribution; see :func:`shape_stats`.

    Attributes
    ----------
    tail_index : float
        Mohammadi :math:`\hat\alpha` of the pooled, standardised noise (2 for Gaussian,
        smaller for heavier tails).
    normality_pvalue : float
        Median p-value of the normality tests of random projections of the raw noise.
    normality_reject_fraction : float
        Fraction of those projections rejected as Gaussian at level 0.05 (about 0.05 when the
        noise is Gaussian).
    kurtosis : float
        Mean excess kurtosis of the projections (0 for Gaussian).
    """

    tail_index: float
    normality_pvalue: float
    normality_reject_fraction: float
    kurtosis: float

    def to_dict(self) -> dict[str, float]:
        """The four statistics, keyed by field name."""
        return asdict(self)


def shape_stats(
    centred: torch.Tensor,
    *,
    n_projections: int = 32,
    max_values: int = 2_000_000,
    seed: int = 0,
) -> ShapeStats:
    r"""Tail index and Gaussianity of gradient-noise samples.

    * ``tail_index``: :func:`tail_index` of the ``n * d'`` values of
      :func:`standardize_noise`, pooled in a random order. When ``n * d'`` exceeds
      ``max_values``, a random subset of ``max_values // n`` coordinates is used. For
      heavy-tailed noise and small ``n`` this is biased towards 2; see :func:`standardize_noise`.
    * For ``m = n_projections`` random unit directions :math:`u_k` (normalised standard
      Gaussian vectors), the ``n`` projections :math:`x_i \cdot u_k` of the *raw* noise -- the
      one-dimensional views an optimizer sees -- are tested for normality with
      :func:`scipy.stats.normaltest` (D'Agostino-Pearson), or :func:`scipy.stats.shapiro`
      when ``n < 20``, where the kurtosis part of normaltest is unreliable.
      ``normality_pvalue`` is the median p-value, ``normality_reject_fraction`` the fraction
      below 0.05, ``kurtosis`` the mean unbiased excess kurtosis
      (:func:`scipy.stats.kurtosis` with ``fisher=True, bias=False``).

    Parameters
    ----------
    centred : torch.Tensor of shape (n, d)
        SGN samples: per-sample gradients minus their mean, ``n >= 8``; any float dtype and
        device (computed on the CPU in float64).
    n_projections : int, default=32
        Number of random directions, at least 1.
    max_values : int, default=2_000_000
        Budget of pooled values for the tail index.
    seed : int, default=0
        Seeds the CPU ``torch.Generator`` that draws the directions, the coordinate subset and
        the pooling order; equal seeds give equal results.

    Returns
    -------
    ShapeStats

    Raises
    ------
    ValueError
        If ``centred`` is not 2-D with at least 8 rows and 1 column, holds NaN or infinite
        values, if ``n_projections < 1``, or if fewer than 16 non-zero standardised values
        remain.
    """
    if centred.ndim != 2 or centred.shape[1] == 0:
        raise ValueError(
            f"centred must be 2-D (n, d) with d >= 1, got shape {tuple(centred.shape)}"
        )
    n, d = centred.shape
    if n < _MIN_NOISE_SAMPLES:
        raise ValueError(f"need at least {_MIN_NOISE_SAMPLES} noise samples (rows), got n={n}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    x = centred.detach().to(device="cpu", dtype=torch.float64)
    bad = torch.nonzero(~torch.isfinite(x))
    if bad.numel():
        i, j = bad[0].tolist()
        raise ValueError(
            f"centred has {bad.shape[0]} non-finite value(s); the first is "
            f"centred[{i}, {j}] = {x[i, j].item()}"
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)

    std, keep = _scale_and_keep(x, _EPS)
    if n * keep.numel() > max_values:
        keep = keep[torch.randperm(keep.numel(), generator=gen)[: max(1, max_values // n)]]
    pooled = (x[:, keep] / std[keep]).flatten()
    # The estimator wants i.i.d. values within a block. Row-major order would put the d'
    # coordinates of one sample side by side; these can be correlated with a common sign (one
    # dominant noise direction), which inflates block sums and drives alpha-hat to about 1.
    # Column-major order would put the n values of one coordinate side by side; after centring
    # and standardising they sum to exactly 0, which pins block sums and drives alpha-hat far
    # above 2. In a random order a block draws from many samples and many coordinates.
    pooled = pooled[torch.randperm(pooled.numel(), generator=gen)]
    alpha = tail_index(pooled)

    # One direction at a time: a (d, m) matrix of directions can dwarf the noise itself.
    test = stats.normaltest if n >= _MIN_NORMALTEST_SAMPLES else stats.shapiro
    pvalues, kurtoses = [], []
    for _ in range(n_projections):
        u = torch.randn(d, generator=gen, dtype=torch.float64)
        proj = (x @ (u / u.norm())).numpy()
        pvalues.append(test(proj).pvalue)
        kurtoses.append(stats.kurtosis(proj, fisher=True, bias=False))
    pvalues = np.asarray(pvalues)

    return ShapeStats(
        tail_index=alpha,
        normality_pvalue=float(np.median(pvalues)),
        normality_reject_fraction=float(np.mean(pvalues < _ALPHA_LEVEL)),
        kurtosis=float(np.mean(kurtoses)),
    )


MINIBATCH_SHAPE_COLUMNS = ("batch_size", "tail_index", "normality_pvalue",
                           "normality_reject_fraction", "kurtosis")


def minibatch_noise_shape(
    G: torch.Tensor,
    batch_sizes: Sequence[int],
    *,
    draws: int = 256,
    seed: int = 0,
    n_projections: int = 32,
) -> pd.DataFrame:
    r"""Tail index and Gaussianity of the *minibatch* noise :math:`g_B - \bar g` at each B.

    For each batch size B, ``draws`` minibatches of B rows are drawn from the n per-sample
    gradients ``G``, each without replacement (independently of the others), and their means
    :math:`g_B` minus the mean :math:`\bar g` of all n rows are the R noise samples handed to
    :func:`shape_stats`. B = 1 is the per-sample noise (rows drawn with replacement across
    draws); the row of B is the noise an optimizer sees at batch B. Sums of i.i.d. symmetric
    α-stable vectors are α-stable, so a stable per-sample noise keeps its α at every B, while
    a noise with finite variance approaches the Gaussian (α = 2, kurtosis 0) as B grows (the
    central limit theorem).

    The R draws share the pool of n rows: a row lands in R·B/n of them on average, so for
    R·B well above n they are far from independent samples of the minibatch noise (the tail
    index standardises by their std, see :func:`shape_stats`, and the normality tests count R
    samples). Keep R·B of the order of n, or below, when that matters.

    Parameters
    ----------
    G : torch.Tensor of shape (n, d)
        Per-sample gradients (:func:`sgn_lab.flatten_grads`), n >= 2, any float dtype and
        device; computed on the CPU in float64 (one (n, d) copy).
    batch_sizes : sequence of int
        Each B with 1 <= B < n (B = n has no noise left to measure).
    draws : int, default=256
        R, minibatches per batch size, at least 8 (the noise samples are an R × d matrix).
    seed : int, default=0
        With B, seeds the draws and :func:`shape_stats` of that B's row: equal seeds give
        equal tables, and a row does not depend on the other batch sizes asked for.
    n_projections : int, default=32
        Random directions of the normality tests (:func:`shape_stats`).

    Returns
    -------
    pandas.DataFrame
        One row per batch size, in the order given, columns :data:`MINIBATCH_SHAPE_COLUMNS`.

    Raises
    ------
    ValueError
        If ``G`` is not 2-D, ``batch_sizes`` is empty or holds a B outside [1, n), ``draws``
        is not an integer >= 8, or as :func:`shape_stats` (non-finite values, no noise).

    Notes
    -----
    A minibatch is a uniform B-subset, drawn for all R draws at once (the n − B rows left out
    when B > n/2: see ``_uniform_subsets``); its sum is gathered row by row, or taken as a 0/1
    matrix times G in blocks of draws (``_row_sums``). Beyond the (n, d) copy, memory grows
    with R·d, never with R·B·d.
    """
    if G.ndim != 2:
        raise ValueError(f"G must be 2-D (n, d), got shape {tuple(G.shape)}")
    n, d = G.shape
    sizes = list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes is empty")
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b < n:
            raise ValueError(f"batch size {b!r} is not an integer in 1 <= B < n = {n} (the "
                             "per-sample gradients available)")
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) \
            or draws < _MIN_NOISE_SAMPLES:
        raise ValueError(f"draws must be an integer >= {_MIN_NOISE_SAMPLES}, got {draws!r}")
    X = G.detach().to(device="cpu", dtype=torch.float64)
    mean = X.mean(dim=0)
    total = X.sum(dim=0)
    rows = []
    for B in map(int, sizes):
        gen = torch.Generator().manual_seed(derive(seed, B))
        k = min(B, n - B)
        picks = _uniform_subsets(n, k, int(draws), gen)  # (R, k)
        sums = _row_sums(X, picks)
        if k < B:  # the picks are the rows left out
            sums = total - sums
        noise = sums / B - mean  # (R, d)
        stats_ = shape_stats(noise, n_projections=n_projections, seed=derive(seed, B, 1))
        rows.append({"batch_size": B, **stats_.to_dict()})
    return pd.DataFrame(rows, columns=list(MINIBATCH_SHAPE_COLUMNS))


def _row_sums(X: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """Row r of the result is the sum of the rows ``picks[r]`` of ``X`` (n, d).

    Few picks among many rows: k gathers of R rows (memory-bound, never an R × k × d tensor).
    Otherwise a 0/1 matrix times X, in blocks of draws of at most ~4M entries: R·n·d flops,
    but at matrix-multiply speed, which wins unless k is a small fraction of n.
    """
    (n, d), (draws, k) = X.shape, picks.shape
    if 32 * k < n:
        sums = torch.zeros((draws, d), dtype=X.dtype)
        for column in picks.T.contiguous():
            sums += X.index_select(0, column)
        return sums
    block = max(1, (1 << 22) // n)
    parts = []
    for start in range(0, draws, block):
        rows = picks[start:start + block]
        weights = torch.zeros((len(rows), n), dtype=X.dtype).scatter_(1, rows, 1.0)
        parts.append(weights @ X)
    return torch.cat(parts)


def _uniform_subsets(n: int, k: int, draws: int, gen: torch.Generator) -> torch.Tensor:
    """``draws`` independent uniform k-subsets of range(n), as a (draws, k) index tensor.

    Dense subsets (8k > n): the first k of a random permutation per draw, O(n) each, at most
    8 times the size of the subset. Sparse ones: each row starts as k uniform draws with
    replacement, and a value repeated within its row is redrawn, round after round, until
    every row holds k distinct values; a redraw collides with probability below 1/8, so a few
    rounds of one (draws, k) sort each do. Both procedures commute with any relabelling of
    the n rows, so every k-subset is equally likely.
    """
    if 8 * k > n:
        return torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(draws)])
    picks = torch.randint(0, n, (draws, k), generator=gen)
    while True:
        picks = picks.sort(dim=1).values
        repeat = torch.zeros_like(picks, dtype=torch.bool)
        repeat[:, 1:] = picks[:, 1:] == picks[:, :-1]
        count = int(repeat.sum())
        if count == 0:
            return picks
        picks[repeat] = torch.randint(0, n, (count,), generator=gen)
