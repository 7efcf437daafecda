"""The layers instrument: the per-layer table at every measurement, by the Gram path and by
vmap, against the loop reference; layers.csv in the run directory, written, loaded and resumed."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import interrupt_at, loop_grads, seeded
from torch import nn
from torch.nn import functional as F

from sgn_lab import layer_noise_scale, load_run
from sgn_lab.run import INSTRUMENTS, NoiseProbe
from sgn_lab.run.config import parse
from sgn_lab.run.loop import run_measurement
from sgn_lab.run.recorder import SPECTRUM_IDENTITY
from sgn_lab.run.rundir import LAYERS_FILE, TIMING_COLUMNS
from sgn_lab.stats.layers import LAYER_COLUMNS

D = torch.float64


class NormMLP(nn.Module):
    def __init__(self, norm=True):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8) if norm else nn.Identity()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def problem(norm=True):
    with seeded(0):
        model = NormMLP(norm).to(D)
        x = torch.randn(40, 5, dtype=D)
        y = torch.randint(0, 3, (40,))
    return model, x, y


def numbers(table):
    return table.select_dtypes("number").to_numpy()


def test_layers_is_a_built_in_instrument():
    assert "layers" in INSTRUMENTS and not INSTRUMENTS["layers"].needs_grads


@pytest.mark.parametrize("grads", ["gram", "vmap"])
def test_probe_table_equals_the_loop_reference_and_its_total_is_the_sgn(grads):
    model, x, y = problem()
    probe = NoiseProbe(model, F.cross_entropy, x, y, every=1, samples=16, batch_size=8,
                       instruments=["sgn", "layers"], grads=grads)
    result = probe.measure(3)
    table = result.layers
    assert list(table.columns) == ["step", *LAYER_COLUMNS] and (table["step"] == 3).all()
    idx = probe.probe_indices(3)
    want = layer_noise_scale(loop_grads(model, F.cross_entropy, x[idx], y[idx]), model=model)
    assert list(table["name"]) == list(want["name"])
    np.testing.assert_allclose(numbers(table.drop(columns="step")), numbers(want), rtol=1e-9,
                               atol=1e-15)
    total = table[table["kind"] == "total"].iloc[0]
    for column in ("trace", "grad_sq_norm", "grad_sq_norm_se", "noise_scale",
                   "noise_scale_se"):
        assert total[column] == pytest.approx(getattr(result.noise, column), rel=1e-9)
    group = table[(table["kind"] == "group") & (table["name"] == "layernorm")].iloc[0]
    for column, name in (("noise_scale", "noise_scale_layernorm"),
                         ("noise_scale_se", "noise_scale_layernorm_se"),
                         ("trace", "trace_layernorm"), ("grad_sq_norm", "grad_sq_norm_layernorm"),
                         ("trace_fraction", "trace_fraction_layernorm")):
        assert result.row[name] == group[column]


def test_layers_alone_on_auto_checks_the_gram_and_reports_coverage():
    model, x, y = problem()
    probe = NoiseProbe(model, F.cross_entropy, x, y, every=1, samples=12,
                       instruments=["layers"], grads="auto", verify=4)
    result = probe.measure(0)
    assert result.noise is None and probe.coverage is not None
    assert probe.take_verify() is None  # taken once; then the functions' own first-call checks
    assert len(result.layers) and math.isfinite(result.row["trace_layernorm"])


def test_a_model_without_norm_layers_has_nan_layernorm_columns():
    model, x, y = problem(norm=False)
    probe = NoiseProbe(model, F.cross_entropy, x, y, every=1, samples=12,
                       instruments=["layers"], grads="gram")
    result = probe.measure(0)
    assert "group" not in set(result.layers["kind"])
    assert math.isnan(result.row["noise_scale_layernorm"])


def lm_config(**overrides):
    base = dict(task="markov:n=200,context=8,vocab=12", model="gpt2", width=16, depth=1,
                heads=2, steps=30, measure_every=10, probe_samples=16, batch_size=8,
                device="cpu", method="sgd", lr=0.5, instruments=["eval", "sgn", "layers"],
                grads="gram")
    return parse({**base, **overrides})


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    return load_run(run_measurement(lm_config(), tmp_path_factory.mktemp("lm") / "full"))


def test_run_writes_layers_csv_one_row_per_step_and_name(lm_run):
    assert (lm_run.path / LAYERS_FILE).is_file()
    layers = lm_run.layers
    assert list(layers.columns) == [*SPECTRUM_IDENTITY, "step", *LAYER_COLUMNS]
    assert sorted(layers["step"].unique()) == [0, 10, 20, 30]
    assert not layers.duplicated(["step", "name", "kind"]).any()
    per_step = layers.groupby("step")["name"].apply(list)
    assert all(names == per_step.iloc[0] for names in per_step)  # the same rows every step
    assert (layers["run"] == lm_run.config["run"]).all() and (layers["method"] == "sgd").all()
    # the layernorm group holds the transformer's LayerNorm parameters (2 per LayerNorm)
    group = layers[(layers["kind"] == "group") & (layers["name"] == "layernorm")]
    assert len(group) == 4 and (group["dim"] == 16 * 2 * 3).all()
    # the total is the sgn instrument's measurement, the flat columns the group's
    total = layers[layers["kind"] == "total"].set_index("step")
    metrics = lm_run.metrics.set_index("step")
    np.testing.assert_allclose(total["trace"], metrics["trace"], rtol=1e-9)
    np.testing.assert_allclose(total["noise_scale"], metrics["noise_scale"], rtol=1e-6)
    np.testing.assert_allclose(group.set_index("step")["noise_scale"],
                               metrics["noise_scale_layernorm"], rtol=1e-12)


def test_a_killed_and_resumed_run_keeps_the_same_layer_rows(lm_run, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_measurement(lm_config(), tmp_path / "cut", progress=interrupt_at(15))
    partial = load_run(tmp_path / "cut")
    assert not partial.complete and partial.layers["step"].max() == 10
    resumed = load_run(run_measurement(None, tmp_path / "cut", resume=True))
    assert resumed.complete
    pd.testing.assert_frame_equal(lm_run.layers, resumed.layers, check_exact=True)
    drop = list(TIMING_COLUMNS)
    pd.testing.assert_frame_equal(lm_run.metrics.drop(columns=drop),
                                  resumed.metrics.drop(columns=drop), check_exact=True)


def test_vmap_run_writes_the_same_table_and_runs_without_it_write_none(lm_run, tmp_path):
    vmap = load_run(run_measurement(lm_config(grads="vmap", steps=10), tmp_path / "vmap"))
    gram = lm_run.layers[lm_run.layers["step"] <= 10]
    assert list(vmap.layers["name"]) == list(gram["name"])
    np.testing.assert_allclose(numbers(vmap.layers), numbers(gram), rtol=1e-4, atol=1e-9)
    plain = run_measurement(lm_config(instruments=["sgn"], steps=10), tmp_path / "plain")
    assert not (plain / LAYERS_FILE).exists() and load_run(plain).layers.empty
