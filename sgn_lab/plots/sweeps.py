"""Figures of the sweeps of theory against measurement (:mod:`sgn_lab.sweeps`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sgn_lab.plots.style import (
    FALLBACK_COLORS,
    METHOD_COLORS,
    METRIC_LABELS,
    PANEL_SIZE,
    REFERENCE_COLOR,
    check_table,
    method_color,
    metric_label,
    numeric,
    panel_note,
    plot_style,
)

# scaling sweeps (theory against measurement: sgn_lab.sweeps)

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
    ("diagonal_", "covariance noise, diagonal", FALLBACK_COLORS[6]),
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
    """Theory against measurement for one sweep of :func:`sgn_lab.sweeps.run_sweep`.

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
        bends it down). Labels come from :data:`METRIC_LABELS`. The ``critical-batch`` sweep
        is drawn by :func:`plot_critical_batch`.

    Raises
    ------
    ValueError
        Empty table, missing columns, or rows of several sweeps.
    """
    check_table(table, "scaling", _SCALING_COLUMNS)
    sweeps = list(pd.unique(table["sweep"]))
    if len(sweeps) != 1:
        raise ValueError(f"plot_scaling: the table holds several sweeps {sweeps}; pass one")
    sweep = str(sweeps[0])
    if sweep == "critical-batch":  # a different shape of table: its own figure
        return plot_critical_batch(table)
    data = table.loc[:, list(_SCALING_COLUMNS)].copy()
    for col in ("x", "measured", "ci_low", "ci_high", "theory"):
        data[col] = numeric(data[col])
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
            figsize=(PANEL_SIZE[0] * ncols + 1.9, PANEL_SIZE[1] * nrows), layout="constrained"
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
        panel_note(ax, f"slope {slope:.3f} for B ≤ {small['x'].max():g}; dotted: ∝ 1/B")


# critical batch (McCandlish et al.): S against E, and the noise scales

_CRITICAL_PROBLEM_LABELS = {
    "linreg": "linear regression",
    "mlp": "MLP (teacher–student)",
    "transformer": "GPT-2 (Markov language)",
}
_CRITICAL_COLORS = {
    "fit": METHOD_COLORS["sgd"],
    "simple": METHOD_COLORS["pnm"],
    "theory": "0.15",
}


def plot_critical_batch(table: pd.DataFrame) -> Figure:
    """McCandlish et al.'s steps–samples trade-off of the ``critical-batch`` sweep.

    Parameters
    ----------
    table
        One or several tables of :func:`sgn_lab.sweeps.run_sweep` ``("critical-batch")``; with
        several, a ``problem`` column tells them apart (the figure recipe adds it).

    Returns
    -------
    matplotlib.figure.Figure
        One panel per problem: steps S against samples E = B·S (log–log), the mean over seeds
        at each batch size with its 95% CI (points, labelled with B), the fitted hyperbola
        S = S_min + E_min/B, E = B·S (the line, drawn over the grid and beyond it), its
        asymptotes S_min and E_min (dotted), and, where the table has it (linear regression),
        the same protocol on the exact expected loss (grey dashes). A last panel puts the
        fitted B_noise = E_min/S_min with its bootstrap CI next to the measured B_simple at the
        branch point (and the closed forms, where known: open markers), on a log axis.

    Raises
    ------
    ValueError
        Empty table, missing columns, or rows of another sweep.
    """
    check_table(table, "critical-batch", _SCALING_COLUMNS)
    if set(pd.unique(table["sweep"])) != {"critical-batch"}:
        raise ValueError("plot_critical_batch: the table must hold critical-batch rows only")
    data = table.copy()
    for col in ("x", "measured", "ci_low", "ci_high", "theory"):
        data[col] = numeric(data[col])
    if "problem" not in data:
        data["problem"] = ""
    problems = list(dict.fromkeys(data["problem"]))
    with plot_style():
        n = len(problems) + 1
        fig = Figure(figsize=(PANEL_SIZE[0] * n + 0.4, PANEL_SIZE[1] + 0.6),
                     layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)).ravel()
        for ax, problem in zip(axes[:-1], problems, strict=True):
            _critical_panel(ax, data[data["problem"] == problem], str(problem))
        _critical_scales(axes[-1], data, problems)
        fig.draw_without_rendering()
    return fig


def _critical_values(part: pd.DataFrame, quantity: str, column: str = "measured") -> float:
    rows = part[part["quantity"] == quantity]
    return float(rows[column].iloc[0]) if len(rows) else float("nan")


def _critical_panel(ax: Axes, part: pd.DataFrame, problem: str) -> None:
    steps = part[part["quantity"] == "steps"].sort_values("x")
    b = steps["x"].to_numpy()
    s = steps["measured"].to_numpy()
    ok = np.isfinite(s)
    ax.set_xscale("log")
    ax.set_yscale("log")
    color = _CRITICAL_COLORS["fit"]
    low = (s - steps["ci_low"].to_numpy()).clip(min=0)
    high = (steps["ci_high"].to_numpy() - s).clip(min=0)
    ax.errorbar(b[ok] * s[ok], s[ok], yerr=[low[ok], high[ok]], xerr=[b[ok] * low[ok],
                b[ok] * high[ok]], fmt="o", markersize=3.5, capsize=1.5, elinewidth=0.8,
                color=color, markeredgecolor="white", markeredgewidth=0.4, zorder=3,
                label="measured (95% CI)")
    for bi, si, ei in zip(b[ok], s[ok], b[ok] * s[ok], strict=True):
        ax.annotate(f"{bi:g}", (ei, si), textcoords="offset points", xytext=(3, 3),
                    fontsize=5.5, color="0.35")
    from sgn_lab.sweeps.critical import lr_at_edge

    edge = np.isin(b, [bi for bi, _ in lr_at_edge(part)]) & ok
    if edge.any():  # S there is only an upper bound: the best lr may lie outside the grid
        ax.plot(b[edge] * s[edge], s[edge], "o", markersize=7, markerfacecolor="none",
                markeredgecolor=_CRITICAL_COLORS["theory"], zorder=4,
                label="best lr at the grid's end (S an upper bound)")
    s_min, e_min = _critical_values(part, "s_min"), _critical_values(part, "e_min")
    if np.isfinite(s_min) and np.isfinite(e_min) and s_min > 0 and e_min > 0 and ok.any():
        grid = np.geomspace(b[ok].min() / 4, b[ok].max() * 4, 200)
        curve = s_min + e_min / grid
        ax.plot(grid * curve, curve, color=color, linewidth=1.3, zorder=2,
                label="fit S = S_min(1 + B_noise/B)")
        ax.axhline(s_min, color=REFERENCE_COLOR, linestyle=":", linewidth=0.9, zorder=1)
        ax.axvline(e_min, color=REFERENCE_COLOR, linestyle=":", linewidth=0.9, zorder=1)
    theory = steps["theory"].to_numpy()
    if np.isfinite(theory).any():
        good = np.isfinite(theory)
        ax.plot(b[good] * theory[good], theory[good], color=_CRITICAL_COLORS["theory"],
                linestyle="--", linewidth=1.0, zorder=2, label="exact expected loss")
    b_fit = _critical_values(part, "b_noise_fit")
    title = _CRITICAL_PROBLEM_LABELS.get(problem, problem or "critical batch")
    ax.set_title(f"{title}\nB_noise fit = {b_fit:.3g}  (S_min = {s_min:.3g}, "
                 f"E_min = {e_min:.3g})", fontsize=7)
    ax.set_xlabel("samples E = B·S to the target")
    ax.set_ylabel("steps S to the target")
    ax.legend(fontsize=6, loc="upper right")


def _critical_scales(ax: Axes, data: pd.DataFrame, problems: list[str]) -> None:
    ax.set_yscale("log")
    series = (
        ("b_noise_fit", "B_noise fitted (bootstrap 95% CI)", _CRITICAL_COLORS["fit"], -0.12),
        ("b_simple", "B_simple measured at the branch (95% CI)", _CRITICAL_COLORS["simple"],
         0.12),
    )
    for quantity, label, color, dx in series:
        xs, ys, lows, highs, theory = [], [], [], [], []
        for i, problem in enumerate(problems):
            part = data[(data["problem"] == problem) & (data["quantity"] == quantity)]
            if not len(part):
                continue
            row = part.iloc[0]
            xs.append(i + dx)
            ys.append(row["measured"])
            low, high = row["measured"] - row["ci_low"], row["ci_high"] - row["measured"]
            bounded = np.isfinite(low) and np.isfinite(high) and row["ci_low"] > 0
            lows.append(max(low, 0.0) if bounded else 0.0)
            highs.append(max(high, 0.0) if bounded else 0.0)
            theory.append(row["theory"])
            if not bounded and np.isfinite(row["measured"]):
                ax.annotate("CI unbounded", (i + dx, row["measured"]), fontsize=5.5,
                            textcoords="offset points", xytext=(4, -8), color=color)
        xs_a, ys_a = np.array(xs), np.array(ys, dtype=float)
        ax.errorbar(xs_a, ys_a, yerr=[lows, highs], fmt="o",
                    markersize=4, capsize=2, color=color, label=label, zorder=3)
        th = np.array(theory, dtype=float)
        if np.isfinite(th).any():
            ax.plot(xs_a[np.isfinite(th)], th[np.isfinite(th)], marker="D", linestyle="",
                    markersize=5, markerfacecolor="none", markeredgecolor=color,
                    label=label.split(" ")[0] + " closed form", zorder=4)
    ax.set_xticks(range(len(problems)))
    ax.set_xticklabels([_CRITICAL_PROBLEM_LABELS.get(p, p or "problem").split(" (")[0]
                        for p in problems], fontsize=7)
    ax.set_xlim(-0.6, len(problems) - 0.4)
    ax.set_ylabel("batch size")
    ax.set_title("noise scale against critical batch", fontsize=8)
    ax.legend(fontsize=5.5, loc="upper left")

