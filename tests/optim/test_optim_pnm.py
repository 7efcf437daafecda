"""Tests for ``sgn_lab.optim.pnm``: PNM and AdaPNM against their rules written out here.

The references below (:func:`reference_pnm`, :func:`reference_adapnm`) restate the update rules
of Xie et al., ICML 2021 (arXiv 2103.17182), as a plain per-tensor loop in float64, with the
two buffers kept in a Python list indexed by the step's parity; they share nothing with the
implementation. Gradients are random, drawn from seeded generators (torch's global RNG is never
touched), with a per-step scale that varies over two orders of magnitude so that AMSGrad's
running maximum actually differs from the second moment.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import rejects
from torch import Tensor

from sgn_lab.optim.pnm import PNM, AdaPNM, pnm_noise_factor

RTOL = 1e-12
ATOL = 1e-14
N_STEPS = 25
BETA0S = [0.0, 0.5, 1.0, 2.5]
SHAPES = [(3, 4), (5,), (2, 3)]  # tensors 0 and 1 form group 0, tensor 2 forms group 1
GROUP_OF = [0, 0, 1]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_params(device: str, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [
        torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
        for shape in SHAPES
    ]


def make_grads(n_steps: int, device: str, seed: int = 1) -> list[list[Tensor]]:
    """Per step, one random gradient per tensor; each step has its own scale exp(1.5·z)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grads = []
    for _ in range(n_steps):
        scale = math.exp(1.5 * float(torch.randn((), generator=gen, dtype=torch.float64)))
        grads.append(
            [
                (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device)
                for shape in SHAPES
            ]
        )
    return grads


def split_groups(params: list[Tensor]) -> list[dict[str, Any]]:
    return [
        {"params": [p for p, k in zip(params, GROUP_OF, strict=True) if k == group]}
        for group in (0, 1)
    ]


def run_optimizer(
    make_opt: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    params: list[Tensor],
    grads: list[list[Tensor]],
) -> list[list[Tensor]]:
    """Step through ``grads`` (set by hand) and return every tensor's value after each step."""
    groups = split_groups(params)
    opt = make_opt(groups)
    trajectory = []
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def gamma(beta0: float) -> float:
    return (1.0 + beta0) ** 2 + beta0**2


def reference_pnm(
    theta0: list[Tensor], grads: list[list[Tensor]], hps: list[dict[str, Any]]
) -> list[list[Tensor]]:
    """PNM, one tensor at a time; ``hps[i]`` holds tensor i's hyperparameters."""
    per_tensor = []
    for i, theta in enumerate(theta0):
        lr, beta1, beta0 = hps[i]["lr"], hps[i]["beta1"], hps[i]["beta0"]
        wd, decoupled = hps[i]["weight_decay"], hps[i]["decoupled"]
        theta = theta.detach().clone()
        buffers = [torch.zeros_like(theta), torch.zeros_like(theta)]  # buffers[t % 2]
        values = []
        for t in range(1, len(grads) + 1):
            g = grads[t - 1][i]
            if decoupled:
                theta = theta * (1 - lr * wd)
            else:
                g = g + wd * theta
            buffers[t % 2] = beta1**2 * buffers[t % 2] + (1 - beta1**2) * g  # positive: m_t
            m_t, m_prev = buffers[t % 2], buffers[(t - 1) % 2]  # negative: m_{t-1}
            theta = theta - lr * ((1 + beta0) * m_t - beta0 * m_prev) / math.sqrt(gamma(beta0))
            values.append(theta)
        per_tensor.append(values)
    return [list(step) for step in zip(*per_tensor, strict=True)]


