"""Seaborn figures of measurement runs.

Inputs are the tidy tables of :func:`sgn_lab.load_run` (one row per observation):

``metrics``
    One row per measurement: ``run``, ``method``, ``seed``, ``step``, ``epoch``, hyperparameter
    columns, training metrics (``train_loss``, ``test_accuracy``, ...) and every scalar of
    :class:`sgn_lab.NoiseStats` / :class:`sgn_lab.CurvatureStats` under its attribute name
    (``trace``, ``noise_scale``, ``effective_rank``, ...), optionally ``update_trace``.
``spectra``
    One row per eigenvalue: ``run``, ``method``, ``seed``, ``step``, ``k`` (1-based rank),
    ``eigenvalue`` (> 0) and ``kind`` (``"sgn"``, or ``"isotropic"`` for the reference spectrum
    of isotropic noise of equal trace).

Figures
    :func:`plot_metrics` (metrics over training steps), :func:`plot_spectra` (eigenvalue vs. rank
    on log-log axes), :func:`save_figure` (PNG at 150 dpi + PDF, each written atomically) and
    :func:`plot_run` (both figures of one run directory, as ``sgn-lab plot RUN`` makes them).

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
import secrets
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "DEFAULT_COLUMNS",
    "LOG_METRICS",
    "METHODS",
    "METHOD_COLORS",
    "METRIC_LABELS",
    "REFERENCE_COLOR",
    "metric_label",
    "method_color",
    "plot_metrics",
    "plot_run",
    "plot_spectra",
    "plot_style",
    "save_figure",
]

#: The methods of :mod:`sgn_lab.optim`, in the order legends list them.
METHODS: tuple[str, ...] = (
    "sgd",
    "momentum",
    "adam",
    "gaussian",
    "covariance",
    "symmetric",
    "pnm",
    "adapnm",
    "adaptive-hb",
)

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
_FALLBACK_COLORS: tuple[str, ...] = (
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
    "test_loss": "test loss",
    "train_accuracy": "training accuracy",
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
        "test_loss",
    }
)

#: Panels of :func:`plot_metrics` by default.
DEFAULT_COLUMNS: tuple[str, ...] = ("trace", "noise_scale", "effective_rank", "test_accuracy")

# Panels :func:`plot_run` adds to DEFAULT_COLUMNS when the table has data for them.
_OPTIONAL_RUN_COLUMNS: tuple[str, ...] = (
    "update_trace",
    "hessian_top_eigenvalue",
    "curvature_alignment",
)

_ERRORBAR: tuple[str, float] = ("sd", 1.0)
_PANEL_SIZE: tuple[float, float] = (3.4, 2.5)  # inches per panel
_SPECTRUM_KINDS = ("sgn", "isotropic")
_DASHES: tuple[Any, ...] = ("", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1, 1, 1))
_STYLE_RC: dict[str, Any] = {
    "legend.frameon": False,
    "axes.titleweight": "bold",
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays text
    "ps.fonttype": 42,
}
_PNG_DPI = 150


# --------------------------------------------------------------------------------------------
# style


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
    return _FALLBACK_COLORS[zlib.crc32(str(method).encode()) % len(_FALLBACK_COLORS)]


def metric_label(column: str) -> str:
    """Axis label of a column: :data:`METRIC_LABELS`, or the column name itself."""
    return METRIC_LABELS.get(column, column)


# --------------------------------------------------------------------------------------------
# metrics over training


def plot_metrics(
    metrics: pd.DataFrame,
    *,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    hue: str = "method",
    x: str = "step",
) -> Figure:
    """A grid of panels, one per metric, each over training steps.

    Parameters
    ----------
    metrics
        The tidy metrics table (one row per measurement; see the module docstring). Needs the
        columns ``x`` and ``hue``.
    columns
        The metrics to draw, one panel each, in this order. A column that is missing or has no
        finite value gets an empty panel that says so; it is an error only when none of them has
        data. Metrics in :data:`LOG_METRICS` get a log y-axis (non-positive values, e.g. a
        noisy negative ``noise_scale``, are left out and counted in a note). The
        ``effective_rank`` panel also shows ``isotropic_effective_rank`` (when present) dashed in
        grey, the reference of isotropic noise of equal trace.
    hue
        Column that colours the lines. ``"method"`` uses :data:`METHOD_COLORS`; for another
        column (say ``"lr"``) the levels get an ordered palette and, when the table holds
        several methods, the methods are told apart by dash style.
    x
        Column of the x-axis: ``"step"`` (default) or ``"epoch"``.

    Returns
    -------
    matplotlib.figure.Figure
        Not registered with pyplot; pass it to :func:`save_figure` or display it in a notebook.
        The panels are ``fig.axes`` in the order of ``columns``; the legend is ``fig.legends[0]``.

    Raises
    ------
    ValueError
        Empty table, missing ``x``/``hue`` column, no columns requested, or none of the requested
        columns has data (the message names them).

    Notes
    -----
    Rows that share a hue value and an x value are aggregated: the line is their mean and the
    band ±1 standard deviation (seeds of one method; with one seed there is no band). A sweep
    with several runs per method should use ``hue`` for the swept hyperparameter, or be
    filtered, so that different settings are not averaged together.
    """
    if isinstance(columns, str):
        columns = (columns,)
    columns = list(dict.fromkeys(columns))
    if not columns:
        raise ValueError("plot_metrics: `columns` is empty; name at least one metric column")
    _check_table(metrics, "metrics", [x, hue])

    # Which panels have data, and why the others have none.
    status: dict[str, str | None] = {}
    for col in columns:
        if col not in metrics.columns:
            status[col] = f"'{col}' not in the table"
        elif not np.isfinite(_numeric(metrics[col])).any():
            status[col] = f"'{col}' has no finite values"
        else:
            status[col] = None
    if all(reason is not None for reason in status.values()):
        detail = "; ".join(str(reason) for reason in status.values())
        raise ValueError(
            f"plot_metrics: none of the requested columns has data ({detail}); "
            f"the table has columns {sorted(map(str, metrics.columns))}"
        )

    hue_order, palette = _hue_mapping(metrics[hue], hue)
    style, style_order, dashes = None, None, None
    if hue != "method" and "method" in metrics.columns and metrics["method"].nunique() > 1:
        style = "method"
        style_order = _ordered_levels(metrics["method"], "method")
        dashes = {m: _DASHES[i % len(_DASHES)] for i, m in enumerate(style_order)}

    n = len(columns)
    ncols = 1 if n == 1 else 2 if n in (2, 4) else 3
    nrows = -(-n // ncols)
    reference_drawn = False
    with plot_style():
        fig = Figure(
            figsize=(_PANEL_SIZE[0] * ncols + 1.3, _PANEL_SIZE[1] * nrows), layout="constrained"
        )
        grid = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
        for ax in grid[n:]:
            ax.remove()
        for ax, col in zip(grid[:n], columns, strict=True):
            ax.set_xlabel(metric_label(x))
            ax.set_ylabel(metric_label(col))
            ax.tick_params(labelbottom=True)
            if status[col] is not None:
                _empty_panel(ax, str(status[col]))
                continue
            data = _panel_data(metrics, [x, hue, style], col)
            notes = []
            if col in LOG_METRICS:
                positive = data[col] > 0
                if positive.any():
                    ax.set_yscale("log")  # before plotting: seaborn aggregates in log space
                    dropped = int((~positive).sum())
                    if dropped:
                        notes.append(f"{dropped} value{'s' * (dropped > 1)} ≤ 0 omitted")
                    data = data[positive]
                else:
                    notes.append("no positive values: linear axis")
            sns.lineplot(
                data=data,
                x=x,
                y=col,
                hue=hue,
                hue_order=hue_order,
                palette=palette,
                style=style,
                style_order=style_order,
                dashes=dashes if dashes is not None else True,
                estimator="mean",
                errorbar=_ERRORBAR,
                legend=False,
                linewidth=1.4,
                ax=ax,
            )
            if col == "effective_rank":
                reference_drawn |= _draw_metric_reference(
                    ax, metrics, x, "isotropic_effective_rank", log=ax.get_yscale() == "log"
                )
            if f"{col}_se" in metrics.columns:
                _draw_standard_errors(ax, metrics, x, col, hue, palette)
            ax.set_xlabel(metric_label(x))
            ax.set_ylabel(metric_label(col))
            if notes:
                _note(ax, "; ".join(notes))

        handles, labels = _legend_entries(hue, hue_order, palette, style, style_order, dashes)
        if reference_drawn:
            handles.append(Line2D([], [], color=REFERENCE_COLOR, linestyle="--", linewidth=1.0))
            labels.append("isotropic noise\n(equal tr S)")
        fig.legend(handles, labels, loc="outside right upper", title=_legend_title(hue))
        fig.draw_without_rendering()  # lay out (and create ticks) inside the style
    return fig


# --------------------------------------------------------------------------------------------
# spectra


def plot_spectra(
    spectra: pd.DataFrame,
    *,
    steps: Sequence[int] | None = None,
    hue: str = "step",
) -> Figure:
    """Eigenvalue spectra of S, eigenvalue against rank on log-log axes.

    Parameters
    ----------
    spectra
        The tidy spectra table (see the module docstring). Needs ``step``, ``k``,
        ``eigenvalue`` and the ``hue`` column; ``kind`` (default: all ``"sgn"``), ``method``
        and ``seed`` are optional. Non-positive or non-finite eigenvalues are left out (a note
        counts them).
    steps
        The training steps to draw; default: the first, middle and last step with an SGN
        spectrum in the table. A step that is not in the table is an error.
    hue
        Column that colours the lines: ``"step"`` (default; ordered palette, later steps
        lighter), ``"method"`` (:data:`METHOD_COLORS`; one panel, steps by dash style) or another
        column such as ``"seed"``.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per method (titled by it) when the table holds several methods and ``hue`` is
        not ``"method"``, else one panel; axes share both scales. Several seeds are aggregated
        as in :func:`plot_metrics` (geometric mean over seeds at each k, ±1 sd band in log
        space). The isotropic reference (``kind == "isotropic"``) is dashed, in grey (darker for
        earlier steps).

    Raises
    ------
    ValueError
        Empty table, missing columns, unknown ``kind`` values, no SGN eigenvalues, or
        requested steps that are not in the table.
    """
    _check_table(spectra, "spectra", ["step", "k", "eigenvalue", hue])
    table = spectra.copy()
    if "kind" not in table.columns:
        table["kind"] = "sgn"
    unknown = sorted(set(table["kind"].dropna().astype(str)) - set(_SPECTRUM_KINDS))
    if unknown:
        raise ValueError(
            f"plot_spectra: unknown 'kind' value(s) {unknown}; expected one of {_SPECTRUM_KINDS}"
        )
    table["eigenvalue"] = _numeric(table["eigenvalue"])
    table["k"] = _numeric(table["k"])
    sgn = table[table["kind"] == "sgn"]
    if sgn.empty:
        raise ValueError("plot_spectra: the spectra table has no rows with kind == 'sgn'")

    available = sorted(pd.unique(sgn["step"].dropna()))
    if steps is None:
        selected = list(
            dict.fromkeys([available[0], available[len(available) // 2], available[-1]])
        )
    else:
        selected = list(dict.fromkeys(steps))
        missing = [s for s in selected if s not in set(available)]
        if not selected or missing:
            raise ValueError(
                f"plot_spectra: step(s) {missing or '(none given)'} have no SGN spectrum; "
                f"available steps: {available}"
            )
    table = table[table["step"].isin(selected)].reset_index(drop=True)
    valid = np.isfinite(table["eigenvalue"]) & (table["eigenvalue"] > 0) & (table["k"] >= 1)

    by_method = hue != "method" and "method" in table.columns and table["method"].nunique() > 1
    panels: list[Any] = _ordered_levels(table["method"], "method") if by_method else [None]
    step_palette = dict(zip(selected, _sequential_colors(len(selected)), strict=True))
    if hue == "step":
        hue_order: list[Any] = list(selected)
        palette = step_palette
        style, style_order, dashes = None, None, None
    else:
        hue_order, palette = _hue_mapping(table[hue], hue)
        style, style_order = "step", list(selected)
        dashes = {s: _DASHES[i % len(_DASHES)] for i, s in enumerate(style_order)}
    greys = dict(zip(selected, np.linspace(0.25, 0.65, len(selected)), strict=True))

    n = len(panels)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    reference_drawn = False
    with plot_style():
        fig = Figure(
            figsize=(_PANEL_SIZE[0] * ncols + 1.3, (_PANEL_SIZE[1] + 0.3) * nrows),
            layout="constrained",
        )
        grid = np.atleast_1d(
            fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        ).ravel()
        for ax in grid[n:]:
            ax.remove()
        for ax, method in zip(grid[:n], panels, strict=True):
            in_panel = np.ones(len(table), bool) if method is None else table["method"] == method
            part = table[in_panel & valid]
            dropped = int((in_panel & ~valid).sum())
            ax.set_xscale("log")  # before plotting: seaborn aggregates in log space
            ax.set_yscale("log")
            curve = _panel_data(part[part["kind"] == "sgn"], ["k", hue, style], "eigenvalue")
            if curve.empty:
                _note(ax, "no SGN spectrum at these steps", center=True)
            else:
                sns.lineplot(
                    data=curve,
                    x="k",
                    y="eigenvalue",
                    hue=hue,
                    hue_order=hue_order,
                    palette=palette,
                    style=style,
                    style_order=style_order,
                    dashes=dashes if dashes is not None else True,
                    estimator="mean",
                    errorbar=_ERRORBAR,
                    legend=False,
                    linewidth=1.4,
                    ax=ax,
                )
            reference = part[part["kind"] == "isotropic"]
            group_cols = [c for c in ("method", "step") if c in reference.columns]
            for key, ref in reference.groupby(group_cols, sort=True):
                step = key[-1] if isinstance(key, tuple) else key
                mean = np.exp(np.log(ref["eigenvalue"]).groupby(ref["k"]).mean())
                ax.plot(
                    mean.index,
                    mean.to_numpy(),
                    color=str(greys[step]),
                    linestyle="--",
                    linewidth=1.0,
                    zorder=1,
                )
                reference_drawn = True
            if method is not None:
                ax.set_title(str(method), loc="left", color=method_color(str(method)))
            elif "method" in part.columns and part["method"].nunique() == 1:
                only = str(part["method"].iloc[0])
                ax.set_title(only, loc="left", color=method_color(only))
            ax.set_xlabel(metric_label("k"))
            ax.set_ylabel(metric_label("eigenvalue"))
            ax.tick_params(labelbottom=True, labelleft=True)
            if dropped:
                _note(ax, f"{dropped} λ ≤ 0 or NaN omitted")

        handles, labels = _legend_entries(hue, hue_order, palette, style, style_order, dashes)
        if reference_drawn:
            handles.append(Line2D([], [], color=REFERENCE_COLOR, linestyle="--", linewidth=1.0))
            labels.append("isotropic noise\n(equal tr S)")
        fig.legend(handles, labels, loc="outside right upper", title=_legend_title(hue))
        fig.draw_without_rendering()
    return fig


# --------------------------------------------------------------------------------------------
# files


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
            _atomic_savefig(fig, out, fmt, extra)
            written.append(out)
    finally:
        _close(fig)
    return written


def plot_run(
    metrics: pd.DataFrame,
    spectra: pd.DataFrame | None,
    out_dir: str | os.PathLike[str],
    *,
    steps: Sequence[int] | None = None,
    columns: Sequence[str] | None = None,
) -> list[Path]:
    """The figures of one run: ``metrics.png/pdf`` and ``spectra.png/pdf`` in ``out_dir``.

    Parameters
    ----------
    metrics, spectra
        The tables of :func:`sgn_lab.load_run`. ``spectra`` may be ``None`` or empty (a run
        that recorded none): then only the metrics figure is written.
    out_dir
        Folder for the files; created if needed.
    steps
        Steps of the spectra figure (default: first, middle and last).
    columns
        Panels of the metrics figure; default :data:`DEFAULT_COLUMNS` plus ``update_trace``,
        ``hessian_top_eigenvalue`` and ``curvature_alignment`` when the table has data for
        them.

    Returns
    -------
    list[pathlib.Path]
        The written files, metrics first.

    Raises
    ------
    ValueError
        As :func:`plot_metrics` and :func:`plot_spectra`. Both figures are built before either
        is written, so bad input writes nothing.
    """
    if columns is None:
        extra = [
            c
            for c in _OPTIONAL_RUN_COLUMNS
            if c in metrics.columns and np.isfinite(_numeric(metrics[c])).any()
        ]
        columns = (*DEFAULT_COLUMNS, *extra)
    if "label" in metrics.columns and metrics["label"].nunique() > metrics["method"].nunique():
        # Runs of one method with other hyperparameters: their full identity tells them apart.
        metrics = metrics.assign(method=metrics["label"])
        if spectra is not None and "label" in spectra.columns:
            spectra = spectra.assign(method=spectra["label"])
    figures = [("metrics", plot_metrics(metrics, columns=columns))]
    if spectra is not None and "kind" in spectra.columns:
        # The update-noise spectra (kind "update") have a figure of their own.
        spectra = spectra[spectra["kind"].isin(_SPECTRUM_KINDS)]
    if spectra is not None and len(spectra) > 0:
        figures.append(("spectra", plot_spectra(spectra, steps=steps)))
    out = Path(out_dir)
    written: list[Path] = []
    for name, fig in figures:
        written += save_figure(fig, out / name)
    return written


# --------------------------------------------------------------------------------------------
# helpers


def _check_table(table: pd.DataFrame, name: str, required: Iterable[str | None]) -> None:
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


def _numeric(values: pd.Series) -> np.ndarray:
    """A column as float64, with non-numbers as NaN."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _panel_data(table: pd.DataFrame, keys: Sequence[str | None], value: str) -> pd.DataFrame:
    """The columns one panel needs, with ``value`` as finite float64 (other rows dropped)."""
    cols = list(dict.fromkeys(c for c in (*keys, value) if c is not None))
    data = table[cols].copy()
    data[value] = _numeric(data[value])
    return data[np.isfinite(data[value].to_numpy())]


