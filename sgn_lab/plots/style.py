"""The one style of sgn-lab's figures: colours, axis labels, rcParams, atomic saving.

Conventions
    * No pyplot state: figures are plain :class:`matplotlib.figure.Figure` objects, so the module
      works headless without forcing a backend and never changes a notebook's backend. In Jupyter,
      a returned figure displays when it is the value of a cell (the inline backend renders any
      ``Figure``); nothing needs ``plt.show()`` or ``plt.close()``.
    * One style everywhere, :func:`plot_style`: seaborn ``whitegrid`` + ``paper`` context, applied
      through :func:`matplotlib.rc_context` inside each function only: importing or calling this
      module leaves the global ``rcParams`` unchanged.
    * One colour per method in every figure (:data:`METHOD_COLORS`; grey is reserved for
      references such as the isotropic spectrum).
    * Seeds are aggregated: the line is the mean over the rows that share a hue value and a step
      (seeds, and runs if several runs share the hue value), the band ±1 standard deviation
      (``errorbar="sd"``): the seed-to-seed spread is what a reader needs to judge a difference,
      it is deterministic (a bootstrap CI would be random) and meaningful for 2-5 seeds. On a log
      axis both are taken in log space (geometric mean, multiplicative band).
    * Axis labels come from :data:`METRIC_LABELS` (column names are the attribute names).
"""


from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sgn_lab.atomic import atomic_write
from sgn_lab.optim import METHODS as OPTIMIZERS

#: The methods of :mod:`sgn_lab.optim` (its registry), in the order legends list them.
METHODS: tuple[str, ...] = tuple(OPTIMIZERS)

#: Fixed colour of each method (matplotlib's tab10 without its grey), the same in every figure.
METHOD_COLORS: dict[str, str] = {
    "sgd": "#1f77b4",  # blue
    "momentum": "#17becf",  # cyan
    "adam": "#2ca02c",  # green
    "gaussian": "#8c564b",  # brown
    "covariance": "#bcbd22",  # olive
    "symmetric": "#e377c2",  # pink
    "pnm": "#d62728",  # red
    "adapnm": "#ff7f0e",  # orange
    "adaptive-hb": "#9467bd",  # purple
}

#: Colour of reference curves (isotropic noise of equal trace).
REFERENCE_COLOR = "0.45"

# Colours for method names outside METHOD_COLORS, picked by a stable hash of the name.
FALLBACK_COLORS: tuple[str, ...] = (
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
)

#: Axis label of each column (one name per concept: the NoiseStats / CurvatureStats attribute
#: names, the training metrics, the spectrum columns and the usual hyperparameters).
METRIC_LABELS: dict[str, str] = {
    # axes and identifiers
    "step": "training step",
    "epoch": "epoch",
    "k": "rank k",
    "eigenvalue": "eigenvalue λ_k of S",
    "run": "run",
    "label": "run (method, hyperparameters)",
    "task": "task",
    "model": "model",
    "method": "method",
    "seed": "seed",
    "kind": "spectrum",
    # hyperparameters
    "lr": "learning rate η",
    "batch_size": "batch size B",
    "generalization_gap": "generalisation gap\n(train − test accuracy)",
    "beta0": "PNM β0",
    "beta1": "momentum β1",
    "momentum": "momentum β",
    "weight_decay": "weight decay",
    # training metrics
    "train_loss": "training loss",
    "val_loss": "validation loss",
    "test_loss": "test loss",
    "train_accuracy": "training accuracy",
    "val_accuracy": "validation accuracy",
    "test_accuracy": "test accuracy",
    # NoiseStats: magnitude
    "n": "per-sample gradients n",
    "dim": "parameters d",
    "trace": "tr S (SGN trace)",
    "mean_sq_norm": "|ḡ|² (mean gradient)",
    "grad_sq_norm": "|G|² (unbiased)",
    "grad_sq_norm_se": "standard error of |G|² (jackknife)",
    "noise_scale": "B_simple = tr S / |G|²",
    "noise_scale_se": "standard error of B_simple (jackknife)",
    "dataset_size": "data-set size N",
    "minibatch_trace": "tr Cov[g_B] (minibatch noise)",
    "noise_to_signal": "tr Cov[g_B] / |G|²",
    # NoiseStats: anisotropy
    "effective_rank": "effective rank of S",
    "participation_ratio": "participation ratio (Σλ)² / Σλ²",
    "stable_rank": "stable rank tr S / λ_1",
    "top1_energy": "top-1 energy λ_1 / tr S",
    "top5_energy": "top-5 energy Σ_{k≤5} λ_k / tr S",
    "top10_energy": "top-10 energy Σ_{k≤10} λ_k / tr S",
    "powerlaw_exponent": "power-law exponent s (λ_k ∝ k^-s)",
    "powerlaw_r2": "R² of the power-law fit",
    "powerlaw_kmin": "power-law fit k_min",
    "powerlaw_kmax": "power-law fit k_max",
    "isotropic_effective_rank": "effective rank, isotropic noise of equal tr S",
    "isotropic_participation_ratio": "participation ratio, isotropic noise",
    "isotropic_stable_rank": "stable rank, isotropic noise",
    "isotropic_top1_energy": "top-1 energy, isotropic noise",
    "isotropic_powerlaw_exponent": "power-law exponent s, isotropic noise",
    # NoiseStats / ShapeStats: shape of the distribution
    "tail_index": "tail index α (2 = Gaussian)",
    "normality_pvalue": "median normality p-value",
    "normality_reject_fraction": "fraction of projections\nrejected as Gaussian",
    "kurtosis": "excess kurtosis",
    # CurvatureStats
    "hessian_top_eigenvalue": "λ_max(H) (sharpness)",
    "hessian_trace": "tr H",
    "hessian_trace_se": "standard error of tr H",
    "trace_hs": "tr(HS)",
    "curvature_alignment": "d·tr(HS) / (tr H · tr S)",
    # per-step update noise of an optimizer
    "update_trace": "tr Cov[Δθ] (update noise per step)",
}

