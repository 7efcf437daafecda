"""Run directories: what a measurement run writes, and :func:`load_run` to read it back.

A run directory holds

- ``config.json``   the full configuration (enough to re-run it: ``sgn-lab measure --config``
                    reads the same keys from TOML or JSON);
- ``metrics.csv``   one row per measurement: run, method, seed, step, epoch, the method's
                    hyperparameters, losses and accuracies, and every :class:`NoiseStats`
                    scalar under its attribute name (plus curvature and update-noise columns
                    when measured);
- ``spectra.csv``   tidy spectra: run, method, seed, step, kind ("sgn" or "isotropic"), k,
                    eigenvalue;
- ``coverage.csv``  with the Gram path: each trainable parameter's route (ghost, per-sample,
                    vmap, none), the operations it enters through and why, from the run's
                    first measurement (:class:`sgn_lab.GramCoverage`);
- ``checkpoint.pt`` model, optimizer and random-generator states at the last measurement
                    (the final state once the run is complete), from which ``--resume``
                    continues.

Every file is written to a temporary name in the same folder and renamed over the old one, so
an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pandas as pd
import torch

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
SPECTRA_FILE = "spectra.csv"
CHECKPOINT_FILE = "checkpoint.pt"
COVERAGE_FILE = "coverage.csv"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_table(path: str | Path, table: pd.DataFrame) -> Path:
    return atomic_write(path, lambda f: table.to_csv(f, index=False))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # Our own file: it holds plain containers, tensors and numbers only.
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class Run:
    """A run directory read back: its configuration and its two tables."""

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    spectra: pd.DataFrame

    @property
    def complete(self) -> bool:
        """Whether the run reached its last step (an interrupted run can be resumed)."""
        return bool(self.config.get("complete", False))


def read_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: {CONFIG_FILE} is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt {file}: {exc}") from exc


def _read_table(file: Path) -> pd.DataFrame:
    if not file.is_file() or file.stat().st_size == 0:
        return pd.DataFrame()
    # pandas >= 3 reads floats back bit for bit (its default is round-trip precision), so a
    # resumed run rewrites identical rows; the resume tests check it.
    return pd.read_csv(file)


def load_run(path: str | Path) -> Run:
    """Load a run directory written by ``sgn-lab measure`` (or ``compare``, one per run).

    Returns a :class:`Run` with ``.config`` (dict), ``.metrics`` and ``.spectra`` (pandas).
    A directory written by ``sgn-lab compare`` holds one sub-directory per run; pass those,
    or use :func:`load_runs` to concatenate them.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}")
    config = read_config(path)
    return Run(path, config, _read_table(path / METRICS_FILE), _read_table(path / SPECTRA_FILE))


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself when it is a run directory, else the run directories below it."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return [path]
    runs = sorted(p.parent for p in path.glob(f"*/{CONFIG_FILE}"))
    if not runs:
        raise FileNotFoundError(f"no run directory at or below {path}")
    return runs


def load_runs(*paths: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics and spectra of every run at or below ``paths``, concatenated."""
    runs = [load_run(p) for path in paths for p in find_runs(path)]
    metrics = pd.concat([r.metrics for r in runs], ignore_index=True)
    spectra = pd.concat([r.spectra for r in runs], ignore_index=True)
    return metrics, spectra
