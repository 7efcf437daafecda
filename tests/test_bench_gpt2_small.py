"""benchmarks/bench_gpt2_small.py in its quick mode, in this process: the script cannot rot.

The quick model (a 2-layer, width-128 GPT-2 with a tied head over a 1024-token vocabulary)
goes through the same functions as the 124M-parameter measurement: the floor, the Gram +
mean gradient + noise_stats path with chunking, and the checks that the benchmark reports.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import benchmark_script

pytest.importorskip("transformers")



@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_gpt2_small") as module:
        yield module


def test_quick_run_writes_checked_rows(bench, tmp_path):
    out = tmp_path / "results.csv"
    assert bench.main(["--quick", "--out", str(out)]) == 0  # 1 when a check fails
    rows = {r["method"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"floor", "floor-accum", "spectrum"}
    assert all(r["status"] == "ok" for r in rows.values())
    spectrum = rows["spectrum"]
    assert int(spectrum["d"]) == 658_944 and spectrum["chunk_size"] == "4"
    for key in ("diag_rel_err", "offdiag_rel_err", "mean_rel_err"):
        assert float(spectrum[key]) <= bench.RTOL
    assert float(rows["floor"]["ratio_to_floor"]) == 1.0
    assert float(spectrum["peak_rss_gb"]) >= float(spectrum["model_rss_gb"]) > 0
    assert "ghost" in spectrum["routes"] or "per-sample" in spectrum["routes"]


def test_chunked_spectrum_matches_the_floor_and_the_loop(bench, tmp_path):
    """Three chunks of 2 (three passes of 4 samples): K's diagonal and one off-diagonal entry
    against single-sample backward passes, ḡ against the floor's gradient."""
    setting = dataclasses.replace(bench.QUICK, n=6)
    grad_file = str(tmp_path / "grad.pt")
    floor = bench.run_method("floor", setting, 2, grad_file)
    assert floor["seconds"] > 0 and Path(grad_file).exists()
    row = bench.run_method("spectrum", setting, 2, grad_file)
    assert row["passes"] == bench.passes_of(6, 2) == 3 and row["pass_samples"] == 4
    assert row["mean_checked_against"] == "floor"
    assert bench.checks_pass(row) is True
    assert row["trace_over_n"] > 0 and row["trace_S"] > 0 and 1 <= row["effective_rank"] <= 5
    assert sum(g["count"] for g in row["route_groups"]) == 28  # the quick model's parameters
    table = bench.markdown([dict(floor, ratio_to_floor=1.0, load_avg_mean=0.0,
                                 load_avg_max=0.0),
                            dict(row, ratio_to_floor=row["seconds"] / floor["seconds"],
                                 load_avg_mean=0.0, load_avg_max=0.0)])
    assert table.count("\n") == 3 and "✓" in table


def test_a_wrong_gram_fails_the_check(bench):
    model, x, y = bench.build(dataclasses.replace(bench.QUICK, n=2))
    params = bench.params_of(model)
    K = torch.zeros(2, 2, dtype=torch.float64)
    for i in range(2):
        g = torch.autograd.grad(bench.loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
        K[i, i] = sum(float(t.double().square().sum()) for t in g)
    assert bench.check_diagonal(model, x, y, K)["diag_rel_err"] <= bench.RTOL
    assert bench.check_diagonal(model, x, y, K * (1 + 1e-3))["diag_rel_err"] > bench.RTOL