def reference_adapnm(
    theta0: list[Tensor], grads: list[list[Tensor]], hps: list[dict[str, Any]]
) -> list[list[Tensor]]:
    """AdaPNM (as in the reference adapnm.py), one tensor at a time."""
    per_tensor = []
    for i, theta in enumerate(theta0):
        lr, eps = hps[i]["lr"], hps[i]["eps"]
        beta1, beta2, beta0 = hps[i]["beta1"], hps[i]["beta2"], hps[i]["beta0"]
        wd, decoupled, amsgrad = hps[i]["weight_decay"], hps[i]["decoupled"], hps[i]["amsgrad"]
        theta = theta.detach().clone()
        buffers = [torch.zeros_like(theta), torch.zeros_like(theta)]
        v = torch.zeros_like(theta)
        v_max = torch.zeros_like(theta)
        values = []
        for t in range(1, len(grads) + 1):
            g = grads[t - 1][i]
            if decoupled:
                theta = theta * (1 - lr * wd)
            else:
                g = g + wd * theta
            buffers[t % 2] = beta1**2 * buffers[t % 2] + (1 - beta1**2) * g
            m_t, m_prev = buffers[t % 2], buffers[(t - 1) % 2]
            v = beta2 * v + (1 - beta2) * g * g
            v_max = torch.maximum(v_max, v)
            v_hat = v_max if amsgrad else v
            denom = torch.sqrt(v_hat) / math.sqrt(1 - beta2**t) + eps
            pn = ((1 + beta0) * m_t - beta0 * m_prev) / math.sqrt(gamma(beta0))
            theta = theta - lr / (1 - beta1**t) * pn / denom
            values.append(theta)
        per_tensor.append(values)
    return [list(step) for step in zip(*per_tensor, strict=True)]


def assert_trajectories_close(got: list[list[Tensor]], want: list[list[Tensor]]) -> None:
    assert len(got) == len(want)
    for t, (got_t, want_t) in enumerate(zip(got, want, strict=True), start=1):
        for i, (a, b) in enumerate(zip(got_t, want_t, strict=True)):
            torch.testing.assert_close(
                a, b, rtol=RTOL, atol=ATOL, msg=lambda m, t=t, i=i: f"step {t}, tensor {i}: {m}"
            )


# --- PNM: two groups with different hyperparameters ------------------------------------------


def pnm_group_hps(beta0: float, decoupled: bool) -> list[dict[str, Any]]:
    group0 = dict(lr=0.05, beta1=0.9, beta0=beta0, weight_decay=0.02, decoupled=decoupled)
    group1 = dict(
        lr=0.2, beta1=0.5, beta0=beta0 + 0.75, weight_decay=0.3, decoupled=not decoupled
    )
    return [group0, group1]


def pnm_factory(beta0: float, decoupled: bool) -> Callable[[list[dict[str, Any]]], PNM]:
    g0, g1 = pnm_group_hps(beta0, decoupled)

    def make(groups: list[dict[str, Any]]) -> PNM:
        groups[1].update(
            lr=g1["lr"],
            betas=(g1["beta1"], g1["beta0"]),
            weight_decay=g1["weight_decay"],
            decoupled=g1["decoupled"],
        )
        return PNM(
            groups,
            lr=g0["lr"],
            betas=(g0["beta1"], g0["beta0"]),
            weight_decay=g0["weight_decay"],
            decoupled=g0["decoupled"],
        )

    return make


def check_pnm_rule(device: str, beta0: float, decoupled: bool) -> None:
    params = make_params(device)
    theta0 = [p.detach().clone() for p in params]
    grads = make_grads(N_STEPS, device)
    got = run_optimizer(pnm_factory(beta0, decoupled), params, grads)
    hps = [pnm_group_hps(beta0, decoupled)[k] for k in GROUP_OF]
    assert_trajectories_close(got, reference_pnm(theta0, grads, hps))


# --- AdaPNM ----------------------------------------------------------------------------------


def adapnm_group_hps(beta0: float, decoupled: bool, amsgrad: bool) -> list[dict[str, Any]]:
    group0 = dict(
        lr=1e-2, beta1=0.9, beta2=0.99, beta0=beta0, eps=1e-8, weight_decay=0.05,
        decoupled=decoupled, amsgrad=amsgrad,
    )  # fmt: skip
    group1 = dict(
        lr=3e-2, beta1=0.6, beta2=0.8, beta0=beta0 + 0.75, eps=1e-3, weight_decay=0.2,
        decoupled=not decoupled, amsgrad=not amsgrad,
    )  # fmt: skip
    return [group0, group1]


