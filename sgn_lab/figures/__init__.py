"""Paper figures: one TOML config in ``configs/`` and one recipe module here per figure.

A recipe is a module with ``make(config, out, *, progress) -> Path`` that runs what the figure
needs (measurement runs, sweeps), writes ``<name>.csv`` (the table behind the figure) and
``<name>.png``/``<name>.pdf`` into ``out``, and returns the CSV path. ``config`` is the figure's
TOML file with its ``[quick]`` or ``[full]`` table merged over the top level, so quick mode runs
the same code on smaller models and fewer steps. Everything is deterministic under the
config's ``seed``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sgn_lab import checks
from sgn_lab.run.choices import PARALLEL

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Figure name -> recipe module (sgn_lab.figures.<module>), in the paper's order.
FIGURES: dict[str, str] = {
    "spectrum": "spectrum",
    "batch": "scaling_sweeps",
    "beta0": "scaling_sweeps",
    "large-batch": "large_batch",
    "symmetric": "symmetric",
    "methods": "methods",
    "tails": "tails",
    "layers": "layers",
    "critical-batch": "critical_batch",
}

MEASURED = ("spectrum", "large-batch", "symmetric", "tails", "layers")
"""The figures made from measurement runs, which ``nproc`` makes data-parallel."""

MODES = ("quick", "full")
# The figures' configs ship with the package, so that `sgn-lab figures` finds them from any
# working directory; --experiments DIR points at a folder of one's own instead.
CONFIGS = Path(__file__).parent / "configs"


def read_figure_config(experiments: str | Path, name: str, *, quick: bool, nproc: int = 1,
                       parallel: str = "ddp") -> dict[str, Any]:
    """The figure's config: ``experiments/<name>.toml`` with its quick/full table merged in,
    and ``nproc`` and ``parallel``: the processes of its measurement runs and how they share
    the model (figures of :data:`MEASURED`; the sweeps and closed forms of the others run in
    this process)."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; choose one of {', '.join(FIGURES)}")
    path = Path(experiments) / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no config for figure {name!r}: {path} is missing")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"cannot parse {path}: {exc}") from exc
    mode = "quick" if quick else "full"
    tables = {k: data.pop(k, {}) for k in MODES}
    nproc = checks.integer("nproc", nproc, 1)
    checks.choice("parallel", parallel, PARALLEL)
    return {**data, **tables[mode], "name": name, "mode": mode, "nproc": nproc,
            "parallel": parallel}


def make_figure(
    name: str,
    out: str | Path,
    *,
    experiments: str | Path = CONFIGS,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
    nproc: int = 1,
    parallel: str = "ddp",
) -> Path:
    """Make one figure (its CSV, PNG and PDF) in ``out``; returns the CSV path.

    ``nproc``: the figure's measurement runs (of :data:`MEASURED`) are data-parallel over
    this many processes, as ``sgn-lab measure --nproc`` runs them (``parallel``: "ddp" or
    "fsdp", as ``--parallel``); sweeps and closed forms run in this process.
    """
    config = read_figure_config(experiments, name, quick=quick, nproc=nproc,
                                parallel=parallel)
    recipe = importlib.import_module(f"sgn_lab.figures.{FIGURES[name]}")
    return recipe.make(config, Path(out), progress=progress)
