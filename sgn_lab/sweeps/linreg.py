"""The Gaussian linear-regression problem the sweeps share: x ~ N(0, H), y = xᵀw* + ε.

:func:`linreg_problem` draws a sweep's problem (H, w*, σ from ``load_task("linreg")``,
optionally rotated, and the fixed state w = w* + δ at ``distance`` from w*) from the sweep's
seed and key; :class:`LinregProblem` samples it. :func:`linear_model` and
:func:`half_squared_error` are the model and loss whose per-sample gradients the sweeps take,
and :func:`keyed_generator` gives each draw its own generator from (seed, keys...). Used by the
theory sweeps (:mod:`sgn_lab.sweeps.runs`) and the critical-batch sweep
(:mod:`sgn_lab.sweeps.critical`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from sgn_lab import theory
from sgn_lab.data import load_task
from sgn_lab.seeds import SweepPurpose, derive
from sgn_lab.sweeps.config import SweepConfig

DTYPE = torch.float64
"""The sweeps' floating-point type."""


@dataclass(frozen=True)
class LinregProblem:
    """x ~ N(0, H) as z @ rootᵀ, y = x·w* + σε; the fixed state w = w* + δ."""

    H: np.ndarray
    root: Tensor
    w_star: Tensor
    noise_std: float
    delta: Tensor

    @property
    def dim(self) -> int:
        return self.H.shape[0]

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        z = torch.randn(*shape, self.dim, generator=generator, dtype=DTYPE)
        x = z @ self.root.T
        eps = torch.randn(*shape, generator=generator, dtype=DTYPE)
        return x, x @ self.w_star + self.noise_std * eps

    def gradient_covariance(self) -> np.ndarray:
        """Σ(w) at the fixed state (exact, population)."""
        return theory.linreg_gradient_covariance(self.H, self.delta.numpy(), self.noise_std)


def linreg_problem(config: SweepConfig, sweep_key: int) -> LinregProblem:
    """The problem of a sweep: H, w*, σ from ``load_task("linreg")``, then the fixed state."""
    seed = derive(config.seed, sweep_key, SweepPurpose.PROBLEM) % 2**32  # load_task's range
    task = load_task("linreg", seed=seed, n=8, dim=config.dim, condition=config.condition,
                     noise_std=config.noise_std)
    H = task.info["H"].numpy().astype(np.float64)
    w_star = task.info["w_star"].numpy().astype(np.float64)
    rng = np.random.default_rng(derive(config.seed, sweep_key, SweepPurpose.ROTATION))
    if config.rotate:
        q, r = np.linalg.qr(rng.standard_normal((config.dim, config.dim)))
        q = q * np.sign(np.diag(r))  # Haar-distributed
        H = q @ H @ q.T
        H = 0.5 * (H + H.T)
        w_star = q @ w_star
    u = rng.standard_normal(config.dim)
    delta = (config.distance or 0.0) * u / np.linalg.norm(u)
    root = np.linalg.cholesky(H)
    return LinregProblem(
        H=H,
        root=torch.from_numpy(root),
        w_star=torch.from_numpy(w_star),
        noise_std=float(task.info["noise_std"]),
        delta=torch.from_numpy(delta),
    )


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """½(xᵀw − y)², the mean over the batch."""
    return 0.5 * (outputs.squeeze(-1) - targets).square().mean()


def linear_model(w: Tensor) -> nn.Linear:
    """``nn.Linear`` without bias at weights ``w`` (float64)."""
    model = nn.Linear(w.numel(), 1, bias=False, dtype=DTYPE)
    with torch.no_grad():
        model.weight.copy_(w.reshape(1, -1))
    return model


def keyed_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by :func:`sgn_lab.seeds.derive` of (seed, keys...)."""
    return torch.Generator().manual_seed(derive(seed, *keys))


