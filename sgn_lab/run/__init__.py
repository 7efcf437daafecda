"""Measurement runs: the typed config, instruments, NoiseProbe, the one loop, run directories.

Modules, bottom up (each imports only those above it in this list):

``choices``      the names a config chooses from (instruments, logs, gradient paths, model
                 kinds), defined once and light
``rundir``       run directories: atomic writes, the lock, load_run
``config``       RunConfig: one nested, validated schema; flat names for TOML keys and flags
``build``        the run's task and model from its config
``instruments``  one class per family of measured quantities, owning its options (Eval, SGN,
                 Tails, MinibatchTails, Curvature, Updates, Layers), and the Measurement
                 they share
``probe``        NoiseProbe: data, a schedule and a list of instruments, in any training loop
``tensorboard``  TensorBoard event files of a run
``recorder``     RunRecorder: the one writer of a run directory's tables
``loop``         run_measurement, run_series: the one training loop (TrainState), resume rules,
                 Diverged
``tuning``       tune: each method at its best grid point on a validation split, then seeds
``tables``       the summary tables of measure and compare as plain text (TextTable)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgn_lab.lazy import homes, lazy_exports

# Each public name -> the module that defines it, imported on first use (sgn_lab.lazy).
_HOME = {
    **homes("sgn_lab.run.config", ("RunConfig", "parse")),
    **homes("sgn_lab.run.instruments", (
        "INSTRUMENTS", "SGN", "Curvature", "Eval", "Instrument", "Layers", "Measurement",
        "MinibatchTails", "Tails", "Updates",
    )),
    **homes("sgn_lab.run.loop", (
        "Diverged", "DivergedMeasurement", "run_measurement", "run_series",
    )),
    **homes("sgn_lab.run.probe", ("NoiseProbe", "ProbeResult", "update_noise")),
    **homes("sgn_lab.run.rundir", ("Run", "RunDirError", "load_run", "load_runs")),
    **homes("sgn_lab.run.tuning", ("TuneResult", "parse_grids", "tune")),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOME)

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from sgn_lab.run.config import RunConfig, parse
    from sgn_lab.run.instruments import (
        INSTRUMENTS,
        SGN,
        Curvature,
        Eval,
        Instrument,
        Layers,
        Measurement,
        MinibatchTails,
        Tails,
        Updates,
    )
    from sgn_lab.run.loop import Diverged, DivergedMeasurement, run_measurement, run_series
    from sgn_lab.run.probe import NoiseProbe, ProbeResult, update_noise
    from sgn_lab.run.rundir import Run, RunDirError, load_run, load_runs
    from sgn_lab.run.tuning import TuneResult, parse_grids, tune
