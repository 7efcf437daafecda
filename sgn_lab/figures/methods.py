"""Figure 6: every method on MNIST-1D and digits over several seeds.

Test accuracy, generalisation gap (train − test accuracy) and final sharpness (top Hessian
eigenvalue), mean ± sd over seeds, one row of panels per task.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sgn_lab.figures._runs import figure_runs
from sgn_lab.plots import METRIC_LABELS, method_color, plot_style, save_figure
from sgn_lab.run.rundir import write_table

PANELS = ("test_accuracy", "generalization_gap", "hessian_top_eigenvalue")


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Config keys: ``tasks`` (task -> RunConfig fields), ``methods`` (method -> fields such
    as lr and the method's hyperparameters) and ``seeds``."""
    settings = {
        f"{task}-{method}-s{seed}": {**task_fields, **method_fields, "method": method,
                                     "seed": seed}
        for task, task_fields in config["tasks"].items()
        for method, method_fields in config["methods"].items()
        for seed in config["seeds"]
    }
    _, _, final = figure_runs(out, config["name"], settings, progress=progress)
    final = final.assign(generalization_gap=final["train_accuracy"] - final["test_accuracy"])
    columns = ["setting", "task", "method", "seed", "step", *PANELS, "train_accuracy"]
    csv = write_table(out / f"{config['name']}.csv", final[columns])
    save_figure(_figure(final, list(config["methods"])), out / config["name"])
    return csv


def _figure(final, methods: list[str]) -> Figure:
    tasks = list(dict.fromkeys(final["task"]))
    with plot_style():
        fig = Figure(figsize=(10, 2.8 * len(tasks)), layout="constrained")
        axes = fig.subplots(len(tasks), len(PANELS), squeeze=False)
        for row, task in enumerate(tasks):
            part = final[final["task"] == task]
            stats = part.groupby("method")[list(PANELS)].agg(["mean", "std"])
            for col, column in enumerate(PANELS):
                ax = axes[row, col]
                present = [m for m in methods if m in stats.index]
                ax.bar(range(len(present)), [stats.loc[m, (column, "mean")] for m in present],
                       yerr=[stats.loc[m, (column, "std")] for m in present], capsize=3,
                       color=[method_color(m) for m in present])
                ax.set_xticks(range(len(present)), present, rotation=45, ha="right")
                ax.set_ylabel(METRIC_LABELS.get(column, column.replace("_", " ")))
                ax.set_title(task, loc="left", fontsize=8)
    return fig
