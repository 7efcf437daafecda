"""The per-layer noise scale of a run (the ``layers`` figure, from ``layers.csv``).

Input: the table of the figure recipe :mod:`sgn_lab.figures.layers`, i.e. the tidy rows of
:func:`sgn_lab.layer_noise_scale` over steps (``step``, ``name``, ``kind``, ``noise_scale``,
``noise_scale_se``, ...) with the columns ``ratio_to_total``, ``log_correlation``,
``median_ratio``, ``ratio_min``, ``ratio_max`` added per name.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sgn_lab.plots.style import (
    PANEL_SIZE,
    REFERENCE_COLOR,
    check_table,
    numeric,
    plot_style,
)

GROUP_COLOR = "#ff7f0e"  # the LayerNorm group
MODULE_COLOR = "#1f77b4"
TOTAL_COLOR = "black"
_CLIP = 1e-2  # lower error bars on the log axis stop at this fraction of the value


def plot_layers(table: pd.DataFrame, *, group: str = "layernorm",
                step: int | None = None) -> Figure:
    """Three panels: (a) B_simple ± 1 SE per module, per group and in total at ``step`` (the
    last by default); (b) the ``group``'s B_simple and the total's over training, ± 1 SE;
    (c) their ratio over training, with its median and the log-log correlation in the title.
    """
    check_table(table, "layers", ["step", "name", "kind", "noise_scale", "noise_scale_se"])
    steps = sorted(table["step"].unique())
    step = steps[-1] if step is None else step
    with plot_style():
        width, height = PANEL_SIZE
        fig = Figure(figsize=(3 * width + 1.2, max(height, 1.0 + 0.16 * _rows(table, step))),
                     layout="constrained")
        ax_end, ax_time, ax_ratio = fig.subplots(1, 3, width_ratios=(1.25, 1, 1))
        _per_module(ax_end, table, step, group)
        _over_training(ax_time, ax_ratio, table, group)
    return fig


def _rows(table: pd.DataFrame, step: int) -> int:
    return int(((table["step"] == step) & (table["kind"] != "parameter")).sum())


def short_names(names: list[str]) -> dict[str, str]:
    """Module names without the dotted prefix they all share (``model.transformer.``)."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 for p in parts) and len(
            {p[common] for p in parts}) == 1:
        common += 1
    return {n: ".".join(p[common:]) for n, p in zip(names, parts, strict=True)}


def _per_module(ax, table: pd.DataFrame, step: int, group: str) -> None:
    rows = table[(table["step"] == step) & (table["kind"] != "parameter")]
    modules = rows[rows["kind"] == "module"]
    short = short_names(list(modules["name"]))
    labels, colors = [], []
    for record in rows.itertuples():
        if record.kind == "module":
            labels.append(short[record.name])
            colors.append(MODULE_COLOR)
        else:
            labels.append(f"[{record.name}]" if record.kind == "group" else "[total]")
            colors.append(GROUP_COLOR if record.name == group else TOTAL_COLOR)
    value, se = numeric(rows["noise_scale"]), numeric(rows["noise_scale_se"])
    y = np.arange(len(rows))[::-1]
    lower, upper = _bars(value, se)
    for yi, v, lo, hi, color in zip(y, value, lower, upper, colors, strict=True):
        if math.isnan(v):
            ax.text(0.02, yi, "|G|² ≤ 0: B undefined", transform=ax.get_yaxis_transform(),
                    va="center", fontsize=6, color=REFERENCE_COLOR)
            continue
        ax.errorbar([v], [yi], xerr=[[lo], [hi]], fmt="o", color=color, markersize=3,
                    capsize=2, linewidth=1)
    ax.set_yticks(y, labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("B_simple = tr S / |G|²  (± 1 SE)")
    ax.set_title(f"(a) per module at step {step}", loc="left")


def _bars(value: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error bar lengths below and above on a log axis: ± SE, the lower one clipped above
    zero, an infinite SE drawn as a bar to the clip and to 100× the value."""
    se = np.where(np.isfinite(se), se, 100 * value)
    lower = np.minimum(se, value * (1 - _CLIP))
    return lower, se


def _over_training(ax_time, ax_ratio, table: pd.DataFrame, group: str) -> None:
    total = table[table["kind"] == "total"].sort_values("step")
    chosen = table[(table["kind"] == "group") & (table["name"] == group)].sort_values("step")
    for rows, label, color in ((total, "all parameters", TOTAL_COLOR),
                               (chosen, f"{group} parameters", GROUP_COLOR)):
        if rows.empty:
            continue
        x = numeric(rows["step"])
        v, se = numeric(rows["noise_scale"]), numeric(rows["noise_scale_se"])
        lower, upper = _bars(v, se)
        ax_time.plot(x, v, "o-", color=color, markersize=2.5, linewidth=1, label=label)
        ax_time.fill_between(x, v - lower, v + upper, color=color, alpha=0.15, linewidth=0)
    ax_time.set_yscale("log")
    ax_time.set_xlabel("training step")
    ax_time.set_ylabel("B_simple (± 1 SE)")
    ax_time.set_title("(b) over training", loc="left")
    ax_time.legend(fontsize=6, loc="best")
    if chosen.empty:
        ax_ratio.set_title(f"(c) no '{group}' group in this run", loc="left")
        return
    x, ratio = numeric(chosen["step"]), numeric(chosen["ratio_to_total"])
    ax_ratio.plot(x, ratio, "o-", color=GROUP_COLOR, markersize=2.5, linewidth=1)
    first = chosen.iloc[0]
    median, r = float(first["median_ratio"]), float(first["log_correlation"])
    if math.isfinite(median):
        ax_ratio.axhline(median, color=REFERENCE_COLOR, linestyle=":", linewidth=1)
    ax_ratio.axhline(1.0, color=REFERENCE_COLOR, linewidth=0.6)
    finite = ratio[np.isfinite(ratio) & (ratio > 0)]
    if finite.size and finite.max() / finite.min() > 10:  # a wide range: log axis
        ax_ratio.set_yscale("log")
    ax_ratio.set_xlabel("training step")
    ax_ratio.set_ylabel(f"B_{group} / B_total")
    lines = [f"(c) ratio: median {median:.2g} (dotted), range "
             f"{float(first['ratio_min']):.2g}–{float(first['ratio_max']):.2g}",
             f"corr(log B_{group}, log B_total) = {r:.2f} over "
             f"{int(first['steps_compared'])} steps"]
    modules = table[table["kind"] == "module"].groupby("name", sort=False)["log_correlation"]
    others = modules.first().dropna()
    if len(others):
        lines.append(f"single modules: corr {others.min():.2f}–{others.max():.2f} "
                     f"(median {others.median():.2f})")
    ax_ratio.set_title("\n".join(lines), loc="left", fontsize=7)
