"""Positive-Negative Momentum: PNM and its adaptive variant AdaPNM.

Xie, Yuan, Zhu & Sugiyama, "Positive-Negative Momentum: Manipulating Stochastic Gradient Noise
to Improve Generalization", ICML 2021, arXiv 2103.17182. Reference code:
github.com/zeke-xie/Positive-Negative-Momentum (``pnm_optim/pnm.py``, ``pnm_optim/adapnm.py``).

Two momentum buffers see alternate steps' gradients, so they hold independent noise; the update
takes ``(1+β0)`` of the buffer refreshed this step minus ``β0`` of the other. That combination
has the mean of one buffer but Γ = (1+β0)² + β0² times its variance; both optimizers divide it
by sqrt(Γ), so at equal drift (lr scaled up by sqrt(Γ)) the gradient noise is amplified.
The noise factor Γ is :func:`pnm_noise_factor`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from sgn_lab import checks
from sgn_lab.optim.registry import pnm_noise_factor

__all__ = ["PNM", "AdaPNM", "pnm_noise_factor"]




def _unpack_betas(betas: Any, names: tuple[str, ...]) -> tuple[float, ...]:
    if not isinstance(betas, tuple | list) or len(betas) != len(names):
        raise ValueError(f"betas must be a tuple ({', '.join(names)}), got {betas!r}")
    return tuple(betas)


def _check_pnm_group(group: dict[str, Any]) -> None:
    checks.number("lr", group["lr"], 0, inclusive=True)
    beta1, beta0 = _unpack_betas(group["betas"], ("beta1", "beta0"))
    checks.coefficient("beta1", beta1)
    checks.number("beta0", beta0, 0, inclusive=True)
    checks.number("weight_decay", group["weight_decay"], 0, inclusive=True)
    checks.boolean("decoupled", group["decoupled"])


def _check_adapnm_group(group: dict[str, Any]) -> None:
    checks.number("lr", group["lr"], 0, inclusive=True)
    beta1, beta2, beta0 = _unpack_betas(group["betas"], ("beta1", "beta2", "beta0"))
    checks.coefficient("beta1", beta1)
    checks.coefficient("beta2", beta2)
    checks.number("beta0", beta0, 0, inclusive=True)
    checks.number("eps", group["eps"], 0, inclusive=True)
    checks.number("weight_decay", group["weight_decay"], 0, inclusive=True)
    checks.boolean("amsgrad", group["amsgrad"])
    checks.boolean("decoupled", group["decoupled"])


def _positive_negative(state: dict[str, Any], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive m_t, negative m_{t−1}) for step ``t``: odd steps refresh ``momentum_odd``."""
    if step % 2 == 1:
        return state["momentum_odd"], state["momentum_even"]
    return state["momentum_even"], state["momentum_odd"]