def adapnm_factory(
    beta0: float, decoupled: bool, amsgrad: bool
) -> Callable[[list[dict[str, Any]]], AdaPNM]:
    g0, g1 = adapnm_group_hps(beta0, decoupled, amsgrad)

    def as_kwargs(h: dict[str, Any]) -> dict[str, Any]:
        return dict(
            lr=h["lr"],
            betas=(h["beta1"], h["beta2"], h["beta0"]),
            eps=h["eps"],
            weight_decay=h["weight_decay"],
            decoupled=h["decoupled"],
            amsgrad=h["amsgrad"],
        )

    def make(groups: list[dict[str, Any]]) -> AdaPNM:
        groups[1].update(as_kwargs(g1))
        return AdaPNM(groups, **as_kwargs(g0))

    return make


def check_adapnm_rule(device: str, beta0: float, decoupled: bool, amsgrad: bool) -> None:
    params = make_params(device)
    theta0 = [p.detach().clone() for p in params]
    grads = make_grads(N_STEPS, device)
    got = run_optimizer(adapnm_factory(beta0, decoupled, amsgrad), params, grads)
    hps = [adapnm_group_hps(beta0, decoupled, amsgrad)[k] for k in GROUP_OF]
    assert_trajectories_close(got, reference_adapnm(theta0, grads, hps))


# --------------------------------------------------------------------------------------------
# the update rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "l2"])
@pytest.mark.parametrize("beta0", BETA0S)
def test_pnm_matches_written_out_rule(beta0: float, decoupled: bool) -> None:
    check_pnm_rule("cpu", beta0, decoupled)


@pytest.mark.parametrize("amsgrad", [True, False], ids=["amsgrad", "adam"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "l2"])
@pytest.mark.parametrize("beta0", BETA0S)
def test_adapnm_matches_written_out_rule(beta0: float, decoupled: bool, amsgrad: bool) -> None:
    check_adapnm_rule("cpu", beta0, decoupled, amsgrad)


def test_amsgrad_changes_the_trajectory_on_these_gradients() -> None:
    """Guards the AdaPNM rule test: with these gradients v_t does fall below its maximum."""
    params_a, params_b = make_params("cpu"), make_params("cpu")
    grads = make_grads(N_STEPS, "cpu")
    on = run_optimizer(lambda gr: AdaPNM(gr, lr=1e-2, betas=(0.9, 0.8, 1.0)), params_a, grads)
    off = run_optimizer(
        lambda gr: AdaPNM(gr, lr=1e-2, betas=(0.9, 0.8, 1.0), amsgrad=False), params_b, grads
    )
    assert not torch.allclose(on[-1][0], off[-1][0], rtol=1e-6, atol=0)


