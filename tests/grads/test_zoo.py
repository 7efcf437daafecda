"""Per-sample gradients for every module: a zoo of layer kinds, and the exact route of last
resort for modules vmap cannot transform (recurrent layers: ``rules/test_recurrent.py``).

Both paths (``per_sample_grads`` and the Gram) against the loop of single-sample backward
passes, in float64: per-sample gradients at rtol 1e-10, the Gram G Gᵀ at 1e-10 relative.
"""


import pytest
import torch
from grads.oracle import D, check_each_parameter, labels
from helpers import seeded
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from sgn_lab.grads import per_sample_grads
from sgn_lab.grads.vmap import LastResortWarning

pytestmark = pytest.mark.usefixtures("one_thread")


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
    coverage = check_each_parameter(model, xs if len(xs) > 1 else xs[0], labels(5 if len(
        xs[0]) == 5 else 4, seed=1))
    assert coverage.names("loop") == []


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
        coverage = check_each_parameter(model, x, labels(6, seed=1), samples=samples)
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
        per_sample_grads(Broken(), F.cross_entropy, torch.randn(3, 4), labels(3, seed=1))
