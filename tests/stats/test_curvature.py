"""Tests for sgn_lab.stats.curvature against explicit float64 Hessians and hand-built noise."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sgn_lab.stats.curvature import (
    CurvatureStats,
    curvature_stats,
    hessian_top_eigenvalue,
    hessian_trace,
    hessian_vector_product,
    trace_hs,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs.squeeze(-1) - targets) ** 2).mean()


def _randomise(model: nn.Module, seed: int, scale: float = 0.7) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_case(name: str):
    """(model, loss_fn, inputs, targets), float64, built without global RNG state."""
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = _randomise(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), 2)
        x = torch.randn(20, 4, generator=g, dtype=F64)
        return model, F.cross_entropy, x, torch.randint(0, 3, (20,), generator=g)
    if name == "linreg":
        model = _randomise(nn.Linear(3, 1).double(), 3)
        x = torch.randn(16, 3, generator=g, dtype=F64)
        return model, half_mse, x, torch.randn(16, generator=g, dtype=F64)
    raise AssertionError(name)


CASES = ["mlp", "linreg"]


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def explicit_hessian(model, loss_fn, inputs, targets) -> np.ndarray:
    """Independent reference: autograd's dense Hessian of the loss as a function of theta."""
    named = trainable(model)
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([p.numel() for _, p in named])
        params = {k: t.view_as(p) for (k, p), t in zip(named, parts, strict=True)}
        return loss_fn(functional_call(model, params, args), targets)

    return torch.autograd.functional.hessian(f, theta).numpy()


def loop_per_sample_grads(model, loss_fn, x, y) -> torch.Tensor:
    """Independent reference: one .backward() per sample."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for _, p in trainable(model)]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("case", CASES)
def test_hvp_matches_explicit_hessian(case):
    model, loss_fn, x, y = make_case(case)
    H = explicit_hessian(model, loss_fn, x, y)
    d = H.shape[0]
    V = torch.randn(5, d, generator=torch.Generator().manual_seed(4), dtype=F64)
    single = hessian_vector_product(model, loss_fn, x, y, V[0])
    assert single.shape == (d,)
    np.testing.assert_allclose(single.numpy(), H @ V[0].numpy(), rtol=1e-10, atol=1e-13)
    for chunk_size in (None, 2):
        batched = hessian_vector_product(model, loss_fn, x, y, V, chunk_size=chunk_size)
        assert batched.shape == (5, d)
        np.testing.assert_allclose(batched.numpy(), V.numpy() @ H, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", CASES)
def test_top_eigenvalue_matches_eigvalsh(case):
    model, loss_fn, x, y = make_case(case)
    expected = np.linalg.eigvalsh(explicit_hessian(model, loss_fn, x, y))[-1]
    assert hessian_top_eigenvalue(model, loss_fn, x, y) == pytest.approx(expected, rel=1e-6)


def test_top_eigenvalue_float32_model():
    model, loss_fn, x, y = make_case("mlp")
    expected = np.linalg.eigvalsh(explicit_hessian(model, loss_fn, x, y))[-1]
    got = hessian_top_eigenvalue(model.float(), loss_fn, x.float(), y)
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_trace_hs_matches_numpy(case):
    model, loss_fn, x, y = make_case(case)
    H = explicit_hessian(model, loss_fn, x, y)
    G = loop_per_sample_grads(model, loss_fn, x, y)
    C = G.numpy() - G.numpy().mean(axis=0)
    S = C.T @ C / (G.shape[0] - 1)
    expected = np.trace(H @ S)
    assert trace_hs(model, loss_fn, x, y, G) == pytest.approx(expected, rel=1e-8)
    assert trace_hs(model, loss_fn, x, y, G, chunk_size=3) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("case", CASES)
def test_hutchinson_within_five_standard_errors(case):
    model, loss_fn, x, y = make_case(case)
    H = explicit_hessian(model, loss_fn, x, y)
    est, se = hessian_trace(model, loss_fn, x, y, n_probes=64, seed=5)
    assert se > 0  # H is not diagonal here, so the probes do vary
    assert abs(est - np.trace(H)) < 5 * se


def centred_orthonormal(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) with orthonormal columns, each orthogonal to the ones vector (zero column mean)."""
    a = np.random.default_rng(seed).standard_normal((n, d))
    return np.linalg.qr(a - a.mean(axis=0))[0]