def test_pnm_with_beta0_zero_is_ema_momentum_on_two_interleaved_buffers() -> None:
    """β0 = 0: the step at t is η times the EMA (coefficient β1 per step) of g_t, g_{t−2}, ...

    Written as an explicit weighted sum, not a recursion:
    m_t = Σ_{s <= t, s ≡ t (mod 2)} (1 − β1²)·β1^(t−s)·g_s, and θ_t = θ_0 − η·Σ_{u <= t} m_u.
    """
    hps = [dict(lr=0.05, beta1=0.9), dict(lr=0.3, beta1=0.6)]
    params = make_params("cpu")
    theta0 = [p.detach().clone() for p in params]
    grads = make_grads(N_STEPS, "cpu")

    def make(groups: list[dict[str, Any]]) -> PNM:
        groups[1].update(lr=hps[1]["lr"], betas=(hps[1]["beta1"], 0.0))
        return PNM(groups, lr=hps[0]["lr"], betas=(hps[0]["beta1"], 0.0))

    got = run_optimizer(make, params, grads)
    for i, theta in enumerate(theta0):
        lr, beta1 = hps[GROUP_OF[i]]["lr"], hps[GROUP_OF[i]]["beta1"]
        total = torch.zeros_like(theta)
        for t in range(1, N_STEPS + 1):
            m_t = sum(
                (1 - beta1**2) * beta1 ** (t - s) * grads[s - 1][i] for s in range(t, 0, -2)
            )
            total = total + m_t
            torch.testing.assert_close(got[t - 1][i], theta - lr * total, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("beta0", BETA0S)
def test_pnm_mean_step_on_constant_gradient(beta0: float) -> None:
    """On a constant g, step t is exactly η·g·(1 − (1+β0)·β1^(2⌈t/2⌉) + β0·β1^(2⌊t/2⌋))/√Γ.

    The positive buffer has seen ⌈t/2⌉ copies of g, the negative one ⌊t/2⌋; the step tends to
    η·g/√Γ, Γ = (1+β0)² + β0², reached to float64 precision after 400 steps at β1 = 0.9.
    """
    lr, beta1, n_steps = 0.1, 0.9, 400
    g = torch.tensor([1.0, -2.0, 0.25, 3.0], dtype=torch.float64)
    p = torch.zeros_like(g, requires_grad=True)
    opt = PNM([p], lr=lr, betas=(beta1, beta0))
    sqrt_gamma = math.sqrt((1 + beta0) ** 2 + beta0**2)
    previous = p.detach().clone()
    for t in range(1, n_steps + 1):
        p.grad = g.clone()
        opt.step()
        step = previous - p.detach()
        previous = p.detach().clone()
        factor = 1 - (1 + beta0) * beta1 ** (2 * math.ceil(t / 2)) + beta0 * beta1 ** (2 * (t // 2))
        torch.testing.assert_close(step, lr * g * factor / sqrt_gamma, rtol=1e-11, atol=0)
    torch.testing.assert_close(step, lr * g / sqrt_gamma, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    ("beta0", "expected"), [(0.0, 1.0), (0.5, 2.5), (1.0, 5.0), (2.5, 18.5)]
)
def test_pnm_noise_factor(beta0: float, expected: float) -> None:
    assert pnm_noise_factor(beta0) == expected


# --------------------------------------------------------------------------------------------
# optimizer mechanics
# --------------------------------------------------------------------------------------------


OPTIMIZER_FACTORIES = {
    "pnm": pnm_factory(2.5, True),
    "pnm-l2": pnm_factory(1.0, False),
    "adapnm": adapnm_factory(1.0, True, True),
    "adapnm-noams-l2": adapnm_factory(2.5, False, False),
}


@pytest.mark.parametrize("name", list(OPTIMIZER_FACTORIES))
def test_state_dict_round_trip_mid_run_is_bit_identical(name: str) -> None:
    make = OPTIMIZER_FACTORIES[name]
    params = make_params("cpu")
    grads = make_grads(17, "cpu")
    groups = split_groups(params)
    opt = make(groups)
    for step_grads in grads[:7]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    params_b = copy.deepcopy(params)
    groups_b = split_groups(params_b)
    opt_b = make(groups_b)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))

    for step_grads in grads[7:]:
        for pa, pb, g in zip(params, params_b, step_grads, strict=True):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt.step()
        opt_b.step()
        for pa, pb in zip(params, params_b, strict=True):
            assert torch.equal(pa, pb)
    for pa, pb in zip(params, params_b, strict=True):
        state_a, state_b = opt.state[pa], opt_b.state[pb]
        assert state_a.keys() == state_b.keys()
        assert state_a["step"] == state_b["step"] == 17
        for key in state_a:
            if isinstance(state_a[key], Tensor):
                assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("name", list(OPTIMIZER_FACTORIES))
def test_skips_params_without_grad_keeps_grad_and_returns_closure_loss(name: str) -> None:
    params = make_params("cpu")
    groups = split_groups(params)
    opt = OPTIMIZER_FACTORIES[name](groups)
    grads = make_grads(1, "cpu")[0]
    before = [p.detach().clone() for p in params]
    params[0].grad = grads[0].clone()
    params[2].grad = grads[2].clone()  # params[1] has no gradient

    loss = opt.step(closure=lambda: torch.tensor(3.5))

    assert loss == 3.5
    assert torch.equal(params[1], before[1]) and not opt.state[params[1]]
    assert not torch.equal(params[0], before[0]) and not torch.equal(params[2], before[2])
    # The L2 penalty must not leak into the caller's gradient.
    assert torch.equal(params[0].grad, grads[0]) and torch.equal(params[2].grad, grads[2])


INVALID = [
    (lambda p: PNM(p, lr=-0.1), "lr: -0.1"),
    (lambda p: PNM(p, lr=float("nan")), "lr: nan"),
    (lambda p: PNM(p, lr=0.1, betas=(1.0, 1.0)), "beta1: 1.0"),
    (lambda p: PNM(p, lr=0.1, betas=(-0.5, 1.0)), "beta1: -0.5"),
    (lambda p: PNM(p, lr=0.1, betas=(0.9, -0.1)), "beta0: -0.1"),
    (lambda p: PNM(p, lr=0.1, betas=(0.9,)), "betas: (0.9,)"),
    (lambda p: PNM(p, lr=0.1, weight_decay=-1e-4), "weight_decay: -0.0001"),
    (lambda p: PNM(p, lr=0.1, decoupled="yes"), "decoupled: 'yes'"),
    (lambda p: PNM([{"params": p, "betas": (0.9, -0.1)}], lr=0.1), "beta0: -0.1"),
    (lambda p: AdaPNM(p, lr=-1e-3), "lr: -0.001"),
    (lambda p: AdaPNM(p, betas=(1.0, 0.999, 1.0)), "beta1: 1.0"),
    (lambda p: AdaPNM(p, betas=(0.9, 1.0, 1.0)), "beta2: 1.0"),
    (lambda p: AdaPNM(p, betas=(0.9, 1.5, 1.0)), "beta2: 1.5"),
    (lambda p: AdaPNM(p, betas=(0.9, 0.999, -0.1)), "beta0: -0.1"),
    (lambda p: AdaPNM(p, betas=(0.9, 1.0)), "betas: (0.9, 1.0)"),
    (lambda p: AdaPNM(p, eps=-1e-8), "eps: -1e-08"),
    (lambda p: AdaPNM(p, weight_decay=-0.1), "weight_decay: -0.1"),
    (lambda p: AdaPNM(p, amsgrad=None), "amsgrad: None"),
    (lambda p: AdaPNM([{"params": p, "eps": -1.0}]), "eps: -1.0"),
]


@pytest.mark.parametrize(("make", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_hyperparameters_raise_value_error_naming_them(
    make: Callable[[list[Tensor]], torch.optim.Optimizer], message: str
) -> None:
    with pytest.raises(ValueError, match=rejects(*message.split(": ", 1))):
        make(make_params("cpu"))


def test_invalid_group_added_later_is_rejected_and_not_added() -> None:
    params = make_params("cpu")
    opt = PNM(params[:2], lr=0.1)
    with pytest.raises(ValueError, match=rejects("lr", "-1.0")):
        opt.add_param_group({"params": params[2:], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_noise_factor_rejects_negative_beta0() -> None:
    with pytest.raises(ValueError, match=rejects("beta0", "-0.1")):
        pnm_noise_factor(-0.1)


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("beta0", [1.0, 2.5])
def test_rules_on_cuda(beta0: float) -> None:
    """The same written-out rule checks, with parameters, gradients and state on the GPU."""
    for decoupled in (True, False):
        check_pnm_rule("cuda", beta0, decoupled)
        for amsgrad in (True, False):
            check_adapnm_rule("cuda", beta0, decoupled, amsgrad)
