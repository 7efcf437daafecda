"""Attention (``sgn_lab.grads.rules.attention`` and the linear rules of its projections):
multi-head attention with a packed or split in-projection; against the float64 loop.
"""


import pytest
import torch
from grads.oracle import D, check, labels
from helpers import seeded
from torch import nn
from torch.nn import functional as F

import sgn_lab.grads.rules as rules

pytestmark = pytest.mark.usefixtures("one_thread")


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


class DotProduct(nn.Module):
    """q, k, v projections and ``F.scaled_dot_product_attention`` (4-D: batch, heads)."""

    def __init__(self, causal=False, masked=False):
        super().__init__()
        self.qkv, self.head = nn.Linear(6, 18), nn.Linear(6, 3)
        self.causal, self.masked = causal, masked

    def forward(self, x):  # x (n, T, 6)
        q, k, v = (t.unflatten(-1, (2, 3)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        mask = torch.ones(x.shape[1], x.shape[1]).tril().bool() if self.masked else None
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.head(h.transpose(1, 2).flatten(2).mean(dim=1))


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"masked": True}])
def test_scaled_dot_product_attention_runs_batched_and_equals_the_loop(options, monkeypatch):
    calls = []
    batched = rules.BATCHED[F.scaled_dot_product_attention]

    def counted(args, kwargs, level):
        out = batched(args, kwargs, level)
        calls.append(out is not None)
        return out

    monkeypatch.setitem(rules.BATCHED, F.scaled_dot_product_attention, counted)
    with seeded(20):
        model = DotProduct(**options).double()
        x = torch.randn(5, 4, 6, dtype=D)
    coverage = check(model, x, labels(5))
    assert calls and all(calls)  # one fused call on the physical tensors, not one per sample
    assert coverage.names("vmap") == []
