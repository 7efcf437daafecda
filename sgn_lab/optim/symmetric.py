"""Symmetric weight noise: S-SGD.

Sung, Choi, Park, Choi & Shin, "S-SGD: Symmetrical Stochastic Gradient Descent with Weight Noise
Injection for Reaching Flat Minima", arXiv 2009.02479, 2020.

The gradient is taken at two points symmetric about the weights, ``w + ε`` and ``w − ε``, with a
noise ``ε`` of fixed magnitude, and the two are averaged. By Taylor expansion

    ½[∇L(w+ε) + ∇L(w−ε)] = ∇L(w) + ½∇³L(w)[ε, ε] + O(|ε|⁴):

the odd terms cancel, so there is no first-order noise in the step (on a quadratic the step is
exactly the gradient step), while the even terms are the gradient of the smoothed loss
``E L(w+ε) ≈ L(w) + ½ tr(H Σ_ε)``: a pressure towards flat regions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from sgn_lab import checks
from sgn_lab.optim._seeded import SeededOptimizer
from sgn_lab.optim._sgd import heavy_ball_step

__all__ = ["SymmetricNoiseSGD", "NOISE_SCALES"]

NOISE_SCALES = ("relative", "absolute")


def _check_group(group: dict[str, Any]) -> None:
    checks.number("lr", group["lr"], 0)
    checks.number("noise", group["noise"], 0, inclusive=True)
    checks.choice("scale", group["scale"], NOISE_SCALES)
    checks.coefficient("momentum", group["momentum"])
    checks.number("weight_decay", group["weight_decay"], 0, inclusive=True)
    checks.number("noise_decay", group["noise_decay"], 0)


class SymmetricNoiseSGD(SeededOptimizer):
    r"""S-SGD: SGD on the average of the gradients at ``w + ε`` and ``w − ε``.

    Sung, Choi, Park, Choi & Shin, "S-SGD: Symmetrical Stochastic Gradient Descent with Weight
    Noise Injection for Reaching Flat Minima", arXiv 2009.02479 (2020).

    One call of :meth:`step` with weights w (all parameter tensors of all groups)::

        for every parameter tensor p (groups in order, parameters in order):
            s_p ← Rademacher signs, one per entry of p          (the draw, see below)
            a_p ← σ·RMS(w_p) = σ·‖w_p‖₂/sqrt(numel)             (scale="relative")
                  σ                                            (scale="absolute")
            ε_p ← a_p·s_p
        w⁺ ← w + ε;  L⁺, g⁺ ← closure() at w⁺
        w⁻ ← w − ε;  L⁻, g⁻ ← closure() at w⁻
        w  restored (copied back bit for bit)
        g  ← ½(g⁺ + g⁻)                                       (left in p.grad)
        d  ← g + λ·w                                          (L2 weight decay)
        b  ← d on a parameter's first step, μ·b + d after      (heavy ball, as torch SGD)
        w  ← w − η·b                                          (d instead of b when μ = 0)
        σ  ← σ·γ                                              (per group, γ = noise_decay)
        return ½(L⁺ + L⁻)

    Every entry of ε has magnitude a_p: the noise has a fixed size (the paper's "fixed-magnitude
    symmetric noise"), only its signs are random. ε is the same at both points, and so is the
    batch: the closure is one function, called twice, so it sees the same data at ``w ± ε``
    unless it draws a new batch on each call itself.

    What the average does. The odd terms of the Taylor series of ∇L about w cancel::

        ½[∇L(w+ε) + ∇L(w−ε)] = ∇L(w) + ½∇³L(w)[ε, ε] + O(|ε|⁴).

    On a quadratic ½(θ−c)ᵀA(θ−c) the average is exactly A(θ−c): the step is plain gradient
    descent (with momentum: torch SGD), whatever the noise. On other losses the even terms are,
    to leading order, the gradient of the smoothed loss E_ε L(w+ε) ≈ L(w) + ½ tr(H Σ_ε) with
    Σ_ε = diag(a_p²): S-SGD descends the loss plus a curvature penalty (flatness pressure),
    without the first-order gradient noise that one-sided weight noise adds. For example,
    L = θ⁴/4 with ε = ±a gives ½[g(θ+a) + g(θ−a)] = θ³ + 3θa², exactly.

    Noise scale. ``scale="relative"`` (default) ties a_p to the tensor's current size:
    σ = 0.01 moves every entry by 1% of the tensor's root-mean-square value, comparably across
    layers of different scale. A tensor that is all zeros (for example a bias initialised to
    zero) has RMS 0 and therefore gets no noise until it moves away from zero. ``"absolute"``
    uses a_p = σ for every tensor.

    Schedule. σ is a per-group hyperparameter (``group["noise"]``) read at every step, so it can
    be changed between steps like the learning rate, with a scheduler-like loop. In addition,
    after each step σ ← σ·γ with ``noise_decay`` γ (default 1.0: constant); the decayed value is
    written back to ``group["noise"]``, so it is the value seen, logged and saved. Step k
    (counted from 1) thus uses σ₀·γ^(k−1).

    Random draws. All signs come from ``self.generator`` (see
    :class:`~sgn_lab.optim._seeded.SeededOptimizer`), one draw per parameter tensor per step, in
    the order above (groups in order, parameters in order, including tensors whose gradient
    turns out to be None and tensors with zero noise), each as
    ``torch.randint(0, 2, p.shape, generator=self.generator, device=p.device, dtype=p.dtype)``
    mapped to ±1 by s = 2r − 1. The draws therefore never depend on the values, and a run can
    be replayed from the seed.

    Restoring the weights. Before the first evaluation w is copied; w − ε is computed from that
    copy and w is copied back after the second evaluation. Adding and subtracting ε instead
    would not give w back in floating point (fl(fl(w + ε) − ε) ≠ w in general, and the error is
    a random walk over steps that has nothing to do with the update). With the copy, the only
    change to w made by a step is the update itself.

    Cost: two forward and backward passes per step, and transiently three extra copies of the
    weights (w, ε and g⁺).

    Parameters
    ----------
    params
        Iterable of tensors or of dicts defining parameter groups; a group may override any
        hyperparameter below. All parameters must be on one device (the generator's).
    lr
        Learning rate η > 0.
    noise
        σ >= 0, the noise magnitude: relative to each tensor's RMS or absolute, see ``scale``.
        0 gives plain SGD (at twice the cost).
    scale
        ``"relative"`` (a_p = σ·RMS(w_p)) or ``"absolute"`` (a_p = σ).
    momentum
        Heavy-ball coefficient μ in [0, 1), as torch.optim.SGD (no dampening, no Nesterov).
    weight_decay
        λ >= 0: L2 penalty, λ·w added to the averaged gradient.
    noise_decay
        γ > 0, multiplies ``group["noise"]`` after every step (1.0: constant noise).
    seed
        Seed of the optimizer's generator; ``None`` takes one from torch's global generator.

    State
    -----
    ``momentum_buffer`` (per parameter, only when μ > 0) and the generator state; the current
    σ of each group lives in ``param_groups`` (``group["noise"]``). Both are in
    :meth:`state_dict`, so a reloaded run continues bit-identically, draws included.

    First step: the momentum buffer starts as the first (averaged, weight-decayed) gradient, as
    in torch SGD.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        noise: float = 0.01,
        scale: str = "relative",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        noise_decay: float = 1.0,
        seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            noise=noise,
            scale=scale,
            momentum=momentum,
            weight_decay=weight_decay,
            noise_decay=noise_decay,
        )
        _check_group(defaults)
        super().__init__(params, defaults, seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may override hyperparameters, so each is checked, before it is added.
        if isinstance(param_group, dict):
            _check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _noise_for(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """ε for one tensor: Rademacher signs (one draw, always taken) times its scale a_p."""
        signs = torch.randint(
            0, 2, p.shape, generator=self.generator, device=p.device, dtype=p.dtype
        )
        signs.mul_(2).sub_(1)
        if group["scale"] == "relative":
            # RMS = ‖w‖₂/sqrt(n); an all-zero tensor gets a = 0 (no noise) rather than NaN.
            rms = torch.linalg.vector_norm(p) / math.sqrt(max(p.numel(), 1))
            return signs.mul_(group["noise"] * rms)
        return signs.mul_(group["noise"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one S-SGD step; return ½(L⁺ + L⁻), the mean of the losses at ``w ± ε``.

        ``closure`` is required: it must zero the gradients, compute the loss, call
        ``backward()`` and return the loss (the convention of torch.optim.LBFGS). It is called
        twice, at ``w + ε`` and at ``w − ε``.
        """
        if closure is None:
            raise ValueError(
                "SymmetricNoiseSGD.step requires a closure (it evaluates the gradient at w + ε "
                "and at w − ε): pass a function that zeroes the gradients, computes the loss, "
                "calls backward() and returns the loss"
            )

        points: list[tuple[Tensor, Tensor, Tensor]] = []  # (p, copy of w, ε)
        for group in self.param_groups:
            for p in group["params"]:
                points.append((p, p.detach().clone(), self._noise_for(p, group)))

        grads_plus: list[Tensor | None] = []
        try:
            for p, _, eps in points:
                p.add_(eps)
            with torch.enable_grad():
                loss_plus = closure()
            # Taken from p, so that g⁻ starts from scratch even if the closure forgets to zero.
            for p, _, _ in points:
                grads_plus.append(p.grad)
                p.grad = None

            for p, w, eps in points:
                p.copy_(w).sub_(eps)
            with torch.enable_grad():
                loss_minus = closure()
        finally:
            # Also when the closure raises: the weights are never left at w ± ε.
            for p, w, _ in points:
                p.copy_(w)

        for (p, _, _), g_plus in zip(points, grads_plus, strict=True):
            # g = ½(g⁺ + g⁻); a gradient missing at one point counts as zero there.
            if p.grad is None:
                if g_plus is not None:
                    p.grad = g_plus.mul_(0.5)
            elif g_plus is not None:
                p.grad.add_(g_plus).mul_(0.5)
            else:
                p.grad.mul_(0.5)
        del points, grads_plus

        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SymmetricNoiseSGD does not support sparse gradients")
                # d = g + λw, a new tensor: p.grad keeps the averaged gradient.
                d_p = p.grad.add(p, alpha=weight_decay) if weight_decay != 0 else p.grad
                heavy_ball_step(p, d_p, self.state[p], lr, momentum)
            group["noise"] = group["noise"] * group["noise_decay"]

        if loss_plus is None or loss_minus is None:
            return None
        return (loss_plus + loss_minus) / 2
