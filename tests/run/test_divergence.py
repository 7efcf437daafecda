"""Divergence: raised (the run stays incomplete) or recorded (complete, marked, series goes on)."""

import json

import pytest
import torch

import sgn_lab.run.loop as loop
from sgn_lab.checks import NonFiniteError
from sgn_lab.grads import per_sample_grads
from sgn_lab.run.config import parse, read_file
from sgn_lab.run.loop import Diverged, DivergedMeasurement, plan, run_measurement, run_series
from sgn_lab.run.rundir import STATUS_KEYS, load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def small(**overrides):
    """SGD on a small linreg; lr=1e6 makes the loss NaN at step 2 (inf in the measurement of
    step 2 when measuring every step)."""
    base = dict(task="linreg", n_train=64, model="mlp", width=8, depth=1, steps=12,
                measure_every=4, probe_samples=8, batch_size=8, device="cpu", method="sgd",
                lr=0.01, instruments=["eval", "sgn"])
    return parse({**base, **overrides})


@pytest.fixture
def trains(monkeypatch):
    """The runs that train: one entry per call of the loop's training function."""
    calls = []
    train = loop._train

    def counted(config, out, **kwargs):
        calls.append(out.name)
        return train(config, out, **kwargs)

    monkeypatch.setattr(loop, "_train", counted)
    return calls


def test_raise_is_the_default_and_leaves_the_run_incomplete(tmp_path):
    with pytest.raises(Diverged, match=r"^training diverged: loss nan at step 2 \(method sgd, "
                                       r"lr 1000000\.0\); lower the learning rate$"):
        run_measurement(small(lr=1e6), tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert not run.complete and run.diverged is None
    assert "diverged" not in json.loads((tmp_path / "run" / "config.json").read_text())
    assert issubclass(Diverged, FloatingPointError)  # what it was before: caught as before


def test_record_marks_the_run_diverged_and_complete_and_keeps_its_rows(tmp_path):
    run_measurement(small(lr=1e6), tmp_path / "run", on_divergence="record")
    run = load_run(tmp_path / "run")
    status = json.loads((tmp_path / "run" / "config.json").read_text())
    assert status["complete"] is True
    assert status["diverged"] == ("training diverged: loss nan at step 2 (method sgd, lr "
                                  "1000000.0); lower the learning rate")
    assert run.complete and run.diverged == status["diverged"]
    assert list(run.metrics["step"]) == [0]  # measured before it diverged: kept
    # The config part of config.json is unchanged: it re-runs as a config file, and a
    # resume with the same config is accepted.
    assert "diverged" in STATUS_KEYS
    assert parse(read_file(tmp_path / "run" / "config.json")) == small(lr=1e6).resolved()
    plan(small(lr=1e6), tmp_path / "run", resume=True)


def test_a_non_finite_measurement_counts_as_divergence(tmp_path):
    config = small(lr=1e6, measure_every=1)
    with pytest.raises(DivergedMeasurement) as info:
        run_measurement(config, tmp_path / "raised")
    # Still the ValueError that the per-sample check raised before, now also a Diverged.
    assert isinstance(info.value, ValueError) and isinstance(info.value, Diverged)
    assert isinstance(info.value.__cause__, NonFiniteError)
    assert str(info.value).startswith("training diverged: non-finite loss inf for sample ")
    assert "at the measurement of step 2 (method sgd, lr 1000000.0)" in str(info.value)
    assert not load_run(tmp_path / "raised").complete

    run_measurement(config, tmp_path / "recorded", on_divergence="record")
    run = load_run(tmp_path / "recorded")
    assert run.complete and run.diverged == str(info.value)
    assert list(run.metrics["step"]) == [0, 1]


def test_a_non_finite_minibatch_of_per_sample_gradients_counts_as_divergence(tmp_path):
    # Covariance noise steps on the per-sample gradients of its minibatch: their check, not
    # the minibatch loss, is what sees the NaN first.
    config = small(method="covariance", lr=1e6, measure_every=100)
    with pytest.raises(DivergedMeasurement, match="in the minibatch of step") as info:
        run_measurement(config, tmp_path / "raised")
    assert isinstance(info.value.__cause__, NonFiniteError)
    run_measurement(config, tmp_path / "recorded", on_divergence="record")
    run = load_run(tmp_path / "recorded")
    assert run.complete and run.diverged == str(info.value)


def test_non_finite_per_sample_values_are_still_value_errors():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    x, y = torch.ones(3, 2), torch.zeros(3)
    with pytest.raises(ValueError, match="non-finite loss inf for sample 0") as info:
        per_sample_grads(model, lambda out, t: ((out.squeeze(-1) - t) ** 2).mean(), x, y)
    assert type(info.value) is NonFiniteError


def test_a_series_records_the_diverged_run_goes_on_and_keeps_it_later(tmp_path, trains):
    configs = [small(lr=1e6), small(lr=0.01)]
    paths = run_series(configs, tmp_path, on_divergence="record")
    assert [p.name for p in paths] == ["sgd-lr=1e+06-s0", "sgd-lr=0.01-s0"]
    assert trains == ["sgd-lr=1e+06-s0", "sgd-lr=0.01-s0"]
    diverged, fine = (load_run(p) for p in paths)
    assert diverged.complete and diverged.diverged.startswith("training diverged: loss nan")
    assert fine.complete and fine.diverged is None
    assert list(fine.metrics["step"]) == [0, 4, 8, 12]  # the next config ran to its end

    files = [p / name for p in paths for name in ("config.json", "metrics.csv")]
    written = [f.stat().st_mtime_ns for f in files]
    for on_divergence in ("record", "raise"):  # either way: a complete run is kept as it is
        again = run_series(configs, tmp_path, on_divergence=on_divergence)
        assert again == paths
    assert trains == ["sgd-lr=1e+06-s0", "sgd-lr=0.01-s0"]  # nothing trained again
    assert [f.stat().st_mtime_ns for f in files] == written
    assert load_run(paths[0]).diverged == diverged.diverged


def test_a_series_under_raise_stops_at_the_diverged_run(tmp_path, trains):
    with pytest.raises(Diverged):
        run_series([small(lr=1e6), small(lr=0.01)], tmp_path)
    assert trains == ["sgd-lr=1e+06-s0"]
    assert not load_run(tmp_path / "sgd-lr=1e+06-s0").complete


def test_an_incomplete_run_resumed_under_record_is_recorded(tmp_path, trains):
    config = small(lr=1e6)
    with pytest.raises(Diverged):
        run_measurement(config, tmp_path / "run")
    run_measurement(config, tmp_path / "run", resume=True, on_divergence="record")
    run = load_run(tmp_path / "run")
    assert run.complete and run.diverged.startswith("training diverged: loss nan at step 2")
    assert list(run.metrics["step"]) == [0]
    run_measurement(config, tmp_path / "run", resume=True, on_divergence="record")
    assert len(trains) == 2  # the third call found it complete


@pytest.mark.parametrize("call", [
    lambda out: run_measurement(small(), out, on_divergence="ignore"),
    lambda out: run_series([small()], out, on_divergence="ignore"),
])
def test_an_unknown_on_divergence_is_one_line_before_any_work(tmp_path, call):
    with pytest.raises(ValueError) as info:
        call(tmp_path / "out")
    assert str(info.value) == "on_divergence must be one of raise, record, got 'ignore'"
    assert not (tmp_path / "out").exists()
