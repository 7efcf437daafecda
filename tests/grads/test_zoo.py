"""Per-sample gradients for every module: a zoo of layer kinds, recurrent layers, and the
exact route of last resort for modules vmap cannot transform.

Both paths (``per_sample_grads`` and the Gram) against the loop of single-sample backward
passes, in float64: per-sample gradients at rtol 1e-10, the Gram G Gᵀ at 1e-10 relative.
"""

import warnings

import pytest
import torch
from helpers import loop_grads, relative_error, seeded
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from sgn_lab.grads import gram_result, per_sample_grads
from sgn_lab.grads.recurrent import Recurrence
from sgn_lab.grads.vmap import LastResortWarning

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


def both_paths_equal_the_loop(model, x, y, loss=F.cross_entropy, samples="independent"):
    """Per-sample gradients and the Gram of both paths against the loop; returns coverage."""
    reference = loop_grads(model, loss, x, y)
    G = torch.cat([g.reshape(g.shape[0], -1) for g in reference.values()], dim=1).double()
    scale = float(torch.linalg.norm(G))
    grads = per_sample_grads(model, loss, x, y, samples=samples)
    assert list(grads) == list(reference)
    for name, want in reference.items():  # relative to the whole where a gradient is zero
        error = float(torch.linalg.norm(grads[name] - want))
        assert error <= 1e-10 * max(float(torch.linalg.norm(want)), 1e-6 * scale), name
    result = gram_result(model, loss, x, y, with_mean=True, samples=samples)
    assert relative_error(result.gram, G @ G.T) <= 1e-10
    assert relative_error(result.mean, G.mean(dim=0)) <= 1e-10
    return result.coverage


def labels(n, classes=3):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))


class Pooled(nn.Module):
    """layers, then flatten and a linear head (made lazily on a first batch)."""

    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).flatten(1))


class Bag(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 4, mode=mode)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # one bag per sample
        return self.head(self.bag(x))


class Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bi = nn.Bilinear(4, 5, 3)

    def forward(self, a, b):
        return self.bi(a, b)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=5, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, q, k, v):
        return self.head(self.attn(q, k, v, need_weights=False)[0].mean(dim=1))


def zoo():
    g = torch.Generator().manual_seed(0)
    images, volumes = torch.randn(5, 4, 7, 7, generator=g), torch.randn(4, 2, 4, 5, 5, generator=g)
    seq = torch.randn(5, 6, 4, generator=g)
    tokens = torch.randint(0, 12, (5, 6), generator=g)
    tokens[0, :2] = 0
    return [
        ("conv-stride-dilation", Pooled(nn.Conv2d(4, 6, 3, stride=2, dilation=2)), images),
        ("conv-groups", Pooled(nn.Conv2d(4, 6, 3, groups=2, padding=1)), images),
        ("conv3d", Pooled(nn.Conv3d(2, 3, 2, stride=(1, 2, 2))), volumes),
        ("conv-transpose2d", Pooled(nn.ConvTranspose2d(4, 3, 3, stride=2)), images),
        ("instancenorm", Pooled(nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4, affine=True)), images),
        ("groupnorm", Pooled(nn.GroupNorm(2, 4)), images),
        ("layernorm-no-bias", Pooled(nn.LayerNorm(4, bias=False)), seq),
        ("rmsnorm", Pooled(nn.RMSNorm([6, 4])), seq),
        ("prelu", Pooled(nn.Linear(4, 4), nn.PReLU(4)), seq[:, 0]),
        ("embedding-padding", Pooled(nn.Embedding(12, 4, padding_idx=0)), tokens),
        ("embeddingbag-mean", Bag("mean"), tokens),
        ("embeddingbag-max", Bag("max"), tokens),
        ("bilinear", Bilinear(), (seq[:, 0], torch.randn(5, 5, generator=g))),
        ("mha-kdim-vdim", Attention(),
         (torch.randn(5, 3, 6, generator=g), seq, torch.randn(5, 6, 5, generator=g))),
    ]


ZOO = zoo()


@pytest.mark.parametrize(("model", "x"), [z[1:] for z in ZOO], ids=[z[0] for z in ZOO])
def test_zoo_on_both_paths(model, x):
    with seeded(2):
        xs = x if isinstance(x, tuple) else (x,)
        model(*xs)  # lazy layers take their shapes
        model = model.double()
    xs = tuple(t.double() if t.is_floating_point() else t for t in xs)
    coverage = both_paths_equal_the_loop(model, xs if len(xs) > 1 else xs[0], labels(5 if len(
        xs[0]) == 5 else 4))
    assert coverage.names("loop") == []


# --- recurrent layers ---------------------------------------------------------------------


class Recurrent(nn.Module):
    def __init__(self, kind, **options):
        super().__init__()
        self.batch_first = options.get("batch_first", False)
        self.rnn = kind(4, 5, **options)
        width = options.get("proj_size") or 5
        self.head = nn.Linear(width * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, x):  # x (n, T, 4)
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(dim=1))


