"""The built-in models: linear, MLP, CNN and ResNet, for any input shape.

Every model is a plain ``nn.Module`` whose forward is a fixed composition of layers: no
in-place operations, no ``.item()``, no branches on data values and no BatchNorm. That keeps
them usable with ``torch.func`` (``vmap`` over per-sample gradients in
:func:`sgn_lab.per_sample_grads`), where each sample is run as a batch of one. Parameters are
initialised by PyTorch's defaults from the global generator, so ``torch.manual_seed(s)`` before
:func:`build_model` gives the same model every time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from sgn_lab import checks
from sgn_lab.models.names import ACTIVATIONS, MODELS

_ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    width: int = 128,
    depth: int = 2,
    activation: str = "relu",
) -> nn.Module:
    """A built-in model by name (one of :data:`MODELS`).

    Parameters
    ----------
    name
        - ``"linear"``: ``f(x) = W·vec(x) + b``; ``width`` and ``depth`` are not used.
        - ``"mlp"``: flatten, then ``depth`` hidden layers of ``width`` units with
          ``activation``, then a linear read-out. ``depth=0`` is the linear model.
        - ``"cnn"``: ``depth`` blocks of [3-tap convolution with ``width`` channels (padding
          keeps the length), activation, max-pool by 2 where every spatial size is still
          >= 2], then the mean over positions and a linear read-out.
        - ``"resnet"``: a stem convolution to ``width`` channels with GroupNorm and activation,
          then ``depth`` residual blocks ``act(x + GN(conv(act(GN(conv(x))))))`` with
          average-pooling by 2 between blocks (where every spatial size is >= 2), then the
          mean over positions and a linear read-out. GroupNorm (never BatchNorm) normalises
          within each sample, so per-sample gradients exist; it uses ``gcd(width, 8)`` groups.

        The convolutional models pick their dimension from ``input_shape``: (L,) is one
        channel of length L (a channel axis is added inside the model, e.g. MNIST-1D's
        (n, 40)), (C, L) is C channels of length L, both with ``Conv1d``; (C, H, W) is an
        image, with ``Conv2d``.
    input_shape
        Shape of one sample, e.g. ``Task.input_shape``.
    num_outputs
        Number of classes, or 1 for (scalar) regression. Outputs have shape (n, num_outputs).
    width
        Hidden units (MLP) or channels (CNN, ResNet).
    depth
        Hidden layers (MLP, >= 0), convolution blocks (CNN, >= 1) or residual blocks
        (ResNet, >= 1).
    activation
        One of :data:`ACTIVATIONS`.

    Raises
    ------
    ValueError
        An unknown name or activation, a bad width/depth/num_outputs, or an input shape the
        model cannot take (the message names the value).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    shape = _check_shape(input_shape)
    checks.integer("num_outputs", num_outputs, 1)
    checks.integer("width", width, 1)
    checks.integer("depth", depth, 1 if name in ("cnn", "resnet") else 0)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    act = _ACTIVATION_MODULES[activation]
    features = math.prod(shape)
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(features, num_outputs))
    if name == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        size = features
        for _ in range(depth):
            layers += [nn.Linear(size, width), act()]
            size = width
        layers.append(nn.Linear(size, num_outputs))
        return nn.Sequential(*layers)
    return _conv_model(name, shape, num_outputs, width=width, depth=depth, act=act)


def _conv_model(
    name: str,
    shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: int,
    depth: int,
    act: type[nn.Module],
) -> nn.Module:
    if len(shape) not in (1, 2, 3):
        raise ValueError(
            f"model {name!r} takes inputs of shape (L,), (C, L) or (C, H, W); got input_shape "
            f"{shape}"
        )
    layers: list[nn.Module] = []
    if len(shape) == 1:
        layers.append(nn.Unflatten(1, (1, shape[0])))  # (n, L) -> (n, 1, L)
        shape = (1, shape[0])
    channels, spatial = shape[0], list(shape[1:])
    dims = len(spatial)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d

    def pool(kind: type[nn.Module]) -> list[nn.Module]:
        # Decided from the static input shape at build time, never from data in forward.
        if min(spatial) < 2:
            return []
        spatial[:] = [s // 2 for s in spatial]
        return [kind(2)]

    if name == "cnn":
        max_pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
        for i in range(depth):
            layers += [conv(channels if i == 0 else width, width, 3, padding=1), act()]
            layers += pool(max_pool)
    else:
        avg_pool = nn.AvgPool1d if dims == 1 else nn.AvgPool2d
        groups = math.gcd(width, 8)
        layers += [
            conv(channels, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width), act()
        ]
        for i in range(depth):
            layers.append(_ResidualBlock(width, dims=dims, groups=groups, act=act))
            if i < depth - 1:
                layers += pool(avg_pool)
    layers += [_GlobalMeanPool(), nn.Linear(width, num_outputs)]
    return nn.Sequential(*layers)


class _ResidualBlock(nn.Module):
    """``act(x + GN(conv(act(GN(conv(x))))))`` at constant width and resolution."""

    def __init__(self, width: int, *, dims: int, groups: int, act: type[nn.Module]) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        # No conv bias: the GroupNorm right after it has its own shift.
        self.conv1 = conv(width, width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, width)
        self.act1 = act()
        self.conv2 = conv(width, width, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, width)
        self.act2 = act()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.norm1(self.conv1(x)))
        return self.act2(x + self.norm2(self.conv2(h)))  # out of place: vmap-safe


class _GlobalMeanPool(nn.Module):
    """(n, C, *spatial) -> (n, C): the mean over all positions."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).mean(dim=2)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of sizes, got {input_shape!r}") from None
    if not shape or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
    ):
        raise ValueError(f"input_shape must be positive integer sizes, got {input_shape!r}")
    return shape
