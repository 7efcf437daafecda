"""Figure 7: tails and Gaussianity of the minibatch noise g_B − ḡ against the minibatch size B.

One model (an MLP on MNIST-1D), trained once with SGD and the ``minibatch-tails`` instrument
(:func:`sgn_lab.minibatch_noise_shape`): at a few training steps, R minibatches of each size B
are drawn without replacement from the probe's per-sample gradients, and of their noise
g_B − ḡ the figure shows, against B,

* the tail index α of the per-coordinate standardised noise (α = 2: Gaussian tails; α < 2:
  heavy, the α-stable picture of Simsekli et al. 2019, which is measured at B = 1);
* the fraction of random 1-D projections that the D'Agostino–Pearson test rejects as Gaussian
  at level 0.05, and their mean excess kurtosis (Panigrahi et al. 2019; Xie et al. 2023: close
  to Gaussian at moderate batch sizes).

A per-sample noise with finite variance approaches the Gaussian as B grows (central limit
theorem); an α-stable one would keep its α at every B.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from sgn_lab.figures.measure import figure_run
from sgn_lab.plots import METRIC_LABELS, REFERENCE_COLOR, plot_style, save_figure
from sgn_lab.run.rundir import write_table

SHAPE = ("tail_index", "normality_pvalue", "normality_reject_fraction", "kurtosis")
PANELS = ("tail_index", "normality_reject_fraction", "kurtosis")
# The Gaussian value of each panel's quantity (the test level for the rejection fraction).
GAUSSIAN = {"tail_index": 2.0, "normality_reject_fraction": 0.05, "kurtosis": 0.0}
_TASKS = {"mnist1d": "MNIST-1D"}
_COLUMN = re.compile(rf"^({'|'.join(SHAPE)})_b(\d+)$")


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """The shape of the minibatch noise against B, one line per measured training step.

    Config keys: ``run`` (RunConfig fields of the one measurement run; its instruments must
    include ``minibatch-tails``, its ``shape_batch_sizes`` are the figure's B).
    """
    run = figure_run(out, config["name"], config["run"], progress=progress, nproc=config["nproc"],
                     parallel=config["parallel"])
    table = tidy(run.metrics)
    csv = write_table(out / f"{config['name']}.csv", table)
    model, task = run.config["model"], run.config["task"]
    probe, training = run.config["probe"], run.config["training"]
    method = run.config["optimizer"]["method"].upper()
    title = (f"{model['name'].upper()} (width {model['width']}) on "
             f"{_TASKS.get(task['name'], task['name'])}, {method} at batch "
             f"{training['batch_size']}: R = {probe['shape_draws']} minibatches of each size B "
             f"from n = {probe['probe_samples']} per-sample gradients")
    save_figure(plot_shape_by_batch(table, title=title), out / config["name"])
    return csv


def tidy(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per measured step and minibatch size B, from the ``<column>_b<B>`` columns.

    Columns: ``run``, ``step``, ``epoch``, ``batch_size`` (the B of the noise, not the training
    batch size) and the four shape statistics; rows sorted by step, then B. A B that was not
    below the probe's per-sample gradients is NaN, kept as such.
    """
    found: dict[int, dict[str, str]] = {}
    for column in metrics.columns:
        match = _COLUMN.match(str(column))
        if match:
            found.setdefault(int(match[2]), {})[column] = match[1]
    if not found:
        raise ValueError("the run has no minibatch-tails columns (tail_index_b<B>, ...): add "
                         "'minibatch-tails' to its instruments")
    keys = [c for c in ("run", "step", "epoch") if c in metrics.columns]
    parts = [metrics[[*keys, *renames]].rename(columns=renames).assign(batch_size=b)
             for b, renames in sorted(found.items())]
    table = pd.concat(parts, ignore_index=True)
    table = table[[*keys, "batch_size", *SHAPE]]
    return table.sort_values(["step", "batch_size"], kind="stable").reset_index(drop=True)


def plot_shape_by_batch(table: pd.DataFrame, panels: Sequence[str] = PANELS, *,
                        title: str | None = None) -> Figure:
    """Each statistic of :func:`tidy`'s table against B (log axis), one line per step.

    Steps are coloured in order (viridis, later steps lighter); the Gaussian value of each
    quantity is a dashed grey line. NaN values are left out.
    """
    steps = sorted(table["step"].unique())
    cmap = mpl.colormaps["viridis"]
    colors = [cmap(p) for p in ([0.0] if len(steps) == 1 else np.linspace(0, 0.85, len(steps)))]
    sizes = sorted(table["batch_size"].unique())
    with plot_style():
        fig = Figure(figsize=(3.2 * len(panels) + 1.3, 2.7), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels), sharex=True))
        for ax, column in zip(axes, panels, strict=True):
            for step, color in zip(steps, colors, strict=True):
                part = table[(table["step"] == step) & np.isfinite(table[column])]
                ax.plot(part["batch_size"], part[column], marker="o", markersize=3.5,
                        color=color, linewidth=1.4)
            ax.axhline(GAUSSIAN[column], color=REFERENCE_COLOR, linestyle="--", linewidth=1.0,
                       zorder=1)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{b:g}" for b in sizes])
            ax.set_xlabel("minibatch size B of the noise g_B − ḡ")
            ax.set_ylabel(METRIC_LABELS.get(column, column))
        if "normality_reject_fraction" in panels:
            axes[list(panels).index("normality_reject_fraction")].set_ylim(-0.03, 1.03)
        handles = [Line2D([], [], color=c, marker="o", markersize=3.5, linewidth=1.4)
                   for c in colors]
        labels = [f"{s:g}" for s in steps]
        handles.append(Line2D([], [], color=REFERENCE_COLOR, linestyle="--", linewidth=1.0))
        labels.append("Gaussian value\n(α = 2, level 0.05,\nkurtosis 0)")
        fig.legend(handles, labels, loc="outside right upper", title="training step")
        if title:
            fig.suptitle(title, fontsize="medium")
        fig.draw_without_rendering()
    return fig
