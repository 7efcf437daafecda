"""benchmarks/bench_distributed.py in its quick mode (2 processes, gloo, localhost): the
script cannot rot, its formula is the one written in its docstring, and a wrong count fails.

The quick run forks 2 processes of this one (about a second); the whole module takes ~15 s
on 2 cores.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_distributed") / "results.csv"
    code = bench.main(["--quick", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    return code, rows


def test_quick_run_passes_its_checks_and_writes_every_section(quick):
    code, rows = quick
    assert code == 0  # 1 when a check fails
    sections = Counter(r["section"] for r in rows)
    assert set(sections) == {"volume", "link", "weak", "eig", "cross", "projection",
                             "validation"}
    assert all(r["status"] in ("", "ok") for r in rows)
    # 4 models × 2 n × 2 routes × 2 ranks; 4 N × 3 interconnects × 2 speeds × 2 payloads
    assert sections["volume"] == 32 and sections["projection"] == 48


def test_measured_volumes_equal_the_formula(quick):
    _, rows = quick
    volume = [r for r in rows if r["section"] == "volume"]
    assert {r["model"] for r in volume} == {"mlp-16", "mlp-64", "mlp-seq", "gpt2"}
    assert {(r["route"], r["nproc"]) for r in volume} == {("gram", "2"), ("vmap", "2")}
    for r in volume:
        assert int(r["payload_bytes"]) == int(r["payload_formula"]) > 0
        assert int(r["sum_bytes"]) == int(r["sum_formula"])
        n, d = int(r["n"]), int(r["d"])
        extra = 8 * d if r["route"] == "vmap" else 0
        assert int(r["sum_bytes"]) == 8 * n * n + 8 * d + extra
        assert float(r["gram_rel_err"]) <= 1e-4 and r["same_as_rank0"] == "True"
        if r["route"] == "vmap":  # gradients only: Σ_{s≠r} 4·n_s·d
            assert int(r["payload_bytes"]) == int(r["gradients_only_bytes"])
        else:
            assert int(r["payload_bytes"]) <= int(r["gradients_only_bytes"])
    # the MLP over positions takes both routes: its first layer is cheaper as gradients
    seq = next(r for r in volume if r["model"] == "mlp-seq" and r["route"] == "gram")
    assert (int(seq["params_factors"]), int(seq["params_gradients"])) == (5, 1)


def test_weak_scaling_and_projection_rows(quick):
    _, rows = quick
    weak = {int(r["nproc"]): r for r in rows if r["section"] == "weak"}
    assert set(weak) == {1, 2}
    assert [int(weak[N]["n"]) for N in (1, 2)] == [4, 8]  # n = n0·N
    assert float(weak[1]["efficiency"]) == 1.0
    assert float(weak[2]["payload_bytes"]) > 0 and float(weak[1]["payload_bytes"]) == 0
    assert float(weak[2]["cross_entries_max"]) == 16  # the one 4 × 4 block, on rank 0
    projection = [r for r in rows if r["section"] == "projection"]
    assert {int(r["nproc"]) for r in projection} == {8, 16, 32, 64}
    for r in projection:
        parts = sum(float(r[k]) for k in ("local_s", "cross_s", "comm_s", "eig_s"))
        assert math.isclose(parts, float(r["total_s"]), rel_tol=1e-4)
        assert 0 < float(r["comm_share"]) < 1


def test_the_formula_by_hand(bench):
    spec = bench.ModelSpec("tiny", "mlp", 4, inputs=3)
    # weight 4×3: factors 4·(3+4) = 28 < 48; bias 16; 4×4: 32 < 64; bias 16; 10×4: 56 < 160;
    # bias 40: 188 bytes a sample on the Gram path; d = 12+4+16+4+40+10 = 86
    pieces = bench.architecture(spec)
    assert sum(p.gram_bytes for p in pieces) == 188 and sum(p.numel for p in pieces) == 86
    model, *_ = bench.build(spec, 2)
    assert sum(p.numel() for p in model.parameters()) == 86
    # n = 5 over 2 ranks: 3 and 2 samples; rank 0 receives rank 1's 2
    assert bench.formula(spec, 5, 2, 0, "gram") == {
        "payload": 2 * 188, "sum": 8 * 25 + 8 * 86, "d": 86, "gradients_only": 2 * 4 * 86}
    assert bench.formula(spec, 5, 2, 1, "vmap")["payload"] == 3 * 4 * 86
    assert bench.formula(spec, 5, 2, 1, "vmap")["sum"] == 8 * 25 + 2 * 8 * 86
    # over T = 16 positions a 64 × 12 weight is cheaper as gradients: 16·76·4 > 768·4
    seq = {p.name: p for p in bench.architecture(bench.FULL_MODELS[3])}
    assert seq["inner.weight"].chosen == "gradients" and seq["mixer.weight"].chosen == "factors"


def test_the_cost_model_by_hand(bench):
    costs = bench.Costs(local_per_sample=1e-3, cross_per_entry=1e-6, eig_a=1e-9, eig_b=0.0,
                        payload_per_sample=1000.0, collectives_per_source=10.0, d=100, n0=10)
    link = bench.Link("test", 1e9, 1e-5)
    p = bench.project(costs, 8, link)
    assert p["n"] == 80
    assert math.isclose(p["local_s"], 0.01)
    assert math.isclose(p["cross_s"], 4 * 100 * 1e-6)  # ⌊8/2⌋ blocks of 10 × 10
    assert math.isclose(p["payload_s"], 7 * 10 * 1000 / 1e9)
    assert math.isclose(p["reduce_s"], 2 * 7 / 8 * (8 * 80**2 + 8 * 100) / 1e9)
    assert math.isclose(p["latency_s"], (8 * 10 + 2) * 1e-5)
    assert math.isclose(p["eig_s"], 1e-9 * 80**3)
    # serialised: a block after each of the 8 broadcasts instead of the busiest rank's 4
    assert math.isclose(p["total_serial_s"], p["total_s"] + (8 - 4) * 100 * 1e-6)
    gpu = bench.project(costs, 8, link, speedup=100.0)
    assert math.isclose(gpu["local_s"], 1e-4) and gpu["comm_s"] == p["comm_s"]


def test_a_wrong_count_fails_the_check(bench):
    row = {"route": "gram", "payload_bytes": 104, "payload_formula": 100, "sum_bytes": 8,
           "sum_formula": 8, "other_bytes": 0, "d": 1, "d_formula": 1, "choice_formula": "same",
           "gradients_only_bytes": 400, "gram_rel_err": 0.0, "mean_rel_err": 0.0,
           "same_as_rank0": True}
    assert "payload 104 != formula 100" in bench.volume_failures(row)
    assert bench.volume_failures(dict(row, payload_bytes=100)) == ""
    assert "Gram vs one process" in bench.volume_failures(dict(row, payload_bytes=100,
                                                               gram_rel_err=1e-3))


def test_the_script_returns_1_when_the_formula_is_off(bench, monkeypatch, tmp_path):
    """End to end: 4 bytes more in the formula, and the run fails."""
    right = bench.formula

    def off_by_four(*args, **kwargs):
        f = right(*args, **kwargs)
        return dict(f, payload=f["payload"] + 4)

    monkeypatch.setattr(bench, "formula", off_by_four)
    out = tmp_path / "results.csv"
    assert bench.main(["--quick", "--parts", "volume", "--out", str(out)]) == 1
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["status"] == "CHECK FAILED" for r in rows)
