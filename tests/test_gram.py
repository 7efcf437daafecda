"""The per-sample Gram fast path against G Gᵀ from per-sample gradients, layer by layer."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sgn_lab.grads import flatten_grads, per_sample_grads
from sgn_lab.gram import per_sample_gram, per_sample_gram_coverage

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_gram(model, loss_fn, x, y):
    """G Gᵀ in float64 from the vmap per-sample gradients (themselves tested against a loop)."""
    G = flatten_grads(per_sample_grads(model, loss_fn, x, y)).double()
    return G @ G.T


def assert_gram_exact(model, x, y, loss_fn=F.cross_entropy, rtol=1e-10):
    K = per_sample_gram(model, loss_fn, x, y)
    ref = reference_gram(model, loss_fn, x, y)
    assert K.dtype == torch.float64 and K.shape == (len(y), len(y))
    assert torch.allclose(K, ref, rtol=rtol, atol=rtol * float(ref.abs().max())), float(
        (K - ref).abs().max() / ref.abs().max()
    )
    assert torch.allclose(K, K.T)


class Tokens(nn.Module):
    """Embedding (with padding) + LayerNorm + attention + Linear over a sequence."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(self.emb(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(torch.relu(self.mix(h)).mean(dim=1))


class Tied(nn.Module):
    """The embedding matrix is also the output projection (weight tying)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)

    def forward(self, x):
        return torch.tanh(self.mix(self.emb(x))).mean(dim=1) @ self.emb.weight.T


class Shared(nn.Module):
    """One Linear applied twice (its Gram sums over both calls)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


def seeded(seed=0):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def test_linear_mlp_with_inplace_activation():
    gen = seeded()
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).double()
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    assert_gram_exact(model, x, torch.randint(0, 3, (9,), generator=gen))
    assert per_sample_gram_coverage(model)[1] == []


def test_linear_over_sequence_dimensions_both_routes():
    # Short sequences take the (nT)×(nT) route, long wide ones the per-sample route.
    gen = seeded(1)
    for length, width in ((3, 4), (40, 2)):
        model = nn.Sequential(nn.Linear(width, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
        x = torch.randn(6, length, width, generator=gen)
        model(x)
        model = model.double()
        assert_gram_exact(model, x.double(), torch.randint(0, 2, (6,), generator=gen))


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, dilation=2, padding="same"),
        dict(kernel_size=2, bias=False),
    ],
)
@pytest.mark.parametrize("channels", [2, 8])  # im2col + bmm, and the grouped weight gradient
def test_conv2d(conv, channels):
    gen = seeded(2)
    model = nn.Sequential(nn.Conv2d(channels, 4, **conv), nn.GroupNorm(2, 4), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(6, channels, 9, 9, generator=gen)
    model(x)
    assert_gram_exact(model.double(), x.double(), torch.randint(0, 3, (6,), generator=gen))


def test_conv1d_and_regression_loss():
    gen = seeded(3)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.Tanh(), nn.Conv1d(8, 2, 3, stride=2),
                          nn.Flatten(), nn.LazyLinear(1))
    x = torch.randn(7, 1, 20, generator=gen)
    model(x)

    def half_mse(out, t):
        return 0.5 * (out.squeeze(-1) - t).pow(2).mean()

    y = torch.randn(7, generator=gen, dtype=torch.float64)
    assert_gram_exact(model.double(), x.double(), y, loss_fn=half_mse)


def test_embedding_layernorm_attention_mixed_with_fallback():
    gen = seeded(4)
    model = Tokens().double()
    x = torch.randint(0, 11, (5, 4), generator=gen)
    x[0, :2] = 0  # padding tokens
    assert_gram_exact(model, x, torch.randint(0, 3, (5,), generator=gen))
    fast, slow = per_sample_gram_coverage(model)
    assert "emb.weight" in fast and "attn.in_proj_weight" in slow


def test_weight_tying_and_shared_modules_are_exact():
    gen = seeded(5)
    assert_gram_exact(Tied().double(), torch.randint(0, 7, (5, 3), generator=gen),
                      torch.randint(0, 7, (5,), generator=gen))
    assert_gram_exact(Shared().double(), torch.randn(6, 4, generator=gen, dtype=torch.float64),
                      torch.randint(0, 2, (6,), generator=gen))


