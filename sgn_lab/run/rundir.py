"""Run directories: what a run writes, how it is written safely, and load_run to read it back.

A run directory holds

- ``config.json``   the resolved configuration (every hyperparameter, defaults included), and
                    the run's status (``complete``, ``run``, ``sgn_lab_version``,
                    ``diverged``, the message, for a run that diverged and was recorded so,
                    and ``probe_samples_used`` where ``probe_samples`` exceeded the training
                    samples and each measurement used them all);
                    the same file re-runs it (``sgn-lab measure --config``);
- ``metrics.csv``   one row per measurement: the run's identity (run, label, task, model,
                    method, seed), every optimizer hyperparameter, step and epoch, and each
                    instrument's columns (docs/guides/measuring.md, "A run directory");
- ``spectra.csv``   tidy spectra: run, label, method, seed, step, kind (``sgn``, ``isotropic``,
                    ``update``), k, eigenvalue;
- ``layers.csv``    with the layers instrument: run, label, method, seed, step and the table of
                    :func:`sgn_lab.layer_noise_scale` (B_simple per parameter, module, group
                    and in total, with errors), one row per step and name;
- ``coverage.csv``  with the Gram path: each trainable parameter's route and why;
- ``checkpoint.pt`` model, optimizer and random-generator states at the last measurement
                    (the final state once the run is complete; for a diverged run, that of its
                    last measurement), from which ``--resume`` continues.

Every file is written to a temporary name in the same folder, with the permissions the user's
umask gives, and renamed over the old one, so an interrupted run never leaves a half-written
file; temporaries a killed process left behind are removed when the directory is opened
again. A lock (``.lock``) keeps a second process from writing the same run. Every filesystem
problem (a file in the way, no permission, a full disk) and a corrupt file is a
:class:`RunDirError` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import secrets
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pandas as pd
import torch
from filelock import FileLock, Timeout

from sgn_lab.atomic import TEMPORARY_PATTERN, atomic_write
from sgn_lab.run.choices import STATUS_KEYS

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
SPECTRA_FILE = "spectra.csv"
LAYERS_FILE = "layers.csv"
CHECKPOINT_FILE = "checkpoint.pt"
COVERAGE_FILE = "coverage.csv"
LOCK_FILE = ".lock"
# Wall-clock time of each measurement: documented, and never part of a comparison of runs.
TIMING_COLUMNS = ("measure_seconds",)


class RunDirError(ValueError):
    """A run directory cannot be written or read: the message names the path and why."""


def _failure(path: Path, exc: OSError) -> RunDirError:
    why = exc.strerror or type(exc).__name__
    return RunDirError(f"cannot write {path}: {why}")


def writable_dir(path: str | Path) -> Path:
    """``path`` as a directory this process can write, created if missing.

    Checked before any computation, so that a file in the way or a read-only folder stops a
    command at once rather than after its work.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"cannot use {path} as a folder: a file is in the way")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _failure(path, exc) from None
    return path


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[Path]:
    """Hold the run directory ``path`` for this process, and clear stale temporaries.

    A second process on the same directory stops with a message instead of mixing its results
    into this one's.
    """
    path = writable_dir(path)
    lock = FileLock(path / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(f"another sgn-lab process is writing {path} (it holds "
                          f"{path / LOCK_FILE}); wait for it, or choose another --out") from None
    except OSError as exc:
        raise _failure(path, exc) from None
    try:
        for stale in path.glob(TEMPORARY_PATTERN):  # a killed writer's: nobody's now
            stale.unlink(missing_ok=True)
        yield path
    finally:
        lock.release()


def _write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    try:
        return atomic_write(path, write)
    except OSError as exc:
        raise _failure(Path(path), exc) from None


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return _write(path, lambda f: f.write(text.encode()))


def write_table(path: str | Path, table: pd.DataFrame) -> Path:
    return _write(path, lambda f: table.to_csv(f, index=False))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return _write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:  # our own file: plain containers, tensors and numbers only
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"corrupt checkpoint {path} ({first[:120]}); remove it to start the "
                          "run again from its beginning") from None


