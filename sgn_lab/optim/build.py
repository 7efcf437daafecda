"""Building and stepping the optimizers of the registry (:mod:`sgn_lab.optim.registry`):
build_optimizer, the factories' keyword arguments from a run's settings, one training step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sgn_lab.optim.registry import METHODS


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