def test_frozen_parameters_and_groupnorm_without_bias():
    gen = seeded(6)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(5, 1, 6, 6, generator=gen)
    model(x)
    model = model.double()
    model[0].bias.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    assert_gram_exact(model, x.double(), torch.randint(0, 2, (5,), generator=gen))


def test_float32_model_within_float32_accuracy():
    gen = seeded(7)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(12, 10, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    assert_gram_exact(model, x, y, rtol=1e-5)


def test_centred_gram_gives_the_noise_trace():
    gen = seeded(8)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(10, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (10,))
    K = per_sample_gram(model, F.cross_entropy, x, y)
    n = len(y)
    C = torch.eye(n, dtype=torch.float64) - 1.0 / n
    G = flatten_grads(per_sample_grads(model, F.cross_entropy, x, y))
    trace = float(torch.trace(C @ K @ C)) / (n - 1)
    assert trace == pytest.approx(float(G.var(dim=0).sum()), rel=1e-10)


def test_errors_and_batchnorm_policy():
    gen = seeded(9)
    x, y = torch.randn(4, 3, generator=gen), torch.randint(0, 2, (4,), generator=gen)
    with pytest.raises(ValueError, match="scalar"):
        per_sample_gram(nn.Linear(3, 2), lambda o, t: F.cross_entropy(o, t, reduction="none"),
                        x, y)
    with pytest.raises(ValueError, match="same number of samples"):
        per_sample_gram(nn.Linear(3, 2), F.cross_entropy, x, y[:3])
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="BatchNorm layer '1'"):
        per_sample_gram(bn, F.cross_entropy, x, y)
    bn(torch.randn(8, 3))  # running statistics
    K = per_sample_gram(bn, F.cross_entropy, x, y, batchnorm="eval")
    assert bn[1].training
    bn.eval()
    ref = reference_gram(bn, F.cross_entropy, x, y)
    assert torch.allclose(K, ref, rtol=1e-5, atol=1e-7)
    bad = x.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="sample 2"):
        per_sample_gram(nn.Linear(3, 2), F.cross_entropy, bad, y)


def test_hooks_are_removed_so_torch_func_still_works():
    gen = seeded(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3, generator=gen), torch.randint(0, 2, (5,), generator=gen)
    per_sample_gram(model, F.cross_entropy, x, y)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    per_sample_grads(model, F.cross_entropy, x, y)  # vmap over the same modules afterwards


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference():
    gen = seeded(11)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    model = model.double().cuda()
    x = torch.randn(6, 1, 6, 6, generator=gen, dtype=torch.float64).cuda()
    assert_gram_exact(model, x, torch.randint(0, 2, (6,), generator=gen).cuda())


def test_mean_gradient_from_the_same_pass_and_noise_stats_from_gram():
    from sgn_lab.gram import gram_and_mean_gradient
    from sgn_lab.noise import noise_stats

    gen = seeded(12)
    model = Tokens().double()  # ghost and fallback parameters mixed
    x, y = torch.randint(0, 11, (12, 4), generator=gen), torch.randint(0, 3, (12,), generator=gen)
    K, mean = gram_and_mean_gradient(model, F.cross_entropy, x, y)
    G = flatten_grads(per_sample_grads(model, F.cross_entropy, x, y))
    assert torch.allclose(mean, G.mean(dim=0), rtol=1e-10, atol=1e-14)
    fast = noise_stats(gram=K, dim=G.shape[1], mean=mean, batch_size=4)
    full = noise_stats(G, batch_size=4)
    for key in ("trace", "mean_sq_norm", "grad_sq_norm", "noise_scale", "minibatch_trace",
                "effective_rank", "participation_ratio", "stable_rank", "top1_energy",
                "powerlaw_exponent", "isotropic_effective_rank"):
        assert getattr(fast, key) == pytest.approx(getattr(full, key), rel=1e-9), key
    assert torch.allclose(fast.eigenvalues, full.eigenvalues, rtol=1e-8)
    assert torch.equal(fast.mean, mean)


