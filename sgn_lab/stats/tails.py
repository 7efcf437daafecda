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
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats

__all__ = ["ShapeStats", "shape_stats", "standardize_noise", "tail_index"]

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
