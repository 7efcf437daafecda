"""Named instruments: each family of quantities switched on by name, and one's own."""

import math
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sgn_lab.cli.app import main
from sgn_lab.run import NoiseProbe
from sgn_lab.run.choices import INSTRUMENT_NAMES
from sgn_lab.run.instruments import (
    INSTRUMENTS,
    OPTIONS,
    Curvature,
    Layers,
    MinibatchTails,
    Updates,
    configured,
)
from sgn_lab.run.rundir import load_run

EVAL = {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}
TAILS = {"tail_index", "normality_pvalue", "normality_reject_fraction", "kurtosis"}


def problem():
    torch.manual_seed(0)
    x, y = torch.randn(200, 5, dtype=torch.float64), torch.randint(0, 3, (200,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, x, y


@dataclass(frozen=True)
class WeightNorm:
    """One's own instrument: the norm of the parameters."""

    name: str = "weight_norm"
    needs_grads: bool = False

    def __call__(self, measurement):
        params = measurement.probe.model.parameters()
        return {"weight_norm": float(torch.sqrt(sum((p.detach() ** 2).sum() for p in params)))}


def test_each_instrument_adds_its_columns_only():
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common = dict(x_test=x[:50], y_test=y[:50], every=1, samples=32, batch_size=16, seed=1,
                  optimizer=opt, update_repeats=3)
    only_eval = NoiseProbe(model, nn.functional.cross_entropy, x, y, instruments=["eval"],
                           **common).measure(0)
    assert EVAL <= set(only_eval.row) and "trace" not in only_eval.row
    assert only_eval.noise is None and only_eval.spectra.empty
    sgn = NoiseProbe(model, nn.functional.cross_entropy, x, y, instruments=["sgn"],
                     **common).measure(0)
    assert {"trace", "noise_scale", "noise_scale_se"} <= set(sgn.row)
    assert not (EVAL | TAILS) & set(sgn.row)
    assert set(sgn.spectra["kind"]) == {"sgn", "isotropic"}
    every = NoiseProbe(model, nn.functional.cross_entropy, x, y,
                       instruments=["updates", "tails", WeightNorm(), "sgn", "eval",
                                    "curvature", "layers", "minibatch-tails"], **common)
    assert [i.name for i in every.instruments] == [*INSTRUMENTS, "weight_norm"]
    assert every.grads == "vmap"  # curvature needs G
    row = every.measure(0).row
    assert {"update_trace", "hessian_top_eigenvalue", "weight_norm"} | TAILS <= set(row)
    expected = math.sqrt(sum(float((p ** 2).sum()) for p in model.parameters()))
    assert row["weight_norm"] == pytest.approx(expected)


def test_the_same_quantities_whichever_instruments_share_the_measurement():
    model, x, y = problem()
    alone = NoiseProbe(model, nn.functional.cross_entropy, x, y, every=1, samples=32, seed=2,
                       instruments=["tails"]).measure(4).row
    together = NoiseProbe(model, nn.functional.cross_entropy, x, y, every=1, samples=32,
                          seed=2, instruments=["sgn", "tails", "eval"]).measure(4).row
    for key in TAILS:
        assert alone[key] == together[key], key


def test_bad_instruments_are_named():
    model, x, y = problem()
    with pytest.raises(ValueError, match="unknown instrument 'hessian'"):
        NoiseProbe(model, nn.functional.cross_entropy, x, y, instruments=["hessian"])
    with pytest.raises(ValueError, match="instrument 'sgn' given twice"):
        NoiseProbe(model, nn.functional.cross_entropy, x, y, instruments=["sgn", "sgn"])
    with pytest.raises(ValueError, match="the updates instrument needs the optimizer"):
        NoiseProbe(model, nn.functional.cross_entropy, x, y, instruments=["updates"])


def test_the_registry_holds_the_names_the_config_chooses_from():
    assert tuple(INSTRUMENTS) == INSTRUMENT_NAMES
    for name, options in OPTIONS.items():  # every setting names an option of its instrument
        assert set(options.values()) <= set(vars(INSTRUMENTS[name]))


def test_each_instrument_owns_its_options():
    assert MinibatchTails((1, 8), draws=64) == MinibatchTails(batch_sizes=(1, 8), draws=64)
    assert Updates(5).repeats == 5 and Curvature(n_probes=8).max_iter == 100
    assert Layers().groups is None and not Updates.needs_grads and Curvature.needs_grads
    built = configured("minibatch-tails", {"shape_batch_sizes": (2,), "shape_draws": 16,
                                           "update_repeats": 3})
    assert built == MinibatchTails((2,), 16) and configured("updates", {}) == Updates()
    for bad in (lambda: MinibatchTails((0, 4)), lambda: MinibatchTails(draws=4),
                lambda: Updates(1), lambda: Curvature(n_probes=0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="unknown instrument 'hessian'"):
        configured("hessian", {})


def test_an_instrument_object_or_its_name_with_the_probe_options_measure_alike():
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common = dict(every=1, samples=32, batch_size=16, seed=1, optimizer=opt, grads="vmap")
    by_name = NoiseProbe(model, nn.functional.cross_entropy, x, y,
                         instruments=["minibatch-tails", "updates"], update_repeats=3,
                         shape_batch_sizes=(1, 4), shape_draws=16, **common)
    by_object = NoiseProbe(model, nn.functional.cross_entropy, x, y,
                           instruments=[Updates(3), MinibatchTails((1, 4), draws=16)],
                           **common)
    assert by_name.instruments == by_object.instruments
    a, b = by_name.measure(2).row, by_object.measure(2).row
    for key in ("update_trace", "tail_index_b4", "kurtosis_b1"):
        assert a[key] == b[key], key


def test_instruments_from_the_command_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "sgn-lab", "measure", "--task", "gaussian-mixture", "--width", "8", "--depth", "1",
        "--steps", "2", "--measure-every", "2", "--probe-samples", "16", "--device", "cpu",
        "--instruments", "sgn,tails,curvature", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    metrics = load_run(out).metrics
    assert {"hessian_top_eigenvalue", "tail_index", "trace"} <= set(metrics.columns)
    assert not EVAL & set(metrics.columns) and "update_trace" not in metrics.columns
    assert set(metrics["grads"]) == {"vmap"}


def test_accuracy_of_padded_tokens_is_over_the_real_targets_only():
    # Token targets (n, T) with IGNORE_INDEX at the padding: those positions predict nothing.
    from sgn_lab.models.losses import IGNORE_INDEX, token_cross_entropy

    torch.manual_seed(0)
    vocab, n, T = 7, 40, 6
    x = torch.randint(0, vocab, (n, T))
    y = torch.randint(0, vocab, (n, T))
    lengths = torch.randint(1, T + 1, (n,))
    y[torch.arange(T) >= lengths[:, None]] = IGNORE_INDEX
    model = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, vocab)).double()
    probe = NoiseProbe(model, token_cross_entropy, x, y, instruments=["eval"], every=1,
                       samples=8, eval_batch=16)
    loss, accuracy = probe.evaluate(x, y)
    with torch.no_grad():
        logits = model(x)
    hits, real = 0, 0
    for i in range(n):  # a plain loop over the real tokens of each sample
        for t in range(int(lengths[i])):
            hits += int(int(logits[i, t].argmax()) == int(y[i, t]))
            real += 1
    assert real == int(lengths.sum()) and accuracy == hits / real
    assert loss == pytest.approx(float(token_cross_entropy(logits, y)), rel=1e-12)
