"""The per-sample Gram path against G Gᵀ from a loop of single-sample backward passes.

Every rule of ``sgn_lab.grads.rules`` (linear, matmul, addmm, convolutions, embedding, norms,
parameters added, multiplied or concatenated), every route of the cost model, the vmap route
for uses no rule covers, layouts the old module-level path got wrong (sequence-first inputs,
inputs without a sample axis, inputs broadcast over the batch), tied and shared parameters,
the chunked Gram, verify=, the coverage report and bad input. The reference is
``helpers.loop_matrix`` (float64 unless stated), never sgn_lab itself.
"""

import math

import pytest
import torch
from helpers import loop_matrix, relative_error, seeded
from torch import nn
from torch.nn import functional as F

import sgn_lab
import sgn_lab.grads.rules as rules
import sgn_lab.grads.terms as terms
from sgn_lab.grads import (
    GramMismatchError,
    SampleMixingError,
    SampleMixingWarning,
    flatten_grads,
    gram_and_mean_gradient,
    gram_result,
    per_sample_grads,
    per_sample_gram,
    per_sample_gram_coverage,
)

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


def check(model, x, y, loss_fn=F.cross_entropy, rtol=1e-10, samples="independent"):
    """The Gram and the mean gradient equal the loop's; returns the coverage."""
    result = gram_result(model, loss_fn, x, y, with_mean=True, samples=samples)
    G = loop_matrix(model, loss_fn, x, y)
    n = len(y)
    assert result.gram.dtype == D and result.gram.shape == (n, n)
    assert relative_error(result.gram, G @ G.T) <= rtol
    assert relative_error(result.mean, G.mean(dim=0)) <= rtol
    assert torch.equal(result.gram, result.gram.T)
    return result.coverage


def labels(n, classes=3, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


# --- matrix products ----------------------------------------------------------------------


def test_mlp_with_inplace_activation_takes_the_fast_routes():
    with seeded(0):
        model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).double()
        x = torch.randn(9, 5, dtype=D)
    coverage = check(model, x, labels(9))
    assert set(coverage.routes.values()) <= {"ghost", "per-sample"}
    assert coverage.routes["0.weight"] == "ghost"  # T = 1: (a aᵀ) ⊙ (δ δᵀ) is cheaper


@pytest.mark.parametrize(("length", "width", "out", "route"),
                         [(2, 32, 32, "ghost"), (40, 2, 3, "per-sample")])
def test_linear_over_positions_takes_the_cheaper_route(length, width, out, route):
    with seeded(1):
        model = nn.Sequential(nn.Linear(width, out), nn.Tanh(), nn.Flatten(),
                              nn.Linear(out * length, 2)).double()
        x = torch.randn(6, length, width, dtype=D)
    coverage = check(model, x, labels(6, 2))
    assert coverage.routes["0.weight"] == route


def test_both_routes_of_one_term_agree():
    with seeded(2):
        term = terms.Outer(torch.randn(5, 4, 3, dtype=D), torch.randn(5, 4, 6, dtype=D), "t")
    per_sample = terms.materialise(term)
    blocks = terms._blocks(term.left, term.right, term.left, term.right)
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


class Products(nn.Module):
    """Parameters entering through matmul, mm, addmm (HF Conv1D), a parameter on the left."""

    def __init__(self):
        super().__init__()
        self.right = nn.Parameter(torch.randn(4, 5))
        self.left = nn.Parameter(torch.randn(3, 6))
        self.conv1d_w, self.conv1d_b = nn.Parameter(torch.randn(5, 6)), nn.Parameter(torch.randn(6))
        self.vec = nn.Parameter(torch.randn(6, 4))
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # x (n, T, 4)
        h = torch.tanh(x @ self.right)  # (T, 5)
        h = torch.tanh(torch.addmm(self.conv1d_b, h.reshape(-1, 5), self.conv1d_w, beta=0.5,
                                   alpha=2.0)).reshape(x.shape[0], -1, 6)
        h = torch.tanh(torch.matmul(self.left, h.transpose(1, 2)))  # (n, 3, T)
        v = torch.tanh(torch.mm(self.vec, x[:, 0].T).T)  # (n, 6): one position per sample
        return self.head(h.mean(dim=2) + v[:, :3])


def test_matmul_mm_and_addmm_with_a_parameter_on_either_side():
    with seeded(4):
        model = Products().double()
        x = torch.randn(6, 7, 4, dtype=D)
    coverage = check(model, x, labels(6, 2))
    assert coverage.names("vmap") == []
    assert coverage.to_frame().set_index("name").loc["conv1d_w", "operations"] == "addmm"


