"""Aliases of a parameter (``sgn_lab.grads.rules.aliases``): scaled, transposed, sliced,
used outside its own layer; the rules treat them as the parameter. Against the float64 loop.
"""


import pytest
import torch
from grads.oracle import D, check, labels
from grads.parameter_uses import Stray
from helpers import seeded
from torch import nn
from torch.nn import functional as F

pytestmark = pytest.mark.usefixtures("one_thread")


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
