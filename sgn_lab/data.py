"""Built-in tasks: data made on this machine, split into seeded train and test sets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

TASKS = ("digits", "gaussian-mixture", "linreg")


@dataclass(frozen=True)
class Task:
    """A supervised data set. ``num_classes`` is 0 for regression (targets are floats)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_classification(self) -> bool:
        return self.num_classes > 0


def load_task(name: str, *, seed: int = 0, test_fraction: float = 0.25) -> Task:
    """Load a built-in task by name (one of :data:`TASKS`), deterministic under ``seed``.

    - ``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes),
      pixels scaled to [0, 1] and flattened to 64 features.
    - ``gaussian-mixture``: 2000 points in 20 dimensions from 4 Gaussian classes.
    - ``linreg``: Gaussian linear regression x ~ N(0, H), y = xᵀw* + ε, ε ~ N(0, 0.5²), with a
      fixed diagonal H of condition number 100 in 20 dimensions.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y, classes = bunch.data / 16.0, bunch.target, 10
    elif name == "gaussian-mixture":
        classes, dim, n = 4, 20, 2000
        centres = rng.standard_normal((classes, dim)) * 1.5
        y = rng.integers(0, classes, n)
        x = centres[y] + rng.standard_normal((n, dim))
    elif name == "linreg":
        dim, n, noise = 20, 2000, 0.5
        h = np.logspace(0, -2, dim)
        w_star = rng.standard_normal(dim)
        x = rng.standard_normal((n, dim)) * np.sqrt(h)
        y, classes = x @ w_star + noise * rng.standard_normal(n), 0
    else:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    order = rng.permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long if classes else torch.float32)
    return Task(name, xt[train], yt[train], xt[test], yt[test], classes)