# --- convolutions -------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding="same"),
    dict(kernel_size=2, padding="same"),  # even span: torch pads asymmetrically
    dict(kernel_size=2, bias=False),
    dict(kernel_size=3, groups=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
])
@pytest.mark.parametrize("channels", [2, 8])  # im2col + bmm, and the grouped weight gradient
def test_conv2d(conv, channels):
    with seeded(5):
        model = nn.Sequential(nn.Conv2d(channels, 4, **conv), nn.GroupNorm(2, 4), nn.ReLU(),
                              nn.Flatten(), nn.LazyLinear(3))
        x = torch.randn(6, channels, 9, 9)
        model(x)
    coverage = check(model.double(), x.double(), labels(6))
    assert coverage.routes["0.weight"] in ("ghost", "per-sample")


def test_conv1d_conv3d_and_a_regression_loss():
    with seeded(6):
        model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.Tanh(),
                              nn.Conv1d(8, 2, 3, stride=2), nn.Flatten(), nn.LazyLinear(1))
        x = torch.randn(7, 1, 20)
        model(x)
        volume = nn.Sequential(nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), nn.Flatten(), nn.LazyLinear(1))
        v = torch.randn(5, 2, 4, 4, 4)
        volume(v)

    def half_mse(out, t):
        return 0.5 * (out.squeeze(-1) - t).pow(2).mean()

    check(model.double(), x.double(), torch.randn(7, dtype=D), loss_fn=half_mse)
    check(volume.double(), v.double(), torch.randn(5, dtype=D), loss_fn=half_mse)


