"""Stochastic gradient noise (SGN) statistics from per-sample gradients.

Notation: per-sample gradients g_1..g_n (rows of an (n, d) matrix G), their mean ḡ, the
centred rows c_i = g_i - ḡ, and the unbiased per-sample covariance

    S = 1/(n-1) Σ_i c_i c_iᵀ.

Everything is accumulated in float64 whatever the dtype of G. The spectrum of S has at most
n-1 non-zero eigenvalues; it comes exactly from whichever is smaller of the n×n centred Gram
matrix K_ij = c_i·c_j (eig(S) = eig(K)/(n-1) on the non-zero part) and the d×d covariance, so a
d×d matrix is formed only when d <= n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sgn_lab import checks
from sgn_lab.stats.tails import shape_stats

TOP_ENERGY_KS = (1, 5, 10)
_BLOCK_ELEMENTS = 2**24  # float64 working block for streaming over columns (128 MiB)


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fit of log λ_k = intercept - exponent·log k over k in [k_min, k_max]."""

    exponent: float
    intercept: float
    k_min: int
    k_max: int
    r2: float


@dataclass(frozen=True)
class NoiseStats:
    """SGN statistics of n per-sample gradients in d dimensions.

    Scalars (every field except the tensors and the per-layer table) are what :meth:`to_dict`
    returns, under their attribute names, as one row of a results table.

    Magnitude
        ``trace`` = tr(S) (unbiased); ``diag_variance`` (d,) = diag(S); ``mean`` (d,) = ḡ;
        ``mean_sq_norm`` = |ḡ|²; ``grad_sq_norm`` = |ḡ|² - tr(S)/n, the unbiased estimate of
        the squared norm |G|² of the full-data gradient; ``noise_scale`` = tr(S)/|G|², the
        simple noise scale B_simple of McCandlish et al. (2018). Both are noisy when |G|² is
        small next to tr(S)/n: ``grad_sq_norm_se`` and ``noise_scale_se`` are their jackknife
        standard errors over the n samples (infinite when a leave-one-out |G|² is not
        positive: the ratio is then undetermined), and an estimate |G|² ≤ 0 gives
        ``noise_scale`` = ``noise_to_signal`` = NaN rather than a meaningless negative ratio
        (``grad_sq_norm`` keeps the estimate). Averaging ``trace`` and ``grad_sq_norm`` over
        several measurements before dividing is the remedy.
    Minibatch noise (when ``batch_size`` is given)
        ``minibatch_trace`` = tr Cov[g_B] = tr(S)·(1/B - 1/N) without replacement, or
        tr(S)·(1 - 1/N)/B with replacement (N = ``dataset_size``; 1/N -> 0 when it is not
        given); ``noise_to_signal`` = minibatch_trace/|G|².
    Anisotropy
        ``eigenvalues``: the non-zero eigenvalues of S, descending (float64, CPU);
        ``effective_rank`` = exp(entropy(λ/Σλ)); ``participation_ratio`` = (Σλ)²/Σλ²;
        ``stable_rank`` = Σλ/λ_1; ``top{k}_energy`` = fraction of tr(S) in the top k
        eigenvalues; ``powerlaw_*``: the fit λ_k ∝ k^-s (exponent s, window, R²).
        ``isotropic_*``: the same numbers for isotropic Gaussian noise of equal trace,
        N(0, tr(S)/d · I_d), measured with the same n samples (so finite-sample effects are
        shared): the reference an anisotropic spectrum is compared with.
    Shape
        ``tail_index``, ``normality_pvalue``, ``normality_reject_fraction``, ``kurtosis``:
        see :func:`sgn_lab.stats.tails.shape_stats`.
    Per layer (when the input was a dict)
        ``layers``: a table with one row per parameter tensor and per module (columns name,
        kind, dim, trace, trace_fraction, effective_rank, participation_ratio, stable_rank,
        top1_energy, powerlaw_exponent) and ``layer_eigenvalues``: name -> eigenvalues.
    """

    n: int
    dim: int
    trace: float
    mean_sq_norm: float
    grad_sq_norm: float
    grad_sq_norm_se: float
    noise_scale: float
    noise_scale_se: float
    batch_size: float
    dataset_size: float
    minibatch_trace: float
    noise_to_signal: float
    effective_rank: float
    participation_ratio: float
    stable_rank: float
    top1_energy: float
    top5_energy: float
    top10_energy: float
    powerlaw_exponent: float
    powerlaw_r2: float
    powerlaw_kmin: int
    powerlaw_kmax: int
    isotropic_effective_rank: float
    isotropic_participation_ratio: float
    isotropic_stable_rank: float
    isotropic_top1_energy: float
    isotropic_powerlaw_exponent: float
    tail_index: float
    normality_pvalue: float
    normality_reject_fraction: float
    kurtosis: float
    mean: Tensor = field(repr=False)
    diag_variance: Tensor = field(repr=False)
    eigenvalues: Tensor = field(repr=False)
    isotropic_eigenvalues: Tensor = field(repr=False)
    layers: pd.DataFrame | None = field(default=None, repr=False)
    layer_eigenvalues: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, float]:
        """The scalar statistics, keyed by attribute name (one row of a table)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), int | float)
        }


def noise_stats(
    grads: Tensor | dict[str, Tensor] | None = None,
    *,
    gram: Tensor | None = None,
    dim: int | None = None,
    mean: Tensor | None = None,
    diag_variance: Tensor | None = None,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    replacement: bool = False,
    powerlaw_window: tuple[int, int] | None = None,
    shape: bool = True,
    seed: int = 0,
) -> NoiseStats:
    """SGN statistics of per-sample gradients.

    Parameters
    ----------
    grads
        (n, d) matrix of per-sample gradients (see :func:`sgn_lab.flatten_grads`), or the
        dict returned by :func:`sgn_lab.per_sample_grads` for an additional per-parameter and
        per-module breakdown in ``layers``.
    gram, dim, mean, diag_variance
        Instead of ``grads``: the (n, n) Gram matrix K_ij = g_i·g_j of the per-sample gradients
        (see :func:`sgn_lab.per_sample_gram`) and the dimension d. The centred Gram C K C
        (C = I − 11ᵀ/n) gives tr S, the spectrum and everything derived from them exactly,
        and |ḡ|² = 1ᵀK1/n². Per-coordinate figures need more than inner products: ``mean``
        (d,) and ``diag_variance`` (d,) are reported when given (else empty tensors), and the
        shape figures (tail index, normality, kurtosis) are NaN.
    batch_size, dataset_size, replacement
        Minibatch size B, data-set size N and sampling scheme for ``minibatch_trace`` and
        ``noise_to_signal`` (see :func:`minibatch_factor`).
    powerlaw_window
        (k_min, k_max), 1-based and inclusive, for the power-law fit; default
        :func:`default_powerlaw_window`.
    shape
        Compute the tail index and Gaussianity figures (costs a pass over n·d values).
    seed
        Seeds the isotropic reference and the random projections.
    """
    nan_tails = dict.fromkeys(
        ("tail_index", "normality_pvalue", "normality_reject_fraction", "kurtosis"), math.nan
    )
    if (grads is None) == (gram is None):
        raise ValueError("give either per-sample gradients or gram= (a Gram matrix), not both")
    layers, layer_eigenvalues = None, {}
    if gram is not None:
        n, d, mean, diag_variance, trace, mean_sq_norm, eigenvalues = _gram_moments(
            gram, dim, mean, diag_variance
        )
        errors = jackknife_from_gram(gram)
        tails = nan_tails
    else:
        G = _as_matrix(grads)
        n, d = G.shape
        checks.samples("n", n)
        if not torch.isfinite(G).all():
            row = int((~torch.isfinite(G)).any(dim=1).nonzero()[0, 0])
            raise checks.NonFiniteError(f"non-finite value in the per-sample gradient of "
                                        f"sample {row}")
        mean, diag_variance, gram_or_cov = centred_moments(G)
        eigenvalues = nonzero_descending(torch.linalg.eigvalsh(gram_or_cov) / (n - 1), max(n, d))
        total = mean.to(G.device) * n  # Σ_i g_i, float64
        G64 = G.to(torch.float64)
        errors = jackknife((G64 * G64).sum(dim=1), G64 @ total, float(total @ total), n)
        trace = float(diag_variance.sum())
        mean_sq_norm = float(mean @ mean)
        if shape and n >= 8 and trace > 0:
            tails = shape_stats(G.to(torch.float64) - mean, seed=seed).to_dict()
        else:
            tails = nan_tails
        if isinstance(grads, dict):
            layers, layer_eigenvalues = _layer_table(grads)
    iso_eigenvalues = isotropic_spectrum(trace, d, n, seed=seed)
    spectrum = spectrum_summary(eigenvalues, window=powerlaw_window)
    iso = spectrum_summary(iso_eigenvalues, window=powerlaw_window)

    return NoiseStats(
        n=n,
        dim=d,
        **magnitudes(trace, mean_sq_norm, n, errors, batch_size=batch_size,
                     dataset_size=dataset_size, replacement=replacement),
        **spectrum,
        **{f"isotropic_{k}": iso[k] for k in _ISOTROPIC_FIELDS},
        **tails,
        mean=mean.cpu(),
        diag_variance=diag_variance.cpu(),
        eigenvalues=eigenvalues,
        isotropic_eigenvalues=iso_eigenvalues,
        layers=layers,
        layer_eigenvalues=layer_eigenvalues,
    )


def magnitudes(trace: float, mean_sq_norm: float, n: int, jackknife: tuple[float, float], *,
               batch_size: int | None, dataset_size: int | None, replacement: bool
               ) -> dict[str, float]:
    """The magnitude fields of :class:`NoiseStats` from tr S, |ḡ|², n and the jackknife's
    standard errors of |G|² and B_simple (:func:`jackknife`)."""
    grad_sq_norm = mean_sq_norm - trace / n
    signal = grad_sq_norm if grad_sq_norm > 0 else math.nan  # a ratio to |G|² ≤ 0 means nothing
    if batch_size is not None:
        factor = minibatch_factor(batch_size, dataset_size=dataset_size, replacement=replacement)
        minibatch_trace = trace * factor
    else:
        minibatch_trace = math.nan
    return {
        "trace": trace,
        "mean_sq_norm": mean_sq_norm,
        "grad_sq_norm": grad_sq_norm,
        "grad_sq_norm_se": jackknife[0],
        "noise_scale": _ratio(trace, signal),
        "noise_scale_se": jackknife[1] if signal == signal else math.nan,
        "batch_size": math.nan if batch_size is None else batch_size,
        "dataset_size": math.nan if dataset_size is None else dataset_size,
        "minibatch_trace": minibatch_trace,
        "noise_to_signal": _ratio(minibatch_trace, signal),
    }


def jackknife_from_gram(K: Tensor) -> tuple[float, float]:
    """:func:`jackknife` from the uncentred Gram K_ij = g_i·g_j."""
    K = K.to(torch.float64)
    return jackknife(torch.diagonal(K), K.sum(dim=1), float(K.sum()), K.shape[0])


def jackknife(sq_norms: Tensor, dots: Tensor, total_sq: float, n: int) -> tuple[float, float]:
    """Jackknife standard errors of |G|² and of B_simple over the n samples.

    From |g_k|² (``sq_norms``), g_k·Σ_i g_i (``dots``) and |Σ_i g_i|² alone, in O(n): without
    sample k, Σ|g_i|² loses |g_k|², |Σ g_i|² becomes |Σ g_i|² − 2 g_k·Σ g_i + |g_k|², and
    tr S, |ḡ|², |G|² = |ḡ|² − tr S/m and B = tr S/|G|² follow for m = n − 1. The standard
    error is sqrt((n−1)/n · Σ_k (θ_{−k} − mean θ_{−k})²). B's is infinite when a
    leave-one-out |G|² is not positive.
    """
    if n < 3:
        return math.nan, math.nan
    sq, dot = sq_norms.double().cpu(), dots.double().cpu()
    m = n - 1
    sum_sq = float(sq.sum()) - sq
    total = total_sq - 2 * dot + sq
    trace = (sum_sq - total / m) / (m - 1)
    signal = total / m**2 - trace / m

    def se(values: Tensor) -> float:
        return math.sqrt((n - 1) / n * float(((values - values.mean()) ** 2).sum()))

    scale = se(trace / signal) if bool((signal > 0).all()) else math.inf
    return se(signal), scale


def _gram_moments(
    gram: Tensor, dim: int | None, mean: Tensor | None, diag_variance: Tensor | None
) -> tuple[int, int, Tensor, Tensor, float, float, Tensor]:
    """n, d, mean, diag(S), tr S, |ḡ|² and the spectrum from an uncentred Gram matrix."""
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        got = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise ValueError(f"gram must be a square (n, n) tensor, got {got}")
    n = gram.shape[0]
    checks.samples("n", n)
    if dim is None or dim < 1:
        raise ValueError(f"gram= needs dim, the number of parameters d >= 1; got dim={dim!r}")
    K = gram.to(torch.float64)
    if not torch.isfinite(K).all():
        row = int((~torch.isfinite(K)).any(dim=1).nonzero()[0, 0])
        raise checks.NonFiniteError(f"non-finite value in row {row} of the Gram matrix")
    centred = K - K.mean(dim=0, keepdim=True)
    centred = centred - centred.mean(dim=1, keepdim=True)  # C K C
    centred = (centred + centred.T) / 2  # exact symmetry for eigvalsh
    trace = float(torch.diagonal(centred).sum()) / (n - 1)
    eigenvalues = nonzero_descending(torch.linalg.eigvalsh(centred) / (n - 1), max(n, dim))
    for name, value in (("mean", mean), ("diag_variance", diag_variance)):
        if value is not None and value.numel() != dim:
            raise ValueError(f"{name} has {value.numel()} entries, expected dim={dim}")
    mean, diag_variance = per_coordinate(mean), per_coordinate(diag_variance)
    mean_sq_norm = float(mean @ mean) if mean.numel() else float(K.sum()) / n**2
    return n, dim, mean, diag_variance, trace, mean_sq_norm, eigenvalues


def per_coordinate(value: Tensor | None) -> Tensor:
    """A per-coordinate figure (mean, diag(S)) as :class:`NoiseStats` holds it: float64 on
    the CPU, or empty when not given."""
    if value is None:
        return torch.empty(0, dtype=torch.float64)
    return value.to(torch.float64).cpu()


_ISOTROPIC_FIELDS = (
    "effective_rank",
    "participation_ratio",
    "stable_rank",
    "top1_energy",
    "powerlaw_exponent",
)


def centred_moments(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, per-coordinate variance and the smaller second-moment matrix of the centred rows.

    Returns ``(mean (d,), diag(S) (d,), M)`` in float64 where M is the n×n centred Gram
    matrix K = C Cᵀ when d > n, else the d×d scatter matrix Cᵀ C (C = G - ḡ). Either
    way eig(M)/(n-1) holds the non-zero eigenvalues of S. Columns are streamed in blocks so
    that no float64 copy of the whole (n, d) matrix is made.
    """
    n, d = G.shape
    mean = G.sum(dim=0, dtype=torch.float64) / n
    if d <= n:
        C = G.to(torch.float64) - mean
        return mean, (C * C).sum(dim=0) / (n - 1), C.T @ C
    K = torch.zeros((n, n), dtype=torch.float64, device=G.device)
    diag_variance = torch.empty(d, dtype=torch.float64, device=G.device)
    step = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, d, step):
        block = G[:, start : start + step].to(torch.float64) - mean[start : start + step]
        K += block @ block.T
        diag_variance[start : start + step] = (block * block).sum(dim=0) / (n - 1)
    return mean, diag_variance, K