#: Positive, scale-like metrics drawn on a log y-axis (magnitudes, ratios of magnitudes and ranks,
#: which span orders of magnitude: the effective rank of anisotropic SGN sits far below its
#: isotropic reference).
LOG_METRICS: frozenset[str] = frozenset(
    {
        "trace",
        "mean_sq_norm",
        "grad_sq_norm",
        "noise_scale",
        "minibatch_trace",
        "noise_to_signal",
        "effective_rank",
        "participation_ratio",
        "stable_rank",
        "isotropic_effective_rank",
        "isotropic_participation_ratio",
        "isotropic_stable_rank",
        "hessian_top_eigenvalue",
        "hessian_trace",
        "trace_hs",
        "curvature_alignment",
        "update_trace",
        "train_loss",
        "val_loss",
        "test_loss",
    }
)

#: Panels of :func:`plot_metrics` by default.
DEFAULT_COLUMNS: tuple[str, ...] = ("trace", "noise_scale", "effective_rank", "test_accuracy")

# Panels :func:`plot_run` adds to DEFAULT_COLUMNS when the table has data for them.
OPTIONAL_RUN_COLUMNS: tuple[str, ...] = (
    "update_trace",
    "hessian_top_eigenvalue",
    "curvature_alignment",
)

ERRORBAR: tuple[str, float] = ("sd", 1.0)
PANEL_SIZE: tuple[float, float] = (3.4, 2.5)  # inches per panel
SPECTRUM_KINDS = ("sgn", "isotropic")
DASHES: tuple[Any, ...] = ("", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1, 1, 1))
_STYLE_RC: dict[str, Any] = {
    "legend.frameon": False,
    "axes.titleweight": "bold",
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays text
    "ps.fonttype": 42,
}
_PNG_DPI = 150




@contextmanager
def plot_style() -> Iterator[None]:
    """The style of every sgn-lab figure, as a context.

    seaborn's ``"whitegrid"`` axes style and ``"paper"`` context, frameless legends and TrueType
    fonts in PDFs, applied with :func:`matplotlib.rc_context`: the global ``rcParams`` are
    restored on exit. Create *and* lay out a figure inside the context (the plotting functions
    of this module do).

    Examples
    --------
    >>> with plot_style():
    ...     fig = Figure()
    ...     ax = fig.subplots()
    """
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper"), **_STYLE_RC}
    with mpl.rc_context(rc):
        yield


def method_color(method: str) -> str:
    """The colour of a method: :data:`METHOD_COLORS`, or a stable colour for other names.

    Names outside :data:`METHOD_COLORS` get a colour from a hash of the name, so they too keep
    their colour from one figure to the next (two unknown names may share one).
    """
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK_COLORS[zlib.crc32(str(method).encode()) % len(FALLBACK_COLORS)]


