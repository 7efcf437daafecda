"""Rules of the normalisation layers (``sgn_lab.grads.rules.normalisation``): layer, group
and RMS norm, frozen or without bias; against the float64 loop.
"""


import pytest
import torch
from grads.oracle import D, check, labels
from helpers import seeded
from torch import nn
from torch.nn import functional as F

pytestmark = pytest.mark.usefixtures("one_thread")


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
