"""`--log tensorboard`: the event files read back hold the run's scalars and spectra."""

import numpy as np
import pytest
from helpers import interrupt_at, run_main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sgn_lab.run.config import parse
from sgn_lab.run.loop import run_measurement
from sgn_lab.run.recorder import TENSORBOARD_DIR
from sgn_lab.run.rundir import TIMING_COLUMNS, load_run

SCALARS = ("trace", "noise_scale", "noise_scale_se", "effective_rank", "train_loss",
           "tail_index")


def _config(**overrides):
    base = dict(task="gaussian-mixture", model="mlp", width=8, depth=1, steps=20,
                measure_every=5, probe_samples=16, batch_size=8, device="cpu", method="sgd",
                log=["tensorboard"])
    return parse({**base, **overrides})


def _events(out):
    events = EventAccumulator(str(out / TENSORBOARD_DIR),
                              size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    return events.Reload()


def test_scalars_and_spectra_equal_the_tables(tmp_path):
    out = run_measurement(_config(), tmp_path / "run")
    run, events = load_run(out), _events(out)
    tags = events.Tags()
    for column in SCALARS:
        assert column in tags["scalars"], column
        logged = events.Scalars(column)
        assert [e.step for e in logged] == run.metrics["step"].tolist()
        # event files hold float32
        np.testing.assert_allclose([e.value for e in logged], run.metrics[column],
                                   rtol=1e-6, equal_nan=True)
    assert "step" not in tags["scalars"] and "epoch" not in tags["scalars"]
    for kind in ("sgn", "isotropic"):
        histograms = events.Histograms(f"spectrum/{kind}")
        assert [h.step for h in histograms] == run.metrics["step"].tolist()
        for h in histograms:
            eig = run.spectra.query("step == @h.step and kind == @kind")["eigenvalue"]
            positive = np.log10(eig[eig > 0].to_numpy())
            assert h.histogram_value.num == len(positive)
            assert h.histogram_value.min == pytest.approx(positive.min())
            assert h.histogram_value.max == pytest.approx(positive.max())
            assert h.histogram_value.sum == pytest.approx(positive.sum(), rel=1e-9)
        assert len(events.Images(f"spectrum/{kind}/figure")) == len(run.metrics)


def test_resume_leaves_one_event_per_step(tmp_path):
    full = run_measurement(_config(), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_measurement(_config(), tmp_path / "cut", progress=interrupt_at(13))
    resumed = run_measurement(None, tmp_path / "cut", resume=True)
    a, b = _events(full), _events(resumed)
    for column in SCALARS:
        steps = [e.step for e in b.Scalars(column)]
        assert steps == sorted(set(steps)) == [0, 5, 10, 15, 20]
        # the same numbers as the run that never stopped (timing columns aside)
        assert column not in TIMING_COLUMNS
        np.testing.assert_array_equal([e.value for e in a.Scalars(column)],
                                      [e.value for e in b.Scalars(column)])


def test_cli_log_flag_and_a_bad_name(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", str(out), "--task",
                            "gaussian-mixture", "--width", "8", "--depth", "1", "--steps", "4",
                            "--measure-every", "2", "--probe-samples", "8", "--batch-size", "8",
                            "--device", "cpu", "--log", "tensorboard")
    assert code == 0, err
    assert any((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", str(tmp_path / "bad"),
                            "--log", "mlflow")
    assert code == 2 and "'mlflow'" in err and "tensorboard" in err and "\n" not in err.strip()