def read_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: {CONFIG_FILE} is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"corrupt {file}: {exc}") from None
    except OSError as exc:
        raise RunDirError(f"cannot read {file}: {exc.strerror}") from None


def without_status(data: dict[str, Any]) -> dict[str, Any]:
    """The configuration part of a run's config.json (or of any config dict)."""
    return {k: v for k, v in data.items() if k not in STATUS_KEYS}


@dataclass(frozen=True)
class Run:
    """A run directory read back: its configuration and its tables (``layers`` is empty
    unless the run had the layers instrument)."""

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    spectra: pd.DataFrame
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def complete(self) -> bool:
        """Whether the run is finished: it reached its last step, or diverged and was recorded
        so (an interrupted run can be resumed)."""
        return bool(self.config.get("complete", False))

    @property
    def diverged(self) -> str | None:
        """The one-line message of the divergence that ended the run, or None."""
        return self.config.get("diverged")


def check_measured(path: str | Path, steps: Sequence[int]) -> None:
    """That a run resumed from its checkpoint has the rows of ``metrics.csv`` it implies: one
    per measured step in ``steps`` (those up to the checkpoint's, in order), and no line cut
    short. Rows after the checkpoint's step are allowed (a kill between the row and the
    checkpoint), and dropped on resuming. Else a :class:`RunDirError` naming the file."""
    file = Path(path) / METRICS_FILE
    last = steps[-1] if steps else None
    if file.is_file() and file.stat().st_size and not file.read_bytes().endswith(b"\n"):
        raise RunDirError(f"{file} ends in a line cut short: the run's tables do not match "
                          f"its checkpoint (step {last}); restore the file, or start again in "
                          "another --out")
    table = _read_table(file)
    if not table.empty and "step" not in table.columns:
        raise RunDirError(f"{file} has no step column: it is not this run's metrics table")
    found = [] if table.empty else [s for s in pd.to_numeric(table["step"], errors="coerce")
                                    if not (s > last)]
    if [float(s) for s in found] != [float(s) for s in steps]:
        raise RunDirError(f"{file} does not match the run's checkpoint: it holds the "
                          f"measurements of steps {_listed(found)}, the checkpoint (step "
                          f"{last}) those of steps {_listed(steps)}; restore the file, or "
                          "start again in another --out")


def _listed(steps: Sequence[Any]) -> str:
    shown = [f"{s:g}" if isinstance(s, float) else str(s) for s in steps]
    if not shown:
        return "none"
    return ", ".join(shown) if len(shown) <= 6 else ", ".join(
        [*shown[:3], "...", *shown[-2:]]) + f" ({len(shown)})"


def _read_table(file: Path) -> pd.DataFrame:
    if not file.is_file() or file.stat().st_size == 0:
        return pd.DataFrame()
    # pandas >= 3 reads floats back bit for bit (its default is round-trip precision), so a
    # resumed run rewrites identical rows; the resume tests check it.
    try:
        return pd.read_csv(file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise RunDirError(f"corrupt {file}: {str(exc).splitlines()[0]}") from None


def load_run(path: str | Path) -> Run:
    """Load a run directory written by ``sgn-lab measure`` (or ``compare``, one per run).

    Returns a :class:`Run` with ``.config`` (dict), ``.metrics``, ``.spectra`` and ``.layers``
    (pandas; ``layers.csv``, empty without the layers instrument).
    A directory written by ``sgn-lab compare`` holds one sub-directory per run; pass those,
    or use :func:`load_runs` to concatenate them.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}")
    config = read_config(path)
    return Run(path, config, _read_table(path / METRICS_FILE), _read_table(path / SPECTRA_FILE),
               _read_table(path / LAYERS_FILE))


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
    """Metrics and spectra of every run at or below ``paths``, concatenated.

    Runs are told apart by their ``run`` column (method, the hyperparameters that differ from
    its defaults, seed) and grouped by ``label`` (the same without the seed).
    """
    runs = [load_run(p) for path in paths for p in find_runs(path)]
    metrics = pd.concat([r.metrics for r in runs], ignore_index=True)
    spectra = pd.concat([r.spectra for r in runs], ignore_index=True)
    return metrics, spectra
