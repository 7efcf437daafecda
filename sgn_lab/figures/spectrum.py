"""Figure 1: the SGN spectrum at several training stages against isotropic noise of equal trace.

The anisotropy argument of the PNM paper: the SGN of a network concentrates in a few
directions (a power-law spectrum λ_k ∝ k^−s), unlike isotropic Gaussian noise of the same
trace measured with the same number of samples.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sgn_lab.figures.measure import figure_run
from sgn_lab.plots import REFERENCE_COLOR, plot_spectra, save_figure
from sgn_lab.run.rundir import write_table
from sgn_lab.stats.noise import powerlaw_fit


def make(
    config: dict[str, Any], out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Spectra at ``config["stages"]`` (fractions of training) with their power-law fits.

    Config keys: ``run`` (RunConfig fields of the measurement run) and ``stages``.
    """
    run = figure_run(out, config["name"], config["run"], progress=progress, nproc=config["nproc"],
                     parallel=config["parallel"])
    steps = sorted(run.spectra["step"].unique())
    chosen = sorted({steps[min(len(steps) - 1, round(f * (len(steps) - 1)))]
                     for f in config.get("stages", (0.0, 0.5, 1.0))})
    spectra = run.spectra[run.spectra["step"].isin(chosen)].reset_index(drop=True)

    fits = []
    for step in chosen:
        lam = spectra[(spectra["step"] == step) & (spectra["kind"] == "sgn")]["eigenvalue"]
        fit = powerlaw_fit(torch.tensor(lam.to_numpy()))
        fits.append({"step": step, "powerlaw_exponent": fit.exponent,
                     "powerlaw_intercept": fit.intercept, "powerlaw_kmin": fit.k_min,
                     "powerlaw_kmax": fit.k_max, "powerlaw_r2": fit.r2})
    fits = pd.DataFrame(fits)
    table = spectra.merge(fits, on="step")
    name = config["name"]
    csv = write_table(out / f"{name}.csv", table)

    fig = plot_spectra(spectra, steps=chosen)
    ax = fig.axes[0]
    lines = []
    for row in fits.itertuples():
        k = np.arange(row.powerlaw_kmin, row.powerlaw_kmax + 1)
        ax.plot(k, np.exp(row.powerlaw_intercept) * k ** -row.powerlaw_exponent, ":",
                color=REFERENCE_COLOR, linewidth=1.0)
        lines.append(f"step {row.step}: s = {row.powerlaw_exponent:.2f} (R² {row.powerlaw_r2:.2f})")
    # One box in the empty lower-left corner: labels at the curves' ends overlap.
    ax.text(0.03, 0.03, "\n".join(lines), transform=ax.transAxes, fontsize=7,
            color=REFERENCE_COLOR, va="bottom", ha="left")
    ax.set_title(r"dotted: power-law fits $\lambda_k \propto k^{-s}$", fontsize=8, loc="left")
    save_figure(fig, out / name)
    return csv
