"""Sweeps of theory against measurement behind ``sgn-lab scaling``: each a tidy table of
measured values with 95% intervals next to the closed form of :mod:`sgn_lab.theory`.

``config``    the sweeps' names, options and defaults (SweepConfig)
``linreg``    the Gaussian linear-regression problem the sweeps share (linreg_problem)
``critical``  the critical-batch sweep: branched SGD runs and the fit S = S_min(1 + B_noise/B)
``runs``      the simulations (run_sweep, run_config); figures of their tables are
              sgn_lab.plots.sweeps's

Layers, bottom up: config, linreg, critical, runs.
"""

from sgn_lab.sweeps.config import (
    COLUMNS,
    SWEEPS,
    Z95,
    SweepConfig,
    format_sweep_options,
    parse_sweep_options,
    sweep_config,
)
from sgn_lab.sweeps.runs import run_config, run_sweep

__all__ = ["COLUMNS", "SWEEPS", "Z95", "SweepConfig", "format_sweep_options",
           "parse_sweep_options", "run_config", "run_sweep", "sweep_config"]