class TwiceConv(nn.Module):
    """One convolution applied twice: its Gram sums over both calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.small = nn.Conv2d(8, 16, 3, stride=2)  # 5x5 -> 2x2 outputs: the ghost route
        self.head = nn.LazyLinear(2)

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        return self.head(torch.tanh(self.small(h)).flatten(1))


def test_a_convolution_called_twice():
    with seeded(7):
        model = TwiceConv()
        x = torch.randn(5, 8, 5, 5)
        model(x)
    coverage = check(model.double(), x.double(), labels(5, 2))
    assert coverage.to_frame().set_index("name").loc["conv.weight", "operations"] == "conv + conv"


# --- embeddings ---------------------------------------------------------------------------


class Embedded(nn.Module):
    def __init__(self, vocab=200, **options):
        super().__init__()
        self.tokens = nn.Embedding(vocab, 4, **options)
        self.positions = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # position ids (1, T), broadcast over the batch as in GPT-2
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1]).unsqueeze(0))
        return self.head(torch.tanh(h).mean(dim=1))


@pytest.mark.parametrize("options", [{}, {"padding_idx": 0}, {"padding_idx": -1},
                                     {"scale_grad_by_freq": True}])
def test_embedding_options_and_broadcast_position_ids(options):
    with seeded(8):
        model = Embedded(**options).double()
        x = torch.randint(0, 200, (9, 6))
        x[1, :3] = x[0, :3]  # rows shared between samples and repeated within one
        x[2, 4] = x[2, 5] = 0
        x[3, :] = 199
    if options.get("scale_grad_by_freq"):
        # Counts over the batch couple the samples in the backward pass: the per-sample
        # gradients are those of batches of one, which must be asked for.
        with pytest.raises(SampleMixingError, match="gradient of the loss of a batch"):
            per_sample_gram(model, F.cross_entropy, x, labels(9))
        with pytest.warns(SampleMixingWarning):
            coverage = check(model, x, labels(9), samples="batch-of-one")
    else:
        coverage = check(model, x, labels(9))
    assert coverage.routes["tokens.weight"] == "ghost"  # few pairs share a row
    assert coverage.routes["positions.weight"] == "per-sample"  # every sample, every row


def test_embedding_pair_route_with_skewed_counts_and_small_blocks(monkeypatch):
    # Rows touched by 1, 2, 3, 7 and 30 samples fall into different power-of-two buckets; tiny
    # working blocks make each bucket take several pieces.
    with seeded(9):
        model = Embedded(vocab=500).double()
        x = torch.randint(5, 500, (30, 6))
        x[:, 0] = 1
        x[:7, 1] = 2
        x[7:10, 2] = 3
    monkeypatch.setattr(terms, "_BLOCK_ENTRIES", 64)
    coverage = check(model, x, labels(30))
    assert coverage.routes["tokens.weight"] == "ghost"


def test_embedding_max_norm_is_refused_by_both_paths():
    model = Embedded(max_norm=1.0).double()
    x = torch.randint(0, 200, (4, 6))
    for compute in (per_sample_gram, per_sample_grads):
        with pytest.raises(ValueError, match="embedding 'tokens' has max_norm=1.0"):
            compute(model, F.cross_entropy, x, labels(4))

    class Functional(nn.Module):  # the functional form too, named by its parameter's module
        def __init__(self):
            super().__init__()
            self.table = nn.Linear(3, 10)

        def forward(self, x):
            return F.embedding(x, self.table.weight, max_norm=2.0).mean(dim=1)

    with pytest.raises(ValueError, match="embedding 'table' has max_norm=2.0"):
        per_sample_gram(Functional(), F.cross_entropy, torch.randint(0, 10, (4, 2)), labels(4))


class TiedHead(nn.Module):
    """An embedding that is also the output layer, through F.linear or through .T."""

    def __init__(self, transposed):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)
        self.transposed = transposed

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x)))  # (n, T, 5): a logit per position
        if self.transposed:
            return (h @ self.emb.weight.T).mean(dim=1)
        return F.linear(h, self.emb.weight).mean(dim=1)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("n", [4, 40])  # cross term from both per-sample gradients, or factors
def test_tied_embedding_and_output_layer(transposed, n):
    with seeded(10):
        model = TiedHead(transposed).double()
        x = torch.randint(0, 7, (n, 3))
    coverage = check(model, x, torch.randint(0, 7, (n,)))
    assert coverage.routes["emb.weight"] in ("ghost", "per-sample")
    assert "cross terms" in coverage.to_frame().set_index("name").loc["emb.weight", "reason"]


def test_rows_outer_cross_term_from_factors():
    with seeded(11):
        outer = terms.Outer(torch.randn(4, 3, 7, dtype=D), torch.randn(4, 3, 5, dtype=D), "a")
        rows = terms.Rows(torch.randint(0, 7, (4, 2)), torch.randn(4, 2, 5, dtype=D), 7, "b")
    want = terms.materialise(rows) @ terms.materialise(outer).T
    assert relative_error(terms._rows_outer(rows, outer), want) < 1e-13


# --- normalisation layers -----------------------------------------------------------------


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(6)
        self.ln_nobias = nn.LayerNorm(6, bias=False)
        self.rms = nn.RMSNorm(6)
        self.gn = nn.GroupNorm(2, 4)
        self.scale = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x (n, 4, 6)
        h = self.ln_nobias(self.ln(x)) + self.rms(x)
        h = h + F.rms_norm(x, (6,), self.scale)  # eps=None: the dtype's eps
        h = self.gn(h.unsqueeze(-1)).squeeze(-1)
        return self.head(h.mean(dim=1))


def test_layer_group_and_rms_norms():
    with seeded(12):
        model = Norms().double()
        x = torch.randn(7, 4, 6, dtype=D)
    coverage = check(model, x, labels(7))
    assert coverage.names("vmap") == []


def test_frozen_parameters_and_groupnorm_without_bias():
    with seeded(13):
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4, affine=True), nn.Flatten(),
                              nn.LazyLinear(2))
        x = torch.randn(5, 1, 6, 6)
        model(x)
    model = model.double()
    model[0].bias.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    coverage = check(model, x.double(), labels(5, 2))
    assert "0.bias" not in coverage.routes and "1.weight" not in coverage.routes


# --- parameters combined with activations -------------------------------------------------


class Combined(nn.Module):
    """A position embedding added, a learned scale, a class token, subtraction with alpha."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 5, 4))
        self.shift = nn.Parameter(torch.randn(4))
        self.gamma = nn.Parameter(torch.randn(4))
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (n, 5, 4)
        h = x + self.pos
        h = torch.sub(h, self.shift, alpha=0.5)
        h = torch.tanh(h) * self.gamma
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)
        return self.head(torch.tanh(h).mean(dim=1))


def test_parameters_added_multiplied_and_concatenated():
    with seeded(14):
        model = Combined().double()
        x = torch.randn(6, 5, 4, dtype=D)
    coverage = check(model, x, labels(6))
    routes = coverage.routes
    assert routes["pos"] == routes["shift"] == routes["gamma"] == "per-sample"
    assert routes["cls"] == "vmap"  # .expand has no rule: the per-sample copy


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


class ShiftedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x + 1.0, self.weight, self.bias)


class SkipLinear(nn.Linear):
    def forward(self, x):
        return x


class DoubleLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(x, self.weight, self.bias)