def _ordered_levels(values: pd.Series, name: str) -> list[Any]:
    """Levels of a hue/style column: methods in :data:`METHODS` order, others sorted."""
    levels = list(pd.unique(values.dropna()))
    if name == "method":
        known = [m for m in METHODS if m in levels]
        return known + sorted((m for m in levels if m not in METHOD_COLORS), key=str)
    try:
        return sorted(levels)
    except TypeError:
        return sorted(levels, key=str)


def _hue_mapping(values: pd.Series, name: str) -> tuple[list[Any], dict[Any, Any]]:
    """Ordered hue levels and a fixed colour for each (a dict palette: categorical mapping)."""
    order = _ordered_levels(values, name)
    if not order:
        raise ValueError(f"the hue column {name!r} has no values")
    if name == "method":
        return order, {m: method_color(str(m)) for m in order}
    if pd.api.types.is_numeric_dtype(values):
        colors = _sequential_colors(len(order))
    else:
        colors = sns.color_palette("deep", len(order))
    return order, dict(zip(order, colors, strict=True))


def _sequential_colors(n: int) -> list[tuple[float, float, float]]:
    """n ordered colours (viridis without its pale yellow end)."""
    cmap = mpl.colormaps["viridis"]
    positions = [0.0] if n == 1 else np.linspace(0.0, 0.85, n)
    return [tuple(cmap(p)[:3]) for p in positions]


