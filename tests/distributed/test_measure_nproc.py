"""``sgn-lab measure --nproc N`` and under torchrun, end to end on gloo (CPU, localhost).

Every run trains the same float32 model with the same seed: DDP over 2 and 3 processes must
give the metrics and spectra of one process to float32 rounding (the minibatch gradient is
summed in another order, and the Gram's blocks are computed from other batch sizes): scalars
within 1e-6 relative, every eigenvalue within 1e-6 of the largest of its spectrum (Weyl's
inequality bounds each eigenvalue's change by the perturbation's norm). The same N by two
launchers, and a killed N-process run resumed, must match the uninterrupted run bit for bit.
A rank killed mid-run ends the run with one line, exit code 1 and a resumable directory.
(The vmap path and the curvature and updates instruments over ranks: test_split_probe.py.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_main
from nproc_helpers import (
    CLI,
    RUN_TIMEOUT_S,
    assert_same_numbers,
    complete,
    sgn_lab,
    started,
    tables,
    wait_for_rows,
    workers,
)

SMALL = ["--task", "gaussian-mixture", "--width", "32", "--depth", "1"]
FLAGS = [*SMALL, "--steps", "12", "--measure-every", "4", "--probe-samples", "13",
         "--batch-size", "12", "--update-repeats", "3", "--seed", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nproc")
    out = {name: root / name for name in ("one", "two", "three", "torchrun", "killed", "dead")}
    sgn_lab(*FLAGS, out=out["one"])
    sgn_lab(*FLAGS, "--nproc", "2", out=out["two"])
    sgn_lab(*FLAGS, "--nproc", "3", out=out["three"])
    sgn_lab(*FLAGS, out=out["torchrun"], torchrun=2)

    killed = started(*FLAGS, "--nproc", "2", out=out["killed"])
    # After the second measurement: the resumed run restarts from a checkpoint past step 0,
    # so gns.csv's rows from there on are the resumed process's own.
    wait_for_rows(out["killed"], 2, killed)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and its workers, as a scheduler would
    killed.wait(30)
    assert not complete(out["killed"])
    sgn_lab("--resume", out=out["killed"])

    dead = started(*FLAGS, "--nproc", "2", out=out["dead"])
    wait_for_rows(out["dead"], 1, dead)
    ranks = workers(dead.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = dead.communicate(timeout=RUN_TIMEOUT_S)
    out["dead:exit"], out["dead:stderr"] = dead.returncode, stderr
    out["dead:complete"] = complete(out["dead"])
    sgn_lab("--resume", out=out["dead"])
    return out


@pytest.mark.parametrize("pair", [("one", "two"), ("one", "three")])
def test_n_processes_give_the_one_process_numbers(runs, pair):
    assert_same_numbers(runs[pair[0]], runs[pair[1]])


def test_nproc_writes_the_ddp_noise_scale_every_step(runs):
    metrics, _ = tables(runs["two"])
    gns = pd.read_csv(runs["two"] / "gns.csv")
    assert list(gns.step) == list(range(12))
    for _, row in metrics.iterrows():  # the metrics row holds the latest smoothed value
        if row.step == 0:
            assert math.isnan(row.gns_trace_smoothed)
            continue
        last = gns.iloc[int(row.step) - 1]
        assert row.gns_trace_smoothed == last.trace_smoothed
        assert row.gns_sq_norm_smoothed == last.sq_norm_smoothed
    assert not (runs["one"] / "gns.csv").exists()
    assert "gns_noise_scale" not in tables(runs["one"])[0]


@pytest.mark.parametrize("other", ["torchrun", "killed", "dead"])
def test_same_processes_same_numbers_bit_for_bit(runs, other):
    """torchrun and --nproc run the same code; a killed run resumes from its checkpoint."""
    for want, got in zip(tables(runs["two"]), tables(runs[other]), strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(runs[other] / "gns.csv"),
                                  pd.read_csv(runs["two"] / "gns.csv"), check_exact=True)
    config = json.loads((runs[other] / "config.json").read_text())
    assert config["complete"] and config["training"]["nproc"] == 2


def test_a_dead_rank_ends_the_run_with_one_line(runs):
    assert runs["dead:exit"] == 1
    lines = [line for line in runs["dead:stderr"].splitlines() if line.strip()]
    assert lines[-1] == ("error: the process of rank 1 of 2 died (SIGKILL); finished "
                         "measurements are saved; rerun with --resume")
    assert "Traceback" not in runs["dead:stderr"]
    assert not runs["dead:complete"]


@pytest.mark.parametrize(("args", "message"), [
    (["--nproc", "5", "--batch-size", "10", "--probe-samples", "4"],
     "nproc=5 exceeds the probe set of probe_samples=4: every process needs a sample"),
    (["--nproc", "3", "--batch-size", "10"],
     "batch_size=10 does not split evenly over nproc=3 processes: give a multiple of nproc"),
    (["--nproc", "2", "--method", "covariance"],
     "method 'covariance' draws its noise from the per-sample gradients of the whole "
     "minibatch; with nproc > 1 that is not supported yet"),
    (["--nproc", "2", "--chunk-size", "4"],
     "chunk_size with nproc > 1 is not supported on the Gram path"),
])
def test_what_cannot_split_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, args, message):
    code, out, err = run_main(monkeypatch, capsys, "measure", "--out", str(tmp_path / "r"),
                              "--steps", "2", *args)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "r" / "config.json").exists()


def test_nproc_under_torchrun_must_agree(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", str(tmp_path / "r"),
                            "--nproc", "3")
    assert code == 2
    assert err.strip() == ("error: --nproc 3 under torchrun, which started 2 processes: drop "
                           "--nproc")


@pytest.mark.parametrize(("run", "nproc", "saved"), [("one", "2", 1), ("two", "3", 2)])
def test_a_plain_resume_with_another_nproc_stops(monkeypatch, capsys, runs, run, nproc, saved):
    before = (runs[run] / "metrics.csv").read_bytes()
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", str(runs[run]), "--resume",
                            "--nproc", nproc)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"resume it with --nproc {saved}, or without --nproc" in err
    assert (runs[run] / "metrics.csv").read_bytes() == before


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_group_exits_130_with_the_resume_hint(tmp_path, how):
    """Ctrl-C reaches the launcher and its workers (the terminal's process group); SIGTERM
    (a scheduler) the launcher alone, whose agent stops the workers. Either way: one line,
    exit code 130, and a run that resumes to completion."""
    out = tmp_path / "run"
    run = started(*FLAGS, "--steps", "120", "--nproc", "2", out=out)
    wait_for_rows(out, 2, run)
    if how == "ctrl-c":
        os.killpg(run.pid, signal.SIGINT)
    else:
        run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert run.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1] == "interrupted: finished measurements are saved; rerun with --resume"
    assert not complete(out)
    rows = len(pd.read_csv(out / "metrics.csv"))
    assert rows >= 2
    sgn_lab("--resume", out=out)
    assert complete(out) and len(pd.read_csv(out / "metrics.csv")) == 120 // 4 + 1


def test_compare_runs_each_method_in_n_processes(runs, tmp_path):
    """compare --nproc 2 runs every method as measure --nproc 2 does: the same files."""
    saved = json.loads((runs["two"] / "config.json").read_text())
    method = saved["optimizer"]["method"]
    other = "momentum" if method == "sgd" else "sgd"
    flags = [f for i, f in enumerate(FLAGS) if "--seed" not in FLAGS[max(i - 1, 0):i + 1]]
    done = subprocess.run([*CLI, "compare", "--methods", f"{method},{other}", "--seeds", "3",
                           *flags,
                           "--nproc", "2", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    configs = {p: json.loads((p / "config.json").read_text()) for p in tmp_path.iterdir()
               if (p / "config.json").is_file()}
    assert sorted(c["optimizer"]["method"] for c in configs.values()) == sorted([method, other])
    assert all(c["complete"] and c["training"]["nproc"] == 2 for c in configs.values())
    same = next(p for p, c in configs.items() if c["optimizer"]["method"] == method)
    for want, got in zip(tables(runs["two"]), tables(same), strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_figures_run_their_measurements_in_n_processes(tmp_path):
    """The quick spectrum figure over 2 processes, with DDP and with FSDP: its runs have nproc
    2, and its table is the one-process table to float32 rounding (eigenvalues within 1e-6 of
    the largest)."""
    tables_by_n = {}
    for n, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        out = tmp_path / f"{n}-{parallel}"
        done = subprocess.run([*CLI, "figures", "--quick", "--only", "spectrum", "--nproc",
                               str(n), "--parallel", parallel, "--out", str(out)],
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-3000:]
        config = json.loads((out / "runs" / "spectrum" / "config.json").read_text())
        assert config["training"]["nproc"] == n and config["complete"]
        assert config["training"]["parallel"] == parallel
        tables_by_n[n, parallel] = pd.read_csv(out / "spectrum.csv")
    one = tables_by_n[1, "ddp"]
    top = one["eigenvalue"].abs().max()
    for two in (tables_by_n[2, "ddp"], tables_by_n[2, "fsdp"]):
        assert one.shape == two.shape and (one["k"] == two["k"]).all()
        assert (one["eigenvalue"] - two["eigenvalue"]).abs().max() <= 1e-6 * top


def test_compare_under_torchrun_asks_for_nproc(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_main(monkeypatch, capsys, "compare", "--out", str(tmp_path))
    assert code == 2 and "run it with --nproc N, not under torchrun" in err


def test_resuming_with_another_nproc_lists_it(monkeypatch, capsys, runs):
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", str(runs["two"]),
                            "--resume", *FLAGS, "--nproc", "3")
    assert code == 2 and "nproc" in err and len(err.strip().splitlines()) == 1
