"""The per-sample Gram path against G Gᵀ from a loop of single-sample backward passes.

What is not one rule's (each rule family has its own file in ``tests/grads/rules/``): every
route of the cost model, layouts the old module-level path got wrong (sequence-first inputs,
inputs without a sample axis, inputs broadcast over the batch), a module applied twice, uses
no torch function mode can see, the chunked Gram, dropout, verify=, precision, the coverage
report and bad input. The reference is the float64 loop of ``grads.oracle``, never sgn_lab
itself.
"""

import math
from dataclasses import replace

import pytest
import torch
from grads.oracle import D, check, labels
from grads.parameter_uses import Combined, Embedded, Stray
from helpers import loop_matrix, relative_error, seeded
from torch import nn
from torch.nn import functional as F

import sgn_lab
import sgn_lab.grads.rules as rules
import sgn_lab.grads.terms as terms
from sgn_lab.grads import (
    GramMismatchError,
    flatten_grads,
    gram_and_mean_gradient,
    gram_result,
    per_sample_grads,
    per_sample_gram,
    per_sample_gram_coverage,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the cost model and the layouts ----------------------------------------------------


def test_both_routes_of_one_term_agree():
    with seeded(2):
        term = terms.Outer(torch.randn(5, 4, 3, dtype=D), torch.randn(5, 4, 6, dtype=D), "t")
    per_sample = terms.materialise(term)
    blocks = terms.outer_cross(term.left, term.right, term.left, term.right)
    assert relative_error(blocks, per_sample @ per_sample.T) < 1e-13


def test_cost_model_is_the_documented_one(monkeypatch):
    # ghost n²T²(p+q) against per-sample nTpq + n²pq; T = 1 drops the T² factor.
    assert terms.outer_route(64, 1, 512, 512, 4) == "ghost"
    assert terms.outer_route(32, 128, 256, 256, 4) == "per-sample"
    assert terms.outer_route(4, 3, 2, 2, 4) == "per-sample"  # 4²·9·4 = 576 > 4·3·4 + 64
    monkeypatch.setattr(terms, "MATERIALISE_BYTES", 1000)
    assert terms.outer_route(32, 128, 256, 256, 4) == "ghost"  # too big to form


class SequenceFirst(nn.Module):
    """A Linear on a (T, n, E) tensor: the sample axis is the second."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x.transpose(0, 1))).mean(dim=0))


class OnTable(nn.Module):
    """A Linear applied to a learned (T, E) table with no sample axis."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 4))
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(x + self.mix(self.table)).mean(dim=1))


class OnBuffer(nn.Module):
    """A Linear applied to a (1, T, E) buffer, broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.register_buffer("codes", torch.randn(1, 6, 4))
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(x * self.mix(self.codes)).mean(dim=1))


class Token(nn.Module):
    """A (1, 1, E) token expanded over the batch, projected and prepended."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        t = self.mix(self.token.expand(x.shape[0], -1, -1))
        return self.head(torch.tanh(torch.cat([t, x], dim=1)).mean(dim=1))


@pytest.mark.parametrize("make", [SequenceFirst, OnTable, OnBuffer, Token])
def test_layouts_the_sample_axis_comes_from_vmap(make):
    # The module-level path was 6–1100 % off on these: it took axis 0 as the sample axis.
    with seeded(3):
        model = make().double()
        x = torch.randn(5, 6, 4, dtype=D)
    coverage = check(model, x, labels(5))
    assert coverage.routes["mix.weight"] in ("ghost", "per-sample")


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


def test_a_module_applied_twice():
    with seeded(16):
        check(Shared().double(), torch.randn(6, 4, dtype=D), labels(6, 2))


def test_an_operand_modified_in_place_after_use_is_never_read_stale():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            a = x * 2.0
            h = self.lin(a)
            a.add_(1.0)  # the weight's gradient needs the a before this
            return self.head(h + a)

    model = InPlace().double()
    x, y = torch.randn(4, 4, dtype=D), labels(4, 2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loop_matrix(model, F.cross_entropy, x, y)  # autograd itself refuses this model
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        per_sample_gram(model, F.cross_entropy, x, y)  # so does the Gram, never a stale a


def test_operations_torch_function_modes_cannot_see_take_vmap():
    with seeded(19):
        traced = torch.jit.trace(nn.Linear(5, 4).double(), torch.randn(2, 5, dtype=D))
        head = nn.Linear(4, 3).double()
    model = nn.Sequential(traced, nn.Tanh(), head)
    x, y = torch.randn(6, 5, dtype=D), labels(6)
    result = gram_result(model, F.cross_entropy, x, y)
    # A traced module's deep copy does not train its own parameters, so the reference loop
    # runs on the model itself, through torch.autograd.grad (no .grad is touched).
    params = list(model.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)]) for i in range(6)]
    G = torch.stack(rows)
    assert relative_error(result.gram, G @ G.T) < 1e-10
    coverage = result.coverage
    assert coverage.routes["0.weight"] == "vmap"
    assert "not a torch function" in coverage.to_frame().set_index("name").loc["0.weight",
                                                                                "reason"]