class Stray(nn.Module):
    """Linear layers used in every way a module-level path cannot see."""

    def __init__(self):
        super().__init__()
        self.scaled, self.shifted = ScaledLinear(4, 4), ShiftedLinear(4, 4)
        self.skip, self.double_ = SkipLinear(4, 4), DoubleLinear(4, 4)
        self.keyword, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)  # spare: never called
        self.reused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.double_(self.skip(self.shifted(self.scaled(x)))))
        h = torch.tanh(self.keyword(input=h)) + h @ self.reused.weight.T
        return self.head(torch.tanh(self.reused(h)))


def test_parameters_used_outside_their_own_layer_stay_exact():
    with seeded(15):
        model = Stray().double()
        x = torch.randn(7, 4, dtype=D)
    coverage = check(model, x, labels(7))
    routes = coverage.routes
    assert routes["scaled.weight"] in ("ghost", "per-sample")  # 2.0 * W: an alias of W
    assert routes["spare.weight"] == routes["skip.weight"] == "none"
    assert routes["reused.weight"] in ("ghost", "per-sample")  # F.linear and .T: cross terms
    assert coverage.names("vmap") == []


class Scales(nn.Module):
    """A parameter times a number, divided by one, negated, and times an activation."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.g = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = F.linear(x, self.w / 4.0) - F.linear(x, -self.w * 3) + 0.5 * self.g * x[:, :3]
        return self.head(torch.tanh(h))


def test_parameters_scaled_by_numbers():
    with seeded(15):
        model = Scales().double()
    coverage = check(model, torch.randn(7, 4, dtype=D), labels(7, 2))
    assert coverage.names("vmap") == []


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


def test_a_module_applied_twice():
    with seeded(16):
        check(Shared().double(), torch.randn(6, 4, dtype=D), labels(6, 2))


class MHA(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, **options)
        self.head = nn.Linear(6, 3)

    def forward(self, q, k, v):
        return self.head(self.attn(q, k, v, need_weights=False)[0].mean(dim=1))


class SelfAttention(MHA):
    def forward(self, x):
        return super().forward(x, x, x)


class CrossAttention(MHA):
    def forward(self, x, memory):
        return super().forward(x, memory, memory)


def test_multihead_attention_packed_in_projection():
    # Self-attention: one linear with the packed weight. Separate q, k, v (or k = v): MHA
    # splits or chunks the packed weight, and each box of it is a linear of its own.
    with seeded(17):
        x, memory = torch.randn(5, 4, 6, dtype=D), torch.randn(5, 3, 6, dtype=D)
        cases = [(SelfAttention(batch_first=True).double(), x, "linear"),
                 (CrossAttention(batch_first=True).double(), (x, memory), "linear + linear"),
                 (MHA(batch_first=True).double(), (x, memory, memory.flip(1)),
                  "linear + linear + linear")]
    for model, inputs, operations in cases:
        coverage = check(model, inputs, labels(5))
        assert coverage.names("vmap") == []
        frame = coverage.to_frame().set_index("name")
        assert frame.loc["attn.in_proj_weight", "operations"] == operations
        assert "cross terms" not in frame.loc["attn.in_proj_weight", "reason"]


def test_multihead_attention_with_kdim_and_vdim():
    with seeded(18):
        model = MHA(batch_first=True, kdim=4, vdim=5).double()
        q, k, v = (torch.randn(5, t, e, dtype=D) for t, e in ((3, 6), (4, 4), (4, 5)))
    coverage = check(model, (q, k, v), labels(5))
    assert coverage.routes["attn.q_proj_weight"] in ("ghost", "per-sample")


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


class Slices(nn.Module):
    """Overlapping boxes of one parameter, a box of a box, and the whole of it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (n, 4)
        top, bottom = self.w.split([4, 2])
        h = F.linear(x, top) @ self.w[1:5] + F.linear(x, bottom.narrow(0, 1, 1)).sum(-1, True)
        return self.head(torch.tanh(h + x @ self.w.T[:, :4]))


def test_overlapping_slices_of_a_parameter():
    with seeded(19):
        model = Slices().double()
    coverage = check(model, torch.randn(6, 4, dtype=D), labels(6))
    assert coverage.routes["w"] in ("per-sample", "vmap")


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

    monkeypatch.setitem(rules.RULES, F.linear, rules.Rule("linear", real.slots, real.defaults,
                                                          off_by_ten_percent))
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
    import sgn_lab.grads.record as record

    with seeded(28):
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
        x = torch.randn(6, 4, dtype=D)
    assert check(model, x, labels(6)).routes["0.weight"] in ("ghost", "per-sample")
    monkeypatch.setattr(record, "_edge", record.get_gradient_edge)
    coverage = check(model, x, labels(6))
    assert coverage.routes["0.weight"] == "vmap"
    assert "modified in place through a view" in coverage.to_frame().set_index("name").loc[
        "0.weight", "reason"]
