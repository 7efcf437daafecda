"""The parts every benchmark script shares: what machine ran it, how long a call took, what a
process's memory peaked at, how a child process reports back, and how rows are written.

Kept to the standard library (and torch only where a description names its version) so that
a script's child processes import it cheaply. Each script keeps its own measurements, columns
and tables; this module only holds what was written the same way in several of them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo; the platform's processor name off Linux."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), cpu)
    return cpu


def ram_text() -> str:
    """", 125 GiB RAM" (the machine's total memory), or "" where /proc/meminfo cannot say."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        return f", {int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    return ""


def machine(ram: bool = False) -> str:
    """"<CPU>, <cores> cores", the ``machine`` column of the scripts' CSVs."""
    return f"{cpu_name()}, {os.cpu_count()} cores{ram_text() if ram else ''}"


def load_average() -> float:
    """The 1-minute load average: the benchmarks share a machine, and say how busy it was."""
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


def timed(fn: Callable[..., T], *args: object) -> tuple[float, T]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def spread(times: Iterable[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated timings."""
    times = list(times)
    return statistics.median(times), min(times), max(times)


def mean_and_max(values: Sequence[float]) -> tuple[float, float]:
    """(mean, max) of sampled load averages; NaNs when none were sampled."""
    return (statistics.fmean(values) if values else math.nan), max(values, default=math.nan)


# --------------------------------------------------------------------------------------------
# Memory of this process (Linux; the callers say what they do elsewhere)
# --------------------------------------------------------------------------------------------


def proc_status_kib(key: str) -> int:
    """A figure of /proc/self/status (VmRSS, VmHWM) in KiB; KeyError when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise KeyError(key)


def meminfo_kib(key: str) -> int:
    """A figure of /proc/meminfo (MemTotal, MemAvailable) in KiB; KeyError when absent."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise KeyError(key)


def max_rss_kib() -> int:
    """ru_maxrss of this process (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Child processes: a child prints one JSON line last, the parent reads it
# --------------------------------------------------------------------------------------------


def print_json(result: dict) -> None:
    """Print a child's result as the JSON line its parent reads."""
    print(json.dumps(result), flush=True)


def last_json(lines: Iterable[str]) -> dict | None:
    """The last line of a child's output that is a JSON object, or None."""
    for line in reversed(list(lines)):
        if line.startswith("{"):
            return json.loads(line)
    return None


def last_line(text: str, empty: str) -> str:
    """The last line of a child's stderr, for a one-line failure reason."""
    return (text.strip().splitlines() or [empty])[-1]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def missing(v: object) -> bool:
    """None or NaN: a cell left empty."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def cell(v: object) -> object:
    """A CSV cell: floats to 6 significant digits, anything else as it is."""
    return f"{v:.6g}" if isinstance(v, float) else v


def write_rows(path: str, columns: Sequence[str], rows: Iterable[dict],
               keep_nan: bool = False) -> None:
    """Rows of dicts as a CSV with these columns (other keys are left out). Missing values
    (None, and NaN unless ``keep_nan``, which writes "nan") are empty cells."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: cell(v) for k, v in row.items()
                        if k in columns and (keep_nan and v is not None or not missing(v))})


def target_line(passed: bool | None, subject: str, text: str) -> str:
    """A target's line: "PASS  <subject>: <text>", FAIL, or n/a (None: nothing to judge)."""
    word = "n/a" if passed is None else "PASS" if passed else "FAIL"
    return f"{word:<5} {subject}: {text}"
