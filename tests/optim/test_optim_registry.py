"""The registry that names every method for configs and the CLI."""

import pytest
import torch
from torch import nn

from sgn_lab.optim import METHODS, STEP_INPUTS, build_optimizer

EXPECTED = ("sgd", "momentum", "adam", "gaussian", "covariance", "symmetric", "pnm", "adapnm",
            "adaptive-hb")


def test_every_issue_name_is_registered():
    assert tuple(METHODS) == EXPECTED
    assert all(m.step_input in STEP_INPUTS for m in METHODS.values())


@pytest.mark.parametrize("name", EXPECTED)
def test_each_method_builds_with_defaults_and_lr(name):
    model = nn.Linear(3, 2)
    extra = {"small_batch": 8, "large_batch": 64} if name == "covariance" else {}
    opt = build_optimizer(name, model.parameters(), lr=0.01, **extra)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == 0.01
    assert "lr" in METHODS[name].hyperparameters()


def test_baselines_are_torch_optimizers():
    params = nn.Linear(2, 1).parameters
    assert type(build_optimizer("sgd", params(), lr=0.1)) is torch.optim.SGD
    momentum = build_optimizer("momentum", params(), lr=0.1)
    assert type(momentum) is torch.optim.SGD and momentum.param_groups[0]["momentum"] == 0.9
    assert type(build_optimizer("adam", params(), lr=0.1)) is torch.optim.Adam


def test_hyperparameters_pass_through():
    opt = build_optimizer("pnm", nn.Linear(2, 1).parameters(), lr=0.1, betas=(0.8, 2.0))
    assert opt.param_groups[0]["betas"] == (0.8, 2.0)


def test_unknown_method_and_hyperparameter_are_named():
    with pytest.raises(ValueError, match="unknown method 'lbfgs'.*pnm"):
        build_optimizer("lbfgs", nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'pnm' takes no hyperparameter 'beta0'.*betas"):
        build_optimizer("pnm", nn.Linear(2, 1).parameters(), lr=0.1, beta0=1.0)


@pytest.mark.parametrize("name", EXPECTED)
def test_every_method_trains_a_model_through_train_step(name):
    # Linear regression: each method, stepped through its own step input, lowers the loss.
    from sgn_lab.optim import train_step

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(5, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    hyper = {
        "gaussian": {"sigma": 1e-3, "seed": 0},
        "covariance": {"small_batch": 8, "large_batch": 32, "seed": 0},
        "symmetric": {"noise": 0.01, "seed": 0},
    }.get(name, {})
    lr = 0.01 if name in ("adam", "adapnm") else 0.05
    opt = build_optimizer(name, model.named_parameters(), lr=lr, **hyper)
    loss_fn = nn.functional.mse_loss
    first = float(loss_fn(model(x), y).detach())
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        loss = train_step(name, opt, model, loss_fn, x[idx], y[idx])
        assert loss == loss  # finite, returned as a float
    assert float(loss_fn(model(x), y).detach()) < 0.5 * first


def test_seeded_optimizer_survives_deepcopy_and_pickle():
    import copy
    import pickle

    from sgn_lab.optim import GaussianNoiseSGD

    model = nn.Linear(3, 2)
    opt = GaussianNoiseSGD(model.parameters(), lr=0.1, sigma=1.0, seed=4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is model2.weight
    opt3 = pickle.loads(pickle.dumps(opt))
    for o in (opt2, opt3):
        assert o.generator is not opt.generator
        assert torch.equal(o.generator.get_state(), opt.generator.get_state())
    for p in model2.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt2.step()
    assert torch.equal(model.weight, model2.weight)  # same state, same draws
