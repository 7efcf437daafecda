"""``sgn-lab measure --nproc N --parallel fsdp``, end to end on gloo (CPU, localhost).

FSDP2 shards the model's parameters, gradients and optimizer state over the ranks; the
measurement gathers the parameters and splits the probe set as DDP does. Every number must be
the one-process number to float32 rounding (the tolerances of test_measure_nproc.py), for the
MLP over 2 and 3 processes and for GPT-2 (tied embeddings, attention) over 2; the noise scale
of the reduce-scatter must be DDP's; a run killed after two measurements and resumed (its
checkpoint gathered whole on rank 0, loaded back into shards) must match the uninterrupted run
bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
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
)

MLP = ["--task", "gaussian-mixture", "--width", "32", "--depth", "2", "--steps", "12",
       "--measure-every", "4", "--probe-samples", "13", "--batch-size", "12", "--seed", "3",
       "--instruments", "sgn,tails,eval,layers"]
GPT2 = ["--task", "markov", "--model", "gpt2", "--width", "32", "--depth", "2", "--heads", "2",
        "--method", "momentum", "--lr", "0.1", "--batch-size", "8", "--steps", "4",
        "--measure-every", "2", "--probe-samples", "8", "--instruments", "sgn,eval,layers",
        "--seed", "1"]
FSDP = ["--parallel", "fsdp"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out = {name: root / name for name in ("one", "two", "three", "ddp", "killed", "gpt2-one",
                                          "gpt2-two")}
    sgn_lab(*MLP, out=out["one"])
    sgn_lab(*MLP, "--nproc", "2", *FSDP, out=out["two"])
    sgn_lab(*MLP, "--nproc", "3", *FSDP, out=out["three"])
    sgn_lab(*MLP, "--nproc", "2", out=out["ddp"])
    killed = started(*MLP, "--nproc", "2", *FSDP, out=out["killed"])
    wait_for_rows(out["killed"], 2, killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(30)
    assert not complete(out["killed"])
    sgn_lab("--resume", out=out["killed"])
    sgn_lab(*GPT2, out=out["gpt2-one"])
    sgn_lab(*GPT2, "--nproc", "2", *FSDP, out=out["gpt2-two"])
    return out


@pytest.mark.parametrize("pair", [("one", "two"), ("one", "three"), ("gpt2-one", "gpt2-two")])
def test_fsdp_gives_the_one_process_numbers(runs, pair):
    assert_same_numbers(runs[pair[0]], runs[pair[1]])
    # Per layer: the sums are float32-rounded to 1e-6 (within a 1e-5 bound over many small
    # layers); |G_P|² = |ḡ_P|² − tr S_P/n is a difference, rounded relative to its terms.
    want, got = (pd.read_csv(runs[name] / "layers.csv") for name in pair)
    for column in ("trace", "trace_fraction", "mean_sq_norm"):
        np.testing.assert_allclose(got[column], want[column], rtol=1e-5, err_msg=column)
    terms = want.mean_sq_norm + want.trace
    assert (np.abs(got.grad_sq_norm - want.grad_sq_norm) <= 1e-5 * terms).all()


def test_a_killed_fsdp_run_resumes_bit_for_bit(runs):
    for want, got in zip(tables(runs["two"]), tables(runs["killed"]), strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(runs["killed"] / "gns.csv"),
                                  pd.read_csv(runs["two"] / "gns.csv"), check_exact=True)
    # The checkpoint holds whole tensors by name, gathered on rank 0, as one process saves.
    saved, one = (torch.load(runs[name] / "checkpoint.pt", weights_only=False)["model"]
                  for name in ("killed", "one"))
    assert {k: t.shape for k, t in saved.items()} == {k: t.shape for k, t in one.items()}


def test_the_reduce_scatter_noise_scale_is_ddps(runs):
    """The same norms from other places: float32 sums in another order (1e-6 relative); the
    estimates are differences of the two norms, so their error is relative to the norms."""
    sharded, ddp = (pd.read_csv(runs[name] / "gns.csv") for name in ("two", "ddp"))
    assert list(sharded.step) == list(ddp.step) == list(range(12))
    for column in ("local_sq_norm", "global_sq_norm"):
        np.testing.assert_allclose(sharded[column], ddp[column], rtol=1e-6)
    scale = ddp.local_sq_norm + ddp.global_sq_norm
    big, small = 12, 6
    for column, factor in (("sq_norm_estimate", big / (big - small)),
                           ("trace_estimate", 1 / (1 / small - 1 / big))):
        assert (np.abs(sharded[column] - ddp[column]) <= 4e-6 * factor * scale).all(), column


@pytest.mark.parametrize(("args", "message"), [
    (["--parallel", "fsdp"], "parallel 'fsdp' shards the model over processes: give nproc >= 2"),
    (["--nproc", "2", "--parallel", "fsdp", "--method", "gaussian"],
     "method 'gaussian' draws noise over whole parameters or steps on extra gradients, which "
     "parallel 'fsdp' does not support: use parallel 'ddp'"),
    (["--nproc", "2", "--parallel", "fsdp", "--batch-size", "4"],
     "the updates instrument steps copies of the optimizer, whose state parallel 'fsdp' "
     "shards: leave it out (e.g. --instruments sgn,tails,eval)"),
    (["--fsdp-blocks", "Linear"], "fsdp_blocks applies to parallel 'fsdp' only"),
])
def test_what_fsdp_cannot_do_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, args,
                                                    message):
    code, out, err = run_main(monkeypatch, capsys, "measure", "--out", str(tmp_path / "r"),
                              *args)
    assert code == 2 and "Traceback" not in out + err
    assert " ".join(err.split()) == f"error: {message}"


def test_compare_runs_each_method_sharded(runs, tmp_path):
    """compare --nproc 2 --parallel fsdp: each method's run is measure's, file for file."""
    flags = [f for i, f in enumerate(MLP) if "--seed" not in MLP[max(i - 1, 0):i + 1]]
    done = subprocess.run([*CLI, "compare", "--methods", "pnm,sgd", "--seeds", "3", *flags,
                           "--nproc", "2", *FSDP, "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    configs = {p: json.loads((p / "config.json").read_text()) for p in tmp_path.iterdir()
               if (p / "config.json").is_file()}
    assert sorted(c["optimizer"]["method"] for c in configs.values()) == ["pnm", "sgd"]
    assert all(c["complete"] and c["training"]["parallel"] == "fsdp" for c in configs.values())
    same = next(p for p, c in configs.items() if c["optimizer"]["method"] == "pnm")
    for want, got in zip(tables(runs["two"]), tables(same), strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_an_unknown_block_class_is_one_line(tmp_path):
    done = subprocess.run([*CLI, "measure", "--out", str(tmp_path / "r"), *MLP, "--nproc", "2",
                           *FSDP, "--fsdp-blocks", "Block"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("error: no module of class Block in the model; its classes: Flatten, "
                         "Linear, ReLU, Sequential")
    assert "Traceback" not in done.stderr