def _legend_entries(
    hue: str,
    hue_order: Sequence[Any],
    palette: dict[Any, Any],
    style: str | None,
    style_order: Sequence[Any] | None,
    dashes: dict[Any, Any] | None,
) -> tuple[list[Any], list[str]]:
    """Legend handles: one per hue level, then (under a heading) one per style level."""
    handles: list[Any] = [Line2D([], [], color=palette[h], linewidth=1.6) for h in hue_order]
    labels = [_format_level(h) for h in hue_order]
    if style is not None and style_order is not None and dashes is not None:
        handles.append(Line2D([], [], linestyle=""))
        labels.append(_legend_title(style))
        for level in style_order:
            line = Line2D([], [], color="0.2", linewidth=1.4)
            if dashes[level]:
                line.set_dashes(dashes[level])
            handles.append(line)
            labels.append(_format_level(level))
    return handles, labels


def _legend_title(column: str) -> str:
    return "training step" if column == "step" else metric_label(column)


def _format_level(value: Any) -> str:
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return f"{float(value):g}"
    return str(value)


def _draw_metric_reference(
    ax: Axes, metrics: pd.DataFrame, x: str, column: str, *, log: bool
) -> bool:
    """Dashed grey mean curve of ``column`` per method (geometric mean on a log axis)."""
    if column not in metrics.columns:
        return False
    keys = ["method"] if "method" in metrics.columns else []
    data = _panel_data(metrics, [x, *keys], column)
    if log:
        data = data[data[column] > 0]
    if data.empty:
        return False
    groups = data.groupby(keys, sort=True) if keys else [(None, data)]
    for _, part in groups:
        values = np.log(part[column]) if log else part[column]
        mean = values.groupby(part[x]).mean().sort_index()
        ax.plot(
            mean.index,
            np.exp(mean.to_numpy()) if log else mean.to_numpy(),
            color=REFERENCE_COLOR,
            linestyle="--",
            linewidth=1.0,
            zorder=1,
        )
    return True