# --- dropout, chunks, verify --------------------------------------------------------------


def dropout_model():
    with seeded(20):
        return nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 3),
                             ).double()


def test_dropout_masks_are_those_of_per_sample_grads_under_the_same_seed():
    model, x, y = dropout_model(), torch.randn(9, 5, dtype=D), labels(9)
    with seeded(3):
        K = per_sample_gram(model, F.cross_entropy, x, y)
    with seeded(3):
        G = flatten_grads(per_sample_grads(model, F.cross_entropy, x, y, chunk_size=9))
    assert relative_error(K, G.double() @ G.double().T) < 1e-12
    with seeded(4):
        other = per_sample_gram(model, F.cross_entropy, x, y)
    assert relative_error(other, K) > 1e-3  # other masks


def test_chunked_gram_and_mean_equal_one_pass():
    with seeded(21):
        model = Embedded().double()
        x = torch.randint(0, 200, (11, 6))
    y = labels(11)
    K, mean = gram_and_mean_gradient(model, F.cross_entropy, x, y)
    for chunk in (1, 3, 5, 10):
        K_c, mean_c = gram_and_mean_gradient(model, F.cross_entropy, x, y, chunk_size=chunk)
        assert relative_error(K_c, K) < 1e-13 and relative_error(mean_c, mean) < 1e-13


def test_chunks_that_would_mix_dropout_draws_are_refused():
    with pytest.raises(ValueError, match="random numbers"):
        per_sample_gram(dropout_model(), F.cross_entropy, torch.randn(6, 5, dtype=D),
                        labels(6), chunk_size=3)


def test_verify_passes_on_exact_models_including_dropout():
    with seeded(22):
        model = Stray().double()
    result = gram_result(model, F.cross_entropy, torch.randn(7, 4, dtype=D), labels(7), verify=5)
    assert result.gram.shape == (7, 7)
    gram_result(dropout_model(), F.cross_entropy, torch.randn(8, 5, dtype=D), labels(8),
                verify=8)


def test_verify_names_the_parameter_of_a_wrong_rule(monkeypatch):
    real = rules.RULES[F.linear]

    def off_by_ten_percent(op):
        plan = real.plan(op)
        inner = plan.terms

        def terms_(saved, signal):
            return inner(saved, signal * 1.1)

        return rules.Plan(plan.takes, plan.declined, plan.keep, plan.sample, terms_)

    monkeypatch.setitem(rules.RULES, F.linear, replace(real, plan=off_by_ten_percent))
    with seeded(23):
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=D), labels(6)
    # The first call for a model checks itself; with the checks off nobody would know.
    with pytest.raises(GramMismatchError, match=r"0\.weight .*2\.bias"):
        per_sample_gram(model, F.cross_entropy, x, y)
    per_sample_gram(model, F.cross_entropy, x, y, verify=0)
    with pytest.raises(GramMismatchError, match=r"0\.weight .*2\.bias"):
        per_sample_gram(model, F.cross_entropy, x, y, verify=4)


# --- precision, report, errors ------------------------------------------------------------


def test_float32_and_bfloat16_within_their_precision():
    with seeded(24):
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        x = torch.randn(6, 2, 7, 7)
        model(x)
    y = labels(6)
    G = loop_matrix(model.double(), F.cross_entropy, x.double(), y)
    model = model.float()
    assert relative_error(per_sample_gram(model, F.cross_entropy, x, y), G @ G.T) < 1e-5
    # bf16: the products run in float32 from bf16 activations and signals (2^-8 relative).
    half = model.to(torch.bfloat16)
    K = per_sample_gram(half, F.cross_entropy, x.to(torch.bfloat16), y)
    assert relative_error(K, G @ G.T) < 4 * 2.0**-8
    gram_result(half, F.cross_entropy, x.to(torch.bfloat16), y, verify=6)


def test_coverage_report():
    with seeded(25):
        model = Combined().double()
    coverage = per_sample_gram_coverage(model, F.cross_entropy, torch.randn(4, 5, 4, dtype=D),
                                        labels(4))
    assert isinstance(coverage, sgn_lab.GramCoverage) and coverage.samples == 4
    frame = coverage.to_frame()
    assert list(frame.columns) == ["name", "route", "operations", "reason"]
    assert list(frame["name"]) == [n for n, _ in model.named_parameters()]
    assert set(frame["route"]) <= set(sgn_lab.grads.ROUTES)
    text = coverage.summary()
    assert "cls: expand (no rule)" in text and "per-sample pos, shift, gamma" in text
    assert "pos" in str(coverage)


