"""Measurement runs: the typed config, instruments, NoiseProbe, the one loop, run directories.

``config``       RunConfig: one nested, validated schema; flat names for TOML keys and flags
``instruments``  the named families of measured quantities (sgn, tails, curvature, updates,
                 eval) and the Measurement they share
``probe``        NoiseProbe: a schedule over instruments inside any training loop
``loop``         run_measurement, run_series: the one training loop, resume rules, Diverged
``rundir``       run directories: atomic writes, the lock, load_run
``tune``         tune: each method at its best grid point on a validation split, then seeds
"""

from sgn_lab.run.config import RunConfig, parse
from sgn_lab.run.instruments import INSTRUMENTS, Instrument, Measurement
from sgn_lab.run.loop import Diverged, DivergedMeasurement, run_measurement, run_series
from sgn_lab.run.probe import NoiseProbe, ProbeResult, update_noise
from sgn_lab.run.rundir import Run, RunDirError, load_run, load_runs
from sgn_lab.run.tune import TuneResult, parse_grids, tune

__all__ = [
    "Diverged",
    "DivergedMeasurement",
    "INSTRUMENTS",
    "Instrument",
    "Measurement",
    "NoiseProbe",
    "ProbeResult",
    "Run",
    "RunConfig",
    "RunDirError",
    "TuneResult",
    "load_run",
    "load_runs",
    "parse",
    "parse_grids",
    "run_measurement",
    "run_series",
    "tune",
    "update_noise",
]
