"""AdaptiveHeavyBall against its rule written out here (both forms), the closed form of the
secant momentum on 1-D quadratics, the special steps, and state-dict reloads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import CPU_AND_CUDA, rejects
from torch import nn

from sgn_lab.optim.adaptive_hb import AdaptiveHeavyBall

F64 = torch.float64

DEVICES = CPU_AND_CUDA


pytestmark = pytest.mark.usefixtures("one_thread")


def clip_beta(lr, h, beta_max):
    """The published β: clip((1 − sqrt(lr·h))², 0, β_max)."""
    return min(max((1 - math.sqrt(lr * h)) ** 2, 0.0), beta_max)


SHAPES = [(4, 3), (5,), (2, 2, 2)]
GROUP_OF = [0, 0, 1]


def group_hyper(form):
    if form == "sgd":
        return [dict(lr=0.05, beta_max=0.9, weight_decay=1e-2),
                dict(lr=0.2, beta_max=0.6, weight_decay=0.0)]
    return [dict(lr=0.05, beta_max=0.9, weight_decay=1e-2, beta2=0.999, eps=1e-8),
            dict(lr=0.02, beta_max=0.6, weight_decay=0.0, beta2=0.99, eps=1e-6)]


def random_grads(gen, device, k):
    """Group 0: pure noise (β moves freely). Group 1: a fixed direction plus a little noise,
    so consecutive gradients hardly change, h is small and β hits the β_max clip."""
    grads = []
    for shape, gi in zip(SHAPES, GROUP_OF, strict=True):
        noise = torch.randn(shape, generator=gen, dtype=F64)
        g = noise if gi == 0 else 1.0 + 0.01 * noise
        grads.append(g.to(device))
    return grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["sgd", "adam"])
def test_rule_written_out_over_25_steps(form, device):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=F64).to(device) for s in SHAPES]
    params = [nn.Parameter(t.clone()) for t in init]
    idle = nn.Parameter(torch.ones(3, dtype=F64, device=device))  # never gets a gradient
    hp = group_hyper(form)
    opt = AdaptiveHeavyBall(
        [{"params": [params[0], idle, params[1]], **hp[0]}, {"params": [params[2]], **hp[1]}],
        lr=1.0, form=form,
    )

    # Reference: plain tensors, one loop per step, one secant per group.
    theta = [t.clone() for t in init]
    prev_theta, prev_g = [None] * 3, [None] * 3
    buf = [torch.zeros_like(t) for t in init]  # b (sgd) or m (adam)
    v = [torch.zeros_like(t) for t in init]
    prod = [1.0, 1.0]
    betas = [0.0, 0.0]
    seen = {"clipped": 0, "free": 0}

    for k in range(1, 26):
        grads = random_grads(gen, device, k)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()

        gk = [g + hp[gi]["weight_decay"] * t
              for g, t, gi in zip(grads, theta, GROUP_OF, strict=True)]
        for gi in (0, 1):
            idx = [i for i in range(3) if GROUP_OF[i] == gi]
            if k == 1:
                betas[gi] = 0.0
            else:
                dg = torch.cat([(gk[i] - prev_g[i]).reshape(-1) for i in idx])
                dth = torch.cat([(theta[i] - prev_theta[i]).reshape(-1) for i in idx])
                h = (dg.norm() / dth.norm()).item()
                raw = (1 - math.sqrt(hp[gi]["lr"] * h)) ** 2
                betas[gi] = clip_beta(hp[gi]["lr"], h, hp[gi]["beta_max"])
                seen["clipped" if raw > hp[gi]["beta_max"] else "free"] += 1
            prod[gi] *= betas[gi]
        for i in range(3):
            gi, lr, beta = GROUP_OF[i], hp[GROUP_OF[i]]["lr"], betas[GROUP_OF[i]]
            prev_theta[i], prev_g[i] = theta[i], gk[i]
            if form == "sgd":
                buf[i] = beta * buf[i] + gk[i]
                theta[i] = theta[i] - lr * buf[i]
            else:
                b2, eps = hp[gi]["beta2"], hp[gi]["eps"]
                buf[i] = beta * buf[i] + (1 - beta) * gk[i]
                v[i] = b2 * v[i] + (1 - b2) * gk[i] ** 2
                m_hat = buf[i] / (1 - prod[gi])
                v_hat = v[i] / (1 - b2**k)
                theta[i] = theta[i] - lr * m_hat / (v_hat.sqrt() + eps)

        for p, t in zip(params, theta, strict=True):
            torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-14)
        assert opt.current_betas() == pytest.approx(betas, rel=1e-12, abs=1e-15)
        assert torch.equal(idle.detach(), torch.ones(3, dtype=F64, device=device))

    assert seen["clipped"] > 0 and seen["free"] > 0  # both branches of the clip were used
    assert not opt.state[idle]


@pytest.mark.parametrize("form", ["sgd", "adam"])
def test_first_step_uses_beta_zero(form):
    gen = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(6, generator=gen, dtype=F64))
    g = torch.randn(6, generator=gen, dtype=F64)
    w = p.detach().clone()
    opt = AdaptiveHeavyBall([p], lr=0.1, beta_max=0.9, form=form, eps=1e-8)
    assert opt.current_betas() == [0.0]
    p.grad = g.clone()
    opt.step()
    assert opt.current_betas() == [0.0]
    if form == "sgd":
        expected = w - 0.1 * g  # plain gradient step
    else:
        expected = w - 0.1 * g / (g.abs() + 1e-8)  # m = g, v̂ = g²
    torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("form", ["sgd", "adam"])
@pytest.mark.parametrize(
    "h,case",
    [
        (10.0, "lr·h = 1: β = 0"),
        (2.5, "free: (1 − 0.5)² = 0.25"),
        (30.0, "free, lr·h > 1: (sqrt 3 − 1)²"),
        (0.01, "flat: clipped at β_max"),
        (50.0, "very sharp: clipped at β_max"),
    ],
)
def test_secant_on_a_1d_quadratic_is_the_curvature(form, h, case):
    lr, beta_max, c = 0.1, 0.9, 0.3
    p = nn.Parameter(torch.tensor([2.0], dtype=F64))
    opt = AdaptiveHeavyBall([p], lr=lr, beta_max=beta_max, form=form)
    expected = clip_beta(lr, h, beta_max)
    assert (expected == beta_max) == ("clipped" in case)

    def closure():
        opt.zero_grad()
        loss = 0.5 * h * (p - c).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.current_betas() == [0.0]
    for _ in range(4):
        # (Should a step land exactly on c, the next one does not move and keeps β: same value.)
        opt.step(closure)
        assert opt.current_betas()[0] == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_adam_form_corrects_the_first_moment_of_a_late_parameter():
    # q gets its first gradient at step 4, when the group's β is no longer 0: m = (1 − β)·g,
    # and the correction 1/(1 − Π β) = 1/(1 − β) makes its first step the unbiased Adam one.
    gen = torch.Generator().manual_seed(3)
    p = nn.Parameter(torch.randn(5, generator=gen, dtype=F64))
    q = nn.Parameter(torch.randn(3, generator=gen, dtype=F64))
    opt = AdaptiveHeavyBall([p, q], lr=0.1, beta_max=0.9, form="adam", eps=1e-8)
    for _ in range(3):
        p.grad = torch.randn(5, generator=gen, dtype=F64)
        opt.step()
    assert q.grad is None and not opt.state[q]
    p.grad = torch.randn(5, generator=gen, dtype=F64)
    g = torch.randn(3, generator=gen, dtype=F64)
    q.grad = g.clone()
    w = q.detach().clone()
    opt.step()
    beta = opt.current_betas()[0]
    assert beta > 0.05
    assert opt.state[q]["beta_prod"] == beta
    torch.testing.assert_close(q.detach(), w - 0.1 * g / (g.abs() + 1e-8), rtol=1e-13, atol=0)


def test_no_movement_keeps_the_previous_beta():
    gen = torch.Generator().manual_seed(2)
    p = nn.Parameter(torch.randn(5, generator=gen, dtype=F64))
    opt = AdaptiveHeavyBall([p], lr=0.1, beta_max=0.95)
    for _ in range(3):
        p.grad = torch.randn(5, generator=gen, dtype=F64)
        opt.step()
    beta = opt.current_betas()[0]
    assert 0.0 < beta < 0.95
    # Put θ back where the last step started: θ_k = θ_{k−1}, h undefined.
    with torch.no_grad():
        p.copy_(opt.state[p]["prev_param"])
    buf = opt.state[p]["momentum_buffer"].clone()
    g = torch.randn(5, generator=gen, dtype=F64)
    p.grad = g.clone()
    w = p.detach().clone()
    opt.step()
    assert opt.current_betas()[0] == beta
    torch.testing.assert_close(p.detach(), w - 0.1 * (beta * buf + g), rtol=1e-14, atol=0)


@pytest.mark.parametrize("form", ["sgd", "adam"])
def test_state_dict_round_trip_continues_bit_identically(form):
    gen = torch.Generator().manual_seed(4)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in SHAPES]
    hp = group_hyper(form)

    def make(ps):
        return AdaptiveHeavyBall(
            [{"params": ps[:2], **hp[0]}, {"params": ps[2:], **hp[1]}], lr=1.0, form=form
        )

    opt = make(params)
    grads = [random_grads(gen, "cpu", k) for k in range(17)]

    def run(ps, o, steps):
        for gs in steps:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            o.step()

    run(params, opt, grads[:7])
    saved = copy.deepcopy(opt.state_dict())
    params2 = copy.deepcopy(params)
    opt2 = make(params2)
    opt2.load_state_dict(saved)
    assert opt2.current_betas() == opt.current_betas()
    for k in range(7, 17):
        run(params, opt, grads[k : k + 1])
        run(params2, opt2, grads[k : k + 1])
        for p, q in zip(params, params2, strict=True):
            assert torch.equal(p, q)
        assert opt.current_betas() == opt2.current_betas()


@pytest.mark.parametrize(
    "kwargs,name,value",
    [
        ({"lr": 0.0}, "lr", "0.0"),
        ({"lr": -0.1}, "lr", "-0.1"),
        ({"beta_max": 1.0}, "beta_max", "1.0"),
        ({"beta_max": -0.5}, "beta_max", "-0.5"),
        ({"weight_decay": -1.0}, "weight_decay", "-1.0"),
        ({"form": "nesterov"}, "form", "'nesterov'"),
        ({"beta2": 1.0}, "beta2", "1.0"),
        ({"eps": 0.0}, "eps", "0.0"),
    ],
)
def test_invalid_hyperparameters_name_the_value(kwargs, name, value):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=rejects(name, str(value))):
        AdaptiveHeavyBall([p], **{"lr": 0.1, **kwargs})
    with pytest.raises(ValueError, match=rejects(name, str(value))):
        AdaptiveHeavyBall([{"params": [p], **kwargs}], lr=0.1)
