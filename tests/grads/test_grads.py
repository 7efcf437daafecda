"""Tests for ``sgn_lab.grads``: per-sample gradients checked against a plain Python loop.

The independent reference (:func:`loop_grads`) computes, for each sample i, the gradient of
``loss_fn(model(x[i:i+1]), y[i:i+1])`` with an ordinary ``backward()``. Every model family the
library claims to support is compared with it, in float64 (tight tolerance) and float32.

Global state: models and data are built inside :func:`seeded`, which forks torch's RNG, so the
tests never leave the global generator changed (and never call ``torch.set_default_dtype``).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import loop_grads, seeded, trainable_names
from torch import Tensor, nn

from sgn_lab.grads import (
    batchnorm_to_groupnorm,
    check_finite,
    flatten_grads,
    per_sample_grads,
    trainable_dim,
)

DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["float64", "float32"]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def assert_grads_close(
    got: dict[str, Tensor],
    ref: dict[str, Tensor],
    model: nn.Module,
    *,
    rtol: float,
    atol: float,
) -> None:
    """Same keys in named_parameters order, same shapes/dtypes/devices, values close.

    ``atol`` is scaled by the largest entry of the reference tensor (at least 1), so that it
    stays a relative statement for gradients of any magnitude.
    """
    names = trainable_names(model)
    assert list(got) == names
    assert list(ref) == names
    params = dict(model.named_parameters())
    for k in names:
        p = params[k]
        assert got[k].shape == (ref[k].shape[0], *p.shape), k
        assert got[k].dtype == p.dtype, k
        assert got[k].device == p.device, k
        scale = max(1.0, ref[k].abs().max().item())
        torch.testing.assert_close(
            got[k], ref[k].to(got[k]), rtol=rtol, atol=atol * scale, msg=lambda m, k=k: f"{k}: {m}"
        )


def assert_grads_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def check_against_loop(model, loss_fn, inputs, targets, dtype, **kwargs) -> dict[str, Tensor]:
    got = per_sample_grads(model, loss_fn, inputs, targets, **kwargs)
    ref = loop_grads(model, loss_fn, inputs, targets)
    assert_grads_close(got, ref, model, rtol=RTOL[dtype], atol=ATOL[dtype])
    return got


# --------------------------------------------------------------------------------------------
# models and data (all small: the whole file must run in well under a minute on 2 cores)
# --------------------------------------------------------------------------------------------

N = 7  # samples per test batch; prime, so chunk_size=3 does not divide it


def make_mlp(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = nn.Sequential(
            nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        ).to(dtype)
        x = torch.randn(N, 5, dtype=dtype)
        y = torch.randint(0, 4, (N,))
    return model, x, y


def make_regression_mlp(dtype: torch.dtype, seed: int = 1) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
        x = torch.randn(N, 3, dtype=dtype)
        y = torch.randn(N, 2, dtype=dtype)
    return model, x, y


def make_cnn2d(dtype: torch.dtype, seed: int = 2) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        ).to(dtype)
        x = torch.randn(N, 2, 8, 8, dtype=dtype)
        y = torch.randint(0, 3, (N,))
    return model, x, y


def make_cnn1d(dtype: torch.dtype, seed: int = 3) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv1d(3, 4, 3),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.AvgPool1d(2),
            nn.Conv1d(4, 4, 3, stride=2),
            nn.Tanh(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        ).to(dtype)
        x = torch.randn(N, 3, 16, dtype=dtype)
        y = torch.randint(0, 3, (N,))
    return model, x, y


class AttentionNet(nn.Module):
    """Pre-norm transformer block (LayerNorm, self-attention, MLP, residuals), mean-pooled."""

    def __init__(self, embed: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(embed)
        self.ff = nn.Sequential(nn.Linear(embed, 16), nn.GELU(), nn.Linear(16, embed))
        self.head = nn.Linear(embed, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff(self.ln2(x))
        return self.head(x.mean(dim=1))


def make_attention(dtype: torch.dtype, seed: int = 4) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = AttentionNet().to(dtype)
        x = torch.randn(N, 5, 8, dtype=dtype)  # (n, L, E)
        y = torch.randint(0, 3, (N,))
    return model, x, y


class EmbeddingNet(nn.Module):
    def __init__(self, vocab: int = 11, embed: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, embed, padding_idx=0)
        self.head = nn.Linear(embed, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.emb(tokens).mean(dim=1))


def make_embedding(dtype: torch.dtype, seed: int = 5) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = EmbeddingNet().to(dtype)
        tokens = torch.randint(0, 11, (N, 4))  # (n, L) integer tokens; 0 is the padding index
        tokens[0, 0] = 0
        tokens[1] = 3  # a repeated token: its row receives the gradient several times
        y = torch.randint(0, 3, (N,))
    return model, tokens, y


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(a) + self.b(b)))


class BufferNet(nn.Module):
    """Uses a registered (non-parameter) buffer in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.tanh(x * self.scale))


def ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y)


# --------------------------------------------------------------------------------------------
# 1-4. model families against the loop
# --------------------------------------------------------------------------------------------

MODEL_CASES = [
    pytest.param(make_mlp, ce, id="mlp-ce"),
    pytest.param(make_regression_mlp, F.mse_loss, id="mlp-mse"),
    pytest.param(make_cnn2d, ce, id="cnn2d-groupnorm"),
    pytest.param(make_cnn1d, ce, id="cnn1d-groupnorm"),
    pytest.param(make_attention, ce, id="layernorm-residual-attention"),
    pytest.param(make_embedding, ce, id="embedding"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("make", "loss_fn"), MODEL_CASES)
def test_matches_loop(make, loss_fn, dtype):
    compare_on_device(torch.device("cpu"), make, loss_fn, dtype)


def compare_on_device(device: torch.device, make, loss_fn, dtype) -> None:
    """The model lives on ``device``; inputs and targets are given on the CPU."""
    model, x, y = make(dtype)
    model = model.to(device)
    got = per_sample_grads(model, loss_fn, x, y)
    ref = loop_grads(model, loss_fn, x, y)  # runs on the model's device too
    assert_grads_close(got, ref, model, rtol=RTOL[dtype], atol=ATOL[dtype])
    assert all(g.device.type == device.type for g in got.values())
    # chunked, on the same device, agrees as well
    chunked = per_sample_grads(model, loss_fn, x, y, chunk_size=3)
    assert_grads_close(chunked, ref, model, rtol=RTOL[dtype], atol=ATOL[dtype])
    # not trivially zero: every trainable tensor receives some gradient
    for k, g in got.items():
        assert g.abs().sum() > 0, k


def test_embedding_padding_row_and_unused_rows_are_zero():
    model, tokens, y = make_embedding(torch.float64)
    g = per_sample_grads(model, ce, tokens, y)["emb.weight"]
    assert torch.all(g[:, 0] == 0)  # padding_idx never gets a gradient
    for i in range(N):
        unused = sorted(set(range(11)) - set(tokens[i].tolist()))
        assert torch.all(g[i, unused] == 0), i
        used = sorted(set(tokens[i].tolist()) - {0})
        assert torch.all(g[i, used].abs().sum(dim=1) > 0), i


def test_per_sample_grads_average_to_batch_gradient():
    # mean-reduced loss: the mean of the per-sample gradients is the full-batch gradient
    model, x, y = make_mlp(torch.float64)
    g = per_sample_grads(model, ce, x, y)
    model.zero_grad()
    ce(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(g[k].mean(dim=0), p.grad, rtol=1e-10, atol=1e-12)


def test_model_is_left_unchanged():
    model, x, y = make_attention(torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_sample_grads(model, ce, x, y)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------
# 5. dropout with matched randomness
# --------------------------------------------------------------------------------------------

DROP_P = 0.3
HIDDEN = 6


def make_dropout_mlp(dtype: torch.dtype, seed: int = 6) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = nn.Sequential(
            nn.Linear(4, HIDDEN), nn.Tanh(), nn.Dropout(DROP_P), nn.Linear(HIDDEN, 3)
        ).to(dtype)
        x = torch.randn(N, 4, dtype=dtype)
        y = torch.randint(0, 3, (N,))
    return model, x, y


def vmap_dropout_masks(seed: int, n: int, dtype: torch.dtype) -> Tensor:
    """The masks per_sample_grads draws: one bernoulli over the physical shape (n, 1, H)."""
    with seeded(seed):
        return torch.empty(n, 1, HIDDEN, dtype=dtype).bernoulli_(1 - DROP_P)


def dropout_loop_grads(model: nn.Module, x: Tensor, y: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Loop reference with the forward written by hand, replaying mask i for sample i."""
    model = copy.deepcopy(model)
    lin1, lin2 = model[0], model[3]
    out: dict[str, list[Tensor]] = {k: [] for k, _ in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        h = torch.tanh(lin1(x[i : i + 1])) * masks[i] / (1 - DROP_P)
        ce(lin2(h), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            out[k].append(p.grad.detach().clone())
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_matches_loop_with_replayed_masks(dtype):
    model, x, y = make_dropout_mlp(dtype)
    seed = 1234
    got = per_sample_grads(model, ce, x, y, seed=seed)
    masks = vmap_dropout_masks(seed, N, dtype)
    assert 0 < masks.sum() < masks.numel()  # the masks really drop something
    ref = dropout_loop_grads(model, x, y, masks)
    assert_grads_close(got, ref, model, rtol=RTOL[dtype], atol=ATOL[dtype])


def test_dropout_masks_differ_between_samples():
    # identical samples: any difference between their gradients comes from dropout alone
    model, x, y = make_dropout_mlp(torch.float64)
    x = x[:1].expand(N, -1).clone()
    y = y[:1].expand(N).clone()
    g = per_sample_grads(model, ce, x, y, seed=0)["0.weight"]
    distinct = {tuple(g[i].flatten().tolist()) for i in range(N)}
    assert len(distinct) > 1
    # ... and the first layer's per-unit zero pattern follows each sample's own mask
    masks = vmap_dropout_masks(0, N, torch.float64)
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1
    dropped_rows = g.abs().sum(dim=2) == 0  # (n, H): units whose output was dropped
    assert torch.equal(dropped_rows, masks[:, 0, :] == 0)


def test_dropout_same_seed_is_bit_identical():
    model, x, y = make_dropout_mlp(torch.float64)
    assert_grads_equal(
        per_sample_grads(model, ce, x, y, seed=5), per_sample_grads(model, ce, x, y, seed=5)
    )


def test_dropout_same_seed_and_chunk_size_is_bit_identical():
    model, x, y = make_dropout_mlp(torch.float64)
    assert_grads_equal(
        per_sample_grads(model, ce, x, y, chunk_size=3, seed=5),
        per_sample_grads(model, ce, x, y, chunk_size=3, seed=5),
    )


def test_dropout_different_seeds_differ():
    model, x, y = make_dropout_mlp(torch.float64)
    a = per_sample_grads(model, ce, x, y, seed=5)
    b = per_sample_grads(model, ce, x, y, seed=6)
    assert not torch.equal(a["0.weight"], b["0.weight"])


def test_dropout_seed_ignores_global_state():
    model, x, y = make_dropout_mlp(torch.float64)
    with seeded(1):
        a = per_sample_grads(model, ce, x, y, seed=5)
    with seeded(2):
        b = per_sample_grads(model, ce, x, y, seed=5)
    assert_grads_equal(a, b)


def test_dropout_seed_leaves_global_rng_untouched():
    model, x, y = make_dropout_mlp(torch.float64)
    with seeded(3):
        before = torch.get_rng_state()
        per_sample_grads(model, ce, x, y, seed=5)
        after = torch.get_rng_state()
    assert torch.equal(before, after)


def test_dropout_seed_none_uses_global_generator():
    model, x, y = make_dropout_mlp(torch.float64)
    with seeded(3):
        before = torch.get_rng_state()
        a = per_sample_grads(model, ce, x, y)
        advanced = not torch.equal(before, torch.get_rng_state())
        c = per_sample_grads(model, ce, x, y)  # the generator moved on: new masks
    with seeded(3):
        b = per_sample_grads(model, ce, x, y)
    assert advanced
    assert_grads_equal(a, b)  # reproducible through torch.manual_seed
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_dropout_in_eval_mode_is_deterministic_and_matches_loop():
    model, x, y = make_dropout_mlp(torch.float64)
    model.eval()
    got = check_against_loop(model, ce, x, y, torch.float64)
    assert_grads_equal(got, per_sample_grads(model, ce, x, y, seed=99))


# --------------------------------------------------------------------------------------------
# 6. frozen parameters and buffers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_frozen_parameters_are_absent_and_rest_is_correct(dtype):
    model, x, y = make_mlp(dtype)
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    got = check_against_loop(model, ce, x, y, dtype)
    assert list(got) == ["0.weight", "0.bias", "4.weight"]
    assert trainable_dim(model) == 5 * 16 + 16 + 16 * 4
    assert flatten_grads(got).shape == (N, trainable_dim(model))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_registered_buffer(dtype):
    with seeded(7):
        model = BufferNet().to(dtype)
        x = torch.randn(N, 4, dtype=dtype)
        y = torch.randint(0, 3, (N,))
    got = check_against_loop(model, ce, x, y, dtype)
    assert list(got) == ["lin.weight", "lin.bias"]
    # the buffer really matters: a different buffer gives different gradients
    other = copy.deepcopy(model)
    other.scale.fill_(1.0)
    assert not torch.allclose(per_sample_grads(other, ce, x, y)["lin.weight"], got["lin.weight"])


# --------------------------------------------------------------------------------------------
# 7. chunking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, N, N + 5])
@pytest.mark.parametrize(
    "make", [make_mlp, make_cnn2d, make_attention, make_embedding], ids=lambda f: f.__name__
)
def test_chunking_does_not_change_result(make, chunk_size):
    model, x, y = make(torch.float64)
    full = per_sample_grads(model, ce, x, y)
    chunked = per_sample_grads(model, ce, x, y, chunk_size=chunk_size)
    assert list(chunked) == list(full)
    for k in full:
        scale = max(1.0, full[k].abs().max().item())
        torch.testing.assert_close(chunked[k], full[k], rtol=1e-12, atol=1e-14 * scale)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_invalid_chunk_size(bad):
    model, x, y = make_mlp(torch.float64)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        per_sample_grads(model, ce, x, y, chunk_size=bad)


# --------------------------------------------------------------------------------------------
# 8. tuple inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("container", [tuple, list])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tuple_inputs(dtype, container):
    with seeded(8):
        model = TwoInputNet().to(dtype)
        a = torch.randn(N, 3, dtype=dtype)
        b = torch.randn(N, 2, dtype=dtype)
        y = torch.randint(0, 3, (N,))
    got = per_sample_grads(model, ce, container([a, b]), y, chunk_size=3)
    ref = loop_grads(model, ce, (a, b), y)
    assert_grads_close(got, ref, model, rtol=RTOL[dtype], atol=ATOL[dtype])


def test_tuple_inputs_of_different_lengths():
    model = TwoInputNet()
    with pytest.raises(ValueError, match=re.escape("(5, 3)")):
        per_sample_grads(model, ce, (torch.randn(5, 3), torch.randn(4, 2)), torch.zeros(5).long())


# --------------------------------------------------------------------------------------------
# 9. flatten_grads / trainable_dim
# --------------------------------------------------------------------------------------------


def test_flatten_grads_shape_and_column_order():
    model, x, y = make_cnn2d(torch.float64)
    g = per_sample_grads(model, ce, x, y)
    flat = flatten_grads(g)
    d = trainable_dim(model)
    assert d == sum(p.numel() for p in model.parameters())
    assert flat.shape == (N, d)
    assert flat.dtype == torch.float64
    start = 0
    for k, p in model.named_parameters():
        stop = start + p.numel()
        assert torch.equal(flat[:, start:stop], g[k].reshape(N, -1)), k
        start = stop
    assert start == d


def test_flatten_grads_errors():
    with pytest.raises(ValueError, match="empty"):
        flatten_grads({})
    with pytest.raises(ValueError, match="number of samples"):
        flatten_grads({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})


def test_check_finite_reports_offset():
    grads = {"w": torch.zeros(3, 2)}
    check_finite(torch.zeros(3), grads)  # all finite: no error
    grads["w"][1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"sample 11 in parameter 'w'"):
        check_finite(torch.zeros(3), grads, offset=10)


def test_check_finite_is_exact_where_row_sums_overflow_or_cancel():
    big = torch.finfo(torch.float32).max
    grads = {"w": torch.tensor([[big, big], [0.0, 1.0], [1.0, 2.0]])}
    check_finite(torch.zeros(3), grads)  # finite entries whose sum overflows: no error
    grads["w"][2] = torch.tensor([float("inf"), -float("inf")])  # sums to nan
    with pytest.raises(ValueError, match=r"sample 2 in parameter 'w'"):
        check_finite(torch.zeros(3), grads)


# --------------------------------------------------------------------------------------------
# 10. BatchNorm
# --------------------------------------------------------------------------------------------


def make_bn1d(dtype: torch.dtype, seed: int = 9) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = nn.Sequential()
        model.add_module("body", nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()))
        model.add_module("head", nn.Linear(8, 3))
        model.to(dtype)
        x = torch.randn(N, 4, dtype=dtype)
        y = torch.randint(0, 3, (N,))
    return model, x, y


def make_bn2d(dtype: torch.dtype, seed: int = 10) -> tuple[nn.Module, Tensor, Tensor]:
    with seeded(seed):
        model = nn.Sequential()
        model.add_module(
            "body",
            nn.Sequential(
                nn.Conv2d(2, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
            ),
        )
        model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
        model.to(dtype)
        x = torch.randn(N, 2, 6, 6, dtype=dtype)
        y = torch.randint(0, 3, (N,))
    return model, x, y


def make_bn1d_seq(dtype: torch.dtype, seed: int = 15) -> tuple[nn.Module, Tensor, Tensor]:
    """BatchNorm1d over (n, C, L) sequences (after a Conv1d)."""
    with seeded(seed):
        model = nn.Sequential()
        model.add_module(
            "body",
            nn.Sequential(
                nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.AdaptiveAvgPool1d(1)
            ),
        )
        model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(8, 3)))
        model.to(dtype)
        x = torch.randn(N, 3, 10, dtype=dtype)
        y = torch.randint(0, 3, (N,))
    return model, x, y


BN_CASES = [
    pytest.param(make_bn1d, id="bn1d-flat"),
    pytest.param(make_bn1d_seq, id="bn1d-seq"),
    pytest.param(make_bn2d, id="bn2d"),
]


def warm_up_running_stats(model: nn.Module, x: Tensor) -> None:
    """Give the BatchNorm layer non-trivial running statistics (and affine weights)."""
    with seeded(11), torch.no_grad():
        for _ in range(3):
            model(x * 2 + 0.5)
        bn = model.body[1]
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("make", BN_CASES)
def test_batchnorm_train_mode_is_refused(make):
    model, x, y = make(torch.float64)
    with pytest.raises(ValueError) as info:
        per_sample_grads(model, ce, x, y)
    msg = str(info.value)
    assert "'body.1'" in msg
    assert "batchnorm='eval'" in msg
    assert "batchnorm_to_groupnorm" in msg


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("make", BN_CASES)
def test_batchnorm_eval_policy(make, dtype):
    model, x, y = make(dtype)
    warm_up_running_stats(model, x)
    bn = model.body[1]
    stats = {k: v.clone() for k, v in bn.named_buffers()}
    reference_model = copy.deepcopy(model).eval()
    ref = loop_grads(reference_model, ce, x, y)

    got = per_sample_grads(model, ce, x, y, batchnorm="eval")

    assert_grads_close(got, ref, model, rtol=RTOL[dtype], atol=ATOL[dtype])
    assert bn.training and model.training
    for k, v in bn.named_buffers():
        assert torch.equal(v, stats[k]), k


def test_batchnorm_eval_policy_restores_train_mode_after_an_error():
    model, x, y = make_bn1d(torch.float64)
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="sample 3"):
        per_sample_grads(model, ce, x, y, batchnorm="eval")
    assert model.body[1].training


def test_batchnorm_in_eval_mode_is_a_buffer_model():
    # BatchNorm already in eval mode: the default policy accepts it; running stats are buffers
    model, x, y = make_bn2d(torch.float64)
    warm_up_running_stats(model, x)
    model.eval()
    got = check_against_loop(model, ce, x, y, torch.float64)
    assert "body.1.running_mean" not in got
    assert not model.body[1].training


def test_batchnorm_without_running_stats_cannot_use_eval():
    with seeded(12):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False))
    x, y = torch.randn(N, 4), torch.randn(N, 8)
    with pytest.raises(ValueError, match="batchnorm_to_groupnorm"):
        per_sample_grads(model, F.mse_loss, x, y, batchnorm="eval")


@pytest.mark.parametrize("make", [make_mlp, make_bn1d], ids=["no-bn", "bn"])
def test_unknown_batchnorm_policy(make):
    model, x, y = make(torch.float64)
    with pytest.raises(ValueError, match="'foo'"):
        per_sample_grads(model, ce, x, y, batchnorm="foo")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("make", BN_CASES)
def test_batchnorm_to_groupnorm(make, dtype):
    model, x, y = make(dtype)
    warm_up_running_stats(model, x)
    original = copy.deepcopy(model)

    converted = batchnorm_to_groupnorm(model, num_groups=8)

    # the input model is untouched
    assert converted is not model
    assert isinstance(model.body[1], nn.modules.batchnorm._BatchNorm)
    for (k, v), (k0, v0) in zip(
        model.state_dict().items(), original.state_dict().items(), strict=True
    ):
        assert k == k0 and torch.equal(v, v0), k
    # the copy has GroupNorm with the copied affine weights and no BatchNorm left
    gn = converted.body[1]
    assert isinstance(gn, nn.GroupNorm)
    channels = model.body[1].num_features
    assert gn.num_channels == channels
    # largest divisor of C that is <= 8 and leaves >= 2 channels per group
    assert gn.num_groups == {8: 4, 12: 6}[channels]
    assert gn.eps == model.body[1].eps
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    # the converted model keeps the model's dtype (so its gradients do too) ...
    assert {k: p.dtype for k, p in converted.named_parameters()} == {
        k: dtype for k, _ in converted.named_parameters()
    }
    # ... and the affine weights are copied exactly
    assert torch.equal(gn.weight.detach(), model.body[1].weight.detach())
    assert torch.equal(gn.bias.detach(), model.body[1].bias.detach())
    # per-sample gradients work with the default policy and match the loop
    got = per_sample_grads(converted, ce, x, y)
    ref = loop_grads(converted, ce, x, y)
    assert_grads_close(got, ref, converted, rtol=RTOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize(
    ("channels", "num_groups", "expected"),
    [(8, 32, 4), (12, 8, 6), (7, 4, 1), (16, 4, 4), (64, 32, 32), (2, 32, 1)],
)
def test_batchnorm_to_groupnorm_group_count(channels, num_groups, expected):
    model = nn.Sequential(nn.BatchNorm1d(channels, affine=False))
    gn = batchnorm_to_groupnorm(model, num_groups=num_groups)[0]
    assert isinstance(gn, nn.GroupNorm)
    assert (gn.num_groups, gn.num_channels, gn.affine) == (expected, channels, False)


def test_batchnorm_to_groupnorm_rejects_zero_groups():
    with pytest.raises(ValueError, match="num_groups"):
        batchnorm_to_groupnorm(nn.Sequential(nn.BatchNorm1d(4)), num_groups=0)


# --------------------------------------------------------------------------------------------
# 11. errors
# --------------------------------------------------------------------------------------------


def test_inputs_and_targets_of_different_lengths():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError) as info:
        per_sample_grads(model, ce, torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    msg = str(info.value)
    assert "(5, 3)" in msg and "(4,)" in msg


def test_zero_samples():
    with pytest.raises(ValueError, match="0 samples"):
        per_sample_grads(nn.Linear(3, 2), ce, torch.randn(0, 3), torch.zeros(0, dtype=torch.long))


def test_inputs_must_be_tensors():
    with pytest.raises(TypeError):
        per_sample_grads(nn.Linear(3, 2), ce, [[1.0, 2.0, 3.0]], torch.zeros(1, dtype=torch.long))


def test_loss_with_reduction_none_is_refused():
    model, x, y = make_mlp(torch.float64)
    with pytest.raises(ValueError, match="scalar"):
        per_sample_grads(model, nn.CrossEntropyLoss(reduction="none"), x, y)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_nan_loss_names_the_sample(chunk_size):
    model, x, y = make_mlp(torch.float64)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite loss .* for sample 3\b"):
        per_sample_grads(model, ce, x, y, chunk_size=chunk_size)


def test_log_of_negative_names_the_sample():
    class LogNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(torch.log(x))

    with seeded(13):
        model = LogNet().double()
        x = torch.rand(N, 2, dtype=torch.float64) + 0.1
        y = torch.randn(N, 2, dtype=torch.float64)
    x[3, 0] = -1.0
    with pytest.raises(ValueError, match=r"loss .* for sample 3\b"):
        per_sample_grads(model, F.mse_loss, x, y)


class SqrtSquareNet(nn.Module):
    """|lin(x)| written as sqrt(h**2): finite output, NaN gradient exactly where h == 0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sqrt(self.lin(x).pow(2))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_nan_gradient_names_sample_and_parameter(chunk_size):
    with seeded(14):
        model = SqrtSquareNet().double()
        x = torch.randn(N, 3, dtype=torch.float64)
        y = torch.randn(N, 2, dtype=torch.float64)
    nn.init.zeros_(model.lin.bias)
    x[3] = 0.0  # h == 0 for sample 3 only: loss finite, gradient 0 * inf = NaN
    assert torch.isfinite(F.mse_loss(model(x[3:4]), y[3:4]))
    with pytest.raises(ValueError, match=r"gradient for sample 3 in parameter 'lin\.weight'"):
        per_sample_grads(model, F.mse_loss, x, y, chunk_size=chunk_size)


def test_no_trainable_parameters():
    model, x, y = make_mlp(torch.float64)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        per_sample_grads(model, ce, x, y)
    with pytest.raises(ValueError, match="requires_grad"):
        per_sample_grads(nn.Flatten(), ce, x, y)  # no parameters at all


# --------------------------------------------------------------------------------------------
# 12. dtype and device
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_output_dtype_and_device_follow_parameters(dtype):
    model, x, y = make_mlp(dtype)
    g = per_sample_grads(model, ce, x, y)
    for k, p in model.named_parameters():
        assert g[k].dtype == dtype == p.dtype
        assert g[k].device == p.device
        assert g[k].shape == (N, *p.shape)


def test_bfloat16_against_float64_loop():
    # smooth activations only: a ReLU kink flipped by bfloat16 rounding would change a
    # sample's gradient by O(1), which says nothing about per_sample_grads
    with seeded(16):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
        x = torch.randn(N, 4).to(torch.bfloat16)
        y = torch.randint(0, 3, (N,))
    got = per_sample_grads(model, ce, x, y)
    # reference: the same (bfloat16-rounded) weights and inputs, computed in float64
    ref = loop_grads(copy.deepcopy(model).double(), ce, x.double(), y)
    assert list(got) == trainable_names(model)
    for k, p in model.named_parameters():
        assert got[k].dtype == torch.bfloat16
        assert got[k].shape == (N, *p.shape)
        g = got[k].double()
        scale = ref[k].abs().max().item()
        torch.testing.assert_close(g, ref[k], rtol=2e-2, atol=2e-2 * scale)
        rel = (g - ref[k]).flatten(1).norm(dim=1) / ref[k].flatten(1).norm(dim=1).clamp_min(1e-30)
        assert rel.max() < 2e-2, (k, rel.max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("make", "loss_fn"), MODEL_CASES)
def test_cuda_matches_loop(make, loss_fn, dtype, monkeypatch):
    # TF32 would cost float32 about 1e-3 relative; keep full precision for this comparison
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    compare_on_device(torch.device("cuda"), make, loss_fn, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_seed_is_reproducible_and_leaves_rng_untouched():
    model, x, y = make_dropout_mlp(torch.float64)
    model = model.cuda()
    before = torch.cuda.get_rng_state()
    a = per_sample_grads(model, ce, x, y, seed=5)
    b = per_sample_grads(model, ce, x, y, seed=5)
    assert torch.equal(before, torch.cuda.get_rng_state())
    assert_grads_equal(a, b)