def _draw_standard_errors(ax: Axes, metrics: pd.DataFrame, x: str, col: str, hue: str,
                          palette: dict[Any, Any]) -> None:
    """±1 standard error of ``col`` (its ``<col>_se`` column, the jackknife's) as a band, for
    each hue level measured by a single run (several runs show their spread instead)."""
    for level, part in metrics.groupby(hue, sort=False):
        if "run" in part.columns and part["run"].nunique() > 1:
            continue
        part = part.sort_values(x)
        value, error = _numeric(part[col]), _numeric(part[f"{col}_se"])
        ok = np.isfinite(value) & np.isfinite(error)
        if ok.any():
            low = np.maximum(value - error, value * 1e-3) if ax.get_yscale() == "log" else (
                value - error)
            ax.fill_between(_numeric(part[x])[ok], low[ok], (value + error)[ok],
                            color=palette.get(level, REFERENCE_COLOR), alpha=0.18, linewidth=0)


def _empty_panel(ax: Axes, reason: str) -> None:
    # Tick labels off, not set_xticks([]): the x-axis is shared, so its ticks are too.
    ax.tick_params(labelbottom=False, labelleft=False, length=0)
    ax.grid(False)
    _note(ax, f"not shown:\n{reason}", center=True)


def _note(ax: Axes, text: str, *, center: bool = False) -> None:
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


