"""matched_lr: each method at its matched lr moves, at a steady gradient, as SGD at η does.

The reference is the optimizer itself, stepped on a linear loss L(θ) = g·θ (a constant
gradient), not the drift formulas: after the transient (μ^t, β1^t below 1e-12) the step per
iteration must be η·g to rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from sgn_lab.optim import METHODS, SETTINGS, build_optimizer, matched_lr, optimizer_kwargs

ETA = 0.05
CASES = [
    ("sgd", {}),
    ("momentum", {}),
    ("momentum", {"momentum": 0.5}),
    ("gaussian", {"momentum": 0.8}),
    ("covariance", {"momentum": 0.3}),
    ("symmetric", {"momentum": 0.6}),
    ("pnm", {}),
    ("pnm", {"beta0": 2.5, "beta1": 0.5}),
    ("pnm", {"beta0": 0.0}),
]


def _steady_step(method: str, settings: dict, lr: float, steps: int) -> torch.Tensor:
    g = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    resolved = {**SETTINGS[method], **settings}
    if resolved.get("small_batch", 0) is None:
        resolved["small_batch"] = 2
    kwargs = optimizer_kwargs(method, lr, resolved, batch_size=4, seed=0)
    opt = build_optimizer(method, [("theta", theta)] if method == "covariance" else [theta],
                          **kwargs)
    step_input = METHODS[method].step_input
    before = None
    for t in range(steps):
        if t == steps - 1:
            before = theta.detach().clone()
        if step_input == "per_sample":  # every sample's gradient g: the noise is zero
            opt.step({"theta": g.expand(4, 3).clone()})
            continue

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (g * theta).sum()
            loss.backward()
            return loss

        if step_input == "closure":
            opt.step(closure)
        else:
            closure()
            opt.step()
    return before - theta.detach()


@pytest.mark.parametrize("method, settings", CASES)
def test_matched_lr_gives_sgds_mean_step(method, settings):
    lr = matched_lr(method, ETA, settings)
    g = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    step = _steady_step(method, settings, lr, steps=400)
    torch.testing.assert_close(step, ETA * g, rtol=1e-9, atol=0)


def test_known_factors():
    assert matched_lr("momentum", 0.1, {}) == pytest.approx(0.1 * (1 - 0.9))
    assert matched_lr("pnm", 0.1, {"beta0": 1.0}) == pytest.approx(0.1 * math.sqrt(5))
    assert matched_lr("sgd", 0.1, {}) == 0.1


@pytest.mark.parametrize("method", ["adam", "adapnm", "adaptive-hb"])
def test_unmatchable_methods_say_why(method):
    with pytest.raises(ValueError, match=f"method {method!r} cannot be matched") as info:
        matched_lr(method, 0.1, {})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("eta", [0.0, -1.0, math.nan, math.inf])
def test_bad_eta_is_named(eta):
    with pytest.raises(ValueError, match="matched step"):
        matched_lr("sgd", eta, {})


def test_every_method_has_a_rule():
    for name, method in METHODS.items():
        assert method.drift_rule, name