class PNM(Optimizer):
    r"""Positive-Negative Momentum (stochastic PNM).

    Xie, Yuan, Zhu & Sugiyama, ICML 2021, arXiv 2103.17182.

    For each parameter θ with gradient g_t at step t = 1, 2, ... (counted per parameter)::

        g_t  ← g_t + λ·θ                       (only with decoupled=False: L2 penalty)
        θ    ← θ·(1 − η·λ)                      (only with decoupled=True: decoupled decay)
        m_t  ← β1²·m_{t−2} + (1 − β1²)·g_t      (the buffer of t's parity: "positive")
        m_{t−1}                                 (the other buffer, untouched: "negative")
        θ    ← θ − η·((1+β0)·m_t − β0·m_{t−1}) / sqrt((1+β0)² + β0²)

    Each buffer is an EMA of every other gradient with coefficient β1² (two steps of β1), so
    they hold independent noise. On a constant gradient g both buffers tend to g and the step
    tends to η·g/sqrt(Γ), Γ = (1+β0)² + β0² (:func:`pnm_noise_factor`): PNM at lr η has the
    drift of SGD at η/sqrt(Γ).

    First step: both buffers start at zero, so at t = 1 the negative buffer m_0 is zero and
    the step is η·(1+β0)·(1 − β1²)·g_1/sqrt(Γ); at t = 2, m_1 = (1 − β1²)·g_1 enters negatively.
    There is no bias correction (as in the reference code).

    Matches the reference ``pnm_optim/pnm.py`` (β1² and 1 − β1²; odd steps refresh the buffer
    created as "positive"; 1/sqrt(Γ) multiplies the whole combination before η) except that:
    the L2 penalty is added to a copy of the gradient (the reference adds it to ``p.grad`` in
    place); β0 < 0 is rejected (the reference does not check β0).

    Parameters
    ----------
    params
        Iterable of tensors or of dicts defining parameter groups; a group may override any
        hyperparameter below.
    lr
        Learning rate η >= 0.
    betas
        ``(β1, β0)``: β1 in [0, 1) sets the buffers' EMA coefficient β1²; β0 >= 0 is the
        negative-momentum weight (any β0 >= 0; the paper's default 1, larger values inject
        more noise). β0 = 0 gives EMA momentum on two interleaved buffers.
    weight_decay
        λ >= 0.
    decoupled
        True: decoupled weight decay θ ← θ·(1 − η·λ) before the update (AdamW style).
        False: L2 penalty, λ·θ added to the gradient before it enters the buffer.

    State
    -----
    ``step`` (int, steps taken by this parameter), ``momentum_odd`` and ``momentum_even``
    (the buffers refreshed on odd and even steps).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 1.0),
        weight_decay: float = 0.0,
        decoupled: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, decoupled=decoupled)
        _check_pnm_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may override hyperparameters, so each is checked, before it is added.
        if isinstance(param_group, dict):
            _check_pnm_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one PNM step; return the closure's loss (re-evaluated with grad) if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            beta1, beta0 = group["betas"]
            inv_sqrt_gamma = 1.0 / math.sqrt(pnm_noise_factor(beta0))
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("PNM does not support sparse gradients")

                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_odd"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["momentum_even"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                state["step"] += 1

                if weight_decay != 0:
                    if group["decoupled"]:
                        p.mul_(1.0 - lr * weight_decay)
                    else:
                        # A new tensor: the caller's p.grad stays as it was.
                        grad = grad.add(p, alpha=weight_decay)

                m_pos, m_neg = _positive_negative(state, state["step"])
                # m_t = β1² m_{t−2} + (1 − β1²) g_t
                m_pos.mul_(beta1**2).add_(grad, alpha=1.0 - beta1**2)
                # θ ← θ − η ((1+β0) m_t − β0 m_{t−1}) / sqrt(Γ)
                pn_momentum = m_pos.mul(1.0 + beta0).add_(m_neg, alpha=-beta0)
                p.add_(pn_momentum, alpha=-lr * inv_sqrt_gamma)
        return loss


class AdaPNM(Optimizer):
    r"""Adaptive Positive-Negative Momentum (Adam/AMSGrad with a PNM first moment).

    Xie, Yuan, Zhu & Sugiyama, ICML 2021, arXiv 2103.17182.

    For each parameter θ with gradient g_t at step t = 1, 2, ... (counted per parameter)::

        g_t    ← g_t + λ·θ                      (only with decoupled=False: L2 penalty)
        θ      ← θ·(1 − η·λ)                     (only with decoupled=True: decoupled decay)
        m_t    ← β1²·m_{t−2} + (1 − β1²)·g_t     (buffer of t's parity; m_{t−1} untouched)
        v_t    ← β2·v_{t−1} + (1 − β2)·g_t²
        v̂_t    ← max(v̂_{t−1}, v_t)               (amsgrad=True; else v̂_t = v_t)
        d_t    ← sqrt(v̂_t)/sqrt(1 − β2^t) + ε
        θ      ← θ − η/(1 − β1^t) · ((1+β0)·m_t − β0·m_{t−1}) / sqrt((1+β0)² + β0²) / d_t

    Bias corrections, exactly as in the reference ``pnm_optim/adapnm.py``: the second moment
    is corrected by sqrt(1 − β2^t) inside the denominator, before ε is added; the first
    moment by Adam's 1 − β1^t. The latter is *not* the exact correction for this first moment:
    on a constant gradient g the combination equals
    g·(1 − (1+β0)·β1^(2⌈t/2⌉) + β0·β1^(2⌊t/2⌋)), which differs from g·(1 − β1^t). At t = 1
    (both buffers zero, m_0 = 0) the step is η·(1+β0)(1+β1)/sqrt(Γ)·g_1/d_1, i.e. about
    1.70·η·sign(g_1) at the defaults rather than Adam's η·sign(g_1) (eps aside). It becomes
    exact as t grows: the step tends to η/sqrt(Γ)·g/d, with Γ = (1+β0)² + β0².

    Matches the reference except that the L2 penalty is added to a copy of the gradient (the
    reference adds it to ``p.grad`` in place), β0 < 0 is rejected, and an AMSGrad buffer is
    created lazily (as zeros, which is exact since v_t >= 0) if amsgrad is switched on
    mid-run.

    Parameters
    ----------
    params
        Iterable of tensors or of dicts defining parameter groups; a group may override any
        hyperparameter below.
    lr
        Learning rate η >= 0.
    betas
        ``(β1, β2, β0)``: β1 in [0, 1) (buffers use β1²), β2 in [0, 1) for the second
        moment, β0 >= 0 the negative-momentum weight (any β0 >= 0, not only <= 1).
    eps
        ε >= 0, added to the bias-corrected root second moment.
    weight_decay
        λ >= 0.
    amsgrad
        Use the running maximum of v_t in the denominator (the reference's default, True).
    decoupled
        True: decoupled weight decay θ ← θ·(1 − η·λ) before the update (AdamW style).
        False: L2 penalty, λ·θ added to the gradient before both moments.

    State
    -----
    ``step`` (int), ``momentum_odd`` and ``momentum_even`` (first-moment buffers refreshed on
    odd and even steps), ``exp_avg_sq`` (v_t) and, with amsgrad, ``max_exp_avg_sq`` (v̂_t).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 1.0),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = True,
        decoupled: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            decoupled=decoupled,
        )
        _check_adapnm_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may override hyperparameters, so each is checked, before it is added.
        if isinstance(param_group, dict):
            _check_adapnm_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one AdaPNM step; return the closure's loss (re-evaluated with grad) if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2, beta0 = group["betas"]
            inv_sqrt_gamma = 1.0 / math.sqrt(pnm_noise_factor(beta0))
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AdaPNM does not support sparse gradients")

                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_odd"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["momentum_even"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                state["step"] += 1
                t = state["step"]

                if weight_decay != 0:
                    if group["decoupled"]:
                        p.mul_(1.0 - lr * weight_decay)
                    else:
                        # A new tensor: the caller's p.grad stays as it was.
                        grad = grad.add(p, alpha=weight_decay)

                m_pos, m_neg = _positive_negative(state, t)
                # m_t = β1² m_{t−2} + (1 − β1²) g_t
                m_pos.mul_(beta1**2).add_(grad, alpha=1.0 - beta1**2)
                # v_t = β2 v_{t−1} + (1 − β2) g_t²
                v = state["exp_avg_sq"]
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                if group["amsgrad"]:
                    v_hat = state["max_exp_avg_sq"]
                    torch.maximum(v_hat, v, out=v_hat)
                else:
                    v_hat = v

                # d_t = sqrt(v̂_t) / sqrt(1 − β2^t) + ε
                denom = (v_hat.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
                # θ ← θ − η/(1 − β1^t) · ((1+β0) m_t − β0 m_{t−1}) / sqrt(Γ) / d_t
                step_size = lr / (1.0 - beta1**t)
                pn_momentum = m_pos.mul(1.0 + beta0).add_(m_neg, alpha=-beta0)
                p.addcdiv_(pn_momentum, denom, value=-step_size * inv_sqrt_gamma)
        return loss
