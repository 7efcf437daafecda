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


@dataclass(frozen=True)
class Method:
    """A named optimizer: how to build it and what its ``step`` takes."""

    name: str
    factory: Callable[..., Optimizer]
    step_input: str
    summary: str

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
        Method("sgd", torch.optim.SGD, "gradient", "plain minibatch SGD"),
        Method("momentum", heavy_ball, "gradient", "SGD with heavy-ball momentum"),
        Method("adam", torch.optim.Adam, "gradient", "Adam"),
        Method("gaussian", GaussianNoiseSGD, "gradient", "SGD + isotropic Gaussian noise"),
        Method("covariance", CovarianceNoiseSGD, "per_sample",
               "large batch + covariance noise (Wen et al. 2020)"),
        Method("symmetric", SymmetricNoiseSGD, "closure",
               "symmetric weight noise S-SGD (Sung et al. 2020)"),
        Method("pnm", PNM, "gradient", "positive-negative momentum (Xie et al. 2021)"),
        Method("adapnm", AdaPNM, "gradient", "AdaPNM (Xie et al. 2021)"),
        Method("adaptive-hb", AdaptiveHeavyBall, "gradient",
               "adaptive heavy-ball momentum (Sun et al. 2021)"),
    )
}


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
    "STEP_INPUTS",
    "AdaPNM",
    "AdaptiveHeavyBall",
    "CovarianceNoiseSGD",
    "GaussianNoiseSGD",
    "Method",
    "SymmetricNoiseSGD",
    "build_optimizer",
    "heavy_ball",
    "pnm_noise_factor",
    "train_step",
]