def test_bad_input_gets_one_clear_error():
    x, y = torch.randn(4, 3), labels(4, 2)
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="scalar"):
        per_sample_gram(lin, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
    with pytest.raises(ValueError, match="same number of samples"):
        per_sample_gram(lin, F.cross_entropy, x, y[:3])
    bad = x.clone()
    bad[2, 0] = math.nan
    with pytest.raises(ValueError, match="sample 2"):
        per_sample_gram(lin, F.cross_entropy, bad, y)
    for key, value in (("chunk_size", 0), ("chunk_size", True), ("verify", -1), ("verify", 1.5)):
        with pytest.raises(ValueError, match=key):
            per_sample_gram(lin, F.cross_entropy, x, y, **{key: value})
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        per_sample_gram(frozen, F.cross_entropy, x, y)


def test_batchnorm_policy():
    x, y = torch.randn(4, 3), labels(4, 2)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="BatchNorm layer '1'"):
        per_sample_gram(bn, F.cross_entropy, x, y)
    bn(torch.randn(8, 3))  # running statistics
    K = per_sample_gram(bn, F.cross_entropy, x, y, batchnorm="eval")
    assert bn[1].training
    G = loop_matrix(bn.eval(), F.cross_entropy, x, y)
    assert relative_error(K, G @ G.T) < 1e-5


def test_centred_gram_gives_the_noise_trace():
    with seeded(26):
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        x = torch.randn(10, 3, dtype=D)
    K = per_sample_gram(model, F.cross_entropy, x, labels(10, 2))
    n = 10
    C = torch.eye(n, dtype=D) - 1.0 / n
    G = loop_matrix(model, F.cross_entropy, x, labels(10, 2))
    assert float(torch.trace(C @ K @ C)) / (n - 1) == pytest.approx(
        float(G.var(dim=0).sum()), rel=1e-10)


def test_no_hooks_left_and_torch_func_still_works():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), labels(5, 2)
    per_sample_gram(model, F.cross_entropy, x, y)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    per_sample_grads(model, F.cross_entropy, x, y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_loop():
    with seeded(27):
        model = Embedded().double().cuda()
        x = torch.randint(0, 200, (6, 6)).cuda()
    y = labels(6).cuda()
    K = per_sample_gram(model, F.cross_entropy, x, y, verify=6)
    G = loop_matrix(model, F.cross_entropy, x, y)
    assert K.device.type == "cuda" and relative_error(K, G @ G.T) < 1e-10


def test_an_edge_orphaned_by_an_in_place_op_on_a_view_is_recorded_again(monkeypatch):
    # Under vmap a linear layer's output is a view of its matmul's; an in-place activation
    # rebuilds the view's history. The pass records the base's edge; were it the view's, the
    # gradient would no longer reach it: that is detected, and the layer recorded again
    # through its per-sample copy.
    import sgn_lab.grads.gram as gram
    import sgn_lab.grads.record as record

    monkeypatch.setattr(gram, "record_chain", lambda *args: None)  # the vmap pass
    with seeded(28):
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
        x = torch.randn(6, 4, dtype=D)
    assert check(model, x, labels(6)).routes["0.weight"] in ("ghost", "per-sample")
    monkeypatch.setattr(record, "output_edge", record.get_gradient_edge)
    coverage = check(model, x, labels(6))
    assert coverage.routes["0.weight"] == "vmap"
    assert "modified in place through a view" in coverage.to_frame().set_index("name").loc[
        "0.weight", "reason"]


class _Wrapped(nn.Module):
    """A chain inside a module of its own: recorded under vmap, not by the plain pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad",
                                                                              "inference_mode"])
@pytest.mark.parametrize("kind", ["chain", "vmap-pass"])
def test_an_evaluation_context_does_not_change_the_gram(mode, kind):
    """Called inside an evaluation loop, the Gram path still differentiates (as vmap's
    torch.func.grad does); before, the vmap pass found no signal and returned K = 0."""
    with seeded(41):
        model = (_Wrapped() if kind == "vmap-pass" else _Wrapped().inner).double()
        x = torch.randn(6, 4, dtype=D)
    y = labels(6)
    want = loop_matrix(model, F.cross_entropy, x, y)
    with mode():
        K, mean = gram_and_mean_gradient(model, F.cross_entropy, x, y)
        assert not torch.is_grad_enabled()
    assert relative_error(K, want @ want.T) <= 1e-10
    assert relative_error(mean, want.mean(dim=0)) <= 1e-10