def minibatch_factor(
    batch_size: int, *, dataset_size: int | None = None, replacement: bool = False
) -> float:
    """Factor c with Cov[g_B] = c·S for the mean gradient of a minibatch of B samples.

    Without replacement from N samples c = 1/B - 1/N; with replacement c = (1 - 1/N)/B (the
    population covariance (N-1)/N·S over B). When N is not given the data set is taken as
    infinite and both are 1/B.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if dataset_size is None:
        return 1.0 / batch_size
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}")
    if replacement:
        return (1.0 - 1.0 / dataset_size) / batch_size
    if batch_size > dataset_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds dataset_size={dataset_size} without replacement"
        )
    return 1.0 / batch_size - 1.0 / dataset_size


def spectrum_summary(
    eigenvalues: Tensor, *, window: tuple[int, int] | None = None
) -> dict[str, float]:
    """Rank, energy and power-law figures of a descending spectrum (zeros excluded)."""
    lam = eigenvalues.to(torch.float64).cpu()
    total = float(lam.sum())
    if lam.numel() == 0 or total <= 0:
        nan = math.nan
        empty = {"effective_rank": nan, "participation_ratio": nan, "stable_rank": nan}
        empty.update({f"top{k}_energy": nan for k in TOP_ENERGY_KS})
        empty.update(powerlaw_exponent=nan, powerlaw_r2=nan, powerlaw_kmin=0, powerlaw_kmax=0)
        return empty
    p = lam / total
    out = {
        "effective_rank": float(torch.exp(-(p * torch.log(p)).sum())),
        "participation_ratio": total**2 / float((lam * lam).sum()),
        "stable_rank": total / float(lam[0]),
    }
    cumulative = torch.cumsum(p, dim=0)
    for k in TOP_ENERGY_KS:
        out[f"top{k}_energy"] = float(cumulative[min(k, lam.numel()) - 1])
    fit = powerlaw_fit(lam, window=window)
    out.update(
        powerlaw_exponent=fit.exponent,
        powerlaw_r2=fit.r2,
        powerlaw_kmin=fit.k_min,
        powerlaw_kmax=fit.k_max,
    )
    return out


def default_powerlaw_window(num_eigenvalues: int) -> tuple[int, int]:
    """Fit window for the power law: k from 1 to a tenth of the non-zero eigenvalues.

    Only the top of a sample spectrum follows the population one. With n samples of a
    d-dimensional noise (d > n), the eigenvalue mass beyond rank n spreads over the sample
    eigenvalues as a floor of about Σ_{j>n} λ_j / n, which flattens the lower part of the
    spectrum. The top tenth keeps that bias small for exponents above 1 (for λ_k ∝ k^-1.5,
    d = 20 n, the fitted exponent is about 1.47); for flatter spectra (s <= 1) the fit is
    biased low at any window, which is why the isotropic reference is reported alongside.
    """
    return 1, max(2, num_eigenvalues // 10)


def powerlaw_fit(eigenvalues: Tensor, *, window: tuple[int, int] | None = None) -> PowerLawFit:
    """Fit λ_k ∝ k^-s by least squares on log λ_k against log k, k in [k_min, k_max].

    ``eigenvalues`` must be descending and positive (k is 1-based). Returns the exponent s,
    the intercept, the window and the R² of the fit in log–log space.
    """
    lam = eigenvalues.to(torch.float64).cpu().numpy()
    k_min, k_max = window if window is not None else default_powerlaw_window(lam.size)
    k_max = min(k_max, lam.size)
    if k_min < 1 or k_max - k_min < 1:
        if window is not None:
            raise ValueError(
                f"powerlaw window {window} must satisfy 1 <= k_min < k_max with at least two "
                f"eigenvalues inside; the spectrum has {lam.size}"
            )
        return PowerLawFit(math.nan, math.nan, k_min, k_max, math.nan)
    k = np.arange(k_min, k_max + 1, dtype=np.float64)
    x, y = np.log(k), np.log(lam[k_min - 1 : k_max])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else math.nan
    return PowerLawFit(float(-slope), float(intercept), int(k_min), int(k_max), r2)


def isotropic_spectrum(trace: float, dim: int, n: int, *, seed: int = 0) -> Tensor:
    """Sample spectrum of n draws of isotropic Gaussian noise N(0, trace/dim · I_dim).

    Descending non-zero eigenvalues of the unbiased sample covariance, as :func:`noise_stats`
    would measure them for isotropic noise with the same trace, dimension and number of
    samples. When dim >= n the n×n Gram matrix Z Zᵀ is Wishart(dim, I_n) and is drawn through
    its Bartlett decomposition, so the cost is O(n³) whatever dim (10M parameters included).
    """
    rng = np.random.default_rng(seed)
    A = wishart_factor(rng, n, dim)  # A Aᵀ = Z Zᵀ for Z (n × dim) of standard normals
    C = A - A.mean(axis=0)  # C A, C = I − 11ᵀ/n: centred over the samples
    M = C.T @ C if C.shape[1] < n else C @ C.T  # the smaller of the two: same non-zero spectrum
    # torch's eigvalsh: numpy's threads thrash on a loaded machine (7 s against 0.1 s at n=1024).
    eigenvalues = torch.linalg.eigvalsh(torch.from_numpy(M)) * (trace / dim / (n - 1))
    return nonzero_descending(eigenvalues, max(n, dim))


def wishart_factor(rng: np.random.Generator, p: int, dof: int) -> np.ndarray:
    """A with A Aᵀ ~ Wishart_p(dof, I): Bartlett's lower-triangular (p × p) when dof >= p, else
    p × dof standard normals (then A Aᵀ = Z Zᵀ directly)."""
    if dof >= p:
        # Bartlett: A_ii² ~ χ²(dof − i), A_ij ~ N(0, 1) below the diagonal.
        A = np.tril(rng.standard_normal((p, p)), -1)
        A[np.diag_indices(p)] = np.sqrt(rng.chisquare(np.arange(dof, dof - p, -1)))
        return A
    return rng.standard_normal((p, dof))


def nonzero_descending(ascending: Tensor, size: int) -> Tensor:
    """Eigenvalues (given ascending, as eigvalsh returns them) that are not rounding error,
    descending, float64 on the CPU; ``size`` is the larger side of the matrix they came from."""
    lam = ascending.to(torch.float64).cpu().flip(0)
    if lam.numel() == 0 or lam[0] <= 0:
        return lam[:0]
    # The cut-off of numpy.linalg.matrix_rank: anything below is rounding error.
    return lam[lam > float(lam[0]) * size * torch.finfo(torch.float64).eps]


def _as_matrix(grads: Tensor | dict[str, Tensor]) -> Tensor:
    if isinstance(grads, dict):
        from sgn_lab.grads import flatten_grads

        return flatten_grads(grads)
    if not isinstance(grads, Tensor) or grads.dim() != 2:
        got = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"expected an (n, d) tensor of per-sample gradients or a dict, got {got}")
    return grads


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 and not math.isnan(a) else math.nan


def _layer_table(grads: dict[str, Tensor]) -> tuple[pd.DataFrame, dict[str, Tensor]]:
    groups: dict[str, list[str]] = {}
    for name in grads:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    items = [(name, "parameter", [name]) for name in grads]
    items += [(module or "<root>", "module", names) for module, names in groups.items()]
    rows, eigenvalues = [], {}
    for name, kind, names in items:
        G = torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in names], dim=1)
        n, d = G.shape
        _, var, M = centred_moments(G)
        lam = nonzero_descending(torch.linalg.eigvalsh(M) / (n - 1), max(n, d))
        summary = spectrum_summary(lam)
        trace = float(var.sum())
        rows.append(
            {
                "name": name,
                "kind": kind,
                "dim": d,
                "trace": trace,
                "effective_rank": summary["effective_rank"],
                "participation_ratio": summary["participation_ratio"],
                "stable_rank": summary["stable_rank"],
                "top1_energy": summary["top1_energy"],
                "powerlaw_exponent": summary["powerlaw_exponent"],
            }
        )
        eigenvalues[name] = lam
    table = pd.DataFrame(rows)
    total = table.loc[table["kind"] == "parameter", "trace"].sum()
    table.insert(4, "trace_fraction", table["trace"] / total if total > 0 else math.nan)
    return table, eigenvalues
