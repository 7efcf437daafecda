"""benchmarks/bench_grads.py in its quick mode, in this process: the script cannot rot.

The run covers a model without a sequence (the MLP) and a padded token batch (BERT with an
attention mask, right padding): every method's Gram is checked against a loop of
single-sample backward passes before it is timed, and a tool that is not installed (CI
installs none of BackPACK, Opacus, nngeometry, ASDL) or cannot compute this Gram is a row
saying "n/a" and why, never a number.
"""

from __future__ import annotations

import builtins
import csv

import pytest
import torch
from helpers import benchmark_script
from torch import nn

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_grads") as module:
        yield module


def test_quick_run_checks_every_number_against_the_loop(bench, tmp_path):
    out = tmp_path / "results.csv"
    assert bench.main(["--quick", "--models", "mlp,bert-padded", "--batches", "6",
                       "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, method) for m in ("mlp", "bert-padded") for method in bench.METHODS}
    for r in rows:
        if r["method"] == "floor":
            assert float(r["ratio_to_floor"]) == 1.0
        elif r["gram_check"] == "n/a":
            assert r["median_s"] == "" and r["note"], r  # a reason, never a number
        else:
            assert r["gram_check"] in ("ok", "FAIL") and float(r["median_s"]) > 0, r
            assert r["checked_against"].startswith("loop float32"), r
    ours = {(r["model"], r["method"]): r for r in rows
            if r["method"] in ("vmap", "gram", "loop")}
    assert len(ours) == 6
    for r in ours.values():
        assert r["gram_check"] == "ok" and float(r["gram_rel_err"]) <= bench.GRAM_RTOL, r
    by = {(r["model"], r["method"]): r for r in rows}
    # No hook tool takes BERT's token positions for samples without saying so.
    for method in ("nngeometry", "asdl", "asdl-kernel", "backpack"):
        assert by[("bert-padded", method)]["gram_check"] == "n/a"


def test_padded_losses_are_the_mean_over_each_samples_real_tokens(bench):
    model, (ids, mask), y = bench.make_problem("gpt2-256-padded", 4)
    assert bool((mask == 0).any()) and bool((y == -100).any())
    lengths = mask.sum(dim=1)
    assert int(lengths.min()) >= 128 // 4 and torch.equal(ids * mask, ids)
    with torch.no_grad():
        out = model(ids, mask)
        losses = bench.per_sample_losses(out, y)
        for i in range(4):  # a batch of one under nn.CrossEntropyLoss(): the per-sample loss
            one = nn.CrossEntropyLoss()(model(ids[i : i + 1], mask[i : i + 1]), y[i : i + 1])
            assert torch.allclose(losses[i], one, rtol=1e-5)
    # The unpadded twin: same weights and, where not padding, the same tokens.
    twin, (ids2, mask2), _ = bench.make_problem("gpt2-256-unpadded", 4)
    assert bool(mask2.all()) and torch.equal(ids2 * mask, ids)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(),
                                                 strict=True))


def test_reference_in_blocks_equals_the_reference_in_one_piece(bench):
    model, x, y = bench.make_problem("mlp", 5)
    whole, how = bench.reference_gram(model, x, y, float64=False)
    d = sum(p.numel() for p in model.parameters())
    blocks, how_blocks = bench.reference_gram(model, x, y, float64=False, limit=2 * d * 4 * 2)
    assert how == "float32" and how_blocks == "float32 in blocks of 2 samples"
    assert torch.allclose(blocks, whole, rtol=1e-6)


@pytest.mark.parametrize("method", ["backpack", "opacus", "nngeometry", "asdl", "asdl-kernel"])
def test_a_tool_that_does_not_import_is_unavailable(bench, monkeypatch, method):
    real_import = builtins.__import__
    roots = {"backpack", "opacus", "nngeometry", "asdl"}

    def refuse(name, *args, **kwargs):
        if name.partition(".")[0] in roots:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    model, x, y = bench.make_problem("mlp", 4)
    with pytest.raises(bench.Unavailable, match="does not import"):
        bench.prepare(method, model, x, y)
