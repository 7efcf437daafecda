"""Figure 4: large batch with covariance noise against large batch, small batch, and large batch
with isotropic noise of the same trace — the noise spectrum and the test accuracy.

Wen et al. (AISTATS 2020): adding noise with the covariance (1/B_S − 1/B_L)·S to a large batch
restores the small batch's noise structure, and the structure (full, diagonal, isotropic of
equal trace) matters, not only the size. The noise shown is the per-step update noise
Cov[Δθ]/η² over independent draws from the same state, at the end of training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sgn_lab.figures.measure import expand, figure_runs
from sgn_lab.plots import METRIC_LABELS, plot_style, save_figure
from sgn_lab.run.rundir import write_table


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Config keys: ``base`` (RunConfig fields shared by all), ``grid`` (label -> fields of
    each setting: small batch, large batch, covariance full/diagonal, isotropic)."""
    settings = expand(config)
    metrics, spectra, final = figure_runs(out, config["name"], settings, progress=progress,
                                          nproc=config["nproc"],
                     parallel=config["parallel"])
    lr = {label: fields["lr"] for label, fields in settings.items()}
    update = spectra[spectra["kind"] == "update"]
    last = update[update["step"] == update.groupby("setting")["step"].transform("max")]
    last = last.assign(noise_eigenvalue=last["eigenvalue"] / last["setting"].map(lr) ** 2)
    table = final[["setting", "method", "step", "test_accuracy", "train_accuracy",
                   "update_trace", "trace"]].assign(
        noise_trace=lambda t: t["update_trace"] / t["setting"].map(lr) ** 2
    )
    csv = write_table(out / f"{config['name']}.csv", pd.concat(
        [table.assign(k=np.nan), last[["setting", "step", "k", "noise_eigenvalue"]]],
        ignore_index=True))
    save_figure(_figure(metrics, last, list(settings)), out / config["name"])
    return csv


def _figure(metrics: pd.DataFrame, last: pd.DataFrame, labels: list[str]) -> Figure:
    with plot_style():
        fig = Figure(figsize=(9, 3.4), layout="constrained")
        left, right = fig.subplots(1, 2)
        colors = dict(zip(labels, _palette(len(labels)), strict=True))
        for label in labels:
            part = last[last["setting"] == label]
            left.plot(part["k"], part["noise_eigenvalue"], marker=".", color=colors[label],
                      label=label)
            run = metrics[metrics["setting"] == label]
            right.plot(run["step"], run["test_accuracy"], color=colors[label], label=label)
        left.set_xscale("log")
        left.set_yscale("log")
        left.set_xlabel(METRIC_LABELS["k"])
        left.set_ylabel("eigenvalue of Cov[Δθ]/η² (update noise)")
        right.set_xlabel(METRIC_LABELS["step"])
        right.set_ylabel(METRIC_LABELS["test_accuracy"])
        right.legend(fontsize=7)
    return fig


def _palette(n: int) -> list:
    import seaborn as sns

    return sns.color_palette("colorblind", n)
