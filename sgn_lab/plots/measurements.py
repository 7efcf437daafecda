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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sgn_lab.plots.style import (
    DASHES,
    DEFAULT_COLUMNS,
    ERRORBAR,
    LOG_METRICS,
    OPTIONAL_RUN_COLUMNS,
    PANEL_SIZE,
    REFERENCE_COLOR,
    SPECTRUM_KINDS,
    check_table,
    empty_panel,
    format_level,
    method_color,
    metric_label,
    numeric,
    ordered_levels,
    panel_note,
    plot_style,
    save_figure,
)


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
    check_table(metrics, "metrics", [x, hue])

    # Which panels have data, and why the others have none.
    status: dict[str, str | None] = {}
    for col in columns:
        if col not in metrics.columns:
            status[col] = f"'{col}' not in the table"
        elif not np.isfinite(numeric(metrics[col])).any():
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
        style_order = ordered_levels(metrics["method"], "method")
        dashes = {m: DASHES[i % len(DASHES)] for i, m in enumerate(style_order)}

    n = len(columns)
    ncols = 1 if n == 1 else 2 if n in (2, 4) else 3
    nrows = -(-n // ncols)
    reference_drawn = False
    with plot_style():
        fig = Figure(
            figsize=(PANEL_SIZE[0] * ncols + 1.3, PANEL_SIZE[1] * nrows), layout="constrained"
        )
        grid = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
        for ax in grid[n:]:
            ax.remove()
        for ax, col in zip(grid[:n], columns, strict=True):
            ax.set_xlabel(metric_label(x))
            ax.set_ylabel(metric_label(col))
            ax.tick_params(labelbottom=True)
            if status[col] is not None:
                empty_panel(ax, str(status[col]))
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
            _lines(ax, data, x, col, hue=hue, hue_order=hue_order, palette=palette,
                   style=style, style_order=style_order, dashes=dashes)
            if col == "effective_rank":
                reference_drawn |= _draw_metric_reference(
                    ax, metrics, x, "isotropic_effective_rank", log=ax.get_yscale() == "log"
                )
            if f"{col}_se" in metrics.columns:
                _draw_standard_errors(ax, metrics, x, col, hue, palette)
            ax.set_xlabel(metric_label(x))
            ax.set_ylabel(metric_label(col))
            if notes:
                panel_note(ax, "; ".join(notes))

        handles, labels = _legend_entries(hue, hue_order, palette, style, style_order, dashes)
        if reference_drawn:
            handles.append(Line2D([], [], color=REFERENCE_COLOR, linestyle="--", linewidth=1.0))
            labels.append("isotropic noise\n(equal tr S)")
        fig.legend(handles, labels, loc="outside right upper", title=_legend_title(hue))
        fig.draw_without_rendering()  # lay out (and create ticks) inside the style
    return fig


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
    table = _spectra_table(spectra, hue)
    selected = _selected_steps(table[table["kind"] == "sgn"], steps)
    table = table[table["step"].isin(selected)].reset_index(drop=True)
    valid = np.isfinite(table["eigenvalue"]) & (table["eigenvalue"] > 0) & (table["k"] >= 1)

    by_method = hue != "method" and "method" in table.columns and table["method"].nunique() > 1
    panels: list[Any] = ordered_levels(table["method"], "method") if by_method else [None]
    lines = _spectra_lines(table, hue, selected)
    greys = dict(zip(selected, np.linspace(0.25, 0.65, len(selected)), strict=True))

    n = len(panels)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    reference_drawn = False
    with plot_style():
        fig = Figure(
            figsize=(PANEL_SIZE[0] * ncols + 1.3, (PANEL_SIZE[1] + 0.3) * nrows),
            layout="constrained",
        )
        grid = np.atleast_1d(
            fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        ).ravel()
        for ax in grid[n:]:
            ax.remove()
        for ax, method in zip(grid[:n], panels, strict=True):
            in_panel = np.ones(len(table), bool) if method is None else table["method"] == method
            dropped = int((in_panel & ~valid).sum())
            drawn = _spectrum_panel(ax, table[in_panel & valid], method, dropped, hue, lines,
                                    greys)
            reference_drawn = reference_drawn or drawn

        handles, labels = _legend_entries(hue, *lines)
        if reference_drawn:
            handles.append(Line2D([], [], color=REFERENCE_COLOR, linestyle="--", linewidth=1.0))
            labels.append("isotropic noise\n(equal tr S)")
        fig.legend(handles, labels, loc="outside right upper", title=_legend_title(hue))
        fig.draw_without_rendering()
    return fig


def _spectra_table(spectra: pd.DataFrame, hue: str) -> pd.DataFrame:
    """A checked copy of the spectra table: ``kind`` filled in (default ``"sgn"``), eigenvalues
    and ranks as floats."""
    check_table(spectra, "spectra", ["step", "k", "eigenvalue", hue])
    table = spectra.copy()
    if "kind" not in table.columns:
        table["kind"] = "sgn"
    unknown = sorted(set(table["kind"].dropna().astype(str)) - set(SPECTRUM_KINDS))
    if unknown:
        raise ValueError(
            f"plot_spectra: unknown 'kind' value(s) {unknown}; expected one of {SPECTRUM_KINDS}"
        )
    table["eigenvalue"] = numeric(table["eigenvalue"])
    table["k"] = numeric(table["k"])
    if (table["kind"] == "sgn").sum() == 0:
        raise ValueError("plot_spectra: the spectra table has no rows with kind == 'sgn'")
    return table


def _selected_steps(sgn: pd.DataFrame, steps: Sequence[int] | None) -> list[Any]:
    """The steps to draw: those asked for (each with an SGN spectrum), else the first, middle
    and last step that has one."""
    available = sorted(int(s) for s in pd.unique(sgn["step"].dropna()))
    if steps is None:
        return list(dict.fromkeys([available[0], available[len(available) // 2], available[-1]]))
    selected = list(dict.fromkeys(steps))
    missing = [s for s in selected if s not in set(available)]
    if not selected or missing:
        raise ValueError(
            f"plot_spectra: step(s) {', '.join(map(str, missing)) or '(none given)'} have no "
            f"SGN spectrum; available steps: {', '.join(map(str, available))}"
        )
    return selected


def _spectra_lines(table: pd.DataFrame, hue: str, selected: list[Any]) -> tuple[Any, ...]:
    """(hue_order, palette, style, style_order, dashes): steps by colour when ``hue`` is the
    step, else by dash style."""
    if hue == "step":
        palette = dict(zip(selected, _sequential_colors(len(selected)), strict=True))
        return list(selected), palette, None, None, None
    hue_order, palette = _hue_mapping(table[hue], hue)
    dashes = {s: DASHES[i % len(DASHES)] for i, s in enumerate(selected)}
    return hue_order, palette, "step", list(selected), dashes


def _spectrum_panel(ax: Axes, part: pd.DataFrame, method: Any, dropped: int, hue: str,
                    lines: tuple[Any, ...], greys: dict[Any, float]) -> bool:
    """One panel of :func:`plot_spectra` (the valid eigenvalues of one method, or of all);
    whether it drew an isotropic reference."""
    hue_order, palette, style, style_order, dashes = lines
    ax.set_xscale("log")  # before plotting: seaborn aggregates in log space
    ax.set_yscale("log")
    curve = _panel_data(part[part["kind"] == "sgn"], ["k", hue, style], "eigenvalue")
    if curve.empty:
        panel_note(ax, "no SGN spectrum at these steps", center=True)
    else:
        _lines(ax, curve, "k", "eigenvalue", hue=hue, hue_order=hue_order,
               palette=palette, style=style, style_order=style_order, dashes=dashes)
    reference_drawn = _isotropic_references(ax, part[part["kind"] == "isotropic"], greys)
    if method is not None:
        ax.set_title(str(method), loc="left", color=method_color(str(method)))
    elif "method" in part.columns and part["method"].nunique() == 1:
        only = str(part["method"].iloc[0])
        ax.set_title(only, loc="left", color=method_color(only))
    ax.set_xlabel(metric_label("k"))
    ax.set_ylabel(metric_label("eigenvalue"))
    ax.tick_params(labelbottom=True, labelleft=True)
    if dropped:
        panel_note(ax, f"{dropped} λ ≤ 0 or NaN omitted")
    return reference_drawn


def _isotropic_references(ax: Axes, reference: pd.DataFrame, greys: dict[Any, float]) -> bool:
    """The isotropic spectra, dashed grey (geometric mean over seeds); whether any was drawn."""
    group_cols = [c for c in ("method", "step") if c in reference.columns]
    drawn = False
    for key, ref in reference.groupby(group_cols, sort=True):
        step = key[-1] if isinstance(key, tuple) else key
        mean = np.exp(np.log(ref["eigenvalue"]).groupby(ref["k"]).mean())
        ax.plot(mean.index, mean.to_numpy(), color=str(greys[step]), linestyle="--",
                linewidth=1.0, zorder=1)
        drawn = True
    return drawn


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
            for c in OPTIONAL_RUN_COLUMNS
            if c in metrics.columns and np.isfinite(numeric(metrics[c])).any()
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
        spectra = spectra[spectra["kind"].isin(SPECTRUM_KINDS)]
    if spectra is not None and len(spectra) > 0:
        figures.append(("spectra", plot_spectra(spectra, steps=steps)))
    out = Path(out_dir)
    written: list[Path] = []
    for name, fig in figures:
        written += save_figure(fig, out / name)
    return written


def _panel_data(table: pd.DataFrame, keys: Sequence[str | None], value: str) -> pd.DataFrame:
    """The columns one panel needs, with ``value`` as finite float64 (other rows dropped)."""
    cols = list(dict.fromkeys(c for c in (*keys, value) if c is not None))
    data = table[cols].copy()
    data[value] = numeric(data[value])
    return data[np.isfinite(data[value].to_numpy())]


def _hue_mapping(values: pd.Series, name: str) -> tuple[list[Any], dict[Any, Any]]:
    """Ordered hue levels and a fixed colour for each (a dict palette: categorical mapping)."""
    order = ordered_levels(values, name)
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
    labels = [format_level(h) for h in hue_order]
    if style is not None and style_order is not None and dashes is not None:
        handles.append(Line2D([], [], linestyle=""))
        labels.append(_legend_title(style))
        for level in style_order:
            line = Line2D([], [], color="0.2", linewidth=1.4)
            if dashes[level]:
                line.set_dashes(dashes[level])
            handles.append(line)
            labels.append(format_level(level))
    return handles, labels


def _legend_title(column: str) -> str:
    return "training step" if column == "step" else metric_label(column)


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
        value, error = numeric(part[col]), numeric(part[f"{col}_se"])
        ok = np.isfinite(value) & np.isfinite(error)
        if ok.any():
            low = np.maximum(value - error, value * 1e-3) if ax.get_yscale() == "log" else (
                value - error)
            ax.fill_between(numeric(part[x])[ok], low[ok], (value + error)[ok],
                            color=palette.get(level, REFERENCE_COLOR), alpha=0.18, linewidth=0)


def _lines(ax: Axes, data: pd.DataFrame, x: str, y: str, *, hue: str, hue_order: list[str],
           palette: Any, style: str | None, style_order: list[Any] | None,
           dashes: Any) -> None:
    """One line per hue (and style) level: the mean over seeds, ± one sd as a band."""
    sns.lineplot(data=data, x=x, y=y, hue=hue, hue_order=hue_order, palette=palette,
                 style=style, style_order=style_order,
                 dashes=dashes if dashes is not None else True, estimator="mean",
                 errorbar=ERRORBAR, legend=False, linewidth=1.4, ax=ax)
