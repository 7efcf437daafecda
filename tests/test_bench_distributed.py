"""benchmarks/bench_distributed.py in its quick mode (2 processes, gloo, localhost): the
script cannot rot, its formula is the one written in its docstring (and its route rule the
library's cost model), and a wrong count or rule fails the run.

The quick run forks 2 processes of this one (about a second); the whole module takes ~20 s
on 2 cores.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import Counter

import pytest
from helpers import benchmark_script

pytest.importorskip("transformers")



@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_distributed") as module:
        yield module


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_distributed") / "results.csv"
    code = bench.main(["--quick", "--out", str(out)])
    return code, list(csv.DictReader(out.open()))


def test_quick_run_passes_its_checks_and_writes_every_section(quick):
    code, rows = quick
    assert code == 0  # 1 when a check fails
    sections = Counter(r["section"] for r in rows)
    assert set(sections) == {"volume", "link", "weak", "eig", "projection", "validation"}
    assert all(r["status"] in ("", "ok") for r in rows)
    # 3 models × 2 n × 2 routes × 2 ranks; 4 N × 3 interconnects × 2 speeds
    assert sections["volume"] == 24 and sections["projection"] == 24


def test_measured_volumes_equal_the_formula(quick):
    _, rows = quick
    volume = [r for r in rows if r["section"] == "volume"]
    assert {r["model"] for r in volume} == {"mlp-16", "mlp-seq", "gpt2"}
    assert {(r["route"], r["nproc"]) for r in volume} == {("gram", "2"), ("vmap", "2")}
    for r in volume:
        assert int(r["payload_bytes"]) == int(r["payload_formula"]) > 0
        assert int(r["sum_bytes"]) == int(r["sum_formula"])
        n, d = int(r["n"]), int(r["d"])
        extra = 8 * d if r["route"] == "vmap" else 0
        assert int(r["sum_bytes"]) == 8 * n * n + 8 * d + extra
        assert float(r["gram_rel_err"]) <= 1e-4 and r["same_as_rank0"] == "True"
        assert r["choice_formula"] == "same"
        if r["route"] == "vmap":  # gradients only: Σ_{s≠r} 4·n_s·d
            assert int(r["payload_bytes"]) == int(r["gradients_only_bytes"])
        else:
            assert int(r["payload_bytes"]) <= int(r["gradients_only_bytes"])
    # the sequence MLP's mixer (16 × 16, T = 4) is ghost, so factors, up to 4 samples a rank:
    # n = 9 splits 5 + 4, and the two ranks send it differently
    seq = {(int(r["n"]), int(r["rank"])): (int(r["params_factors"]), int(r["params_gradients"]))
           for r in volume if r["model"] == "mlp-seq" and r["route"] == "gram"}
    # (its three biases are per-sample gradients already and travel as such)
    assert seq == {(6, 0): (2, 4), (6, 1): (2, 4), (9, 0): (1, 5), (9, 1): (2, 4)}


def test_weak_scaling_and_projection_rows(quick):
    _, rows = quick
    weak = {(int(r["nproc"]), int(r["rank"])): r for r in rows if r["section"] == "weak"}
    assert set(weak) == {(1, 0), (2, 0), (2, 1)}
    assert [int(weak[(N, 0)]["n"]) for N in (1, 2)] == [4, 8]  # n = n0·N
    assert float(weak[(1, 0)]["efficiency"]) == 1.0
    assert float(weak[(2, 0)]["payload_bytes"]) > 0 and float(weak[(1, 0)]["payload_bytes"]) == 0
    # the one 4 × 4 cross block, half of its rows on each rank (Ranks.cross_tasks)
    assert [int(weak[(2, r)]["cross_entries"]) for r in (0, 1)] == [8, 8]
    projection = [r for r in rows if r["section"] == "projection"]
    assert {int(r["nproc"]) for r in projection} == {8, 16, 32, 64}
    for r in projection:
        parts = sum(float(r[k]) for k in ("local_s", "cross_s", "comm_s", "eig_s"))
        assert math.isclose(parts, float(r["total_s"]), rel_tol=1e-4)
        assert 0 < float(r["comm_share"]) < 1


def test_the_formula_by_hand(bench):
    spec = bench.ModelSpec("tiny", "mlp", 4, inputs=3)
    # weight 4×3: factors 4·(3+4) = 28 < 48; bias 16; 4×4: 32 < 64; bias 16; 10×4: 56 < 160;
    # bias 40: 188 bytes a sample on the Gram path (T = 1: always ghost); d = 86
    pieces = bench.architecture(spec)
    assert sum(p.bytes(3) for p in pieces) == 188 and sum(p.numel for p in pieces) == 86
    model, *_ = bench.build(spec, 2)
    assert sum(p.numel() for p in model.parameters()) == 86
    # n = 5 over 2 ranks: 3 and 2 samples; rank 0 receives rank 1's 2
    f = bench.formula(spec, 5, 2, 0, "gram")
    assert (f["payload"], f["sum"], f["d"], f["gradients_only"]) == (
        2 * 188, 8 * 25 + 8 * 86, 86, 2 * 4 * 86)
    assert bench.formula(spec, 5, 2, 1, "vmap")["payload"] == 3 * 4 * 86
    assert bench.formula(spec, 5, 2, 1, "vmap")["sum"] == 8 * 25 + 2 * 8 * 86
    # over T = 16 positions: the 64 × 12 weight has more bytes as factors, the 64 × 64 one
    # fewer (16·128 < 4096) but the per-sample route is cheaper: both go as gradients
    seq = {p.name: p for p in bench.architecture(bench.FULL_MODELS[3])}
    assert seq["mixer.weight"].factors < seq["mixer.weight"].gradients
    assert [seq[k].chosen(32) for k in ("inner.weight", "mixer.weight", "head.weight")] == [
        "gradients", "gradients", "factors"]
    # the ghost rule, by hand: 16 × 16 at T = 4 is ghost up to n = 4 (equal costs at 4)
    assert 4 * 4 * 32 * 16 == 4 * 4 * 256 + 4 * 4 * 256
    assert bench.ghost(4, 4, 16, 16) and not bench.ghost(5, 4, 16, 16)
    # above 2 GiB of per-sample gradients never per-sample: GPT-2 small's tied head
    assert bench.ghost(64, 1024, 50257, 768) and not bench.ghost(64, 1024, 3072, 768)


def test_the_ghost_rule_is_the_librarys_cost_model(bench):
    from sgn_lab.grads.terms import outer_route

    for n, T, p, q in itertools.product((1, 3, 16, 64), (1, 2, 4, 32), (3, 64, 768),
                                        (10, 128, 50257)):
        assert bench.ghost(n, T, p, q) == (outer_route(n, T, p, q, 4) == "ghost")


def test_the_cost_model_by_hand(bench):
    # (N−1)/2 blocks, ⌊N/2⌋ other ranks' payloads held at once
    assert [bench.busiest(N) for N in (2, 3, 4, 8)] == [(0.5, 1), (1, 1), (1.5, 2), (3.5, 4)]
    costs = bench.Costs(local_per_sample=1e-3, compact_per_sample=1e-4, cross_per_entry=1e-6,
                        eig_a=1e-9, eig_b=0.0, payload_per_sample=1000.0,
                        collectives_per_source=10.0, d=100, n0=10)
    link = bench.Link("test", 1e9, 1e-5)
    p = bench.project(costs, 8, link)
    assert p["n"] == 80 and p["payload_bytes"] == 7 * 10 * 1000
    assert p["kept_bytes"] == 4 * 10 * 1000
    assert math.isclose(p["local_s"], 10 * 1.1e-3)
    assert math.isclose(p["cross_s"], 3.5 * 100 * 1e-6)
    assert math.isclose(p["payload_s"], 8 * 10 * 1000 / 1e9)  # N broadcasts in turn
    assert math.isclose(p["reduce_s"], 2 * 7 / 8 * (8 * 80**2 + 8 * 100) / 1e9)
    assert math.isclose(p["latency_s"], (8 * 10 + 2) * 1e-5)
    assert math.isclose(p["eig_s"], 1e-9 * 80**3)
    gpu = bench.project(costs, 8, link, speedup=100.0)
    assert math.isclose(gpu["local_s"], 1.1e-4) and gpu["comm_s"] == p["comm_s"]


def test_a_wrong_count_fails_the_check(bench):
    row = {"payload_bytes": 104, "payload_formula": 100, "sum_bytes": 8, "sum_formula": 8,
           "other_bytes": 0, "d": 1, "d_formula": 1, "choice_formula": "same",
           "gradients_only_bytes": 400, "gram_rel_err": 0.0, "mean_rel_err": 0.0,
           "same_as_rank0": True}
    assert "payload 104 != formula 100" in bench.volume_failures(row)
    assert bench.volume_failures(dict(row, payload_bytes=100)) == ""
    assert "gram vs one process" in bench.volume_failures(dict(row, payload_bytes=100,
                                                               gram_rel_err=1e-3))
    assert "choice" in bench.volume_failures(dict(row, payload_bytes=100,
                                                  choice_formula="DIFFERENT"))


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


def test_the_script_returns_1_under_the_bytes_only_rule(bench, monkeypatch, tmp_path):
    """End to end: factors wherever fewer bytes (the rule before the cost model) fails."""
    monkeypatch.setattr(bench, "ghost", lambda *args, **kwargs: True)
    out = tmp_path / "results.csv"
    assert bench.main(["--quick", "--parts", "volume", "--out", str(out)]) == 1
    failed = {(r["model"], r["n"], r["rank"]) for r in csv.DictReader(out.open())
              if r["status"] == "CHECK FAILED"}
    assert {("mlp-seq", "9", "0"), ("mlp-seq", "9", "1")} <= failed
    assert not any(model == "mlp-16" for model, _, _ in failed)  # T = 1: always ghost
