"""Figure 8: the simple noise scale per module of a small transformer, and whether the noise
scale of its LayerNorm parameters alone tracks the total over training.

B_simple = tr S / |G|² (McCandlish et al. 2018) per parameter tensor, module, the group of every
LayerNorm parameter and all parameters together, from the ``layers`` instrument
(:func:`sgn_lab.layer_noise_scale`). Gray et al. (NeurIPS 2024) observe that the noise scale of
the LayerNorm parameters alone tracks the total in transformers, which would make it a cheap
proxy; the figure shows what this run measures, whatever it is: the two over training, their
ratio, and the correlation of their logarithms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sgn_lab.figures.measure import figure_run
from sgn_lab.plots import save_figure
from sgn_lab.plots.layers import plot_layers
from sgn_lab.run.rundir import write_table
from sgn_lab.stats.layers import LAYERNORM


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """The per-module noise scale at the end and the LayerNorm group's against the total.

    Config keys: ``run`` (RunConfig fields of the measurement run; its instruments must include
    ``layers``) and ``group`` (the group compared with the total, default ``layernorm``).
    """
    run = figure_run(out, config["name"], config["run"], progress=progress, nproc=config["nproc"],
                     parallel=config["parallel"])
    if run.layers.empty:
        raise ValueError(f"the run of figure {config['name']!r} wrote no layers.csv: add "
                         "'layers' to its instruments")
    table = tracking(run.layers)
    name = config["name"]
    csv = write_table(out / f"{name}.csv", table)
    save_figure(plot_layers(table, group=config.get("group", LAYERNORM)), out / name)
    return csv


def tracking(layers: pd.DataFrame) -> pd.DataFrame:
    """``layers.csv`` rows with how each one's noise scale follows the total's over training.

    Adds ``total_noise_scale`` (B_total at the row's step), ``ratio_to_total`` (B_P/B_total)
    and, the same on every row of a (name, kind), over the steps where both are finite and
    positive: ``steps_compared``, ``log_correlation`` (Pearson correlation of log B_P and
    log B_total, NaN below 3 steps or without variation), ``median_ratio``, ``ratio_min`` and
    ``ratio_max``.
    """
    total = layers[layers["kind"] == "total"].set_index("step")["noise_scale"]
    table = layers.copy()
    table["total_noise_scale"] = table["step"].map(total)
    table["ratio_to_total"] = table["noise_scale"] / table["total_noise_scale"]
    columns = {"steps_compared": 0, "log_correlation": math.nan, "median_ratio": math.nan,
               "ratio_min": math.nan, "ratio_max": math.nan}
    for column, value in columns.items():
        table[column] = value
    for _, rows in table.groupby(["name", "kind"], sort=False):
        b = rows["noise_scale"].to_numpy(dtype=float)
        ref = rows["total_noise_scale"].to_numpy(dtype=float)
        ok = np.isfinite(b) & np.isfinite(ref) & (b > 0) & (ref > 0)
        ratio = b[ok] / ref[ok]
        values = {"steps_compared": int(ok.sum())}
        if ok.any():
            values.update(median_ratio=float(np.median(ratio)), ratio_min=float(ratio.min()),
                          ratio_max=float(ratio.max()))
        x, y = np.log(b[ok]), np.log(ref[ok])
        if ok.sum() >= 3 and x.std() > 0 and y.std() > 0:
            values["log_correlation"] = float(np.corrcoef(x, y)[0, 1])
        for column, value in values.items():
            table.loc[rows.index, column] = value
    return table