def _atomic_savefig(fig: Figure, out: Path, fmt: str, extra: dict[str, Any]) -> None:
    """Render into a temporary file next to ``out``, then rename it over ``out``.

    The temporary file is opened with mode 0o666 and the process umask, like any new file
    (``tempfile.mkstemp`` would leave the figure readable by its owner only).
    """
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format=fmt, bbox_inches="tight", pad_inches=0.05, **extra)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _close(fig: Figure) -> None:
    """Release a figure from pyplot if pyplot manages it (figures of this module it does not)."""
    manager = getattr(fig.canvas, "manager", None)
    if manager is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)


# --------------------------------------------------------------------------------------------
# scaling sweeps (theory against measurement: sgn_lab.scaling)

METRIC_LABELS.update(
    {
        # x of the sweeps
        "sigma": "injected noise σ",
        "large_batch": "large batch B_L",
        # quantities of the sweeps (beyond the NoiseStats names)
        "parameter_trace": "tr Cov[θ − w*] (stationary fluctuation)",
        "update_lag1_correlation": "lag-1 correlation of Δθ",
        "update_trace_ratio": "tr Cov[Δθ]: PNM / SGD at η/√Γ",
        "parameter_trace_ratio": "tr Cov[θ]: PNM / SGD at η/√Γ",
        "noise_trace": "tr Cov[Δθ/η] (noise of the step)",
        "injected_trace": "injected part of tr Cov[Δθ/η]",
    }
)