def design(n: int, d: int, diagonal: bool) -> np.ndarray:
    """Centred design X (n, d); with ``diagonal`` its Gram matrix, hence H = XᵀX/n, is diagonal."""
    if diagonal:
        return centred_orthonormal(n, d, 6) * np.array([3.0, 2.0, 1.0, 0.5])[:d]
    a = np.random.default_rng(7).standard_normal((n, d)) @ np.diag([3.0, 1.0, 0.5, 0.2])[:d, :d]
    return a - a.mean(axis=0)


def linear_problem(X: np.ndarray):
    """½(xᵀw − y)² without bias: H = XᵀX/n whatever w and y are."""
    model = _randomise(nn.Linear(X.shape[1], 1, bias=False).double(), 8)
    y = torch.randn(X.shape[0], generator=torch.Generator().manual_seed(9), dtype=F64)
    return model, half_mse, torch.from_numpy(X), y


def test_hutchinson_exact_for_diagonal_hessian():
    X = design(12, 4, diagonal=True)
    H = X.T @ X / X.shape[0]
    assert np.allclose(H, np.diag(np.diag(H)), atol=1e-12)
    est, se = hessian_trace(*linear_problem(X), n_probes=7, seed=3)
    assert est == pytest.approx(np.trace(H), rel=1e-12)
    assert se == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("diagonal", [True, False])
def test_alignment_noise_proportional_to_hessian(diagonal):
    n, d = 12, 4
    X = design(n, d, diagonal)
    H = X.T @ X / n
    # Rows of X have zero mean, so G = X gives S = XᵀX/(n-1) = n/(n-1) H.
    stats = curvature_stats(*linear_problem(X), torch.from_numpy(X), n_probes=256, seed=1)
    expected = d * np.trace(H @ H) / np.trace(H) ** 2
    assert expected > 1.5  # anisotropic enough that the test can tell the noise apart
    assert stats.trace_hs == pytest.approx(n / (n - 1) * np.trace(H @ H), rel=1e-10)
    assert stats.hessian_top_eigenvalue == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-6)
    # The ratio carries the Hutchinson error of tr H (nil for a diagonal H).
    rel_err = 1e-10 if diagonal else 5 * stats.hessian_trace_se / stats.hessian_trace
    assert stats.curvature_alignment == pytest.approx(expected, rel=rel_err)


@pytest.mark.parametrize("diagonal", [True, False])
def test_alignment_isotropic_noise_is_one(diagonal):
    n, d = 12, 4
    X = design(n, d, diagonal)
    G = 0.3 * centred_orthonormal(n, d, 10)  # CᵀC ∝ I, so S ∝ I
    stats = curvature_stats(*linear_problem(X), torch.from_numpy(G), n_probes=256, seed=2)
    rel_err = 1e-10 if diagonal else 5 * stats.hessian_trace_se / stats.hessian_trace
    assert stats.curvature_alignment == pytest.approx(1.0, rel=rel_err)


def test_curvature_stats_deterministic_and_consistent():
    model, loss_fn, x, y = make_case("mlp")
    G = loop_per_sample_grads(model, loss_fn, x, y)
    a = curvature_stats(model, loss_fn, x, y, G, n_probes=16, seed=11)
    assert a == curvature_stats(model, loss_fn, x, y, G, n_probes=16, seed=11)
    assert (a.hessian_trace, a.hessian_trace_se) == hessian_trace(
        model, loss_fn, x, y, n_probes=16, seed=11
    )
    assert a.hessian_trace != hessian_trace(model, loss_fn, x, y, n_probes=16, seed=12)[0]
    assert a.hessian_top_eigenvalue == hessian_top_eigenvalue(model, loss_fn, x, y, seed=11)
    C = G - G.mean(0)
    tr_s = (C.square().sum() / (len(G) - 1)).item()
    assert a.curvature_alignment == pytest.approx(
        G.shape[1] * a.trace_hs / (a.hessian_trace * tr_s), rel=1e-12
    )


def test_curvature_stats_fields_and_to_dict():
    names = [f.name for f in dataclasses.fields(CurvatureStats)]
    assert names == [
        "hessian_top_eigenvalue",
        "hessian_trace",
        "hessian_trace_se",
        "trace_hs",
        "curvature_alignment",
    ]
    stats = CurvatureStats(1.0, 2.0, 0.1, 3.0, 1.5)
    assert list(stats.to_dict()) == names
    assert stats.to_dict()["trace_hs"] == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.trace_hs = 0.0  # type: ignore[misc]


