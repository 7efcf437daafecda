"""Built-in models and the loss that goes with a task."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

MODELS = ("linear", "mlp")


def build_model(
    name: str, input_shape: tuple[int, ...], num_outputs: int, *, width: int = 128, depth: int = 2
) -> nn.Module:
    """A built-in model by name (one of :data:`MODELS`); ``num_outputs`` = classes, or 1."""
    if width < 1 or depth < 0:
        raise ValueError(f"width must be >= 1 and depth >= 0, got width={width}, depth={depth}")
    features = math.prod(input_shape)
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(features, num_outputs))
    if name == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        size = features
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, num_outputs))
        return nn.Sequential(*layers)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def half_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """½ mean squared error, so that the SGN of linear regression has its textbook form."""
    return 0.5 * (outputs.reshape(targets.shape) - targets).pow(2).mean()


def loss_for(num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross entropy for classification (num_classes > 0), ½ MSE for regression."""
    return F.cross_entropy if num_classes > 0 else half_mse