#: x column of each sweep, for its axis label.
_SCALING_X: dict[str, str] = {
    "batch": "batch_size",
    "beta0": "beta0",
    "sigma": "sigma",
    "large-batch": "large_batch",
}

#: Series of a sweep table, by the prefix of its quantity: (prefix, legend label, colour).
_SCALING_SERIES: tuple[tuple[str, str, str], ...] = (
    ("sgd_", "SGD at η/√Γ", METHOD_COLORS["sgd"]),
    ("full_", "covariance noise, full", METHOD_COLORS["covariance"]),
    ("diagonal_", "covariance noise, diagonal", _FALLBACK_COLORS[6]),
    ("isotropic_", "isotropic noise, equal trace", METHOD_COLORS["gaussian"]),
    ("large_batch_", "large batch alone", METHOD_COLORS["sgd"]),
)

#: The series of quantities without a prefix, per sweep: (legend label, colour).
_SCALING_DEFAULT_SERIES: dict[str, tuple[str, str]] = {
    "batch": ("minibatch SGD", METHOD_COLORS["sgd"]),
    "beta0": ("PNM", METHOD_COLORS["pnm"]),
    "sigma": ("SGD + Gaussian noise", METHOD_COLORS["gaussian"]),
}

#: Log axes per sweep: (x, y); None: log where the values are positive and span 10×.
_SCALING_LOG: dict[str, tuple[bool | None, bool | None]] = {
    "batch": (True, True),
    "beta0": (False, None),
    "sigma": (False, False),
    "large-batch": (True, None),
}

