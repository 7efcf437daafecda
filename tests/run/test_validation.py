"""The validation set: held out of the training set by a run's seed, measured by eval."""

import math

import pytest
import torch
from helpers import run_main

from sgn_lab.data import load_task
from sgn_lab.run.build import build_run_model, build_task
from sgn_lab.run.config import parse
from sgn_lab.run.loop import run_measurement
from sgn_lab.run.rundir import load_checkpoint, load_run

pytestmark = pytest.mark.usefixtures("one_thread")

# A task of one's own whose sample i has the input (i, i): a row names its index, so the
# split can be read off the tensors without trusting any index sgn_lab returns.
INDEXED_TASK = '''
import numpy as np

def make_task(n=40):
    ids = np.arange(n, dtype=np.float32)
    test = 1000 + np.arange(10, dtype=np.float32)
    return {"train": (np.stack([ids, ids], 1), ids), "test": (np.stack([test, test], 1), test)}
'''


@pytest.fixture
def indexed(tmp_path, monkeypatch):
    """The reference of the indexed task (a module written for this test)."""
    (tmp_path / "sgnlab_indexed_task.py").write_text(INDEXED_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "sgnlab_indexed_task:make_task"


def ids(x: torch.Tensor) -> list[int]:
    return [int(v) for v in x[:, 0]]


def rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r.tolist()) for r in x.reshape(len(x), -1)}


def small(**overrides):
    base = dict(task="linreg", n_train=40, model="mlp", width=8, depth=1, steps=20,
                measure_every=10, probe_samples=8, batch_size=8, device="cpu", method="sgd",
                lr=0.05, instruments=["eval", "sgn"])
    return parse({**base, **overrides})


def test_validation_rows_come_from_the_training_set_and_leave_it(indexed):
    task = build_task(small(task=indexed, n_train=None, validation_fraction=0.25))
    train, val, test = ids(task.x_train), ids(task.x_val), ids(task.x_test)
    assert len(val) == 10 and len(train) == 30  # round(0.25 * 40)
    assert not set(val) & set(train)
    assert sorted(train + val) == list(range(40))  # together: the whole training set
    assert not set(val) & set(test) and min(test) >= 1000
    assert [int(v) for v in task.y_val] == val  # targets travel with their inputs
    assert len(set(val)) == len(val)


def test_on_a_built_in_task_after_n_train_subsampling():
    config = small(validation_fraction=0.25)
    task = build_task(config)
    loaded = load_task("linreg", seed=0, n_train=40)  # the task before the hold-out
    assert len(task.x_val) == 10 and len(task.x_train) == 30 and len(task.y_val) == 10
    assert not rows(task.x_val) & rows(task.x_train)
    assert not rows(task.x_val) & rows(task.x_test)
    assert rows(task.x_val) | rows(task.x_train) == rows(loaded.x_train)
    assert torch.equal(task.x_test, loaded.x_test)  # the test set is untouched
    pairs = {tuple(x.tolist()): float(y) for x, y in zip(loaded.x_train, loaded.y_train,
                                                         strict=True)}
    assert all(pairs[tuple(x.tolist())] == float(y) for x, y in zip(task.x_val, task.y_val,
                                                                     strict=True))


def test_no_validation_set_by_default():
    task = build_task(small())
    assert task.x_val is None and task.y_val is None and len(task.x_train) == 40


def test_the_split_is_fixed_by_the_seed_and_differs_between_seeds(indexed):
    def val(seed):
        return ids(build_task(small(task=indexed, n_train=None, validation_fraction=0.25,
                                    seed=seed)).x_val)

    assert val(0) == val(0)
    assert val(1) == val(1)
    assert val(0) != val(1)
    # A held-out set of a random draw, not the first or last rows.
    assert val(0) != list(range(10)) and val(0) != list(range(30, 40))


@pytest.mark.parametrize("fraction, n_val", [(0.1, 4), (0.25, 10), (0.5, 20), (0.9, 36)])
def test_sizes(indexed, fraction, n_val):
    task = build_task(small(task=indexed, n_train=None, validation_fraction=fraction))
    assert (len(task.x_val), len(task.x_train)) == (n_val, 40 - n_val)


@pytest.mark.parametrize("value", [1.5, 1.0, -0.1, True, "0.2"])
def test_fractions_outside_zero_to_one_are_refused(value):
    with pytest.raises(ValueError) as info:
        parse({"validation_fraction": value})
    message = str(info.value)
    assert "validation_fraction" in message and "\n" not in message


@pytest.mark.parametrize("n_train, fraction, counts", [
    (4, 0.1, "leaves 0 validation and 4 training samples"),
    (10, 0.99, "leaves 10 validation and 0 training samples"),
])
def test_a_fraction_leaving_one_part_empty_is_one_line(n_train, fraction, counts):
    with pytest.raises(ValueError) as info:
        build_task(small(n_train=n_train, validation_fraction=fraction))
    message = str(info.value)
    assert message.startswith(f"validation_fraction={fraction} of {n_train} training samples")
    assert counts in message and "\n" not in message


@pytest.mark.parametrize("args, message", [
    (["--validation-fraction", "1.5"], "config key 'validation_fraction': input should be "
                                       "less than 1, got 1.5"),
    (["--validation-fraction", "0.1", "--n-train", "4"], "validation_fraction=0.1 of 4 "
                                                         "training samples leaves 0"),
])
def test_cli_refuses_a_bad_fraction_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    code, out, err = run_main(monkeypatch, capsys, "measure", "--task", "linreg", *args,
                              "--steps", "1", "--probe-samples", "8", "--batch-size", "2",
                              "--device", "cpu", "--out", str(tmp_path / "r"))
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def _final_model(out, config):
    """The run's model at its last measurement, from its checkpoint, and its task."""
    task = build_task(config)
    model = build_run_model(config, task)
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    return model.eval(), task


@pytest.mark.parametrize("task, model, width", [("gaussian-mixture", "mlp", 8),
                                                 ("linreg", "mlp", 8),
                                                 ("markov:context=6,vocab=5", "gpt2", 8)])
def test_val_columns_are_the_final_models_loss_and_accuracy(tmp_path, task, model, width):
    config = small(task=task, model=model, width=width, heads=2, validation_fraction=0.25,
                   n_train=48)
    run_measurement(config, tmp_path / "run")
    run = load_run(tmp_path / "run")
    last = run.metrics.iloc[-1]
    assert list(run.metrics["step"]) == [0, 10, 20]
    net, data = _final_model(tmp_path / "run", config)
    with torch.no_grad():
        out = net(data.x_val)
        loss = float(data.loss_fn(out, data.y_val))
    assert last["val_loss"] == pytest.approx(loss, rel=1e-5)
    if data.num_classes:
        # Per sample, or per token for a language task (targets (n, T)).
        accuracy = (out.argmax(dim=-1) == data.y_val).double().mean().item()
        assert last["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    else:
        assert math.isnan(last["val_accuracy"])
    # The validation loss is not the training or the test loss: its own samples.
    assert last["val_loss"] != last["train_loss"] and last["val_loss"] != last["test_loss"]
    # The training set the run saw (and the probe drew from) is the reduced one: 36 of 48.
    assert (run.metrics["dataset_size"] == 36).all()
    assert last["epoch"] == pytest.approx(20 / (36 // 8))


def test_without_validation_set_no_val_columns(tmp_path):
    run_measurement(small(steps=2, measure_every=2), tmp_path / "run")
    columns = set(load_run(tmp_path / "run").metrics.columns)
    assert {"train_loss", "test_loss"} <= columns
    assert not {"val_loss", "val_accuracy"} & columns

