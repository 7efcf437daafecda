"""Figure 6: every method at its tuned learning rate, on MNIST-1D and digits, over seeds.

Per task, the protocol of :func:`sgn_lab.run.tuning.tune`: each method runs at every lr of its
grid (first seed) with a validation split carved from the training set; the lr with the best
final validation metric is chosen; that setting reruns at every seed. The figure shows, per
task (one row of panels), the chosen settings' final test accuracy, generalisation gap
(train − test accuracy), sharpness (top Hessian eigenvalue), SGN trace and effective rank,
mean ± sd over seeds (bars) and each seed (dots), each method's chosen lr under its bar; and
the sensitivity curve, the final validation metric of every tuning run against its lr, one
line per method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sgn_lab.plots import METRIC_LABELS, method_color, plot_style, save_figure
from sgn_lab.run.config import parse
from sgn_lab.run.rundir import load_run, write_table
from sgn_lab.run.tuning import parse_grids, tune

PANELS = ("test_accuracy", "generalization_gap", "hessian_top_eigenvalue", "trace",
          "effective_rank")


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Config keys: ``tasks`` (task -> RunConfig fields), ``methods`` (method -> its fields
    besides the tuned ones), ``tune`` (grids as for ``sgn-lab compare --tune``, e.g.
    ``["lr=1e-3:1:7", "adam.lr=1e-5:1e-2:7"]``), ``validation_fraction``, ``select`` (auto,
    val_loss or val_accuracy) and ``seeds``.

    Writes ``<name>.csv`` (the final measurement of every chosen run: task, method, seed, lr,
    the panels, train accuracy) and ``<name>-tuning.csv`` (every tuning run: task, method, lr,
    its spec's label, its validation metric, diverged, selected); the runs go to
    ``out/runs/<name>-<task>/``.
    """
    grids = parse_grids(list(config["tune"]), where="tune")
    finals, tuning = [], []
    for task, task_fields in config["tasks"].items():
        configs = [parse({"device": "cpu", **task_fields, **fields, "method": method,
                          "validation_fraction": config["validation_fraction"]})
                   for method, fields in config["methods"].items()]
        result = tune(configs, grids, seeds=config["seeds"],
                      root=out / "runs" / f"{config['name']}-{task}",
                      select=config.get("select", "auto"), done=progress)
        finals.append(_finals(result.runs).assign(task=task))
        # The tuning table names a method by its spec's label (gaussian-sigma=0.01): the
        # figure by the method.
        method_of = {c.label: c.method for c in result.choices}
        table = result.tuning.assign(task=task, metric=result.metric, label=result.tuning[
            "method"], method=result.tuning["method"].map(method_of))
        tuning.append(table.assign(value=table[result.metric]))
    final = pd.concat(finals, ignore_index=True)
    final["generalization_gap"] = final["train_accuracy"] - final["test_accuracy"]
    columns = ["task", "method", "seed", "lr", "step", *PANELS, "train_accuracy"]
    csv = write_table(out / f"{config['name']}.csv", final[columns])
    sensitivity = pd.concat(tuning, ignore_index=True)[
        ["task", "method", "label", "lr", "metric", "value", "diverged", "selected"]]
    write_table(out / f"{config['name']}-tuning.csv", sensitivity)
    save_figure(_figure(final, sensitivity, list(config["methods"])), out / config["name"])
    return csv


def _finals(runs: tuple[Path, ...]) -> pd.DataFrame:
    """The last measurement of each run (diverged runs left out: they have no final one)."""
    rows = []
    for path in runs:
        run = load_run(path)
        if run.diverged is None:
            rows.append(run.metrics.sort_values("step").iloc[-1])
    return pd.DataFrame(rows).reset_index(drop=True)


def _figure(final: pd.DataFrame, sensitivity: pd.DataFrame, methods: list[str]) -> Figure:
    tasks = list(dict.fromkeys(final["task"]))
    with plot_style():
        fig = Figure(figsize=(17, 3.2 * len(tasks)), layout="constrained")
        axes = fig.subplots(len(tasks), len(PANELS) + 1, squeeze=False)
        for row, task in enumerate(tasks):
            part = final[final["task"] == task]
            stats = part.groupby("method")[[*PANELS, "lr"]].agg(["mean", "std"])
            present = [m for m in methods if m in stats.index]
            ticks = [f"{m}\nη={stats.loc[m, ('lr', 'mean')]:.2g}" for m in present]
            for col, column in enumerate(PANELS):
                ax = axes[row, col]
                ax.bar(range(len(present)), [stats.loc[m, (column, "mean")] for m in present],
                       yerr=[stats.loc[m, (column, "std")] for m in present], capsize=3,
                       color=[method_color(m) for m in present])
                # Each seed too: an sd of three values hides an outlier behind a symmetric bar.
                for x, method in enumerate(present):
                    seeds = part.loc[part["method"] == method, column]
                    ax.plot(np.full(len(seeds), x), seeds, ".", color="black", ms=3)
                ax.set_xticks(range(len(present)), ticks, rotation=90, fontsize=6)
                ax.set_ylabel(METRIC_LABELS.get(column, column.replace("_", " ")))
                ax.set_title(task, loc="left", fontsize=8)
            _sensitivity(axes[row, -1], sensitivity[sensitivity["task"] == task], methods)
    return fig


def _sensitivity(ax: Any, table: pd.DataFrame, methods: list[str]) -> None:
    """Validation metric against lr per method (first seed); the chosen lr circled."""
    for method in methods:
        rows = table[table["method"] == method].sort_values("lr")
        if rows.empty:
            continue
        value = np.where(rows["diverged"].fillna("").astype(str) == "", rows["value"], np.nan)
        ax.plot(rows["lr"], value, marker=".", color=method_color(method), label=method)
        chosen = rows[rows["selected"].astype(bool)]
        ax.plot(chosen["lr"], chosen["value"], "o", mfc="none", color=method_color(method))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate η (tuning, first seed)")
    metric = table["metric"].iloc[0] if len(table) else "val_accuracy"
    ax.set_ylabel(METRIC_LABELS.get(metric, metric.replace("_", " ")))
    ax.legend(fontsize=5, ncol=3, loc="lower center")
