"""S-SGD (SymmetricNoiseSGD) against its rule written out here, GD on quadratics, exact Taylor
terms on quartic and exponential losses, and bit-exact weight restoration and reloads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_AND_CUDA, rejects
from torch import nn

from sgn_lab.optim.symmetric import SymmetricNoiseSGD

F64 = torch.float64

DEVICES = CPU_AND_CUDA


pytestmark = pytest.mark.usefixtures("one_thread")


def rademacher(shape, gen, device, dtype):
    """The documented draw: randint(0, 2) mapped to ±1."""
    r = torch.randint(0, 2, shape, generator=gen, device=device, dtype=dtype)
    return 2 * r - 1


# --------------------------------------------------------------------------- quadratic: = GD


def quadratic_problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    d1, d2 = 3, 4  # p1 of shape (3,), p2 of shape (2, 2): coupled through A
    m = torch.randn(d1 + d2, d1 + d2, generator=gen, dtype=F64)
    a = m @ m.T / (d1 + d2) + 0.5 * torch.eye(d1 + d2, dtype=F64)  # SPD, dense: couples p1, p2
    c = torch.randn(d1 + d2, generator=gen, dtype=F64)
    p1 = torch.randn(d1, generator=gen, dtype=F64)
    p2 = torch.randn(2, 2, generator=gen, dtype=F64)
    return a, c, p1, p2


def quadratic_loss(a, c, p1, p2):
    r = torch.cat([p1.reshape(-1), p2.reshape(-1)]) - c
    return 0.5 * r @ a @ r


@pytest.mark.parametrize("scale,noise", [("relative", 0.3), ("absolute", 0.5)])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.01)])
def test_on_a_quadratic_every_noise_gives_the_gradient_descent_trajectory(
    scale, noise, momentum, weight_decay
):
    a, c, p1_0, p2_0 = quadratic_problem(0)
    p1, p2 = nn.Parameter(p1_0.clone()), nn.Parameter(p2_0.clone())
    q1, q2 = nn.Parameter(p1_0.clone()), nn.Parameter(p2_0.clone())
    hyper = dict(momentum=momentum, weight_decay=weight_decay)
    ssgd = SymmetricNoiseSGD(
        [{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 0.05}],
        lr=0.1, noise=noise, scale=scale, seed=3, **hyper,
    )
    sgd = torch.optim.SGD([{"params": [q1], "lr": 0.1}, {"params": [q2], "lr": 0.05}], **hyper)

    seen = []

    def closure_s():
        ssgd.zero_grad()
        seen.append(p1.detach().clone())
        loss = quadratic_loss(a, c, p1, p2)
        loss.backward()
        return loss

    def closure_g():
        sgd.zero_grad()
        loss = quadratic_loss(a, c, q1, q2)
        loss.backward()
        return loss

    for _ in range(20):
        before = p1.detach().clone()
        ssgd.step(closure_s)
        sgd.step(closure_g)
        # The closure really saw perturbed weights (otherwise the comparison proves nothing).
        assert (seen[-2] - before).abs().min() > 1e-3
        torch.testing.assert_close(p1, q1, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(p2, q2, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------- non-quadratic: the even terms


@pytest.mark.parametrize("scale", ["relative", "absolute"])
def test_quartic_loss_gets_exactly_the_third_derivative_term(scale):
    # L = Σ θ⁴/4, ε = ±a: ½[g(θ+a) + g(θ−a)] = θ³ + 3θa² = ∇L + ½∇³L[ε, ε], whatever the signs.
    theta0 = torch.tensor([0.7, -1.3, 0.2, 2.0], dtype=F64)
    p = nn.Parameter(theta0.clone())
    noise, lr = 0.25, 0.05
    opt = SymmetricNoiseSGD([p], lr=lr, noise=noise, scale=scale, seed=1)

    def closure():
        opt.zero_grad()
        loss = (p**4).sum() / 4
        loss.backward()
        return loss

    opt.step(closure)
    a = noise * theta0.norm() / math.sqrt(4) if scale == "relative" else noise
    expected_grad = theta0**3 + 3 * theta0 * a**2
    torch.testing.assert_close(p.grad, expected_grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.detach(), theta0 - lr * expected_grad, rtol=1e-12, atol=0)
    # ... and so it is not the gradient-descent step.
    gd = theta0 - lr * theta0**3
    assert (p.detach() - gd).abs().min() > 1e-4


def test_leading_even_term_is_half_the_third_derivative():
    # L = Σ exp(θ): ½[e^(θ+a) + e^(θ−a)] − e^θ = e^θ (cosh a − 1) = ½ e^θ a² (1 + a²/12 + ...),
    # so ½∇³L[ε, ε] = ½ e^θ a² is the leading term with relative remainder ≈ a²/12.
    theta0 = torch.tensor([0.3, -0.8, 1.1], dtype=F64)
    for a in (0.2, 0.1, 0.05):
        p = nn.Parameter(theta0.clone())
        opt = SymmetricNoiseSGD([p], lr=0.01, noise=a, scale="absolute", seed=0)

        def closure(p=p, opt=opt):
            opt.zero_grad()
            loss = p.exp().sum()
            loss.backward()
            return loss

        opt.step(closure)
        diff = p.grad - theta0.exp()
        torch.testing.assert_close(diff, theta0.exp() * (math.cosh(a) - 1), rtol=1e-9, atol=0)
        leading = 0.5 * theta0.exp() * a**2
        rel = diff / leading - 1
        assert torch.all(rel > 0)
        assert torch.all((rel - a**2 / 12).abs() <= a**4 / 300)


# ----------------------------------------------------------- the rule, replayed, on an MLP


def mlp(device):
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(device, F64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=gen, dtype=F64))
        model[0].bias.zero_()  # all-zero tensor: relative noise is zero until it moves
    return model


def mlp_loss(ws, x, y):
    w1, b1, w2, b2 = ws
    out = torch.tanh(x @ w1.T + b1) @ w2.T + b2
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("device", DEVICES)
def test_rule_written_out_with_replayed_draws_on_an_mlp(device):
    model = mlp(device)
    seed = 1234
    groups_hp = [
        dict(lr=0.1, noise=0.05, scale="relative", momentum=0.9, weight_decay=1e-2,
             noise_decay=1.0),
        dict(lr=0.05, noise=0.02, scale="absolute", momentum=0.0, weight_decay=0.0,
             noise_decay=0.9),
    ]
    opt = SymmetricNoiseSGD(
        [{"params": list(model[0].parameters()), **groups_hp[0]},
         {"params": list(model[2].parameters()), **groups_hp[1]}],
        lr=1.0, seed=seed,
    )

    # Reference state: plain tensors, the order of the groups and parameters.
    ws = [p.detach().clone() for p in model.parameters()]
    group_of = [0, 0, 1, 1]
    bufs = [None] * 4
    noise = [hp["noise"] for hp in groups_hp]
    gen = torch.Generator(device=device).manual_seed(seed)
    data = torch.Generator().manual_seed(99)

    for _ in range(20):
        x = torch.randn(8, 3, generator=data, dtype=F64).to(device)
        y = torch.randn(8, 2, generator=data, dtype=F64).to(device)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)

        # --- reference step
        eps = []
        for w, gi in zip(ws, group_of, strict=True):
            s = rademacher(w.shape, gen, device, F64)
            hp = groups_hp[gi]
            a = noise[gi] * torch.sqrt((w**2).mean()) if hp["scale"] == "relative" else noise[gi]
            eps.append(s * a)
        grads, losses = [], []
        for sign in (1.0, -1.0):
            pts = [(w + sign * e).requires_grad_() for w, e in zip(ws, eps, strict=True)]
            lv = mlp_loss(pts, x, y)
            grads.append(torch.autograd.grad(lv, pts))
            losses.append(lv.detach())
        for i, gi in enumerate(group_of):
            hp = groups_hp[gi]
            g = 0.5 * (grads[0][i] + grads[1][i])
            d = g + hp["weight_decay"] * ws[i]
            if hp["momentum"] > 0:
                bufs[i] = d.clone() if bufs[i] is None else hp["momentum"] * bufs[i] + d
                d = bufs[i]
            ws[i] = ws[i] - hp["lr"] * d
        noise = [n * hp["noise_decay"] for n, hp in zip(noise, groups_hp, strict=True)]

        for p, w in zip(model.parameters(), ws, strict=True):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(loss.detach(), 0.5 * (losses[0] + losses[1]), rtol=1e-12,
                                   atol=0)
        for group, n in zip(opt.param_groups, noise, strict=True):
            assert group["noise"] == pytest.approx(n, rel=1e-14)
    # The zero-initialised bias left zero and then took relative noise (the fallback was hit).
    assert ws[1].abs().min() > 0


# ------------------------------------------------------------------ exact restoration of w


def test_closure_sees_w_plus_and_minus_eps_and_w_is_restored_bit_for_bit():
    # Large absolute noise on small weights: (w + ε) − ε != w in floating point, so restoring
    # by add and subtract would fail here; copying back must give exactly w − η·g.
    gen = torch.Generator().manual_seed(5)
    p = nn.Parameter(1e-3 * torch.randn(50, generator=gen, dtype=F64))
    z = nn.Parameter(torch.zeros(4, dtype=F64))  # relative noise of an all-zero tensor: none
    noise, lr, seed = 1e3, 0.01, 77
    opt = SymmetricNoiseSGD(
        [{"params": [p], "scale": "absolute"}, {"params": [z], "scale": "relative"}],
        lr=lr, noise=noise, seed=seed,
    )
    target = torch.randn(50, generator=gen, dtype=F64)
    seen, grads = [], []

    def closure():
        opt.zero_grad()
        seen.append((p.detach().clone(), z.detach().clone()))
        loss = ((p - target) ** 3).abs().sum() + (z**2 * (1 + p[:4])).sum()  # ∇_z = 0 at z = 0
        loss.backward()
        grads.append((p.grad.clone(), z.grad.clone()))
        return loss

    for _ in range(3):
        w, wz = p.detach().clone(), z.detach().clone()
        assert not wz.any()  # the all-zero case, checked at every step
        ref = torch.Generator().manual_seed(seed)
        for _ in range(len(seen) // 2):  # replay the draws of earlier steps
            rademacher(p.shape, ref, "cpu", F64), rademacher(z.shape, ref, "cpu", F64)
        eps = noise * rademacher(p.shape, ref, "cpu", F64)
        rademacher(z.shape, ref, "cpu", F64)
        assert not torch.equal((w + eps) - eps, w)  # the naive restore really would drift

        opt.step(closure)
        (plus, zplus), (minus, zminus) = seen[-2], seen[-1]
        assert torch.equal(plus, w + eps) and torch.equal(minus, w - eps)
        assert torch.equal(zplus, wz) and torch.equal(zminus, wz)
        g = 0.5 * (grads[-2][0] + grads[-1][0])
        assert torch.equal(p.grad, g)
        assert torch.equal(p.detach(), w.add(g, alpha=-lr))


def test_weights_are_restored_when_the_closure_raises():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=F64))
    w = p.detach().clone()
    opt = SymmetricNoiseSGD([p], lr=0.1, noise=0.3, seed=0)
    calls = []

    def closure():
        calls.append(p.detach().clone())
        if len(calls) == 2:
            raise RuntimeError("data loader died")
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(closure)
    assert not torch.equal(calls[1], w)
    assert torch.equal(p.detach(), w)


def test_step_returns_the_mean_of_the_two_losses():
    p = nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    opt = SymmetricNoiseSGD([p], lr=0.1, noise=0.5, scale="absolute", seed=0)
    losses = []

    def closure():
        opt.zero_grad()
        loss = (p**3).sum()
        loss.backward()
        losses.append(loss.detach())
        return loss

    out = opt.step(closure)
    assert len(losses) == 2 and losses[0] != losses[1]
    assert torch.equal(out, (losses[0] + losses[1]) / 2)


# --------------------------------------------------------------------- state dict round trip


def test_state_dict_round_trip_continues_bit_identically_including_draws():
    model = mlp("cpu")
    hp = dict(lr=0.05, noise=0.1, momentum=0.9, weight_decay=1e-3, noise_decay=0.95)
    opt = SymmetricNoiseSGD(
        [{"params": list(model[0].parameters())},
         {"params": list(model[2].parameters()), "scale": "absolute", "momentum": 0.5}],
        seed=11, **hp,
    )
    data = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, generator=data, dtype=F64),
                torch.randn(8, 2, generator=data, dtype=F64)) for _ in range(17)]

    def run(model, opt, steps):
        losses = []
        for x, y in steps:
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure).detach())
        return losses

    run(model, opt, batches[:7])
    saved = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = SymmetricNoiseSGD(
        [{"params": list(model2[0].parameters())},
         {"params": list(model2[2].parameters()), "scale": "absolute", "momentum": 0.5}],
        seed=999, **hp,  # a different seed: the generator state must come from the state dict
    )
    opt2.load_state_dict(saved)
    losses = run(model, opt, batches[7:])
    losses2 = run(model2, opt2, batches[7:])
    for a, b in zip(losses, losses2, strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [g["noise"] for g in opt.param_groups] == [g["noise"] for g in opt2.param_groups]


# -------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs,name,value",
    [
        ({"lr": 0.0}, "lr", "0.0"),
        ({"lr": -1.0}, "lr", "-1.0"),
        ({"noise": -0.1}, "noise", "-0.1"),
        ({"scale": "rms"}, "scale", "'rms'"),
        ({"momentum": 1.0}, "momentum", "1.0"),
        ({"momentum": -0.1}, "momentum", "-0.1"),
        ({"weight_decay": -1e-4}, "weight_decay", "-0.0001"),
        ({"noise_decay": 0.0}, "noise_decay", "0.0"),
    ],
)
def test_invalid_hyperparameters_name_the_value(kwargs, name, value):
    p = nn.Parameter(torch.zeros(2))
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=rejects(name, str(value))):
        SymmetricNoiseSGD([p], **args)
    # A group that overrides the hyperparameter is checked too.
    with pytest.raises(ValueError, match=rejects(name, str(value))):
        SymmetricNoiseSGD([{"params": [p], **kwargs}], lr=0.1)


def test_step_without_closure_says_a_closure_is_required():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    opt = SymmetricNoiseSGD([p], lr=0.1)
    with pytest.raises(ValueError, match="requires a closure"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(2))
