"""Figure: McCandlish et al.'s critical batch size against the measured noise scale.

From one checkpoint per problem (linear regression, an MLP, a small GPT-2), SGD runs branch
over a grid of batch sizes B, each at the best learning rate of a grid for its B, until a
target loss; the steps S and samples E = B·S follow the hyperbola S = S_min(1 + B_noise/B)
(:mod:`sgn_lab.sweeps.critical`). The figure puts S against E per problem with the fitted
hyperbola, and the fitted B_noise = E_min/S_min with its bootstrap CI next to B_simple measured
at the branch point (and the closed forms of linear regression).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from sgn_lab.figures.measure import figure_sweep
from sgn_lab.plots import save_figure
from sgn_lab.plots.sweeps import plot_critical_batch
from sgn_lab.run.rundir import write_table


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Run the critical-batch sweep per problem; write ``<name>.csv``, ``.png``, ``.pdf``.

    Config keys: ``seed``, ``quick_sweep`` (each problem's own quick defaults) and
    ``problems``: problem name (linreg, mlp, transformer) -> options of
    :func:`sgn_lab.sweeps.run_sweep` (``{}``: the defaults). The CSV is the sweeps' tables
    one after the other, with a ``problem`` column. Each problem's table is kept as it
    finishes (``sweeps/<name>-<problem>.csv``, :func:`figure_sweep`): a rerun with the same
    settings reads it back.
    """
    problems = config.get("problems") or {}
    if not problems:
        raise ValueError("the critical-batch figure needs at least one entry in 'problems'")
    tables = []
    for i, (problem, options) in enumerate(problems.items()):
        table = figure_sweep(out, f"{config['name']}-{problem}", "critical-batch",
                             quick=bool(config.get("quick_sweep", False)),
                             seed=int(config.get("seed", 0)),
                             options={"problem": problem, **dict(options)})
        if progress is not None:
            progress(i + 1, len(problems))
        tables.append(table.assign(problem=problem))
    table = pd.concat(tables, ignore_index=True)
    name = config["name"]
    csv = write_table(out / f"{name}.csv", table)
    save_figure(plot_critical_batch(table), out / name)
    return csv
