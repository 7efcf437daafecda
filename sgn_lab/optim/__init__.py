"""Optimizers that shape stochastic gradient noise, and the registry that names them.

Baselines are torch's own (``torch.optim.SGD``, ``torch.optim.Adam``); the methods under study
are ``torch.optim.Optimizer`` subclasses:

==============  =====================  ==================================================
name            class                  what it does to the noise
==============  =====================  ==================================================
sgd             torch.optim.SGD        the natural SGN
momentum        torch.optim.SGD        heavy-ball momentum (momentum=0.9 by default)
adam            torch.optim.Adam       adaptive baseline
gaussian        GaussianNoiseSGD       adds isotropic N(0, σ²I) to the gradient
covariance      CovarianceNoiseSGD     large batch + noise of covariance (1/B_S − 1/B_L)·S
symmetric       SymmetricNoiseSGD      gradients at w+ε and w−ε averaged (S-SGD)
pnm             PNM                    positive-negative momentum (Xie et al. 2021)
adapnm          AdaPNM                 PNM inside Adam/AMSGrad
adaptive-hb     AdaptiveHeavyBall      momentum from a secant curvature (Sun et al. 2021)
==============  =====================  ==================================================

Each method takes its input to ``step`` in one of three ways (:attr:`Method.step_input`):
``"gradient"`` (``loss.backward(); opt.step()``), ``"closure"`` (``opt.step(closure)`` with a
closure that recomputes loss and gradients) or ``"per_sample"`` (``opt.step(per_sample)``
with the dict of :func:`sgn_lab.per_sample_grads`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sgn_lab.optim.adaptive_hb import AdaptiveHeavyBall
from sgn_lab.optim.injection import CovarianceNoiseSGD, GaussianNoiseSGD
from sgn_lab.optim.pnm import PNM, AdaPNM, pnm_noise_factor
from sgn_lab.optim.symmetric import SymmetricNoiseSGD

STEP_INPUTS = ("gradient", "closure", "per_sample")


def heavy_ball(
    params: Iterable[Any],
    lr: float,
    momentum: float = 0.9,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> Optimizer:
    """``torch.optim.SGD`` with heavy-ball momentum on by default (v ← βv + g, θ ← θ − ηv)."""
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov,
    )


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

    ``drift(settings)`` is the factor D of its mean step at a steady gradient g, ηDg (1 for
    SGD), from its resolved hyperparameters; None where there is none, and ``drift_rule``
    says why or how D comes about (:func:`matched_lr`).
    """

    name: str
    factory: Callable[..., Optimizer]
    step_input: str
    summary: str
    drift: Callable[[dict[str, Any]], float] | None
    drift_rule: str

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
        Method("sgd", torch.optim.SGD, "gradient", "plain minibatch SGD",
               _heavy_ball_drift, "η"),
        Method("momentum", heavy_ball, "gradient", "SGD with heavy-ball momentum",
               _heavy_ball_drift, "η/(1−μ)"),
        Method("adam", torch.optim.Adam, "gradient", "Adam", None, _ADAPTIVE),
        Method("gaussian", GaussianNoiseSGD, "gradient", "SGD + isotropic Gaussian noise",
               _heavy_ball_drift, "η/(1−μ): the injected noise has mean zero"),
        Method("covariance", CovarianceNoiseSGD, "per_sample",
               "large batch + covariance noise (Wen et al. 2020)", _heavy_ball_drift,
               "η/(1−μ): the injected noise has mean zero"),
        Method("symmetric", SymmetricNoiseSGD, "closure",
               "symmetric weight noise S-SGD (Sung et al. 2020)", _heavy_ball_drift,
               "η/(1−μ): the gradients at w ± ε average to the gradient at w to first order"),
        Method("pnm", PNM, "gradient", "positive-negative momentum (Xie et al. 2021)",
               _pnm_drift, "η/√Γ, Γ = (1+β0)² + β0²"),
        Method("adapnm", AdaPNM, "gradient", "AdaPNM (Xie et al. 2021)", None, _ADAPTIVE),
        Method("adaptive-hb", AdaptiveHeavyBall, "gradient",
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


def optimizer_kwargs(method: str, lr: float, settings: dict[str, Any], *, batch_size: int,
                     seed: int) -> dict[str, Any]:
    """The factory's keyword arguments from the run-level hyperparameters of ``method``.

    β's become the optimizers' ``betas`` tuples (PNM: (β1, β0); AdaPNM: (β1, β2, β0); Adam:
    (β1, β2)); covariance noise's large batch is the training batch; an optimizer with its own
    generator gets ``seed``.
    """
    rest = {k: v for k, v in settings.items() if k != "sigma_trace_factor"}
    kwargs: dict[str, Any] = {"lr": lr}
    if method == "pnm":
        kwargs["betas"] = (rest.pop("beta1"), rest.pop("beta0"))
    elif method == "adapnm":
        kwargs["betas"] = (rest.pop("beta1"), rest.pop("beta2"), rest.pop("beta0"))
    elif method == "adam":
        kwargs["betas"] = (rest.pop("beta1"), rest.pop("beta2"))
    if method == "covariance":
        kwargs["large_batch"] = batch_size
    if "seed" in METHODS[method].hyperparameters():
        kwargs["seed"] = seed
    return {**kwargs, **rest}


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


def train_step(
    method: str,
    optimizer: Optimizer,
    model: torch.nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> float:
    """One optimizer step of ``method`` on the minibatch (inputs, targets); returns its loss.

    Hides the three step inputs: ``"gradient"`` back-propagates the minibatch loss then steps;
    ``"closure"`` hands ``step`` a closure that does so (called as often as the method needs);
    ``"per_sample"`` hands ``step`` the per-sample gradients of the minibatch, so the optimizer
    must have been built over ``model.named_parameters()``. The loss returned is the
    minibatch loss at the parameters before the step (for S-SGD: the mean at w ± ε).
    """
    from sgn_lab.grads import per_sample_grads

    step_input = METHODS[method].step_input if method in METHODS else None
    if step_input is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return loss

    if step_input == "gradient":
        loss = closure()
        optimizer.step()
    elif step_input == "closure":
        loss = optimizer.step(closure)
    else:
        with torch.no_grad():
            loss = loss_fn(model(inputs), targets)
        optimizer.step(per_sample_grads(model, loss_fn, inputs, targets))
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def build_optimizer(name: str, params: Iterable[Any], **hyperparameters: Any) -> Optimizer:
    """Build the optimizer registered as ``name`` over ``params``.

    Unknown names and hyperparameters the method does not take are ValueErrors that name them
    and list the valid choices; invalid values are rejected by the optimizer itself.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    accepted = method.hyperparameters()
    unknown = [k for k in hyperparameters if k not in accepted]
    if unknown:
        raise ValueError(
            f"method {name!r} takes no hyperparameter {unknown[0]!r}; it takes "
            f"{', '.join(accepted)}"
        )
    return method.factory(params, **hyperparameters)


__all__ = [
    "METHODS",
    "PNM",
    "SETTINGS",
    "STEP_INPUTS",
    "AdaPNM",
    "AdaptiveHeavyBall",
    "CovarianceNoiseSGD",
    "GaussianNoiseSGD",
    "Method",
    "SymmetricNoiseSGD",
    "build_optimizer",
    "matched_lr",
    "heavy_ball",
    "optimizer_kwargs",
    "pnm_noise_factor",
    "train_step",
]