def metric_label(column: str) -> str:
    """Axis label of a column: :data:`METRIC_LABELS`, or the column name itself."""
    return METRIC_LABELS.get(column, column)


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> list[Path]:
    """Write a figure as PNG (150 dpi) and PDF, each atomically, and close it.

    Parameters
    ----------
    fig
        The figure (from this module, or any matplotlib figure).
    path
        Target without suffix, e.g. ``"plots/metrics"``; a ``.png`` or ``.pdf`` suffix is
        stripped (``"plots/metrics.png"`` writes the same two files). Any other suffix is kept
        as part of the name (``"fig.v2"`` -> ``fig.v2.png``). Parent folders are created.

    Returns
    -------
    list[pathlib.Path]
        ``[<path>.png, <path>.pdf]``.

    Notes
    -----
    Each file is rendered into a temporary file in the target folder and renamed over the
    target (:func:`os.replace`), so a reader never sees a half-written file and a failure leaves
    no temporary file behind (an older file of the same name stays as it was). The PDF carries
    no creation date, so the same figure gives the same bytes. "Close" releases the figure from
    pyplot when pyplot manages it (``plt.close``); a figure of this module has no pyplot state.
    """
    target = Path(path)
    if target.suffix.lower() in (".png", ".pdf"):
        target = target.with_suffix("")
    if not target.name or target.name in (".", ".."):
        raise ValueError(f"save_figure: {str(path)!r} does not name a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for fmt, extra in (
            ("png", {"dpi": _PNG_DPI}),
            ("pdf", {"dpi": _PNG_DPI, "metadata": {"CreationDate": None}}),
        ):
            out = target.with_name(f"{target.name}.{fmt}")
            try:
                atomic_write(out, lambda f, fmt=fmt, extra=extra: fig.savefig(
                    f, format=fmt, bbox_inches="tight", pad_inches=0.05, **extra))
            except OSError as exc:  # a full disk names no file: name the one not written
                raise OSError(f"cannot write {out}: {exc.strerror or exc}") from None
            written.append(out)
    finally:
        _close(fig)
    return written


def check_table(table: pd.DataFrame, name: str, required: Iterable[str | None]) -> None:
    """Type, emptiness and required columns of an input table."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(table).__name__}")
    if len(table) == 0:
        raise ValueError(f"the {name} table is empty (no rows)")
    missing = [c for c in dict.fromkeys(required) if c is not None and c not in table.columns]
    if missing:
        raise ValueError(
            f"the {name} table lacks required column(s) {', '.join(map(repr, missing))}; "
            f"it has {sorted(map(str, table.columns))}"
        )


def numeric(values: pd.Series) -> np.ndarray:
    """A column as float64, with non-numbers as NaN."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def empty_panel(ax: Axes, reason: str) -> None:
    # Tick labels off, not set_xticks([]): the x-axis is shared, so its ticks are too.
    ax.tick_params(labelbottom=False, labelleft=False, length=0)
    ax.grid(False)
    panel_note(ax, f"not shown:\n{reason}", center=True)


def panel_note(ax: Axes, text: str, *, center: bool = False) -> None:
    """A small grey note: centred in an empty panel, else as the right-hand title (off the data;
    panel titles go on the left)."""
    if center:
        ax.text(
            0.5,
            0.5,
            text,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize="small",
            color="0.35",
            wrap=True,
        )
    else:
        ax.set_title(text, loc="right", fontsize="small", fontweight="normal", color="0.35")


def _close(fig: Figure) -> None:
    """Release a figure from pyplot if pyplot manages it (figures of this module it does not)."""
    manager = getattr(fig.canvas, "manager", None)
    if manager is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)


def ordered_levels(values: pd.Series, name: str) -> list[Any]:
    """Levels of a hue/style column: methods in :data:`METHODS` order, others sorted."""
    levels = list(pd.unique(values.dropna()))
    if name == "method":
        known = [m for m in METHODS if m in levels]
        return known + sorted((m for m in levels if m not in METHOD_COLORS), key=str)
    try:
        return sorted(levels)
    except TypeError:
        return sorted(levels, key=str)


def format_level(value: Any) -> str:
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return f"{float(value):g}"
    return str(value)
