"""Tests for ``sgn_lab.models``: shapes, vmap-compatible per-sample gradients, determinism.

The per-sample gradients of every built-in model are compared, in float64, with a Python loop
of ordinary single-sample ``backward()`` calls; agreement shows that the models work under
``torch.func.vmap`` (no in-place ops on inputs, no ``.item()``, no data-dependent branches).
Models are built inside :func:`seeded`, which forks torch's RNG, so no test leaves the global
generator changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from helpers import loop_grads
from torch import nn

from sgn_lab.grads import per_sample_grads
from sgn_lab.models import ACTIVATIONS, MODELS, build_model, half_mse, loss_for

# (model, input_shape, options): every model with each kind of input it accepts.
CASES = [
    ("linear", (20,), {}),
    ("linear", (1, 8, 8), {}),
    ("mlp", (20,), {"width": 8, "depth": 2}),
    ("mlp", (3, 4, 4), {"width": 8, "depth": 1, "activation": "tanh"}),
    ("mlp", (5,), {"width": 8, "depth": 0}),
    ("cnn", (40,), {"width": 4, "depth": 2}),
    ("cnn", (2, 40), {"width": 4, "depth": 2, "activation": "tanh"}),
    ("cnn", (3, 8, 8), {"width": 4, "depth": 2}),
    ("resnet", (40,), {"width": 4, "depth": 2}),
    ("resnet", (1, 40), {"width": 6, "depth": 3, "activation": "tanh"}),
    ("resnet", (3, 8, 8), {"width": 4, "depth": 2}),
]
CASE_IDS = [f"{name}-{'x'.join(map(str, shape))}" for name, shape, _ in CASES]
N = 6


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block and restore the previous state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make(name, shape, options, num_outputs, seed=0, dtype=torch.float64):
    with seeded(seed):
        model = build_model(name, shape, num_outputs, **options).to(dtype)
        x = torch.randn(N, *shape, dtype=dtype)
        if num_outputs > 1:
            y = torch.randint(0, num_outputs, (N,))
        else:
            y = torch.randn(N, dtype=dtype)
    return model, x, y


@pytest.mark.parametrize("name, shape, options", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_outputs", [3, 1], ids=["classes", "regression"])
def test_forward_shape(name, shape, options, num_outputs):
    model, x, _ = make(name, shape, options, num_outputs)
    assert model(x).shape == (N, num_outputs)
    assert model(x[:1]).shape == (1, num_outputs)


@pytest.mark.parametrize("name, shape, options", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_outputs", [3, 1], ids=["classes", "regression"])
def test_per_sample_grads_match_loop(name, shape, options, num_outputs):
    model, x, y = make(name, shape, options, num_outputs)
    loss_fn = loss_for(num_outputs if num_outputs > 1 else 0)
    got = per_sample_grads(model, loss_fn, x, y)
    ref = loop_grads(model, loss_fn, x, y)
    assert list(got) == [k for k, _ in model.named_parameters()]
    for k in ref:
        assert got[k].shape == (N, *dict(model.named_parameters())[k].shape), k
        assert got[k].dtype == torch.float64, k
        scale = max(1.0, ref[k].abs().max().item())
        torch.testing.assert_close(got[k], ref[k], rtol=1e-8, atol=1e-12 * scale)
    # The gradients differ across samples (a shared or zero gradient would also "match").
    flat = torch.cat([g.reshape(N, -1) for g in got.values()], dim=1)
    assert torch.linalg.matrix_rank(flat - flat.mean(0)) >= min(N - 1, flat.shape[1]) - 1


@pytest.mark.parametrize("name, shape, options", CASES, ids=CASE_IDS)
def test_no_batchnorm_anywhere(name, shape, options):
    model, _, _ = make(name, shape, options, 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("shape", [(40,), (2, 40), (3, 8, 8)])
def test_resnet_uses_groupnorm_and_residual_blocks(shape):
    model, _, _ = make("resnet", shape, {"width": 16, "depth": 3}, 10)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 2 * 3  # the stem and two in each block
    assert all(m.num_groups == 8 for m in norms)  # gcd(16, 8)
    blocks = [m for m in model.modules() if type(m).__name__ == "_ResidualBlock"]
    assert len(blocks) == 3


@pytest.mark.parametrize("name", ["cnn", "resnet"])
@pytest.mark.parametrize(
    "shape, conv", [((40,), nn.Conv1d), ((1, 40), nn.Conv1d), ((3, 8, 8), nn.Conv2d)]
)
def test_conv_models_pick_their_dimension(name, shape, conv):
    model, _, _ = make(name, shape, {"width": 4}, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    assert convs and all(type(m) is conv for m in convs)
    assert convs[0].in_channels == (1 if len(shape) == 1 else shape[0])
    assert all(m.out_channels == 4 for m in convs)


def test_cnn_on_flat_and_channel_inputs_is_the_same_function():
    # (n, 40) is one channel of length 40: the model adds the channel axis itself.
    flat, x, _ = make("cnn", (40,), {"width": 4}, 10)
    chan, _, _ = make("cnn", (1, 40), {"width": 4}, 10)
    torch.testing.assert_close(flat(x), chan(x.unsqueeze(1)), rtol=0, atol=0)


def test_mlp_and_linear_keep_their_layout():
    # Layer indices are part of checkpoints and of the CLI's existing behaviour.
    model, _, _ = make("mlp", (64,), {"width": 16, "depth": 2}, 10)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "1.weight": (16, 64), "1.bias": (16,), "3.weight": (16, 16), "3.bias": (16,),
        "5.weight": (10, 16), "5.bias": (10,),
    }
    assert isinstance(model[2], nn.ReLU)
    linear, _, _ = make("linear", (1, 8, 8), {}, 10)
    assert {k: tuple(v.shape) for k, v in linear.state_dict().items()} == {
        "1.weight": (10, 64), "1.bias": (10,),
    }
    tanh, _, _ = make("mlp", (5,), {"width": 3, "depth": 1, "activation": "tanh"}, 2)
    assert isinstance(tanh[2], nn.Tanh)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_under_manual_seed(name):
    shape, options = (3, 8, 8), {"width": 4, "depth": 2}
    a, x, _ = make(name, shape, options, 5, seed=7)
    b, _, _ = make(name, shape, options, 5, seed=7)
    c, _, _ = make(name, shape, options, 5, seed=8)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))


def test_unknown_model_names_it():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        build_model("resnet9000", (10,), 2)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("width", [0, -3, 2.5, True, "8"])
def test_bad_width_names_it(name, width):
    with pytest.raises(ValueError, match=f"width must be an integer >= 1, got {width!r}"):
        build_model(name, (3, 8, 8), 2, width=width)


@pytest.mark.parametrize(
    "name, depth, minimum", [("mlp", -1, 0), ("cnn", 0, 1), ("resnet", 0, 1)]
)
def test_bad_depth_names_it(name, depth, minimum):
    with pytest.raises(ValueError, match=f"depth must be an integer >= {minimum}, got {depth}"):
        build_model(name, (3, 8, 8), 2, depth=depth)


def test_other_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        build_model("mlp", (4,), 2, activation="gelu")
    with pytest.raises(ValueError, match="num_outputs must be an integer >= 1, got 0"):
        build_model("mlp", (4,), 0)
    with pytest.raises(ValueError, match=r"positive integer sizes, got \(0, 4\)"):
        build_model("mlp", (0, 4), 2)
    with pytest.raises(ValueError, match=r"got input_shape \(1, 2, 3, 4\)"):
        build_model("cnn", (1, 2, 3, 4), 2)
    with pytest.raises(ValueError, match=r"got input_shape \(1, 2, 3, 4\)"):
        build_model("resnet", (1, 2, 3, 4), 2)
    assert set(ACTIVATIONS) == {"relu", "tanh"}


def test_loss_for_and_half_mse():
    assert loss_for(3) is F.cross_entropy
    assert loss_for(0) is half_mse
    out = torch.tensor([[1.0], [2.0], [4.0]])
    y = torch.tensor([0.0, 2.0, 2.0])
    # ½ · mean((1-0)², 0², (4-2)²) = ½ · 5/3
    torch.testing.assert_close(half_mse(out, y), torch.tensor(5.0 / 6.0))


def test_models_run_on_built_in_tasks():
    from sgn_lab.data import load_task

    for spec, name in [("digits:image=true", "cnn"), ("mnist1d:num_samples=60", "resnet")]:
        task = load_task(spec, n_train=6)
        with seeded(0):
            model = build_model(name, task.input_shape, task.num_classes, width=4)
        grads = per_sample_grads(model, loss_for(task.num_classes), task.x_train, task.y_train)
        assert all(g.shape[0] == 6 and torch.isfinite(g).all() for g in grads.values())
