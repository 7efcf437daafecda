"""What a new user meets in the first hour: summary tables that stay readable at 80 and 120
columns, the hint after an interrupt of each command, --probe-samples beyond the data, and
one-line errors that name what is wrong."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from helpers import run_main
from rich.console import Console

from sgn_lab.cli import app
from sgn_lab.run.tables import SUMMARY_COLUMNS, measure_table, seeds_table

FLAGS = ["--task", "gaussian-mixture", "--width", "8", "--depth", "1", "--steps", "2",
         "--measure-every", "2", "--batch-size", "8", "--device", "cpu",
         "--instruments", "sgn,eval"]


def metrics_frame(labels: list[str]) -> pd.DataFrame:
    """Two measurements per label with every summary column, numbers of many digits."""
    rows = []
    for i, label in enumerate(labels):
        for step in (0, 1000):
            row = {"run": f"{label}-s0", "label": label, "step": step}
            for j, (key, _, _) in enumerate(SUMMARY_COLUMNS):
                if key != "step":
                    row[key] = 12345.678 * (j + 1) + i + step
            row["noise_scale_se"] = 987.654 + i
            rows.append(row)
    return pd.DataFrame(rows)


def printed(table, width: int, monkeypatch) -> str:
    shown = Console(width=width, file=io.StringIO(), record=True)
    monkeypatch.setattr(app, "console", shown)
    shown.print(app._render(table))
    return shown.export_text()


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("kind", ["measure", "compare"])
def test_tables_keep_every_number_and_name_at_80_and_120_columns(monkeypatch, width, kind):
    labels = ["pnm-beta0=0.5-lr=0.05", "momentum-lr=0.1", "sgd"]
    metrics = metrics_frame(labels)
    table = (measure_table(metrics[metrics.label == "sgd"], "SGN over training")
             if kind == "measure" else seeds_table(metrics, [0]))
    text = printed(table, width, monkeypatch)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text
    for row in table.rows:  # every cell whole, on one line
        for cell in row:
            assert any(cell in line for line in lines), cell
    blocks = text.count(table.columns[0].header + " ")
    # every block leads with the column that names the rows
    assert blocks >= 1 and all(line.split()[0] in (table.columns[0].header, *labels,
                                                    *map(str, (0, 1000)))
                               for line in lines if "." in line and "±" in line)
    if width == 120 and kind == "measure":
        assert "(continued)" not in text  # one block where it fits


def test_a_table_that_cannot_fit_two_columns_folds_the_name(monkeypatch):
    metrics = metrics_frame(["a-label-longer-than-any-terminal-should-have-to-show-" * 2])
    text = printed(seeds_table(metrics, [0]), 60, monkeypatch)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 60


@pytest.mark.parametrize(("argv", "says"), [
    (["measure", "--out", "x"], "finished measurements are saved; rerun with --resume"),
    (["compare", "--methods", "sgd"], "rerun the same command with --resume"),
    (["figures", "--quick"], "rerun the same command: it continues them"),
    (["scaling", "--sweep", "sigma"], "critical-batch keeps its finished batch sizes"),
])
def test_each_command_says_what_to_do_after_an_interrupt(argv, says):
    assert says in app._resume_hint(argv)


def test_an_interrupted_scaling_sweep_does_not_ask_for_a_missing_option(
        monkeypatch, capsys, tmp_path):
    import sgn_lab.sweeps as sweeps

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweeps, "run_sweep", interrupted)
    code, _, err = run_main(monkeypatch, capsys, "scaling", "--sweep", "sigma", "--quick",
                            "--out", str(tmp_path / "s"))
    assert code == 130
    assert "--resume" not in err and "rerun the same command" in err


def test_probe_samples_beyond_the_data_are_said_once_and_recorded(
        monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "measure", *FLAGS, "--probe-samples", "5000",
                            "--out", str(out))
    assert code == 0, err
    said = [line for line in err.splitlines() if "samples=5000 exceeds the" in line]
    assert len(said) == 1, err
    n_train = int(said[0].split("exceeds the ")[1].split()[0])
    config = json.loads((out / "config.json").read_text())
    assert config["probe"]["probe_samples"] == 5000  # as asked: a rerun is the same run
    assert config["probe_samples_used"] == n_train
    code, _, err = run_main(monkeypatch, capsys, "measure", *FLAGS, "--probe-samples", "5000",
                            "--out", str(out), "--resume")
    assert code == 0, err  # complete, and the same settings


def one_line(code: int, out: str, err: str) -> str:
    assert code == 2 and "Traceback" not in out + err, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    return " ".join(err.split())


def test_an_unknown_task_lists_the_tasks(monkeypatch, capsys, tmp_path):
    from sgn_lab.data.catalog import FILE_TASKS, TASKS

    said = one_line(*run_main(monkeypatch, capsys, "measure", "--task", "mnist", "--out",
                              str(tmp_path / "r")))
    assert "unknown task 'mnist'" in said
    assert all(name in said for name in (*TASKS, *FILE_TASKS))


def test_a_config_that_is_not_utf8_names_its_file(monkeypatch, capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_bytes(b'[optimizer]\nmethod = "sgd"\n# caf\xe9\n')
    said = one_line(*run_main(monkeypatch, capsys, "measure", "--config", str(config),
                              "--out", str(tmp_path / "r")))
    assert str(config) in said and "not UTF-8" in said


@pytest.mark.parametrize(("content", "says"), [
    (b"just some text, not an archive", "it is not one"),
    (None, "it holds a single .npy array"),
])
def test_a_file_that_is_not_an_npz_is_named_for_what_it_is(monkeypatch, capsys, tmp_path,
                                                          content, says):
    path = tmp_path / "data.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    said = one_line(*run_main(monkeypatch, capsys, "measure", "--task", f"npz:{path}",
                              "--out", str(tmp_path / "r")))
    assert str(path) in said and says in said and "pickled" not in said


def test_plot_steps_that_are_missing_are_listed_as_numbers(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "measure", *FLAGS, "--probe-samples", "8",
                            "--out", str(out))
    assert code == 0, err
    said = one_line(*run_main(monkeypatch, capsys, "plot", str(out), "--steps", "5"))
    assert "step(s) 5 have no SGN spectrum; available steps: 0, 2" in said
    assert "np.int64" not in said


def test_a_full_disk_names_the_figure_it_could_not_write(monkeypatch, tmp_path):
    import matplotlib.figure

    import sgn_lab.plots.style as style

    def full(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(style, "atomic_write", full)
    with pytest.raises(OSError) as failed:
        style.save_figure(matplotlib.figure.Figure(), tmp_path / "figs" / "metrics")
    assert str(failed.value) == (f"cannot write {tmp_path / 'figs' / 'metrics.png'}: "
                                 "No space left on device")


def test_figures_help_lists_the_figures(monkeypatch, capsys):
    from sgn_lab.figures import FIGURES

    code, out, _ = run_main(monkeypatch, capsys, "figures", "--help")
    assert code == 0
    assert all(name in " ".join(out.split()) for name in FIGURES)
    assert not math.isnan(len(FIGURES))
