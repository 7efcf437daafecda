"""examples/fsdp_train.py, a user's own FSDP2 training with the probe and the per-sample
functions on the sharded model: under torchrun with 2 processes it measures what it measures
unsharded in one process (float32: 1e-6 relative), and writes the reduce-scatter's noise scale
of every step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp_train.py"
ARGS = ["--steps", "40", "--probe-samples", "24"]


def test_the_example_under_torchrun_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for launcher, out in (([sys.executable], one),
                          ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2"], two)):
        done = subprocess.run([*launcher, str(EXAMPLE), "--out", str(out), *ARGS],
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = pd.read_csv(one / "probe.csv"), pd.read_csv(two / "probe.csv")
    assert list(a.step) == list(b.step) == [0, 20, 40]
    for column in ("train_loss", "trace", "mean_sq_norm", "noise_scale", "effective_rank",
                   "gram_trace", "gram_mean_sq_norm"):
        np.testing.assert_allclose(b[column], a[column], rtol=1e-6, err_msg=column)
    gns = pd.read_csv(two / "gns.csv")
    assert list(gns.step) == list(range(40))
    assert gns.trace_estimate.notna().all() and (gns.trace_smoothed > 0).all()
    assert not (one / "gns.csv").exists()