RECURRENT = [
    (nn.LSTM, dict()),
    (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (nn.LSTM, dict(num_layers=2, bias=False, proj_size=3)),
    (nn.GRU, dict(batch_first=True)),
    (nn.GRU, dict(num_layers=2, bidirectional=True, bias=False)),
    (nn.RNN, dict(nonlinearity="relu", num_layers=2, batch_first=True)),
    (nn.RNN, dict(bidirectional=True)),
]


NAMES = [f"{k.__name__}-" + "-".join(f"{a}={b}" for a, b in o.items()) for k, o in RECURRENT]


@pytest.mark.parametrize(("kind", "options"), RECURRENT, ids=NAMES)
def test_recurrent_layers_on_both_paths(kind, options):
    with seeded(3):
        model = Recurrent(kind, **options).double()
        x = torch.randn(5, 6, 4, dtype=D)
    coverage = both_paths_equal_the_loop(model, x, labels(5))
    assert coverage.names("vmap") == coverage.names("loop") == []  # the rules see linears


@pytest.mark.parametrize(("kind", "options"), RECURRENT, ids=NAMES)
def test_the_step_by_step_recurrence_is_torchs(kind, options):
    with seeded(4):
        layer = kind(4, 5, **options).double()
        x = torch.randn((3, 7, 4) if layer.batch_first else (7, 3, 4), dtype=D)
        h0 = torch.randn(layer.num_layers * (2 if layer.bidirectional else 1), 3,
                         layer.proj_size or 5, dtype=D)
    hx = (h0, torch.randn(h0.shape[0], 3, 5, dtype=D)) if kind is nn.LSTM else h0
    want = layer(x, hx)
    with Recurrence():
        got = layer(x, hx)
    flat = [want[0], *(want[1] if kind is nn.LSTM else (want[1],))]
    for a, b in zip(flat, [got[0], *(got[1] if kind is nn.LSTM else (got[1],))], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_packed_sequences_are_exact_or_refused_with_a_message():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            lengths = (x.abs().sum(-1) > 0).sum(-1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False)
            return self.head(self.rnn(packed)[1][-1])

    with seeded(5):
        model = Packed().double()
        x = torch.randn(4, 6, 4, dtype=D)
        x[1, 4:] = 0  # a shorter sequence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LastResortWarning)
        try:
            both_paths_equal_the_loop(model, x, labels(4))
        except ValueError as refused:
            assert "packed sequence" in str(refused) and "pad" in str(refused)


# --- the route of last resort -------------------------------------------------------------


class Branch(nn.Module):
    """Data-dependent Python control flow: vmap cannot take a branch per sample."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if float(x.sum()) > 0 else self.b(x)


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.inner, self.reentrant = nn.Linear(4, 4), reentrant

    def forward(self, x):
        return checkpoint(lambda t: torch.tanh(self.inner(t)), x,
                          use_reentrant=self.reentrant)


class Running(nn.Module):
    """Updates a buffer in place in its forward pass (a running mean it also uses)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        h = self.lin(x)
        self.mean.mul_(0.5).add_(0.5 * h.detach().mean(dim=0))
        return h - self.mean


@pytest.mark.parametrize(("block", "name"), [
    (Branch(), "Branch"), (Checkpointed(False), "Checkpointed"),
    (Checkpointed(True), "Checkpointed"), (Running(), "Running")],
    ids=["control-flow", "checkpoint", "checkpoint-reentrant", "buffer-in-place"])
def test_modules_vmap_cannot_transform_take_the_last_resort(block, name):
    with seeded(6):
        model = nn.Sequential(nn.Linear(4, 4), block, nn.Tanh(), nn.Linear(4, 3)).double()
        x = torch.randn(6, 4, dtype=D)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    # The branch on the batch's sum and the running mean make a batch of 6 differ from six
    # batches of one: the batch-of-one gradients, which the loop gives, are asked for.
    samples = "batch-of-one" if name in ("Branch", "Running") else "independent"
    with pytest.warns(LastResortWarning, match=rf"module '1' \({name}\)|the model") as caught:
        coverage = both_paths_equal_the_loop(model, x, labels(6), samples=samples)
    assert any(name in str(w.message) or "the model" in str(w.message) for w in caught)
    assert set(coverage.routes.values()) == {"loop"}
    assert "vmap cannot transform" in coverage.to_frame()["reason"].iloc[0]
    for k, b in model.named_buffers():  # the measurement leaves the buffers as they were
        assert torch.equal(b, buffers[k]), k


def test_a_genuine_error_is_not_hidden_by_the_last_resort():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)  # the data have 4 features

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|mat1 and mat2"):
        per_sample_grads(Broken(), F.cross_entropy, torch.randn(3, 4), labels(3))
