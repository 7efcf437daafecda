"""The examples of one's own data-parallel training with the probe attached, each under
torchrun with 2 processes against the same script in one process (float32: 1e-6 relative):

- examples/ddp_train.py: DDP, the noise scale of DDP's all-reduce every step;
- examples/fsdp_train.py: the model sharded with FSDP2, the probe and the per-sample functions
  on the sharded model, the noise scale of the reduce-scatter every step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ARGS = ["--steps", "40", "--probe-samples", "24"]
MEASURED = ("train_loss", "trace", "mean_sq_norm", "noise_scale", "effective_rank")


@pytest.mark.parametrize(("script", "extra"), [
    ("ddp_train.py", ()),
    ("fsdp_train.py", ("gram_trace", "gram_mean_sq_norm")),
])
def test_the_example_under_torchrun_equals_one_process(tmp_path, script, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    for launcher, out in (([sys.executable], one),
                          ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2"], two)):
        done = subprocess.run([*launcher, str(EXAMPLES / script), "--out", str(out), *ARGS],
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = pd.read_csv(one / "probe.csv"), pd.read_csv(two / "probe.csv")
    assert list(a.step) == list(b.step) == [0, 20, 40]
    for column in (*MEASURED, *extra):
        np.testing.assert_allclose(b[column], a[column], rtol=1e-6, err_msg=column)
    gns = pd.read_csv(two / "gns.csv")
    assert list(gns.step) == list(range(40))
    assert gns.trace_estimate.notna().all() and (gns.trace_smoothed > 0).all()
    assert not (one / "gns.csv").exists()
