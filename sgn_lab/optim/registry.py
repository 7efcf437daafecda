"""The registry of optimizers: each method's name, factory (by import path), step input,
run-level hyperparameters with their defaults, and the drift of its mean step. Light (no torch):
the config's schema and ``sgn-lab --help`` read it; :mod:`sgn_lab.optim.build` builds and steps
the optimizers it names.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sgn_lab import checks

if TYPE_CHECKING:
    from torch.optim import Optimizer

STEP_INPUTS = ("gradient", "closure", "per_sample")

COVARIANCE_VARIANTS = ("full", "diagonal")
"""Covariance noise: the full covariance or its diagonal
(:class:`~sgn_lab.optim.injection.CovarianceNoiseSGD`)."""


def pnm_noise_factor(beta0: float) -> float:
    """The paper's noise factor ``Γ = (1+β0)² + β0²`` (5 at β0 = 1, 1 at β0 = 0).

    Under independent buffers, one PNM combination ``(1+β0)·m_t − β0·m_{t−1}`` has Γ times the
    variance of one buffer and the same mean; PNM and AdaPNM divide it by ``sqrt(Γ)``.
    """
    checks.number("beta0", beta0, 0, inclusive=True)
    return (1.0 + beta0) ** 2 + beta0**2


def _heavy_ball_drift(settings: dict[str, Any]) -> float:
    # v ← μv + g, θ ← θ − ηv: at a steady gradient v → g/(1−μ).
    return 1.0 / (1.0 - (settings.get("momentum") or 0.0))


def _pnm_drift(settings: dict[str, Any]) -> float:
    # Both buffers tend to g and the combination is divided by √Γ (Xie et al. 2021).
    return 1.0 / math.sqrt(pnm_noise_factor(settings["beta0"]))


_ADAPTIVE = ("its step is divided per coordinate by √v̂, so its size does not scale with the "
             "gradient's and no lr of it gives SGD's mean step")


@dataclass(frozen=True)
class Method:
    """A named optimizer: how to build it, what its ``step`` takes, and its run-level
    hyperparameters (besides lr) with their defaults (:data:`SETTINGS`).

    The factory (``torch.optim.SGD``, :class:`PNM`, ...) is named by its import path,
    ``home``, and imported on first use (:attr:`factory`), so that the registry, the config's
    schema and ``sgn-lab --help`` load no torch.

    ``drift(settings)`` is the factor D of its mean step at a steady gradient g, ηDg (1 for
    SGD), from its resolved hyperparameters; None where there is none, and ``drift_rule``
    says why or how D comes about (:func:`matched_lr`).
    """

    name: str
    home: str  # "module:attribute" of the factory, imported when a run builds the optimizer
    step_input: str
    summary: str
    drift: Callable[[dict[str, Any]], float] | None
    drift_rule: str

    @property
    def factory(self) -> Callable[..., Optimizer]:
        """The optimizer class or function: ``factory(params, lr=..., ...)``."""
        module, _, attribute = self.home.partition(":")
        return getattr(importlib.import_module(module), attribute)

    @property
    def settings(self) -> dict[str, Any]:
        return SETTINGS[self.name]

    def hyperparameters(self) -> list[str]:
        """Names of the keyword arguments the factory accepts (besides ``params``)."""
        signature = inspect.signature(self.factory)
        return [
            p.name
            for p in signature.parameters.values()
            if p.name != "params" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sgd", "torch.optim:SGD", "gradient", "plain minibatch SGD",
               _heavy_ball_drift, "η"),
        Method("momentum", "sgn_lab.optim.build:heavy_ball", "gradient",
               "SGD with heavy-ball momentum", _heavy_ball_drift, "η/(1−μ)"),
        Method("adam", "torch.optim:Adam", "gradient", "Adam", None, _ADAPTIVE),
        Method("gaussian", "sgn_lab.optim.injection:GaussianNoiseSGD", "gradient",
               "SGD + isotropic Gaussian noise", _heavy_ball_drift,
               "η/(1−μ): the injected noise has mean zero"),
        Method("covariance", "sgn_lab.optim.injection:CovarianceNoiseSGD", "per_sample",
               "large batch + covariance noise (Wen et al. 2020)", _heavy_ball_drift,
               "η/(1−μ): the injected noise has mean zero"),
        Method("symmetric", "sgn_lab.optim.symmetric:SymmetricNoiseSGD", "closure",
               "symmetric weight noise S-SGD (Sung et al. 2020)", _heavy_ball_drift,
               "η/(1−μ): the gradients at w ± ε average to the gradient at w to first order"),
        Method("pnm", "sgn_lab.optim.pnm:PNM", "gradient",
               "positive-negative momentum (Xie et al. 2021)", _pnm_drift,
               "η/√Γ, Γ = (1+β0)² + β0²"),
        Method("adapnm", "sgn_lab.optim.pnm:AdaPNM", "gradient", "AdaPNM (Xie et al. 2021)",
               None, _ADAPTIVE),
        Method("adaptive-hb", "sgn_lab.optim.adaptive_hb:AdaptiveHeavyBall", "gradient",
               "adaptive heavy-ball momentum (Sun et al. 2021)", None,
               "its momentum β is set from the measured curvature at every step, so its "
               "mean step η/(1−β_t) is not known before the run"),
    )
}


# Each method's run-level hyperparameters (besides lr: the names of the CLI flags, config keys
# and metrics columns) and their defaults, which are the optimizers' own. None: computed from
# the run — covariance noise's small batch is B/8 of the training batch, and Gaussian
# injection's trace matching is off.
SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": {"weight_decay": 0.0},
    "momentum": {"momentum": 0.9, "weight_decay": 0.0},
    "adam": {"beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0},
    "gaussian": {"sigma": 0.0, "sigma_trace_factor": None, "momentum": 0.0,
                 "weight_decay": 0.0},
    "covariance": {"small_batch": None, "variant": "full", "momentum": 0.0,
                   "weight_decay": 0.0},
    "symmetric": {"noise": 0.01, "momentum": 0.0, "weight_decay": 0.0},
    "pnm": {"beta0": 1.0, "beta1": 0.9, "weight_decay": 0.0},
    "adapnm": {"beta0": 1.0, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0},
    "adaptive-hb": {"beta_max": 0.99, "weight_decay": 0.0},
}


def matched_lr(method: str, eta: float, settings: dict[str, Any]) -> float:
    """The lr at which ``method`` has the mean step of SGD at lr ``eta``: η/D.

    D is the method's drift factor (:attr:`Method.drift`) under its resolved hyperparameters
    ``settings``: 1/(1−μ) with heavy-ball momentum μ (momentum; gaussian, covariance and
    symmetric with their ``momentum``), 1/√Γ with Γ = (1+β0)² + β0² for PNM, 1 otherwise. So
    momentum 0.9 gets 0.1·η and PNM at β0 = 1 gets √5·η. Adam, AdaPNM and adaptive heavy ball
    have no such factor: a ValueError says why.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(f"the matched step η must be a positive number, got {eta!r}")
    rule = METHODS[method]
    if rule.drift is None:
        raise ValueError(f"method {method!r} cannot be matched to SGD's mean step: "
                         f"{rule.drift_rule}")
    return float(eta / rule.drift({**SETTINGS[method], **settings}))