_SCALING_COLUMNS = ("sweep", "x", "quantity", "measured", "ci_low", "ci_high", "theory")
_SCALING_DODGE = 0.035  # horizontal offset between the series' points, in axis fractions


def plot_scaling(table: pd.DataFrame) -> Figure:
    """Theory against measurement for one sweep of :func:`sgn_lab.scaling.run_sweep`.

    Parameters
    ----------
    table
        The sweep's tidy table (columns sweep, x, quantity, measured, ci_low, ci_high,
        theory, ...), one sweep only.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per measured figure (the quantity without its method prefix: ``sgd_``,
        ``full_``, ``diagonal_``, ``isotropic_``, ``large_batch_``), the methods in colour.
        Measurements are points with their 95% confidence interval as error bars; the theory
        is a line through its values at the grid points (one grey line when all methods of
        the panel share it, as the small-batch target of the ``large-batch`` sweep). An axis
        is logarithmic when its values are positive and span a factor of 10 or more (the
        ``batch`` sweep: log–log, where the minibatch noise has slope −1; there a dotted
        ∝ 1/B line and the fitted slope of the small batches show where the finite data set
        bends it down). Labels come from :data:`METRIC_LABELS`.

    Raises
    ------
    ValueError
        Empty table, missing columns, or rows of several sweeps.
    """
    _check_table(table, "scaling", _SCALING_COLUMNS)
    sweeps = list(pd.unique(table["sweep"]))
    if len(sweeps) != 1:
        raise ValueError(f"plot_scaling: the table holds several sweeps {sweeps}; pass one")
    sweep = str(sweeps[0])
    data = table.loc[:, list(_SCALING_COLUMNS)].copy()
    for col in ("x", "measured", "ci_low", "ci_high", "theory"):
        data[col] = _numeric(data[col])
    split = [_scaling_series(sweep, str(q)) for q in data["quantity"]]
    data["metric"] = [metric for _, metric in split]
    data["series"] = [series for series, _ in split]
    metrics = list(dict.fromkeys(data["metric"]))
    series_order = list(dict.fromkeys(data["series"]))
    colors = {label: color for _, label, color in _SCALING_SERIES}
    colors.update(dict(_SCALING_DEFAULT_SERIES.values()))

    n = len(metrics)
    ncols = 1 if n == 1 else 2 if n in (2, 4) else 3
    nrows = -(-n // ncols)
    shared_theory_drawn = own_theory_drawn = False
    with plot_style():
        fig = Figure(
            figsize=(_PANEL_SIZE[0] * ncols + 1.9, _PANEL_SIZE[1] * nrows), layout="constrained"
        )
        grid = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax in grid[n:]:
            ax.remove()
        for ax, metric in zip(grid[:n], metrics, strict=True):
            part = data[data["metric"] == metric].sort_values("x", kind="stable")
            _scaling_axes(ax, part, *_SCALING_LOG.get(sweep, (None, None)))
            groups = [(s, part[part["series"] == s]) for s in series_order
                      if (part["series"] == s).any()]
            theories = [g["theory"].to_numpy() for _, g in groups]
            shared = len(groups) > 1 and all(
                len(t) == len(theories[0]) and np.allclose(t, theories[0], equal_nan=True)
                for t in theories
            )
            if shared:
                first = groups[0][1]
                ax.plot(first["x"], first["theory"], color="0.15", linestyle="--",
                        linewidth=1.2, zorder=2)
                shared_theory_drawn = True
            for i, (series, g) in enumerate(groups):
                color = colors.get(series, method_color(series))
                if not shared:
                    ax.plot(g["x"], g["theory"], color=color, linewidth=1.3, zorder=2)
                    own_theory_drawn = True
                below = (g["measured"] - g["ci_low"]).clip(lower=0)
                above = (g["ci_high"] - g["measured"]).clip(lower=0)
                # Points of several series side by side (theory lines stay at the true x).
                x = _scaling_dodge(ax, g["x"].to_numpy(), i - (len(groups) - 1) / 2, part)
                ax.errorbar(x, g["measured"], yerr=[below, above], fmt="o",
                            markersize=3.5, capsize=2.0, elinewidth=1.0, color=color,
                            markeredgecolor="white", markeredgewidth=0.4, zorder=3)
            if sweep == "batch":
                _scaling_batch_reference(ax, part)
            if metric.endswith("_ratio"):  # 1: as much as the baseline
                ax.axhline(1.0, color=REFERENCE_COLOR, linestyle=":", linewidth=1.0, zorder=1)
            ax.set_xlabel(metric_label(_SCALING_X.get(sweep, "x")))
            ax.set_ylabel(metric_label(metric))

        handles: list[Any] = [
            Line2D([], [], color=colors.get(s, method_color(s)), marker="o", linestyle="",
                   markersize=4)
            for s in series_order
        ]
        labels = list(series_order)
        handles.append(Line2D([], [], linestyle=""))
        labels.append("")
        handles.append(Line2D([], [], color="0.3", marker="o", linestyle="", markersize=4))
        labels.append("measured (95% CI)")
        if own_theory_drawn:
            handles.append(Line2D([], [], color="0.3", linewidth=1.3))
            labels.append("theory (exact)")
        if shared_theory_drawn:
            handles.append(Line2D([], [], color="0.15", linestyle="--", linewidth=1.2))
            labels.append("target: small batch B_S" if sweep == "large-batch" else "theory")
        fig.legend(handles, labels, loc="outside right upper", title=f"{sweep} sweep")
        fig.draw_without_rendering()
    return fig


def _scaling_series(sweep: str, quantity: str) -> tuple[str, str]:
    """(series label, metric) of a quantity: its method prefix, if any, names the series."""
    for prefix, label, _ in _SCALING_SERIES:
        if quantity.startswith(prefix) and len(quantity) > len(prefix):
            return label, quantity[len(prefix):]
    label = _SCALING_DEFAULT_SERIES.get(sweep, (sweep, ""))[0]
    return label, quantity


def _scaling_axes(ax: Axes, part: pd.DataFrame, log_x: bool | None, log_y: bool | None) -> None:
    """Log scales, set before plotting: where asked for (None: where the values span a factor
    of 10), and only for positive values."""
    for axis, values, log in (
        ("x", part["x"], log_x),
        ("y", part[["measured", "ci_low", "theory"]], log_y),
    ):
        v = values.to_numpy(dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        positive = v.size > 0 and bool((v > 0).all())
        if positive and (log or (log is None and v.max() >= 10 * v.min())):
            (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _scaling_dodge(ax: Axes, x: np.ndarray, offset: float, part: pd.DataFrame) -> np.ndarray:
    """x shifted by ``offset`` dodge steps (a fixed fraction of the axis, log or linear)."""
    if offset == 0:
        return x
    all_x = part["x"].to_numpy(dtype=np.float64)
    if ax.get_xscale() == "log":
        span = np.log(all_x.max() / all_x.min()) or 1.0
        return x * np.exp(offset * _SCALING_DODGE * span)
    span = float(all_x.max() - all_x.min()) or 1.0
    return x + offset * _SCALING_DODGE * span


def _scaling_batch_reference(ax: Axes, part: pd.DataFrame) -> None:
    """A dotted ∝ 1/B line through the smallest B, and the fitted slope of the small B."""
    first = part.iloc[0]
    x = part["x"].to_numpy()
    if not (np.isfinite(first["theory"]) and first["theory"] > 0 and (x > 0).all()):
        return
    ax.plot(x, first["theory"] * first["x"] / x, color=REFERENCE_COLOR, linestyle=":",
            linewidth=1.0, zorder=1)
    small = part[(part["x"] <= x.max() / 8) & (part["measured"] > 0)]
    if len(small) >= 2:
        slope = np.polyfit(np.log(small["x"]), np.log(small["measured"]), 1)[0]
        _note(ax, f"slope {slope:.3f} for B ≤ {small['x'].max():g}; dotted: ∝ 1/B")


__all__ += ["plot_scaling"]
