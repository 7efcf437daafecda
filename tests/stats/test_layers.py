"""Per-layer noise scale: every row of layer_noise_scale against numpy from explicit per-sample
gradients (a loop of single-sample backward passes), with an explicit leave-one-out loop for the
jackknife errors; the Gram path's per-parameter Grams against vmap and the loop."""

import math

import numpy as np
import pytest
import torch
from helpers import loop_grads, seeded
from torch import nn
from torch.nn import functional as F

from sgn_lab import layer_noise_scale, noise_stats
from sgn_lab.grads import flatten_grads, gram_result, per_sample_grads
from sgn_lab.stats.layers import LAYER_COLUMNS, norm_parameters, parameter_grams

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


class NormMLP(nn.Module):
    """An MLP with a LayerNorm, and a parameter of the model's own (module ``<root>``)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))) * self.scale


def mlp_problem(n=12, seed=0):
    with seeded(seed):
        model = NormMLP().to(D)
        x = torch.randn(n, 5, dtype=D)
        y = torch.randint(0, 3, (n,))
    return model, F.cross_entropy, x, y


# --- the independent reference: numpy on explicit per-sample gradients -------------------------

def reference_row(G: np.ndarray) -> dict[str, float]:
    """tr S, |ḡ|², |G|², B and the jackknife errors of (n, d) per-sample gradients, from the
    definitions, the errors by an explicit leave-one-out loop."""

    def point(M):
        m = M.shape[0]
        mean = M.mean(axis=0)
        trace = ((M - mean) ** 2).sum() / (m - 1)
        sq = mean @ mean
        signal = sq - trace / m
        return trace, sq, signal, trace / signal if signal > 0 else math.nan

    n = G.shape[0]
    trace, sq, signal, scale = point(G)
    leave_out = np.array([point(np.delete(G, k, axis=0)) for k in range(n)])
    signals, ratios = leave_out[:, 2], leave_out[:, 0] / leave_out[:, 2]

    def se(values):
        return math.sqrt((n - 1) / n * ((values - values.mean()) ** 2).sum())

    return {"trace": trace, "mean_sq_norm": sq, "grad_sq_norm": signal,
            "grad_sq_norm_se": se(signals),
            "noise_scale": scale,
            "noise_scale_se": (se(ratios) if (signals > 0).all() else math.inf)
            if signal > 0 else math.nan,
            "nonpositive": not signal > 0}


def reference_table(grads: dict[str, torch.Tensor], groups: dict[str, list[str]]) -> dict:
    """(name, kind) -> reference row, for every parameter, module, group and the total."""
    flat = {k: g.reshape(g.shape[0], -1).double().numpy() for k, g in grads.items()}
    modules: dict[str, list[str]] = {}
    for k in flat:
        modules.setdefault(k.rpartition(".")[0] or "<root>", []).append(k)
    sets = {(k, "parameter"): [k] for k in flat}
    sets |= {(m, "module"): names for m, names in modules.items()}
    sets |= {(g, "group"): names for g, names in groups.items()}
    sets[("total", "total")] = list(flat)
    rows = {}
    for key, names in sets.items():
        G = np.concatenate([flat[k] for k in names], axis=1)
        rows[key] = {**reference_row(G), "dim": G.shape[1]}
    total = rows[("total", "total")]["trace"]
    for row in rows.values():
        row["trace_fraction"] = row["trace"] / total
    return rows


def assert_table_matches(table, reference, *, rtol=1e-10):
    assert list(table.columns) == list(LAYER_COLUMNS)
    assert {(r.name, r.kind) for r in table.itertuples()} == set(reference)
    for record in table.to_dict("records"):
        want = reference[(record["name"], record["kind"])]
        assert record["dim"] == want["dim"]
        assert record["nonpositive"] == want["nonpositive"], record["name"]
        for column in ("trace", "trace_fraction", "mean_sq_norm", "grad_sq_norm",
                       "grad_sq_norm_se", "noise_scale", "noise_scale_se"):
            got, expected = record[column], want[column]
            if math.isnan(expected) or math.isinf(expected):
                assert got == expected or (math.isnan(got) and math.isnan(expected)), column
            else:
                assert got == pytest.approx(expected, rel=rtol, abs=1e-14), (record["name"],
                                                                             column)


# --- tests ----------------------------------------------------------------------------------

def test_every_row_of_an_mlp_equals_numpy_on_loop_gradients():
    model, loss_fn, x, y = mlp_problem(n=16, seed=3)
    grads = loop_grads(model, loss_fn, x, y)
    table = layer_noise_scale(grads, model=model)
    # at this seed both cases occur: a defined B and an estimate |G|² <= 0
    assert table["nonpositive"].any() and table["noise_scale"].notna().sum() > 6
    groups = {"layernorm": ["norm.weight", "norm.bias"]}
    assert norm_parameters(model) == groups["layernorm"]
    assert_table_matches(table, reference_table(grads, groups))
    # parameters in order, then modules, the group, the total
    assert list(table["kind"]) == ["parameter"] * 7 + ["module"] * 4 + ["group", "total"]
    # named_parameters() order: the model's own parameter first
    assert list(table.loc[table["kind"] == "module", "name"]) == ["<root>", "fc1", "norm", "fc2"]


def test_modules_and_groups_are_sums_and_the_total_is_noise_stats():
    model, loss_fn, x, y = mlp_problem(n=16, seed=3)
    grads = loop_grads(model, loss_fn, x, y)
    table = layer_noise_scale(grads, model=model, groups={"heads": ["fc2.weight", "scale"]})
    by = {(r["name"], r["kind"]): r for r in table.to_dict("records")}
    params = table[table["kind"] == "parameter"]
    for column in ("trace", "grad_sq_norm", "mean_sq_norm", "dim", "trace_fraction"):
        # additive over disjoint sets: modules, groups and the total are sums of parameters
        for module in ("fc1", "norm", "fc2"):
            members = params[params["name"].str.startswith(module + ".")]
            assert by[(module, "module")][column] == pytest.approx(members[column].sum(),
                                                                   rel=1e-10)
        heads = params[params["name"].isin(["fc2.weight", "scale"])][column].sum()
        assert by[("heads", "group")][column] == pytest.approx(heads, rel=1e-10)
        assert by[("total", "total")][column] == pytest.approx(params[column].sum(), rel=1e-10)
    assert by[("total", "total")]["trace_fraction"] == pytest.approx(1.0)
    # the total is noise_stats of all the gradients, its jackknife included
    stats = noise_stats(flatten_grads(grads), shape=False)
    total = by[("total", "total")]
    for column in ("trace", "grad_sq_norm", "grad_sq_norm_se", "noise_scale",
                   "noise_scale_se"):
        assert total[column] == pytest.approx(getattr(stats, column), rel=1e-9), column
    assert total["dim"] == stats.dim


def test_grams_route_equals_the_gradients_route():
    model, loss_fn, x, y = mlp_problem()
    grads = loop_grads(model, loss_fn, x, y)
    from_grads = layer_noise_scale(grads, model=model)
    dims = {k: g[0].numel() for k, g in grads.items()}
    from_grams = layer_noise_scale(grams=parameter_grams(grads), dims=dims,
                                   groups={"layernorm": ["norm.weight", "norm.bias"]})
    from_model = layer_noise_scale(grams=parameter_grams(grads), model=model)
    for table in (from_grams, from_model):
        np.testing.assert_allclose(table.select_dtypes("number").to_numpy(),
                                   from_grads.select_dtypes("number").to_numpy(), rtol=1e-12)
        assert list(table["name"]) == list(from_grads["name"])


def test_gram_path_per_parameter_grams_equal_vmap_and_the_loop():
    model, loss_fn, x, y = mlp_problem(n=11)
    result = gram_result(model, loss_fn, x, y, per_parameter=True)
    vmap = parameter_grams(per_sample_grads(model, loss_fn, x, y))
    loop = parameter_grams(loop_grads(model, loss_fn, x, y))
    assert list(result.parameter_grams) == list(vmap) == list(loop)
    for name, K in result.parameter_grams.items():
        assert K.dtype == D and K.shape == (11, 11)
        torch.testing.assert_close(K, vmap[name], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(K, loop[name], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(sum(result.parameter_grams.values()), result.gram, rtol=1e-12,
                               atol=1e-14)
    # chunked: the Gram assembled from pairs of chunks, every parameter's too
    chunked = gram_result(model, loss_fn, x, y, per_parameter=True, chunk_size=4)
    for name, K in chunked.parameter_grams.items():
        torch.testing.assert_close(K, loop[name], rtol=1e-10, atol=1e-14)
    assert gram_result(model, loss_fn, x, y).parameter_grams is None  # off by default


def test_a_parameter_without_gradient_has_a_zero_gram():
    model, loss_fn, x, y = mlp_problem(n=6)
    model.unused = nn.Linear(2, 2).to(D)
    result = gram_result(model, loss_fn, x, y, per_parameter=True)
    assert torch.equal(result.parameter_grams["unused.weight"], torch.zeros(6, 6, dtype=D))
    table = layer_noise_scale(grams=result.parameter_grams, model=model)
    row = table[table["name"] == "unused.weight"].iloc[0]
    assert row["trace"] == 0 and row["nonpositive"] and math.isnan(row["noise_scale"])


def test_nonpositive_signal_is_nan_with_the_flag():
    n = 8
    v = torch.arange(1.0, 7.0, dtype=D)
    signs = torch.tensor([1.0, -1.0] * (n // 2), dtype=D)
    with seeded(3):
        grads = {"noise.weight": signs[:, None] * v,  # mean exactly 0: |G|² = −tr S/n < 0
                 "signal.weight": 5 + 0.1 * torch.randn(n, 4, dtype=D)}
    table = layer_noise_scale(grads)
    by = {(r["name"], r["kind"]): r for r in table.to_dict("records")}
    noise = by[("noise.weight", "parameter")]
    assert noise["nonpositive"] and math.isnan(noise["noise_scale"])
    assert math.isnan(noise["noise_scale_se"]) and noise["grad_sq_norm"] < 0
    signal = by[("signal.weight", "parameter")]
    assert not signal["nonpositive"] and signal["noise_scale"] > 0
    assert_table_matches(table, reference_table(grads, {}))
    assert not by[("total", "total")]["nonpositive"]
    assert "group" not in set(table["kind"])  # no model, no groups: no group rows


def test_transformer_rows_from_the_gram_path_equal_the_loop():
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager")

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = transformers.GPT2LMHeadModel(cfg)

        def forward(self, ids):
            return self.model(input_ids=ids).logits

    def loss_fn(logits, ids):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1))

    with seeded(0):
        model = LM().to(D)
        ids = torch.randint(0, 20, (10, 8))
    norms = norm_parameters(model)
    assert norms == [f"model.transformer.h.{i}.{ln}.{p}" for i in (0, 1) for ln in ("ln_1", "ln_2")
                     for p in ("weight", "bias")] + ["model.transformer.ln_f.weight",
                                                     "model.transformer.ln_f.bias"]
    result = gram_result(model, loss_fn, ids, ids, per_parameter=True)
    table = layer_noise_scale(grams=result.parameter_grams, model=model)
    grads = loop_grads(model, loss_fn, ids, ids)
    assert_table_matches(table, reference_table(grads, {"layernorm": norms}), rtol=1e-8)
    vmap = parameter_grams(per_sample_grads(model, loss_fn, ids, ids))
    for name, K in result.parameter_grams.items():
        torch.testing.assert_close(K, vmap[name], rtol=1e-9, atol=1e-12)


def test_norm_classes_are_found_by_type_and_by_name():
    class T5LayerNorm(nn.Module):  # a Hugging Face style norm of its own class
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    model = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.GroupNorm(2, 4), T5LayerNorm(),
                          nn.BatchNorm1d(4), nn.LayerNorm(4, elementwise_affine=False))
    model[1].weight.requires_grad_(False)
    assert norm_parameters(model) == ["2.weight", "2.bias", "3.weight"]


def test_bad_input_is_named():
    grads = {"a.weight": torch.randn(5, 3, dtype=D), "b.weight": torch.randn(5, 2, dtype=D)}
    with pytest.raises(ValueError, match="group 'g' names 'c.weight'"):
        layer_noise_scale(grads, groups={"g": ["c.weight"]})
    with pytest.raises(ValueError, match="either"):
        layer_noise_scale(grads, grams=parameter_grams(grads))
    grams = parameter_grams(grads)
    with pytest.raises(ValueError, match="needs dims"):
        layer_noise_scale(grams=grams)
    with pytest.raises(ValueError, match="'b.weight' is over 4 samples"):
        layer_noise_scale(grams={**grams, "b.weight": grams["b.weight"][:4, :4]},
                          dims={"a.weight": 3, "b.weight": 2})
    with pytest.raises(ValueError, match="d >= 1 of 'b.weight'"):
        layer_noise_scale(grams=grams, dims={"a.weight": 3})
    with pytest.raises(ValueError, match="at least 2 samples"):
        layer_noise_scale({"a": torch.randn(1, 3)})
    with pytest.raises(ValueError, match=r"got n\[a\]=0"):  # no sample at all: one line too
        layer_noise_scale({"a": torch.randn(0, 3)})
    table = layer_noise_scale(grams=grams, dims={"a.weight": 3, "b.weight": 2},
                              groups={"empty": []})
    assert "empty" not in set(table["name"])  # a group without parameters has no row
