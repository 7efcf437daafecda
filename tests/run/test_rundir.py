"""Run directories you can trust: the lock, temporaries, permissions, filesystem errors,
corrupt files, resume rules, and one line with exit code 2 from every command."""

import os
import signal
import stat

import pandas as pd
import pytest
from filelock import FileLock
from helpers import interrupt_at, run_main

from sgn_lab.run.config import parse
from sgn_lab.run.loop import run_measurement, run_series
from sgn_lab.run.rundir import (
    LOCK_FILE,
    TIMING_COLUMNS,
    RunDirError,
    load_run,
    locked,
    write_table,
)

SMALL = {"task": "gaussian-mixture", "width": 8, "depth": 1, "steps": 6, "measure_every": 3,
         "probe_samples": 12, "batch_size": 8, "device": "cpu", "update_repeats": 3}
FLAGS = ["--task", "gaussian-mixture", "--width", "8", "--depth", "1", "--steps", "6",
         "--measure-every", "3", "--probe-samples", "12", "--batch-size", "8", "--device", "cpu",
         "--update-repeats", "3"]


def one_line_exit_2(code, out, err, *fragments):
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_second_process_on_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(out / LOCK_FILE):  # another process holds it
        with pytest.raises(RunDirError, match="another sgn-lab process is writing"):
            run_measurement(parse(SMALL), out)
    assert not (out / "config.json").exists()
    run_measurement(parse(SMALL), out)  # free again
    assert load_run(out).complete


def test_stale_temporaries_are_removed_and_files_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".metrics.csv.0123abcd.tmp"
    stale.write_text("half a table")
    old = os.umask(0o027)
    try:
        run_measurement(parse(SMALL), out)
    finally:
        os.umask(old)
    assert not stale.exists() and not list(out.glob(".*.tmp"))
    for name in ("config.json", "metrics.csv", "spectra.csv", "checkpoint.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name


def test_filesystem_errors_name_the_path(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match=f"cannot use {blocker} as a folder"):
        run_measurement(parse(SMALL), blocker)
    with pytest.raises(RunDirError, match="cannot write .*file/run"):
        run_measurement(parse(SMALL), blocker / "run")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with locked(tmp_path / "ok") as path:
        monkeypatch.setattr(os, "fsync", full_disk)
        with pytest.raises(RunDirError, match="No space left on device"):
            write_table(path / "metrics.csv", pd.DataFrame({"a": [1]}))
    assert not list((tmp_path / "ok").glob(".*.tmp"))


@pytest.mark.parametrize("command", [
    ["measure", *FLAGS, "--out"],
    ["compare", "--methods", "sgd", *FLAGS, "--out"],
    ["scaling", "--sweep", "sigma", "--quick", "--out"],
    ["figures", "--quick", "--only", "batch", "--out"],
])
def test_every_command_stops_before_its_work_when_out_is_a_file(tmp_path, monkeypatch, capsys,
                                                                command):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    one_line_exit_2(*run_main(monkeypatch, capsys, *command, str(blocker)), str(blocker),
                    "a file is in the way")


def test_a_corrupt_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_measurement(parse(SMALL), out, progress=interrupt_at(4))
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    one_line_exit_2(*run_main(monkeypatch, capsys, "measure", "--out", str(out), "--resume"),
                    "corrupt checkpoint", str(out / "checkpoint.pt"))


def test_resuming_a_folder_without_a_run_stops(tmp_path, monkeypatch, capsys):
    """A mistyped --out with --resume alone: no run there, so no default run either."""
    missing = tmp_path / "typo"
    one_line_exit_2(*run_main(monkeypatch, capsys, "measure", "--out", str(missing),
                              "--resume"), f"no run in {missing} to resume")
    assert not missing.exists()


def interrupted_after_two_measurements(out):
    """A run of SMALL stopped at step 4: rows 0 and 3, its checkpoint at step 3."""
    with pytest.raises(KeyboardInterrupt):
        run_measurement(parse({**SMALL, "steps": 9}), out, progress=interrupt_at(5))
    assert list(load_run(out).metrics["step"]) == [0, 3]


@pytest.mark.parametrize(("damage", "says"), [
    (lambda text: "", "holds the measurements of steps none, the checkpoint (step 3) those of "
                      "steps 0, 3"),
    (lambda text: text[: text.index("\n") + 1], "holds the measurements of steps none"),
    (lambda text: "\n".join(text.splitlines()[:2]) + "\n", "of steps 0, the checkpoint"),
    (lambda text: text[:-7], "ends in a line cut short"),
])
def test_a_metrics_table_that_disagrees_with_the_checkpoint_stops_the_resume(
        tmp_path, monkeypatch, capsys, damage, says):
    out = tmp_path / "run"
    interrupted_after_two_measurements(out)
    metrics = out / "metrics.csv"
    metrics.write_text(damage(metrics.read_text()))
    one_line_exit_2(*run_main(monkeypatch, capsys, "measure", "--out", str(out), "--resume"),
                    str(metrics), says)


def test_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path, monkeypatch, capsys):
    """A kill between a row and its checkpoint leaves one row more: resuming drops it."""
    out = tmp_path / "run"
    interrupted_after_two_measurements(out)
    metrics = out / "metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines, lines[-1].replace(",3,", ",6,", 1)]) + "\n")
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", str(out), "--resume")
    assert code == 0, err
    assert list(load_run(out).metrics["step"]) == [0, 3, 6, 9]


