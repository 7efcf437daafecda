"""TensorBoard event files of a run: each measurement's scalars and spectra, as it is taken.

Scalars carry the metrics columns' own names (``trace``, ``noise_scale``, ``noise_scale_se``,
``effective_rank``, ...), so a tag in TensorBoard is a column of ``metrics.csv``. Each spectrum
kind (``sgn``, ``isotropic``, ``update``) is written twice at every measurement: as a
histogram of log10 of its positive eigenvalues (tag ``spectrum/<kind>``), and as a figure of
the eigenvalues against their rank on log axes (tag ``spectrum/<kind>/figure``). A resumed run
purges events after its checkpoint, as the tables drop their rows.

Needs the ``tensorboard`` package (extra ``tensorboard``).
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sgn_lab.run.probe import ProbeResult

# Row entries that index a measurement rather than measure something.
NOT_SCALARS = ("step", "epoch", "grads")


def scalars(result: ProbeResult) -> dict[str, float]:
    """The measured numbers of a result's row, under the metrics columns' names: what a live
    view (TensorBoard, W&B) logs as scalars."""
    return {key: float(value) for key, value in result.row.items()
            if key not in NOT_SCALARS and isinstance(value, Real) and not isinstance(value, bool)}


def positive_spectra(result: ProbeResult) -> dict[str, np.ndarray]:
    """Each spectrum kind of a result -> its positive eigenvalues (what a log-scale view can
    show), kinds without one left out."""
    out: dict[str, np.ndarray] = {}
    if result.spectra.empty:
        return out
    for kind, rows in result.spectra.groupby("kind", sort=False):
        eigenvalues = rows["eigenvalue"].to_numpy(dtype=float)
        if (eigenvalues > 0).any():
            out[str(kind)] = eigenvalues[eigenvalues > 0]
    return out


class TensorBoardLog:
    """Write :class:`~sgn_lab.run.probe.ProbeResult` s to event files in ``folder``."""

    def __init__(self, folder: str | Path, *, resume_from: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--log tensorboard needs the tensorboard package: pip install "
                             "'sgn-lab[tensorboard]'") from None
        purge = None if resume_from is None else resume_from + 1
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge)

    def write(self, result: ProbeResult) -> None:
        step = int(result.step)
        for key, value in scalars(result).items():
            self.writer.add_scalar(key, value, step)
        for kind, positive in positive_spectra(result).items():
            self._spectrum(kind, positive, step)
        self.writer.flush()

    def _spectrum(self, kind: str, positive: np.ndarray, step: int) -> None:
        self.writer.add_histogram(f"spectrum/{kind}", np.log10(positive), step)
        self.writer.add_figure(f"spectrum/{kind}/figure", _spectrum_figure(kind, positive),
                               step)

    def close(self) -> None:
        self.writer.close()


def _spectrum_figure(kind: str, eigenvalues: np.ndarray):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 3), dpi=80)
    axes = figure.subplots()
    ranks = np.arange(1, eigenvalues.size + 1)
    axes.loglog(ranks, np.sort(eigenvalues)[::-1], marker=".", linewidth=1)
    axes.set_xlabel("rank k")
    axes.set_ylabel("eigenvalue λ_k")
    axes.set_title(f"{kind} spectrum")
    if not math.isfinite(float(eigenvalues.max())):
        axes.set_yscale("linear")
    figure.tight_layout()
    return figure
