"""Running ``sgn-lab measure`` in subprocesses, killing it, and comparing runs' tables: shared
by the multi-process tests (tests/distributed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

RUN_TIMEOUT_S = 240
# Excess kurtosis is m4/m2² − 3: rounding is relative to m4/m2², not to the difference.
OFFSET = {"kurtosis": 3.0}
CLI = [sys.executable, "-m", "sgn_lab.cli"]


def sgn_lab(*args: str, out: Path, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(torchrun), "-m", "sgn_lab.cli"] if torchrun else CLI)
    done = subprocess.run([*launcher, "measure", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def started(*args: str, out: Path) -> subprocess.Popen:
    """A run in a session of its own (so that its whole process group can be killed)."""
    return subprocess.Popen([*CLI, "measure", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_rows(out: Path, rows: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        metrics = out / "metrics.csv"
        if metrics.is_file() and len(pd.read_csv(metrics)) >= rows:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    pytest.fail(f"no {rows} measurements in {out} within {RUN_TIMEOUT_S} s")


def complete(out: Path) -> bool:
    return json.loads((out / "config.json").read_text()).get("complete", False)


def workers(launcher_pid: int) -> list[int]:
    """The worker processes the elastic agent spawned (multiprocessing's spawn_main)."""
    listing = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(launcher_pid)],
                             capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "spawn_main" in line]


def tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    metrics = pd.read_csv(out / "metrics.csv").drop(columns=["measure_seconds"])
    return metrics, pd.read_csv(out / "spectra.csv")


def numeric(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if frame[c].dtype.kind == "f" and not c.startswith("gns_")
            and c not in ("epoch",)]


def assert_same_numbers(one: Path, other: Path) -> None:
    """Scalars within 1e-6 relative, every eigenvalue within 1e-6 of its spectrum's largest
    (float32 rounding; see test_measure_nproc.py's docstring)."""
    (want, want_spectra), (got, got_spectra) = tables(one), tables(other)
    assert len(got) == len(want) and list(got.step) == list(want.step)
    shared = [c for c in numeric(want) if c in got]
    for column in shared:
        a, b = want[column].to_numpy(), got[column].to_numpy()
        assert (np.isnan(a) == np.isnan(b)).all(), column
        finite = np.isfinite(a)
        assert (a[~finite] == b[~finite]).all() | np.isnan(a[~finite]).all(), column
        scale = np.abs(a[finite]) + OFFSET.get(column, 0.0)
        assert (np.abs(b[finite] - a[finite]) <= 1e-6 * scale).all(), (column, a, b)
    assert list(got_spectra.columns) == list(want_spectra.columns)
    for key, part in want_spectra.groupby(["step", "kind"]):
        other = got_spectra[(got_spectra.step == key[0]) & (got_spectra.kind == key[1])]
        assert list(other.k) == list(part.k), key
        top = part.eigenvalue.abs().max()
        assert (np.abs(other.eigenvalue.to_numpy() - part.eigenvalue.to_numpy())
                <= 1e-6 * top).all(), key
