"""RunRecorder: the one writer of a run directory's tables."""

import math

import pandas as pd
import pytest

from sgn_lab.run.probe import ProbeResult
from sgn_lab.run.recorder import RunRecorder
from sgn_lab.run.rundir import load_run

IDENTITY = {"run": "r-s0", "label": "r", "method": "sgd", "seed": 0, "batch_size": 32}


def _result(step, **row):
    spectra = pd.DataFrame({"step": step, "kind": "sgn", "k": [1, 2],
                            "eigenvalue": [2.0, 1.0]})
    return ProbeResult(step, {"step": step, **row}, spectra, None)


def test_identity_comes_first_and_is_never_overwritten(tmp_path):
    recorder = RunRecorder(tmp_path, config={"x": 1}, identity=IDENTITY)
    recorder.record(_result(0, trace=1.5, batch_size=math.nan))
    recorder.finish()
    run = load_run(tmp_path)
    assert list(run.metrics.columns[:5]) == list(IDENTITY)[:5]
    assert run.metrics["batch_size"].tolist() == [32] and run.metrics["trace"].tolist() == [1.5]
    assert run.spectra.columns.tolist() == ["run", "label", "method", "seed", "step", "kind",
                                            "k", "eigenvalue"]
    assert run.complete and run.config["x"] == 1


def test_resume_drops_the_rows_after_the_checkpoint(tmp_path):
    recorder = RunRecorder(tmp_path, config={}, identity=IDENTITY)
    for step in (0, 10, 20):
        recorder.record(_result(step, trace=float(step)))
    recorder.close()
    resumed = RunRecorder(tmp_path, config={}, identity=IDENTITY, resume_from=10)
    resumed.record(_result(20, trace=99.0))
    resumed.finish()
    run = load_run(tmp_path)
    assert run.metrics["step"].tolist() == [0, 10, 20]
    assert run.metrics["trace"].tolist() == [0.0, 10.0, 99.0]
    assert run.spectra["step"].tolist() == [0, 0, 10, 10, 20, 20]


def test_bad_identity_and_log(tmp_path):
    with pytest.raises(ValueError, match="identity lacks the column"):
        RunRecorder(tmp_path, config={}, identity={"run": "r"})
    with pytest.raises(ValueError, match="unknown log 'mlflow'; choose from tensorboard, wandb"):
        RunRecorder(tmp_path, config={}, identity=IDENTITY, log=("mlflow",))
