"""Adaptive heavy-ball momentum from a secant curvature estimate, for SGD and Adam.

Sun, Ling, Shi, Li & Wang, "Training Deep Neural Networks with Adaptive Momentum Inspired by the
Quadratic Optimization", arXiv 2110.09057, 2021.

For heavy ball with step α on a quadratic whose curvatures lie in [μ, L], the momentum that
gives the fastest rate is ``max{(1 − sqrt(αμ))², (sqrt(αL) − 1)²}``. The adaptive method
replaces the unknown curvature by a secant estimate from the last two iterates,
``h_k = ‖g_k − g_{k−1}‖ / ‖θ_k − θ_{k−1}‖``, and uses ``β_k = clip((1 − sqrt(α h_k))², 0, β_max)``
as the momentum of the next step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sgn_lab import checks

__all__ = ["AdaptiveHeavyBall", "FORMS", "adaptive_beta"]

FORMS = ("sgd", "adam")


def adaptive_beta(lr: float, curvature: float, beta_max: float) -> float:
    """β = clip((1 − sqrt(lr·h))², 0, β_max) for a curvature estimate h >= 0.

    (1 − sqrt(lr·h))² equals both terms of the optimal-momentum formula
    max{(1 − sqrt(αμ))², (sqrt(αL) − 1)²} when μ = L = h. It is 0 at lr·h = 1 and grows on both
    sides: towards 1 as lr·h → 0 (flat: long memory) and again for lr·h > 1, where the
    (sqrt(αL) − 1)² branch asks for momentum to stay stable at a step beyond 1/h.
    """
    # A square is never negative, so the lower clip never binds; it is kept to state the
    # formula as published. β_max < 1 keeps the buffer from growing without bound.
    return min(max((1.0 - math.sqrt(lr * curvature)) ** 2, 0.0), beta_max)


def _check_group(group: dict[str, Any]) -> None:
    checks.number("lr", group["lr"], 0)
    checks.coefficient("beta_max", group["beta_max"])
    checks.number("weight_decay", group["weight_decay"], 0, inclusive=True)
    checks.choice("form", group["form"], FORMS)
    checks.coefficient("beta2", group["beta2"])
    checks.number("eps", group["eps"], 0)


class AdaptiveHeavyBall(Optimizer):
    r"""Heavy-ball momentum set each step from a secant curvature estimate (SGD or Adam form).

    Sun, Ling, Shi, Li & Wang, "Training Deep Neural Networks with Adaptive Momentum Inspired
    by the Quadratic Optimization", arXiv 2110.09057 (2021).

    At step k of a parameter group, with θ_k all its parameters that have a gradient and g_k
    their gradients::

        g_k ← g_k + λ·θ_k                                     (L2 weight decay)
        h_k ← ‖g_k − g_{k−1}‖ / ‖θ_k − θ_{k−1}‖               (norms over the whole group)
        β_k ← clip((1 − sqrt(η·h_k))², 0, β_max)

    then, for every parameter of the group, ``form="sgd"``::

        b ← β_k·b + g_k                                       (b₀ = 0)
        θ ← θ − η·b

    or ``form="adam"`` (Adam with β1 replaced by β_k)::

        m ← β_k·m + (1 − β_k)·g_k                             (m₀ = 0)
        v ← β2·v + (1 − β2)·g_k²                              (v₀ = 0)
        P ← P·β_k                                             (P₀ = 1)
        m̂ ← m / (1 − P);  v̂ ← v / (1 − β2^t)                 (t: the parameter's step count)
        θ ← θ − η·m̂ / (sqrt(v̂) + eps)

    The secant. h_k is the ratio of the change in gradient to the change in position along the
    last step: on a quadratic with Hessian A it is a Rayleigh-like quotient
    ‖A Δθ‖/‖Δθ‖ in [λ_min, λ_max], and in 1-D it is exactly the curvature. The gradient
    includes the L2 term, i.e. h estimates the curvature of the penalised objective that is
    being minimised. The norms run over all parameters of the group together (one secant, one
    β per group, as a model-wide estimate). The paper writes the method for the whole parameter
    vector x_k of the model with one β_k per iteration; we could not read its algorithm box to
    rule out a per-layer variant, and the one third-party implementation we found also uses one
    global secant over all trainable parameters. To get per-layer momenta, put each layer in its
    own group.

    Relation to the paper's formula. With curvatures in [μ, L] the optimal momentum is
    max{(1 − sqrt(αμ))², (sqrt(αL) − 1)²}; one secant gives one number h, and with μ = L = h
    both terms equal (1 − sqrt(αh))², the formula used here (see :func:`adaptive_beta`). It is
    0 at η·h = 1 and grows again for η·h > 1, as the (sqrt(αL) − 1)² branch does; it exceeds
    β_max, and is clipped, both for small η·h (below (1 − sqrt(β_max))²) and for large
    η·h (above (1 + sqrt(β_max))²). The lower clip at 0 never binds: (1 − x)² >= 0. The step α
    of the formula is the group's learning rate η, also in the Adam form, where the actual step
    is η/(sqrt(v̂) + eps) per coordinate; there η·h is a heuristic scale, not the quadratic
    theory's α·h.

    First step and special cases.

    - First step (no parameter of the group has a previous gradient): β_1 = 0, so the SGD form
      takes a plain gradient step and the Adam form's m is g_1.
    - No movement, ‖θ_k − θ_{k−1}‖ = 0 (for instance a zero first gradient, or parameters
      reset by the user): h is undefined and the previous β is kept.
    - Parameters whose gradient is None are skipped, and left out of the norms; a parameter
      that has a gradient for the first time enters the norms from its next step on.

    Bias correction of the Adam form. With a varying β the first moment is
    m_t = Σ_j (1 − β_j) Π_{i=j+1..t} β_i · g_j, whose weights sum to 1 − Π_{i=1..t} β_i (the
    sum telescopes), so the correct bias correction divides by 1 − P with P = Π_i β_i over the
    parameter's own steps (Adam's 1 − β1^t is the constant-β case). Since β_1 = 0, P is 0 from
    the first step on and the correction is exactly 1: m is then a proper weighted average of
    past gradients from the start. P matters only for a parameter whose first gradient arrives
    after its group's first step, when β is no longer 0. v has the constant β2 and Adam's
    correction 1 − β2^t.

    Parameters
    ----------
    params
        Iterable of tensors or of dicts defining parameter groups; a group may override any
        hyperparameter below and gets its own secant and β.
    lr
        Learning rate η > 0 (also the α in β_k).
    beta_max
        Upper clip β_max in [0, 1) of the momentum.
    weight_decay
        λ >= 0: L2 penalty λ·θ added to the gradient (it enters the secant too).
    form
        ``"sgd"`` (heavy-ball SGD) or ``"adam"`` (Adam with the adaptive β as β1).
    beta2
        Second-moment coefficient in [0, 1) (Adam form only).
    eps
        eps > 0 added to sqrt(v̂) (Adam form only).

    State
    -----
    Per parameter: ``prev_param`` (θ_k, taken before the update, for the next secant),
    ``prev_grad`` (g_k with weight decay), ``momentum_buffer`` (SGD form) or ``exp_avg`` (m),
    ``exp_avg_sq`` (v), ``beta_prod`` (P, a float) and ``step`` (t) (Adam form). Per group, in
    the state of the group's first parameter: ``beta``, the β used by the group's last step (a
    float), so it is saved by :meth:`state_dict` and can be logged; :meth:`current_betas` lists
    it for every group.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        beta_max: float = 0.99,
        weight_decay: float = 0.0,
        form: str = "sgd",
        beta2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr, beta_max=beta_max, weight_decay=weight_decay, form=form, beta2=beta2, eps=eps
        )
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may override hyperparameters, so each is checked, before it is added.
        if isinstance(param_group, dict):
            _check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def current_betas(self) -> list[float]:
        """β of each group's last step, in group order (0.0 for a group not stepped yet)."""
        return [float(self.state[g["params"][0]].get("beta", 0.0)) for g in self.param_groups]

    def _secant_beta(self, group: dict[str, Any], grads: list[tuple[Tensor, Tensor]]) -> float:
        """β_k of one group from its (parameter, weight-decayed gradient) pairs."""
        previous = self.state[group["params"][0]].get("beta", 0.0)
        dg, dtheta = [], []
        for p, g in grads:
            state = self.state[p]
            if "prev_grad" in state:
                dg.append(torch.linalg.vector_norm(g - state["prev_grad"], dtype=torch.float64))
                dtheta.append(
                    torch.linalg.vector_norm(p - state["prev_param"], dtype=torch.float64)
                )
        if not dtheta:
            return 0.0  # first step: no previous iterate
        num = torch.linalg.vector_norm(torch.stack(dg)).item()
        den = torch.linalg.vector_norm(torch.stack(dtheta)).item()
        if den == 0.0:
            return float(previous)  # no movement: h undefined
        return adaptive_beta(group["lr"], num / den, group["beta_max"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; return the closure's loss (evaluated with grad enabled) if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            grads: list[tuple[Tensor, Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaptiveHeavyBall does not support sparse gradients")
                # A new tensor when decayed: the caller's p.grad stays as it was.
                g = p.grad.add(p, alpha=weight_decay) if weight_decay != 0 else p.grad
                grads.append((p, g))
            if not grads:
                continue

            beta = self._secant_beta(group, grads)
            self.state[group["params"][0]]["beta"] = beta

            for p, g in grads:
                state = self.state[p]
                if "prev_grad" not in state:
                    state["prev_param"] = torch.empty_like(p, memory_format=torch.preserve_format)
                    state["prev_grad"] = torch.empty_like(p, memory_format=torch.preserve_format)
                    if group["form"] == "sgd":
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    else:
                        state["step"] = 0
                        state["beta_prod"] = 1.0
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                # θ_k and g_k, kept for the secant of the next step.
                state["prev_param"].copy_(p)
                state["prev_grad"].copy_(g)

                if group["form"] == "sgd":
                    buf = state["momentum_buffer"]
                    # b ← β_k b + g_k;  θ ← θ − η b
                    buf.mul_(beta).add_(g)
                    p.add_(buf, alpha=-lr)
                else:
                    state["step"] += 1
                    state["beta_prod"] *= beta
                    beta2 = group["beta2"]
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    # m ← β_k m + (1 − β_k) g;  v ← β2 v + (1 − β2) g²
                    m.mul_(beta).add_(g, alpha=1.0 - beta)
                    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    # θ ← θ − η m̂ / (sqrt(v̂) + eps), m̂ = m/(1 − P), v̂ = v/(1 − β2^t)
                    denom = v.div(1.0 - beta2 ** state["step"]).sqrt_().add_(group["eps"])
                    p.addcdiv_(m, denom, value=-lr / (1.0 - state["beta_prod"]))
        return loss
