"""Rules of the embeddings (``sgn_lab.grads.rules.embedding``): options, broadcast position
ids, the Rows routes, max_norm refused, an embedding tied to the output layer; against the
float64 loop.
"""


import pytest
import torch
from grads.oracle import D, check, labels
from grads.parameter_uses import Embedded
from helpers import relative_error, seeded
from torch import nn
from torch.nn import functional as F

import sgn_lab.grads.terms as terms
from sgn_lab.grads import SampleMixingError, SampleMixingWarning, per_sample_grads, per_sample_gram

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert relative_error(terms.rows_outer_cross(rows, outer), want) < 1e-13