def test_model_left_untouched():
    model = _randomise(
        nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double(), 12
    )
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(13), dtype=F64)
    y = torch.arange(10) % 2
    G = torch.randn(10, sum(p.numel() for p in model.parameters()), dtype=F64)
    curvature_stats(model, F.cross_entropy, x, y, G, n_probes=4)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_batchnorm_train_mode_refused_eval_mode_works():
    model = _randomise(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), 14)
    model = model.double()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(15), dtype=F64)
    y = torch.randn(8, generator=torch.Generator().manual_seed(16), dtype=F64)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=F64)
    with pytest.raises(ValueError, match=r"BatchNorm1d module '1'.*eval"):
        hessian_vector_product(model, half_mse, x, y, v)
    model.eval()
    H = explicit_hessian(model, half_mse, x, y)
    np.testing.assert_allclose(
        hessian_vector_product(model, half_mse, x, y, v).numpy(), H @ v.numpy(), rtol=1e-10
    )
    model[1].track_running_stats, model[1].running_mean = False, None  # eval, batch stats
    with pytest.raises(ValueError, match="BatchNorm1d"):
        hessian_trace(model, half_mse, x, y)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(u) * self.b(w)))


def test_tuple_inputs_and_frozen_parameters():
    model = _randomise(TwoInputs().double(), 17)
    model.b.weight.requires_grad_(False)  # excluded from theta; the order of the rest is kept
    g = torch.Generator().manual_seed(18)
    inputs = (torch.randn(9, 3, generator=g, dtype=F64), torch.randn(9, 2, generator=g, dtype=F64))
    y = torch.randint(0, 3, (9,), generator=g)
    H = explicit_hessian(model, F.cross_entropy, inputs, y)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert H.shape == (d, d)
    V = torch.randn(3, d, generator=g, dtype=F64)
    got = hessian_vector_product(model, F.cross_entropy, inputs, y, V)
    np.testing.assert_allclose(got.numpy(), V.numpy() @ H, rtol=1e-10, atol=1e-13)


def test_validation_errors():
    model, loss_fn, x, y = make_case("mlp")  # n = 20, d = 51
    G = torch.zeros(20, 51, dtype=F64)
    with pytest.raises(ValueError, match=re.escape("(20, 51)") + ".*" + re.escape("(20, 50)")):
        trace_hs(model, loss_fn, x, y, G[:, :50])
    with pytest.raises(ValueError, match=re.escape("(20, 51)") + ".*" + re.escape("(19, 51)")):
        curvature_stats(model, loss_fn, x, y, G[:19])
    with pytest.raises(ValueError, match=r"d=51.*\(50,\)"):
        hessian_vector_product(model, loss_fn, x, y, torch.zeros(50, dtype=F64))
    with pytest.raises(ValueError, match=r"d=51.*\(2, 3, 51\)"):
        hessian_vector_product(model, loss_fn, x, y, torch.zeros(2, 3, 51, dtype=F64))
    with pytest.raises(ValueError, match="n=1"):
        trace_hs(model, loss_fn, x[:1], y[:1], G[:1])
    with pytest.raises(ValueError, match="n_probes must be >= 1, got 0"):
        hessian_trace(model, loss_fn, x, y, n_probes=0)
    with pytest.raises(ValueError, match="n_probes must be >= 1, got -3"):
        curvature_stats(model, loss_fn, x, y, G, n_probes=-3)
    with pytest.raises(ValueError, match="chunk_size .* got 0"):
        trace_hs(model, loss_fn, x, y, G, chunk_size=0)
    with pytest.raises(ValueError, match="batch dimension"):
        hessian_trace(model, loss_fn, x, y[:5])
    with pytest.raises(ValueError, match="not finite: nan"):
        hessian_top_eigenvalue(model, loss_fn, x.clone().fill_(float("nan")), y)
    lin, _, xl, yl = make_case("linreg")
    with pytest.raises(ValueError, match="not finite: inf"):
        hessian_trace(lin, half_mse, xl, torch.full_like(yl, 1e300))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model, loss_fn, x, y = make_case("mlp")
    G = loop_per_sample_grads(model, loss_fn, x, y)
    cpu = curvature_stats(model, loss_fn, x, y, G, n_probes=16, seed=0)
    # Inputs, targets and G stay on CPU: the library moves them to the model's device.
    gpu = curvature_stats(model.cuda(), loss_fn, x, y, G, n_probes=16, seed=0)
    assert gpu.to_dict() == pytest.approx(cpu.to_dict(), rel=1e-8)
    V = torch.randn(3, G.shape[1], dtype=F64)
    hv = hessian_vector_product(model, loss_fn, x, y, V)
    assert hv.device.type == "cuda"
