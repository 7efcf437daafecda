"""``--log wandb``: a Weights & Biases run in offline mode, read back from the file W&B writes
(tests/wandb_helpers.py). Every logged scalar must be the metrics column of the same name at
the same step, and each spectrum a histogram of log10 of its positive eigenvalues."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers import run_main
from wandb_helpers import history, history_of

pytest.importorskip("wandb", reason="the wandb extra is not installed")

FLAGS = ["--task", "gaussian-mixture", "--width", "8", "--depth", "1", "--steps", "4",
         "--measure-every", "2", "--probe-samples", "12", "--batch-size", "8", "--device",
         "cpu", "--update-repeats", "3", "--method", "momentum"]
@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_measure_logs_the_metrics_columns_and_spectra_to_wandb(offline, monkeypatch, capsys,
                                                               tmp_path):
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "measure", *FLAGS, "--log", "wandb",
                            "--out", str(out))
    assert code == 0, err
    metrics = pd.read_csv(out / "metrics.csv")
    spectra = pd.read_csv(out / "spectra.csv")
    logged = history(out)
    assert sorted(logged) == list(metrics["step"])
    numeric = [c for c in metrics.columns if metrics[c].dtype.kind in "fi"
               and c not in ("step", "epoch", "seed", "batch_size")]
    for _, row in metrics.iterrows():
        step = int(row["step"])
        for column in numeric:
            if column not in logged[step]:  # an identity column, not a measured one
                continue
            got, want = logged[step][column], row[column]
            if isinstance(want, float) and math.isnan(want):
                assert got == "NaN" or (isinstance(got, float) and math.isnan(got)), column
            else:
                assert got == pytest.approx(want, rel=1e-15, abs=0), (step, column)
        for kind, part in spectra[spectra.step == step].groupby("kind"):
            # W&B keeps a histogram's fields under its key: spectrum/<kind>/{_type,bins,values}
            histogram = {field: logged[step][f"spectrum/{kind}/{field}"]
                         for field in ("_type", "bins", "values")}
            positive = part.eigenvalue[part.eigenvalue > 0]
            assert histogram["_type"] == "histogram"
            assert sum(histogram["values"]) == len(positive)
            bins = np.asarray(histogram["bins"])
            assert bins[0] <= np.log10(positive).min() + 1e-12
            assert bins[-1] >= np.log10(positive).max() - 1e-12
    assert {"trace", "noise_scale", "noise_scale_se", "effective_rank",
            "update_trace"} <= set(logged[0])


def test_a_resumed_run_continues_the_same_wandb_run(offline, monkeypatch, capsys, tmp_path):
    from helpers import interrupt_at

    from sgn_lab.run.config import parse
    from sgn_lab.run.loop import run_measurement

    out = tmp_path / "run"
    config = parse({"task": "gaussian-mixture", "width": 8, "depth": 1, "steps": 6,
                    "measure_every": 2, "probe_samples": 12, "batch_size": 8,
                    "device": "cpu", "update_repeats": 3, "log": ["wandb"]})
    with pytest.raises(KeyboardInterrupt):
        run_measurement(config, out, progress=interrupt_at(3))
    run_id = (out / "wandb" / "sgn-lab-run-id").read_text().strip()
    run_measurement(config, out, resume=True)
    assert (out / "wandb" / "sgn-lab-run-id").read_text().strip() == run_id
    files = sorted(out.glob("wandb/offline-run-*"))
    assert len(files) == 2 and all(run_id in f.name for f in files)
    steps = set(history_of(files[0])) | set(history_of(files[1]))
    assert steps == {0, 2, 4, 6}


def test_without_wandb_installed_the_message_says_what_to_install(monkeypatch, tmp_path):
    import builtins

    from sgn_lab.run.wandb_log import WandbLog

    real = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    with pytest.raises(ValueError, match=r"pip install 'sgn-lab\[wandb\]'"):
        WandbLog(tmp_path, name="x", config={})
