"""Figure 5: S-SGD against SGD across batch sizes — sharpness and test accuracy.

Symmetric weight noise (Sung et al. 2020) averages the gradients at w ± ε, a pressure toward
flat minima (the even terms smooth the loss) without first-order noise; the figure shows the
top Hessian eigenvalue (sharpness) and the test accuracy at the end of training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sgn_lab.figures.measure import figure_runs
from sgn_lab.plots import METRIC_LABELS, method_color, plot_style, save_figure
from sgn_lab.run.rundir import write_table


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Config keys: ``base`` (RunConfig fields), ``methods`` (label -> fields, e.g. sgd and
    symmetric with its noise), ``batch_sizes`` and ``seeds``."""
    settings = {
        f"{label}-B{batch}-s{seed}": {**config["base"], **fields, "batch_size": batch,
                                      "seed": seed}
        for label, fields in config["methods"].items()
        for batch in config["batch_sizes"]
        for seed in config.get("seeds", [0])
    }
    _, _, final = figure_runs(out, config["name"], settings, progress=progress,
                              nproc=config["nproc"],
                     parallel=config["parallel"])
    columns = ["setting", "method", "seed", "batch_size", "step", "hessian_top_eigenvalue",
               "test_accuracy", "train_accuracy", "test_loss", "train_loss"]
    csv = write_table(out / f"{config['name']}.csv", final[columns])
    save_figure(_figure(final), out / config["name"])
    return csv


def _figure(final) -> Figure:
    with plot_style():
        fig = Figure(figsize=(8, 3.2), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, column in zip(axes, ("hessian_top_eigenvalue", "test_accuracy"), strict=True):
            for method, part in final.groupby("method", sort=False):
                stats = part.groupby("batch_size")[column].agg(["mean", "std"]).reset_index()
                ax.errorbar(stats["batch_size"], stats["mean"], yerr=stats["std"].fillna(0),
                            marker="o", capsize=3, color=method_color(method), label=method)
            ax.set_xscale("log", base=2)
            batches = sorted(final["batch_size"].unique())
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
            ax.set_xlabel(METRIC_LABELS["batch_size"])
            ax.set_ylabel(METRIC_LABELS[column])
        axes[0].legend(title="method")
    return fig
