"""Figure 7: tail index and Gaussianity of the SGN over training.

Tail index α of the per-coordinate standardised per-sample noise (α = 2: Gaussian tails; α < 2:
heavy, the α-stable picture of Simsekli et al. 2019), and the D'Agostino–Pearson test and
excess kurtosis of random 1-D projections (Panigrahi et al. 2019: close to Gaussian).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sgn_lab.figures._runs import figure_runs
from sgn_lab.plots import plot_metrics, save_figure
from sgn_lab.run.rundir import write_table

COLUMNS = ("tail_index", "normality_reject_fraction", "kurtosis", "test_accuracy")


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Tail and Gaussianity figures over steps for the runs in ``config["runs"]``.

    Config keys: ``runs`` (a table of name -> RunConfig fields; several methods or batch sizes
    side by side).
    """
    table, _, _ = figure_runs(out, config["name"], config["runs"], progress=progress)
    keep = ["setting", "run", "method", "seed", "step", "epoch", *COLUMNS,
            "normality_pvalue", "n", "dim"]
    csv = write_table(out / f"{config['name']}.csv", table[[c for c in keep if c in table]])
    # Settings that differ by batch size are coloured by it (ordered palette, numeric order).
    by_batch = table.groupby("setting")["batch_size"].nunique().eq(1).all() and (
        table["batch_size"].nunique() == table["setting"].nunique())
    hue = "batch_size" if by_batch else "setting"
    save_figure(plot_metrics(table, columns=COLUMNS, hue=hue), out / config["name"])
    return csv