def test_convolution_routes_shared_calls_and_asymmetric_same_padding():
    # Small outputs with many channels take the (nT)×(nT) block route, large ones the
    # per-sample weight gradients; a convolution applied twice sums over both calls; an
    # even kernel with padding="same" pads asymmetrically and falls back to vmap.
    gen = seeded(13)

    class TwiceConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.small = nn.Conv2d(8, 16, 3, stride=2)  # 5x5 -> 2x2 outputs
            self.odd = nn.Conv1d(2, 2, 2, padding="same")
            self.head = nn.LazyLinear(2)

        def forward(self, x):
            h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
            s = torch.tanh(self.small(h)).flatten(1)
            o = self.odd(s.reshape(len(x), 2, -1)).flatten(1)
            return self.head(torch.cat([s, o], dim=1))

    model = TwiceConv()
    x = torch.randn(5, 8, 5, 5, generator=gen)
    model(x)
    model = model.double()
    assert_gram_exact(model, x.double(), torch.randint(0, 2, (5,), generator=gen))
    assert per_sample_gram_coverage(model)[1] == ["odd.weight", "odd.bias"]


def test_embedding_routes_agree_with_reference(monkeypatch):
    # Positions (every sample hits every row) take the per-sample route, a sparse vocabulary
    # the pair route; a tiny piece size makes the pair route work through many pieces.
    import sgn_lab.gram as gram

    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(200, 4)
            self.positions = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.tokens(x) + self.positions(torch.arange(x.shape[1]).expand_as(x))
            return self.head(torch.tanh(h).mean(dim=1))

    gen = seeded(14)
    model = Embedded().double()
    x = torch.randint(0, 200, (9, 6), generator=gen)
    x[1, :3] = x[0, :3]  # shared tokens and a repeat within one sample
    x[2, 4] = x[2, 5]
    y = torch.randint(0, 3, (9,), generator=gen)
    assert_gram_exact(model, x, y)
    monkeypatch.setattr(gram, "_PAIR_CHUNK", 8)
    assert_gram_exact(model, x, y)


class ScaledLinear(nn.Linear):
    """Uses its weight through another op than the plain F.linear (weight scaled)."""

    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


class ShiftedLinear(nn.Linear):
    """Calls F.linear on another tensor than its input."""

    def forward(self, x):
        return F.linear(x + 1.0, self.weight, self.bias)


class SkipLinear(nn.Linear):
    """Never uses its parameters: their per-sample gradients are zero."""

    def forward(self, x):
        return x


class DoubleLinear(nn.Linear):
    """Applies its own functional twice."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(x, self.weight, self.bias)


class Stray(nn.Module):
    """Linear layers misused in every way the formulas cannot see, and one called by keyword."""

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


def test_parameters_used_outside_their_own_layer_fall_back_and_stay_exact():
    gen = seeded(15)
    model = Stray().double()
    x, y = torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert_gram_exact(model, x, y)
    from sgn_lab.gram import gram_and_mean_gradient

    K, mean = gram_and_mean_gradient(model, F.cross_entropy, x, y)
    G = flatten_grads(per_sample_grads(model, F.cross_entropy, x, y))
    assert torch.allclose(mean, G.mean(dim=0), rtol=1e-10, atol=1e-14)


def test_float32_convolutions_and_bf16_within_their_accuracy():
    gen = seeded(16)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(6, 2, 7, 7, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    model(x)
    assert_gram_exact(model, x, y, rtol=1e-5)
    # bf16 parameters: the Gram is formed in float32 from bf16 activations and signals, so it
    # agrees with G Gᵀ of the bf16 per-sample gradients to bf16 accuracy (2^-8 relative).
    model = model.to(torch.bfloat16)
    K = per_sample_gram(model, F.cross_entropy, x.to(torch.bfloat16), y)
    ref = reference_gram(model, F.cross_entropy, x.to(torch.bfloat16), y)
    assert float((K - ref).abs().max() / ref.abs().max()) < 3 * 2.0**-8


def test_reading_a_parameters_shape_or_dtype_keeps_the_fast_path(monkeypatch):
    import sgn_lab.gram as gram

    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = x.to(self.lin.weight.dtype).reshape(-1, self.lin.weight.shape[1])
            assert self.lin.weight.size(0) == 4 and self.head.weight.requires_grad
            return self.head(torch.tanh(self.lin(x)))

    def no_fallback(*args, **kwargs):
        raise AssertionError(f"fell back to vmap for {args[4]}")

    gen = seeded(17)
    model = Reads().double()
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (6,))
    ref = reference_gram(model, F.cross_entropy, x, y)
    monkeypatch.setattr(gram, "_fallback_gram", no_fallback)
    K = per_sample_gram(model, F.cross_entropy, x, y)
    assert torch.allclose(K, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
