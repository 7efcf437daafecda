"""Rules of the matrix products (``sgn_lab.grads.rules.linear``): F.linear, matmul, mm,
addmm, against the float64 loop of single-sample backward passes (``grads.oracle``).
"""


import pytest
import torch
from grads.oracle import D, check, labels
from helpers import seeded
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_the_per_sample_route_in_blocks_of_rows(monkeypatch):
    """Blocks of 1, 2 and 3 of the weight's 5 rows (the last one short) sum to the same K."""
    from sgn_lab.grads import terms

    with seeded(2):
        model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Flatten(), nn.Linear(200, 2)).double()
        x = torch.randn(6, 40, 2, dtype=D)
    for rows in (1, 2, 3):
        monkeypatch.setattr(terms, "_BLOCK_BYTES", 6 * 2 * 8 * rows)  # n · q · 8 bytes a row
        assert check(model, x, labels(6, 2)).routes["0.weight"] == "per-sample"


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
