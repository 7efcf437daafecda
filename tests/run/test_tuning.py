"""Tuned comparisons (sgn_lab.run.tuning): grids, the choice on the validation split, resume."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from sgn_lab.optim import matched_lr
from sgn_lab.run.build import build_run_model, build_task
from sgn_lab.run.config import parse
from sgn_lab.run.rundir import load_run
from sgn_lab.run.tuning import (
    SUMMARY_FILE,
    TUNED_FILE,
    TUNING_FILE,
    Grid,
    choose_metric,
    method_grids,
    parse_grid,
    parse_grids,
    select_point,
    tune,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# --- grids ---------------------------------------------------------------------------------


def test_log_grid_has_count_points_from_low_to_high_both_included():
    grid = parse_grid("lr=1e-3:1:7")
    assert grid == Grid("lr", grid.values, None, True)
    np.testing.assert_allclose(grid.values, np.logspace(-3, 0, 7), rtol=1e-12)
    assert grid.values[0] == 1e-3 and grid.values[2] == 0.01 and grid.values[-1] == 1.0


def test_explicit_values_method_grids_and_integer_keys():
    assert parse_grid("beta0=0.5,1,2") == Grid("beta0", (0.5, 1.0, 2.0))
    assert all(isinstance(v, float) for v in parse_grid("beta0=0.5,1,2").values)
    adam = parse_grid("adam.lr=1e-5:1e-2:4")
    assert adam.method == "adam" and adam.values == (1e-5, 1e-4, 1e-3, 1e-2)
    assert parse_grid("small_batch=1:64:7").values == (1, 2, 4, 8, 16, 32, 64)
    assert parse_grid("variant=full,diagonal").values == ("full", "diagonal")
    assert parse_grid("adaptive-hb.beta_max=0.9,0.99").method == "adaptive-hb"


@pytest.mark.parametrize("text, message", [
    ("lr", "write KEY=LOW:HIGH:COUNT or KEY=v1,v2,..."),
    ("lr=", "write KEY=LOW:HIGH:COUNT"),
    ("lr=1e-3:1", "write KEY=LOW:HIGH:COUNT"),
    ("lr=x:1:7", "LOW and HIGH must be numbers, got 'x' and '1'"),
    ("lr=1:1e-3:7", "LOW must be below HIGH, got 1.0 >= 0.001"),
    ("lr=1e-3:1e-3:7", "LOW must be below HIGH"),
    ("lr=1e-3:1:1", "COUNT must be at least 2, got 1"),
    ("lr=1e-3:1:2.5", "COUNT must be an integer, got '2.5'"),
    ("lr=0:1:3", "a log-spaced grid needs finite LOW > 0, got 0.0"),
    ("lr=-0.1,0.1", "a learning rate must be positive, got -0.1"),
    ("lr=0.1,0.1", "a value repeats"),
    ("lr=0.1,nan", "lr takes a finite number, got 'nan'"),
    ("beta0=a,b", "beta0 takes a finite number, got 'a'"),
    ("small_batch=2.5,4", "small_batch takes an integer, got '2.5'"),
    ("small_batch=1:3:9", "a value repeats (rounded to integers)"),
    ("variant=a:b:3", "variant takes names"),
    ("nope=1,2", "'nope' is no hyperparameter of a method"),
    ("method=sgd,adam", "'method' is no hyperparameter of a method"),
    ("foo.lr=0.1,1", "unknown method 'foo'"),
    ("adam.beta0=1,2", "method 'adam' takes no beta0"),
])
def test_bad_grids_are_one_line_naming_the_text(text, message):
    with pytest.raises(ValueError) as info:
        parse_grid(text, where="--tune")
    assert str(info.value).startswith(f"--tune {text!r}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_key_given_twice_is_an_error_a_method_grid_overrides_the_general_one():
    with pytest.raises(ValueError, match=r"^--tune: adam.lr is given twice$"):
        parse_grids(["adam.lr=0.1,1", "adam.lr=1,2"], where="--tune")
    grids = parse_grids(["lr=1e-3:1:4", "beta0=0.5,2", "adam.lr=1e-5:1e-2:4"])
    assert list(method_grids(grids, "sgd")) == ["lr"]  # beta0 skipped: sgd takes none
    assert method_grids(grids, "sgd")["lr"].values == (1e-3, 1e-2, 0.1, 1.0)
    assert method_grids(grids, "adam")["lr"].values == (1e-5, 1e-4, 1e-3, 1e-2)
    assert list(method_grids(grids, "pnm")) == ["lr", "beta0"]  # the order given
    # The method's own grid wins in either order.
    first = parse_grids(["adam.lr=0.5,1", "lr=1,2"])
    assert method_grids(first, "adam")["lr"].values == (0.5, 1.0)


# --- selection -----------------------------------------------------------------------------


def _table(**columns):
    n = len(next(iter(columns.values())))
    base = {"val_loss": [math.nan] * n, "val_accuracy": [math.nan] * n, "diverged": [""] * n}
    return pd.DataFrame({**base, **columns})


def test_selection_by_accuracy_takes_the_highest_and_breaks_ties_by_loss():
    rows = _table(val_accuracy=[0.5, 0.8, 0.8, 0.7], val_loss=[0.1, 0.9, 0.2, 0.3])
    assert select_point(rows, "val_accuracy") == 2  # two 0.8s: the lower val_loss
    same = _table(val_accuracy=[0.5, 0.8, 0.8], val_loss=[0.1, 0.2, 0.2])
    assert select_point(same, "val_accuracy") == 1  # an exact tie: the first in grid order
    assert select_point(rows, "val_loss") == 0
    assert choose_metric(rows, "auto") == "val_accuracy"
    regression = _table(val_loss=[0.3, 0.2, 0.2])
    assert choose_metric(regression, "auto") == "val_loss"
    assert select_point(regression, "val_loss") == 1
    with pytest.raises(ValueError, match="^select val_accuracy: no tuning run has a "
                                         "validation accuracy"):
        choose_metric(regression, "val_accuracy")


def test_diverged_and_non_finite_points_are_never_chosen():
    rows = _table(val_loss=[0.5, 0.01, math.nan, math.inf, 0.4],
                  diverged=["", "training diverged: loss nan at step 3", "", "", ""])
    assert select_point(rows, "val_loss") == 4
    read_back = rows.assign(diverged=[math.nan, "diverged", math.nan, math.nan, math.nan])
    assert select_point(read_back, "val_loss") == 4  # "" reads back from a CSV as NaN
    nothing = _table(val_loss=[0.1, math.nan], diverged=["diverged", ""])
    assert select_point(nothing, "val_loss") is None


def test_selection_never_reads_test_columns():
    rows = _table(val_loss=[0.2, 0.3, 0.4], val_accuracy=[0.9, 0.8, 0.7],
                  test_loss=[0.9, 0.1, 0.5], test_accuracy=[0.1, 0.99, 0.5])
    assert select_point(rows, "val_loss") == 0
    assert select_point(rows, "val_accuracy") == 0
    # Without test columns at all the choice is the same: they play no part.
    assert select_point(rows.drop(columns=["test_loss", "test_accuracy"]), "val_loss") == 0


# --- the protocol on a problem whose answer is known ---------------------------------------

STEPS = 10
# Explicit points around the optimum of T = 10 full-batch GD steps on this problem (the best
# lr lies inside, its neighbours' validation losses differ by a factor 1.5 or more), and 1000,
# whose training loss overflows: a diverged run.
LINREG_GRID = "lr=0.5,1,1.4,1.7,1.8,2,1000"


def _linreg(**overrides):
    base = dict(task="linreg", task_options=dict(n=40, dim=5, noise_std=0.0, condition=10.0),
                validation_fraction=0.2, model="linear", method="sgd", steps=STEPS,
                measure_every=STEPS, batch_size=24, probe_samples=8, instruments=("eval",),
                device="cpu", seed=0)
    return parse({**base, **overrides})


def _gd_validation_losses(config, lrs):
    """½ MSE on the validation set after T full-batch GD steps from the run's own initial
    weights, in float64 numpy: the data and the model as the loop builds them."""
    task = build_task(config)
    assert len(task.x_train) == config.training.batch_size  # full batch: order is irrelevant
    torch.manual_seed(config.training.seed)  # as the loop does, just before the model
    layer = build_run_model(config, task)[1]
    theta0 = np.concatenate([layer.weight.detach().double().numpy().ravel(),
                             layer.bias.detach().double().numpy()])

    def augmented(x):
        return np.hstack([x.double().numpy(), np.ones((len(x), 1))])

    x, y = augmented(task.x_train), task.y_train.double().numpy()
    x_val, y_val = augmented(task.x_val), task.y_val.double().numpy()
    losses = []
    for lr in lrs:
        theta = theta0.copy()
        for _ in range(STEPS):
            theta -= lr * x.T @ (x @ theta - y) / len(x)
        losses.append(0.5 * np.mean((x_val @ theta - y_val) ** 2))
    return np.array(losses)


def test_tuning_chooses_the_lr_of_least_validation_loss_gradient_descent_predicts(tmp_path):
    config = _linreg()
    grid = parse_grid(LINREG_GRID)
    predicted = _gd_validation_losses(config, grid.values)
    best = int(np.argmin(predicted))
    assert 0 < best < len(grid.values) - 2  # inside the grid, not trivially an end
    ordered = np.sort(predicted[:-1])
    assert ordered[1] > 1.5 * ordered[0]  # a clear winner

    result = tune([config], [grid], seeds=[0], root=tmp_path)
    (choice,) = result.choices
    assert result.metric == "val_loss"  # regression: auto picks the loss
    assert choice.setting == {"lr": grid.values[best]} and choice.config.optimizer.lr == 1.7
    assert choice.at_edge == {}  # an explicit list has no edges to extend
    table = pd.read_csv(tmp_path / TUNING_FILE)
    assert list(table["lr"]) == list(grid.values)
    assert list(table["selected"]) == [i == best for i in range(len(grid.values))]
    # The run's own numbers are those of the float64 reference (float32 training).
    usable = table["diverged"].isna()
    np.testing.assert_allclose(table["val_loss"][usable], predicted[:-1], rtol=1e-3)
    assert list(usable) == [True] * 6 + [False]  # lr=1000: diverged, recorded, skipped
    assert "diverged" in table["diverged"].iloc[-1]
    assert load_run(tmp_path / table["run"].iloc[-1]).diverged == table["diverged"].iloc[-1]
    assert table["val_accuracy"].isna().all()
    tuned = json.loads((tmp_path / TUNED_FILE).read_text())
    assert tuned["methods"]["sgd"]["chosen"] == {"lr": 1.7}
    assert tuned["methods"]["sgd"]["value"] == pytest.approx(predicted[best], rel=1e-3)
    assert tuned["metric"] == "val_loss" and tuned["select"] == "auto"


def test_a_best_point_at_the_end_of_a_log_grid_is_flagged(tmp_path):
    result = tune([_linreg()], parse_grids(["lr=0.1:1:3"]), seeds=[0], root=tmp_path)
    assert result.choices[0].setting == {"lr": 1.0}
    assert result.choices[0].at_edge == {"lr": "high"}
    assert json.loads((tmp_path / TUNED_FILE).read_text())["methods"]["sgd"]["at_edge"] == {
        "lr": "high"}


def test_a_method_without_a_usable_point_is_named_after_the_table_is_written(tmp_path):
    with pytest.raises(ValueError) as info:
        tune([_linreg()], parse_grids(["lr=1000,2000"]), seeds=[0], root=tmp_path)
    assert str(info.value).startswith("no usable grid point for 'sgd': every run diverged")
    assert "\n" not in str(info.value)
    assert (tmp_path / TUNING_FILE).is_file() and not (tmp_path / TUNED_FILE).exists()


@pytest.mark.parametrize("grids, kwargs, message", [
    (["lr=0.1,1"], dict(validation_fraction=0.0), "tuning chooses on a validation split: set "
                                                  "validation_fraction > 0"),
    (["adam.lr=0.1,1"], {}, "grid adam.lr: method 'adam' is not among those compared (sgd)"),
    (["beta0=1,2"], {}, "grid beta0: no method compared takes beta0"),
    (["lr=0.1,1", "momentum=0.5,1.5"], dict(method="momentum"),
     "config key 'momentum': input should be less than 1, got 1.5"),
])
def test_bad_tuning_requests_stop_before_any_run(tmp_path, grids, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        tune([_linreg(**kwargs)], parse_grids(grids), seeds=[0], root=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_select_and_seeds_are_checked(tmp_path):
    with pytest.raises(ValueError, match="^select must be one of auto, val_loss, val_accuracy"):
        tune([_linreg()], parse_grids(["lr=0.1,1"]), seeds=[0], root=tmp_path, select="test")
    with pytest.raises(ValueError, match=r"^seeds must be distinct"):
        tune([_linreg()], parse_grids(["lr=0.1,1"]), seeds=[0, 0], root=tmp_path)


def test_matched_step_sets_each_points_lr_and_excludes_an_lr_grid(tmp_path):
    pnm = _linreg(method="pnm")
    with pytest.raises(ValueError, match="^grid lr: the learning rates are set by the matched"):
        tune([pnm], parse_grids(["lr=0.1,1"]), seeds=[0], root=tmp_path, match_step=0.1)
    result = tune([pnm], parse_grids(["beta0=0.5,2"]), seeds=[0], root=tmp_path,
                  match_step=0.1)
    settings = {"beta1": 0.9, "weight_decay": 0.0}
    lrs = [matched_lr("pnm", 0.1, {**settings, "beta0": b}) for b in (0.5, 2.0)]
    np.testing.assert_allclose(result.tuning["lr"], lrs, rtol=1e-12)
    assert result.choices[0].label == "pnm"


# --- several methods and seeds, the records, resume ----------------------------------------


def _mixture(method, **overrides):
    base = dict(task="gaussian-mixture", task_options=dict(n=200), model="mlp", width=8,
                depth=1, steps=20, measure_every=10, probe_samples=8, batch_size=16,
                device="cpu", instruments=("eval",), validation_fraction=0.2, method=method)
    return parse({**base, **overrides})


SWEEP = dict(grids=["lr=0.01:1:3", "momentum.lr=0.003:0.3:3"], seeds=[0, 1])


def _sweep(root, **callbacks):
    return tune([_mixture("sgd"), _mixture("momentum")], parse_grids(SWEEP["grids"]),
                seeds=SWEEP["seeds"], root=root, **callbacks)


def _records(root):
    return (json.loads((root / TUNED_FILE).read_text()), pd.read_csv(root / TUNING_FILE),
            pd.read_csv(root / SUMMARY_FILE))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    return root, _sweep(root)


def test_chosen_settings_run_at_every_seed_and_are_summarised(fresh):
    root, result = fresh
    assert result.metric == "val_accuracy"  # classification: auto picks the accuracy
    tuning = result.tuning
    assert list(tuning["method"]) == ["sgd"] * 3 + ["momentum"] * 3
    assert list(tuning["lr"]) == [0.01, 0.1, 1.0, 0.003, 0.03, 0.3]
    for choice in result.choices:
        rows = tuning[tuning["method"] == choice.label]
        assert rows["selected"].sum() == 1
        chosen = rows[rows["selected"]].iloc[0]
        assert chosen["val_accuracy"] == rows["val_accuracy"].max() == choice.value
        assert chosen["lr"] == choice.config.optimizer.lr
    # One directory per tuning point, plus the chosen settings at the second seed.
    runs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(runs) == 6 + 2
    assert [p.name for p in result.runs] == [
        f"{c.config.label}-s{s}" for c in result.choices for s in (0, 1)]
    summary = pd.read_csv(root / SUMMARY_FILE)
    assert list(summary["method"]) == ["sgd", "momentum"]
    for choice, (_, row) in zip(result.choices, summary.iterrows(), strict=True):
        finals = [load_run(root / f"{choice.config.label}-s{s}").metrics.iloc[-1]
                  for s in (0, 1)]
        test = [f["test_accuracy"] for f in finals]
        gap = [f["train_accuracy"] - f["test_accuracy"] for f in finals]
        assert row["lr"] == choice.config.optimizer.lr and row["seeds"] == 2
        assert row["diverged"] == 0
        assert row["test_accuracy_mean"] == pytest.approx(np.mean(test))
        assert row["test_accuracy_sd"] == pytest.approx(np.std(test, ddof=1))
        assert row["generalization_gap_mean"] == pytest.approx(np.mean(gap))
        assert {"test_loss_mean", "train_accuracy_sd"} <= set(summary.columns)


def test_a_killed_sweep_resumes_to_the_same_choice(tmp_path, fresh):
    class Stop(KeyboardInterrupt):
        pass

    def stop_after(runs):
        def done(finished, total):
            assert total == 8
            if finished == runs:
                raise Stop
        return done

    def stop_mid_run(name, at_step):
        def progress(config):
            def step(done, total):
                if config.run_name == name and done == at_step:
                    raise Stop
            return step
        return progress

    root = tmp_path / "killed"
    with pytest.raises(Stop):
        _sweep(root, done=stop_after(2))  # two tuning runs done
    with pytest.raises(Stop):  # the first momentum point, killed after its measurement at 10
        _sweep(root, progress=stop_mid_run("momentum-lr=0.003-s0", 15))
    assert not load_run(root / "momentum-lr=0.003-s0").complete
    with pytest.raises(Stop):  # in the final runs at the second seed
        _sweep(root, done=stop_after(7))
    result = _sweep(root)
    want = _records(fresh[0])
    for got, expected in zip(_records(root), want, strict=True):
        if isinstance(got, dict):
            assert got == expected
        else:
            pd.testing.assert_frame_equal(got, expected)
    assert [c.setting for c in result.choices] == [c.setting for c in fresh[1].choices]


@pytest.mark.parametrize(("specs", "flags", "grids", "match_step", "message"), [
    ([{"method": "sgd"}], {"lr": 0.1}, ["lr=0.1,1"], None,
     "--tune lr and --lr both set lr: choose one"),
    ([{"method": "sgd", "lr": 0.1}], {}, ["lr=0.1,1"], None,
     "--tune sets lr of sgd: drop it from 'sgd:lr=0.1'"),
    ([{"method": "sgd", "lr": 0.1}], {}, [], 0.1,
     "--match-step sets every lr: drop lr from 'sgd:lr=0.1'"),
    ([{"method": "sgd"}], {"lr": 0.1}, [], 0.1, "--match-step sets every lr: drop --lr"),
    ([{"method": "sgd"}], {}, ["lr=0.1,1"], 0.1,
     "--match-step and --tune of lr both set the lr: choose one"),
    ([{"method": "sgd"}], {}, [], -1.0,
     "--match-step must be a positive learning rate, got -1.0"),
])
def test_check_lr_sources_refuses_a_hyperparameter_set_twice(specs, flags, grids, match_step,
                                                             message):
    from sgn_lab.run.tuning import check_lr_sources

    with pytest.raises(ValueError, match=re.escape(message)):
        check_lr_sources(specs, flags, parse_grids(grids), match_step)


def test_check_lr_sources_passes_one_source_each():
    from sgn_lab.run.tuning import check_lr_sources

    check_lr_sources([{"method": "pnm", "beta0": 2.0}, {"method": "nope", "lr": 0.1}],
                     {"lr": None}, parse_grids(["lr=0.1,1", "sgd.weight_decay=0,0.1"]), None)
    check_lr_sources([{"method": "sgd"}], {}, (), 0.05)
