"""RunRecorder: a run directory written measurement by measurement.

The one writer of ``metrics.csv``, ``spectra.csv``, ``layers.csv``, ``coverage.csv`` and the
status in ``config.json``, shared by the training loop of ``sgn-lab measure`` and the trainer
callbacks (:mod:`sgn_lab.integrations`), so that every run directory has the same files and
columns and :func:`sgn_lab.load_run` reads them all. After each measurement the tables are
rewritten atomically (``layers.csv`` only with the layers instrument); rows after a resumed
step (written before a kill) are dropped, to be measured again. ``log=("tensorboard",)``
mirrors each measurement to TensorBoard event files in ``out/tensorboard``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from sgn_lab.run.choices import LOGS
from sgn_lab.run.rundir import (
    CONFIG_FILE,
    COVERAGE_FILE,
    LAYERS_FILE,
    METRICS_FILE,
    SPECTRA_FILE,
    load_run,
    write_json,
    write_table,
)
from sgn_lab.run.tensorboard import TensorBoardLog

if TYPE_CHECKING:
    from sgn_lab.run.probe import ProbeResult

TENSORBOARD_DIR = "tensorboard"
# The identity columns copied onto every spectrum row, so that spectra of many runs concatenate.
SPECTRUM_IDENTITY = ("run", "label", "method", "seed")
SPECTRUM_COLUMNS = (*SPECTRUM_IDENTITY, "step", "kind", "k", "eigenvalue")


class RunRecorder:
    """Write measurements into the run directory ``out``.

    Parameters
    ----------
    out
        The run directory (created if missing).
    config
        What ``config.json`` holds besides the status: the run's resolved configuration.
    identity
        Columns put first on every metrics row (at least ``run``, ``label``, ``method`` and
        ``seed``, which the spectra carry too).
    resume_from
        The step of the checkpoint a run resumes from: rows measured after it are dropped.
        None: a new run (existing tables are replaced).
    log
        Live views (:data:`LOGS`): ``"tensorboard"`` writes event files to
        ``out/tensorboard`` (:mod:`sgn_lab.run.tensorboard`), ``"wandb"`` a Weights & Biases
        run kept in ``out/wandb`` (:mod:`sgn_lab.run.wandb_log`).
    notify
        Called once with the Gram path's coverage report when it is first written.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        config: Mapping[str, Any],
        identity: Mapping[str, Any],
        resume_from: int | None = None,
        log: Sequence[str] = (),
        notify: Any = None,
    ) -> None:
        missing = [k for k in SPECTRUM_IDENTITY if k not in identity]
        if missing:
            raise ValueError(f"identity lacks the column(s) {', '.join(missing)}")
        unknown = [name for name in log if name not in LOGS]
        if unknown:
            raise ValueError(f"unknown log {unknown[0]!r}; choose from {', '.join(LOGS)}")
        self.out = Path(out)
        self.status = dict(config)
        self.identity = dict(identity)
        self.notify = notify
        self.metrics, self.spectra, self.layers = pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
        if resume_from is not None:
            run = load_run(self.out)
            if not run.metrics.empty:
                kept = run.metrics["step"] <= resume_from
                self.metrics = run.metrics[kept].reset_index(drop=True)
            if not run.spectra.empty:
                kept = run.spectra["step"] <= resume_from
                self.spectra = run.spectra[kept].reset_index(drop=True)
            if not run.layers.empty:
                kept = run.layers["step"] <= resume_from
                self.layers = run.layers[kept].reset_index(drop=True)
        self._views = [self._view(name, resume_from) for name in log]
        write_json(self.out / CONFIG_FILE, {**self.status, "complete": False})

    def record(self, result: ProbeResult, *, coverage: pd.DataFrame | None = None,
               coverage_summary: str | None = None) -> None:
        """Add one measurement and rewrite the tables (and coverage.csv, once)."""
        if coverage is not None and not (self.out / COVERAGE_FILE).is_file():
            write_table(self.out / COVERAGE_FILE, coverage)
            if self.notify is not None and coverage_summary is not None:
                self.notify(coverage_summary)
        # The identity is the run's (e.g. the training batch size): a measured column of the
        # same name never overwrites it.
        measured = {k: v for k, v in result.row.items() if k not in self.identity}
        row = pd.DataFrame([{**self.identity, **measured}])
        self.metrics = row if self.metrics.empty else pd.concat([self.metrics, row],
                                                                ignore_index=True)
        tidy = result.spectra.assign(**{k: self.identity[k] for k in SPECTRUM_IDENTITY})
        tidy = tidy[list(SPECTRUM_COLUMNS)]
        self.spectra = tidy if self.spectra.empty else pd.concat([self.spectra, tidy],
                                                                 ignore_index=True)
        if result.layers is not None and not result.layers.empty:
            # The layers instrument's table, with the spectra's identity columns first.
            layers = result.layers.assign(**{k: self.identity[k] for k in SPECTRUM_IDENTITY})
            layers = layers[[*SPECTRUM_IDENTITY, *result.layers.columns]]
            self.layers = layers if self.layers.empty else pd.concat([self.layers, layers],
                                                                     ignore_index=True)
        write_table(self.out / METRICS_FILE, self.metrics)
        write_table(self.out / SPECTRA_FILE, self.spectra)
        if not self.layers.empty:
            write_table(self.out / LAYERS_FILE, self.layers)
        for view in self._views:
            view.write(result)

    def finish(self, *, complete: bool = True, diverged: str | None = None) -> None:
        """Mark the run complete (or not) in ``config.json`` and close the live views.

        ``diverged``: the run ended because training diverged; this message goes into the
        status as ``diverged`` (:attr:`sgn_lab.run.rundir.Run.diverged`).
        """
        status = {**self.status, "complete": complete}
        if diverged is not None:
            status["diverged"] = diverged
        write_json(self.out / CONFIG_FILE, status)
        self.close()

    def close(self) -> None:
        while self._views:
            self._views.pop().close()

    def _view(self, name: str, resume_from: int | None) -> Any:
        """The live view ``name`` of :data:`LOGS`."""
        if name == "tensorboard":
            return TensorBoardLog(self.out / TENSORBOARD_DIR, resume_from=resume_from)
        from sgn_lab.run.wandb_log import WandbLog

        return WandbLog(self.out, name=str(self.status.get("run", self.out.name)),
                        config=self.status)

