"""Each guide's example script (examples/) runs as a user runs it, in a process of its own,
and writes what it says; the two torchrun examples: tests/distributed/test_examples_torchrun.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WRITES = {
    "measure_run.py": ["metrics.csv", "figures/spectra.png"],
    "own_model_and_data.py": ["data.npz", "probe.csv"],
    "gram_path.py": ["gram.pt"],
    "tuned_comparison.py": ["summary.csv"],
    "theory_vs_measurement.py": ["theory.json"],
}


def test_every_example_is_run_here_or_under_torchrun():
    launched = {"ddp_train.py", "fsdp_train.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(WRITES) | launched


@pytest.mark.parametrize("script", sorted(WRITES))
def test_the_example_runs_and_writes_its_files(script, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in WRITES[script]:
        assert (out / name).is_file(), name
    if script == "theory_vs_measurement.py":  # the closed form within 4 standard errors
        found = json.loads((out / "theory.json").read_text())
        gap = abs(found["measured_trace"] - found["closed_form_trace"])
        assert gap <= 4 * found["trace_se"], found
