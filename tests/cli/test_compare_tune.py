"""`sgn-lab compare --tune` and `--match-step`: a short tuned comparison, bad input in one line."""

import json

import pytest
from helpers import run_main

from sgn_lab.run.rundir import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

LINREG = ["--task", "linreg", "--task-options", "n=40,dim=5,noise_std=0,condition=10",
          "--model", "linear", "--steps", "10", "--measure-every", "10", "--batch-size", "16",
          "--probe-samples", "8", "--instruments", "eval", "--device", "cpu"]


def test_tuned_compare_prints_the_tuning_table_the_choice_and_the_summary(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run_main(monkeypatch, capsys, "compare", *LINREG, "--methods",
                                 "sgd,momentum", "--seeds", "0,1", "--tune", "lr=0.01:1:3",
                                 "--tune", "momentum.lr=0.001,0.01,0.1", "--out", str(out))
    assert code == 0, err
    text = " ".join(stdout.split())  # rich wraps titles to the terminal's width
    assert "tuning at seed 0: val_loss at the final measurement" in text
    assert stdout.count("✓") == 2  # one chosen point per method
    assert "chosen settings (by val_loss): final measurement, mean ± sd over seeds 0,1" in text
    assert "test loss" in text
    tuned = json.loads((out / "tuned.json").read_text())
    assert set(tuned["methods"]) == {"sgd", "momentum"}
    assert tuned["methods"]["momentum"]["grid"] == {"lr": [0.001, 0.01, 0.1]}
    for name in ("tuning.csv", "summary.csv"):
        assert (out / name).is_file()
    # --validation-fraction not given: tuning splits off 0.2 of the training set.
    run = load_run(out / tuned["methods"]["sgd"]["run"])
    assert run.config["task"]["validation_fraction"] == 0.2
    # The chosen lrs at the ends of their grids are named with a warning each (stderr).
    edges = [m for m, t in tuned["methods"].items() if t["at_edge"]]
    assert err.count("warning:") == len(edges)
    assert " ".join(err.split()).count("extend the grid") == len(edges)


def test_a_chosen_lr_at_the_top_of_its_grid_is_warned_about(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "compare", *LINREG, "--methods", "sgd",
                            "--tune", "lr=0.01:0.1:2", "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    assert " ".join(err.split()) == ("warning: sgd: the chosen lr=0.1 is the highest point of "
                                     "its grid; extend the grid above it")


def test_match_step_sets_each_methods_lr(tmp_path, monkeypatch, capsys):
    from sgn_lab.optim import matched_lr

    out = tmp_path / "cmp"
    code, _, err = run_main(monkeypatch, capsys, "compare", *LINREG, "--methods",
                            "sgd,momentum,pnm:beta0=2", "--match-step", "0.05",
                            "--out", str(out))
    assert code == 0, err
    lrs = {load_run(p).config["optimizer"]["method"]: load_run(p).config["optimizer"]["lr"]
           for p in out.iterdir()}
    assert lrs["sgd"] == 0.05
    assert lrs["momentum"] == pytest.approx(0.005)
    assert lrs["pnm"] == pytest.approx(matched_lr("pnm", 0.05, {"beta0": 2.0, "beta1": 0.9}))


@pytest.mark.parametrize("args, message", [
    (["--tune", "lr=1:0.1:3"], "--tune 'lr=1:0.1:3': LOW must be below HIGH, got 1.0 >= 0.1"),
    (["--tune", "lr=0.1,1", "--tune", "lr=1,2"], "--tune: lr is given twice"),
    (["--tune", "adam.lr=0.1,1"], "grid adam.lr: method 'adam' is not among those compared"),
    (["--tune", "lr=0.1,1", "--validation-fraction", "0"],
     "tuning chooses on a validation split: set validation_fraction > 0"),
    (["--tune", "lr=0.1,1", "--lr", "0.1"], "--tune lr and --lr both set lr: choose one"),
    (["--tune", "lr=0.1,1", "--methods", "sgd:lr=0.1"],
     "--tune sets lr of sgd: drop it from 'sgd:lr=0.1'"),
    (["--tune", "lr=0.1,1", "--select", "test_loss"],
     "--select must be one of auto, val_loss, val_accuracy, got 'test_loss'"),
    (["--tune", "lr=0.1,1", "--select", "val_accuracy"],
     "select val_accuracy: no tuning run has a validation accuracy"),
    (["--match-step", "0.1", "--methods", "sgd,adam"],
     "--match-step 0.1: method 'adam' cannot be matched to SGD's mean step"),
    (["--match-step", "0.1", "--methods", "sgd:lr=0.1"],
     "--match-step sets every lr: drop lr from 'sgd:lr=0.1'"),
    (["--match-step", "0.1", "--lr", "0.1"], "--match-step sets every lr: drop --lr"),
    (["--match-step", "0.1", "--tune", "lr=0.1,1"],
     "--match-step and --tune of lr both set the lr: choose one"),
    (["--match-step", "-1"], "--match-step must be a positive learning rate, got -1.0"),
])
def test_bad_tuning_arguments_end_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args,
                                                          message):
    args = ["--methods", "sgd", *args] if "--methods" not in args else args
    code, out, err = run_main(monkeypatch, capsys, "compare", *LINREG, *args,
                              "--out", str(tmp_path / "cmp"))
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def test_compare_help_documents_the_tuning_options(monkeypatch, capsys):
    from typer.testing import CliRunner

    from sgn_lab.cli.app import app

    result = CliRunner().invoke(app, ["compare", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert "--tune" in text and "KEY=LOW:HIGH:COUNT" in text and "0.2 unless given" in text
    assert "--select" in text and "test metrics are never read" in text
    assert "--match-step" in text and "adam, adapnm, adaptive-hb" in text
