"""Rules of a parameter added, subtracted, multiplied or concatenated to activations
(``sgn_lab.grads.rules.elementwise``), against the float64 loop.
"""


import pytest
import torch
from grads.oracle import D, check, labels
from grads.parameter_uses import Combined
from helpers import seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parameters_added_multiplied_and_concatenated():
    with seeded(14):
        model = Combined().double()
        x = torch.randn(6, 5, 4, dtype=D)
    coverage = check(model, x, labels(6))
    routes = coverage.routes
    assert routes["pos"] == routes["shift"] == routes["gamma"] == "per-sample"
    assert routes["cls"] == "vmap"  # .expand has no rule: the per-sample copy
