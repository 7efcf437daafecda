"""Figures 2 and 3: noise trace versus batch size, and PNM's β0, theory against measurement."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sgn_lab.figures.measure import figure_sweep
from sgn_lab.plots import plot_scaling, save_figure
from sgn_lab.run.rundir import write_table


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Run the sweep named by ``config["sweep"]`` and write ``<name>.csv``, ``.png``, ``.pdf``.

    Config keys: ``sweep`` (batch or beta0), ``seed``, ``quick_sweep`` (the sweep's own quick
    grid) and ``options`` (passed to :func:`sgn_lab.sweeps.run_sweep`). The sweep's table is
    kept (``sweeps/<name>.csv``, :func:`figure_sweep`): a rerun with the same settings reads
    it back.
    """
    name = config["name"]
    table = figure_sweep(out, name, config["sweep"], quick=bool(config.get("quick_sweep", False)),
                         seed=int(config.get("seed", 0)), options=config.get("options", {}),
                         progress=progress)
    csv = write_table(out / f"{name}.csv", table)
    save_figure(plot_scaling(table), out / name)
    return csv