def test_resume_with_other_settings_lists_them_and_plain_resume_shows_the_saved_run(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "measure", *FLAGS, "--method", "pnm",
                            "--lr", "0.05", "--out", str(out))
    assert code == 0, err
    metrics = out / "metrics.csv"
    before = metrics.read_bytes()
    one_line_exit_2(*run_main(monkeypatch, capsys, "measure", *FLAGS, "--method", "sgd",
                              "--lr", "0.02", "--out", str(out), "--resume"),
                    "holds a run with other settings", "lr: 0.05 -> 0.02",
                    "method: 'pnm' -> 'sgd'")
    code, printed, _ = run_main(monkeypatch, capsys, "measure", "--out", str(out), "--resume")
    assert code == 0
    assert "pnm-lr=0.05-s0" in printed and "lr=0.05" in printed  # the saved run's settings
    assert metrics.read_bytes() == before  # complete: left as it is


def test_ctrl_c_and_sigterm_print_the_resume_hint_and_leave_no_temporaries(
        tmp_path, monkeypatch, capsys):
    import sgn_lab.run.loop as loop

    out = tmp_path / "run"
    real = loop.train_step
    calls = []

    def terminate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", terminate)
    code, _, err = run_main(monkeypatch, capsys, "measure", *FLAGS, "--out", str(out))
    assert code == 130 and "rerun with --resume" in err
    assert not list(out.glob(".*.tmp"))
    assert not load_run(out).complete and load_run(out).metrics["step"].max() == 3
    monkeypatch.setattr(loop, "train_step", real)
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", str(out), "--resume")
    assert code == 0 and load_run(out).complete


def test_errors_keep_brackets_that_look_like_markup(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "[red]data[/red].npz"
    one_line_exit_2(*run_main(monkeypatch, capsys, "measure", *FLAGS, "--task", f"npz:{missing}",
                              "--out", str(tmp_path / "r")), "[red]data[/red].npz")


def test_compare_names_runs_by_method_and_hyperparameters(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    code, printed, err = run_main(
        monkeypatch, capsys, "compare", "--methods", "sgd,pnm:beta0=2,pnm:beta0=0.5:lr=0.05",
        "--seeds", "0,1", *FLAGS, "--out", str(out))
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["pnm-beta0=2-s0", "pnm-beta0=2-s1", "pnm-lr=0.05-beta0=0.5-s0",
                     "pnm-lr=0.05-beta0=0.5-s1", "sgd-s0", "sgd-s1"]
    config = load_run(out / "pnm-lr=0.05-beta0=0.5-s1").config
    assert config["optimizer"] == {"method": "pnm", "lr": 0.05, "beta0": 0.5, "beta1": 0.9,
                                   "weight_decay": 0.0}
    assert "pnm-beta0=2" in printed and "pnm-lr=0.05-beta0=0.5" in printed
    one_line_exit_2(*run_main(monkeypatch, capsys, "compare", "--methods",
                              "pnm:beta0=2,pnm:beta0=2", *FLAGS, "--out", str(tmp_path / "twice")),
                    "two runs would share the name 'pnm-beta0=2-s0'")
    one_line_exit_2(*run_main(monkeypatch, capsys, "compare", "--methods", "pnm:gamma=2",
                              *FLAGS, "--out", str(tmp_path / "bad")),
                    "'gamma' in 'pnm:gamma=2' is no hyperparameter of a method")


def test_a_series_never_mixes_runs_and_keeps_the_timing_out_of_comparisons(tmp_path):
    configs = [parse({**SMALL, "method": "sgd", "seed": s}) for s in (0, 1)]
    first = run_series(configs, tmp_path)
    tables = [load_run(p).metrics for p in first]
    again = run_series(configs, tmp_path)  # complete: kept as they are
    assert first == again
    for path, table in zip(again, tables, strict=True):
        pd.testing.assert_frame_equal(load_run(path).metrics, table)
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run_series([parse({**SMALL, "method": "sgd", "seed": 0, "steps": 9})], tmp_path)
    assert set(TIMING_COLUMNS) <= set(tables[0].columns)
