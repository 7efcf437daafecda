"""Sweeps of theory against measurement behind ``sgn-lab scaling``: each a tidy table of
measured values with 95% intervals next to the closed form of :mod:`sgn_lab.theory`.

``config``    the sweeps' names, options and defaults (SweepConfig)
``linreg``    the Gaussian linear-regression problem the sweeps share (linreg_problem)
``critical``  the critical-batch sweep: branched SGD runs and the fit S = S_min(1 + B_noise/B)
``runs``      the simulations (run_sweep, run_config); figures of their tables are
              sgn_lab.plots.sweeps's
``tables``    what ``sgn-lab scaling`` prints: the table as plain text, the lr-grid advice

Layers, bottom up: config, linreg, critical, runs, tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgn_lab.lazy import homes, lazy_exports

# Each public name -> the module that defines it, imported on first use (sgn_lab.lazy).
_HOME = {
    **homes("sgn_lab.sweeps.config", (
        "COLUMNS", "SWEEPS", "Z95", "SweepConfig", "format_sweep_options", "parse_sweep_options",
        "sweep_config",
    )),
    **homes("sgn_lab.sweeps.runs", ("run_config", "run_sweep")),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOME)

if TYPE_CHECKING:  # the same names, for type checkers and editors
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
