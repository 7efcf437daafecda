"""Noise injection: SGD plus isotropic Gaussian noise, and large-batch SGD plus structured noise.

Two ways of adding noise to the gradient before a (momentum) SGD step:

- :class:`GaussianNoiseSGD`: isotropic noise ``σ·z``, ``z ~ N(0, I)``: the "injected random
  noise" baseline of Xie et al., "Positive-Negative Momentum", ICML 2021, arXiv 2103.17182.
  :meth:`GaussianNoiseSGD.set_sigma_from_trace` gives it the magnitude (trace) of a measured
  stochastic gradient noise while keeping it isotropic.
- :class:`CovarianceNoiseSGD`: Wen et al., "An Empirical Study of Large-Batch Stochastic
  Gradient Descent with Structured Covariance Noise", AISTATS 2020, arXiv 1902.08234: the mean
  of B_L per-sample gradients plus noise of covariance ``(1/B_S − 1/B_L)·S``, so the total
  gradient noise is that of a batch of B_S; the noise has the full covariance structure of S or
  only its diagonal.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sgn_lab import checks
from sgn_lab.optim._seeded import SeededOptimizer
from sgn_lab.optim._sgd import heavy_ball_step
from sgn_lab.optim.registry import COVARIANCE_VARIANTS

__all__ = ["GaussianNoiseSGD", "CovarianceNoiseSGD", "COVARIANCE_VARIANTS"]

PerSampleGrads = Mapping[str, Tensor] | Sequence[Tensor | None]


def _check_sgd_group(group: dict[str, Any]) -> None:
    checks.number("lr", group["lr"], 0, inclusive=True)
    checks.coefficient("momentum", group["momentum"])
    checks.number("weight_decay", group["weight_decay"], 0, inclusive=True)


def _check_gaussian_group(group: dict[str, Any]) -> None:
    _check_sgd_group(group)
    checks.number("sigma", group["sigma"], 0, inclusive=True)


def _check_covariance_group(group: dict[str, Any]) -> None:
    _check_sgd_group(group)
    checks.integer("small_batch", group["small_batch"], 1)
    checks.integer("large_batch", group["large_batch"], 1)
    if group["small_batch"] >= group["large_batch"]:
        raise ValueError(
            f"small_batch must be smaller than large_batch={group['large_batch']!r}, got "
            f"{group['small_batch']!r}"
        )
    checks.choice("variant", group["variant"], COVARIANCE_VARIANTS)


class GaussianNoiseSGD(SeededOptimizer):
    r"""SGD (optionally with heavy-ball momentum) plus isotropic Gaussian gradient noise.

    The "injected random noise" baseline of Xie, Yuan, Zhu & Sugiyama, "Positive-Negative
    Momentum: Manipulating Stochastic Gradient Noise to Improve Generalization", ICML 2021,
    arXiv 2103.17182: noise of a chosen scale but no structure, to compare with methods that
    reshape the stochastic gradient noise (SGN) itself.

    For each parameter θ with gradient g, at every step::

        z  ~ N(0, I)                    (fresh for each parameter tensor and each step)
        g̃  = g + λ·θ + σ·z
        v  ← μ·v + g̃                    (v = g̃ on the first step; only when μ > 0)
        θ  ← θ − η·v                    (θ ← θ − η·g̃ when μ = 0)

    The injected noise adds to the minibatch noise already in g; its covariance is σ²·I.

    Matching SGN's magnitude: :meth:`set_sigma_from_trace` sets σ² = tr/d, so the injected
    noise has the trace of the measured minibatch noise (E|σ·z|² = σ²·d = tr) but is isotropic::

        g = sgn_lab.per_sample_grads(model, loss_fn, x, y)   # n >= 2 samples
        stats = sgn_lab.noise_stats(sgn_lab.flatten_grads(g), batch_size=B,
                                    dataset_size=N, shape=False)
        opt.set_sigma_from_trace(stats.minibatch_trace)       # tr Cov[g_B] at batch size B

    Random draws, in this order (so that a test can replay them): for each param group in
    order with σ > 0, for each of its parameters in order whose ``.grad`` is not None, one
    ``torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=self.generator)``.
    Groups with σ = 0 and parameters without a gradient draw nothing.

    Parameters
    ----------
    params
        Iterable of tensors, of (name, tensor) pairs, or of dicts defining parameter groups; a
        group may override any hyperparameter below.
    lr
        Learning rate η >= 0.
    sigma
        Noise scale σ >= 0 (standard deviation per coordinate). σ = 0 is plain (momentum) SGD.
    momentum
        Heavy-ball coefficient μ in [0, 1).
    weight_decay
        L2 coefficient λ >= 0, added to the gradient.
    seed
        Seed of the optimizer's own generator (see :class:`SeededOptimizer`); ``None`` takes one
        from torch's global generator.

    State
    -----
    ``momentum_buffer`` (v, only when μ > 0), created on a parameter's first step; the
    generator's state is saved in :meth:`state_dict`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        sigma: float = 0.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        seed: int | None = None,
    ) -> None:
        defaults = dict(lr=lr, sigma=sigma, momentum=momentum, weight_decay=weight_decay)
        _check_gaussian_group(defaults)
        super().__init__(params, defaults, seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may override hyperparameters, so each is checked before it is added.
        if isinstance(param_group, dict):
            _check_gaussian_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def set_sigma_from_trace(self, trace: float, dim: int | None = None) -> float:
        """Set σ² = trace/d in every group (and the defaults); return the new σ.

        ``trace`` is tr Cov[g_B], the trace of the minibatch gradient noise, e.g.
        ``sgn_lab.noise_stats(G, batch_size=B, ...).minibatch_trace``. ``dim`` is d, the number
        of coordinates the trace was measured over; by default the total number of elements of
        this optimizer's parameters. Pass ``dim=stats.dim`` when the trace covers a different
        set of parameters than this optimizer holds.
        """
        checks.number("trace", trace, 0, inclusive=True)
        if dim is None:
            dim = sum(p.numel() for group in self.param_groups for p in group["params"])
        checks.integer("dim", dim, 1)
        sigma = math.sqrt(trace / dim)
        self.defaults["sigma"] = sigma
        for group in self.param_groups:
            group["sigma"] = sigma
        return sigma

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update; ``closure`` (re-evaluates the model, returns the loss) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, sigma = group["lr"], group["sigma"]
            momentum, weight_decay = group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if weight_decay != 0:
                    d_p = d_p.add(p, alpha=weight_decay)  # g + λ·θ
                if sigma != 0:
                    z = torch.randn(p.shape, dtype=p.dtype, device=p.device,
                                    generator=self.generator)
                    d_p = d_p.add(z, alpha=sigma)  # g̃ = g + λ·θ + σ·z
                heavy_ball_step(p, d_p, self.state[p], lr, momentum)
        return loss


class CovarianceNoiseSGD(SeededOptimizer):
    r"""Large-batch SGD plus Gaussian noise with the covariance structure of the gradient noise.

    Wen, Luk, Gazeau, Zhang, Chan & Ba, "An Empirical Study of Large-Batch Stochastic Gradient
    Descent with Structured Covariance Noise", AISTATS 2020, arXiv 1902.08234.

    Each step is given the per-sample gradients g_1, ..., g_n of a large batch (normally
    n = B_L samples). With ḡ their mean, S = 1/(n−1)·Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ their unbiased
    covariance and c = 1/B_S − 1/B_L, the minibatch noise of ḡ (covariance ≈ S/B_L) plus the
    injected ξ (covariance c·S) has the covariance S/B_S of a batch of B_S: large-batch
    steps with small-batch noise. For each parameter θ::

        ξ  = sqrt(c/(n−1)) · Σ_i z_i·(g_i − ḡ),  z ~ N(0, I_n)    variant "full": Cov ξ = c·S
        ξ  = sqrt(c·diag S) ⊙ z,                 z ~ N(0, I_d)    variant "diagonal"
        g̃  = ḡ + λ·θ + ξ
        v  ← μ·v + g̃                    (v = g̃ on the first step; only when μ > 0)
        θ  ← θ − η·v                    (θ ← θ − η·g̃ when μ = 0)

    "full" never forms the d×d matrix S: ξ is a random combination of the n centred per-sample
    gradients, whose covariance is exactly c·S (S of the given samples). Its z is shared by all
    parameter tensors (and all "full" groups), so ξ has c·S's cross-parameter blocks too.
    "diagonal" keeps only the per-coordinate variances: noise of the same trace, without the
    correlations (the paper's point: the structure of the noise matters, not only its trace).
    ``p.grad`` is ignored; ḡ is written to it after the step, for inspection. A group may set
    its own B_S, B_L (c) and variant; groups with "full" then share z, each with its own c.

    Input: ``step(per_sample)``, ``step(closure)`` or ``step(closure=closure)``, where the
    per-sample gradients (or what the closure returns, evaluated under grad mode) are either

    - the dict name -> (n, *param.shape) of :func:`sgn_lab.per_sample_grads`. The optimizer
      must then know its parameters' names: build it from ``model.named_parameters()`` (torch
      keeps them in each group's ``param_names``). The dict must hold exactly the optimizer's
      parameters that require grad; or
    - a sequence with one (n, *param.shape) tensor (or None to skip that parameter) per
      parameter, in the optimizer's order (groups in order, each group's params in order).

    The training-loop line is then::

        opt = CovarianceNoiseSGD(model.named_parameters(), lr, small_batch=32, large_batch=1024)
        opt.step(lambda: sgn_lab.per_sample_grads(model, loss_fn, xb, yb))   # xb: B_L samples

    Random draws, in this order (so that a test can replay them): first, if a "full" group has
    a parameter with per-sample gradients, one ``torch.randn(n, dtype=..., device=...,
    generator=self.generator)`` on the generator's device, in the dtype promoted over those
    parameters' per-sample gradients; then, for each "diagonal" group in order and each of its
    parameters with per-sample gradients in order, one ``torch.randn(p.shape, dtype=p.dtype,
    device=p.device, generator=self.generator)``.

    Parameters
    ----------
    params
        Iterable of tensors, of (name, tensor) pairs (needed for dict input), or of dicts
        defining parameter groups; a group may override any hyperparameter below.
    lr
        Learning rate η >= 0.
    small_batch
        B_S, the batch size whose noise is emulated: a positive integer < ``large_batch``.
    large_batch
        B_L, the batch size of the per-sample gradients fed to :meth:`step`. It sets c; the
        number n of samples given is not checked against it (n >= 2 is required).
    variant
        ``"full"`` (covariance c·S) or ``"diagonal"`` (covariance c·diag S).
    momentum
        Heavy-ball coefficient μ in [0, 1).
    weight_decay
        L2 coefficient λ >= 0, added to the gradient.
    seed
        Seed of the optimizer's own generator (see :class:`SeededOptimizer`); ``None`` takes one
        from torch's global generator.

    State
    -----
    ``momentum_buffer`` (v, only when μ > 0), created on a parameter's first step; the
    generator's state is saved in :meth:`state_dict`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        small_batch: int,
        large_batch: int,
        variant: str = "full",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            small_batch=small_batch,
            large_batch=large_batch,
            variant=variant,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        _check_covariance_group(defaults)
        super().__init__(params, defaults, seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may override hyperparameters, so each is checked before it is added.
        if isinstance(param_group, dict):
            _check_covariance_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(
        self,
        per_sample: PerSampleGrads | Callable[[], PerSampleGrads] | None = None,
        closure: Callable[[], PerSampleGrads] | None = None,
    ) -> PerSampleGrads | None:
        """One update from per-sample gradients; returns what the closure returned, if any."""
        if callable(per_sample):
            if closure is not None:
                raise ValueError("pass either per-sample gradients or a closure, not both")
            per_sample, closure = None, per_sample
        result = None
        if closure is not None:
            if per_sample is not None:
                raise ValueError("pass either per-sample gradients or a closure, not both")
            with torch.enable_grad():
                result = per_sample = closure()
        if per_sample is None:
            raise ValueError(
                "CovarianceNoiseSGD.step needs the per-sample gradients of the large batch: "
                "step(per_sample) or step(lambda: sgn_lab.per_sample_grads(model, loss_fn, x, y))"
            )
        # Everything is checked before any parameter moves.
        matched, n = self._match(per_sample)

        full = [g for group, pairs in zip(self.param_groups, matched, strict=True)
                if group["variant"] == "full" for _, g in pairs]
        z_full = None
        if full:
            # One z for all tensors: Σ_i z_i·(g_i − ḡ) over the whole parameter vector has
            # covariance c·S including S's cross-parameter blocks; a z per tensor would give
            # a block-diagonal covariance, a different noise structure from the paper's.
            dtype = functools.reduce(torch.promote_types, (g.dtype for g in full))
            z_full = torch.randn(n, dtype=dtype, device=self.generator.device,
                                 generator=self.generator)

        for group, pairs in zip(self.param_groups, matched, strict=True):
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            c = 1.0 / group["small_batch"] - 1.0 / group["large_batch"]
            for p, g in pairs:
                mean = g.mean(dim=0)  # ḡ
                centred = g - mean  # g_i − ḡ
                if group["variant"] == "full":
                    xi = torch.tensordot(z_full.to(device=g.device, dtype=g.dtype), centred, 1)
                    xi.mul_(math.sqrt(c / (n - 1)))  # ξ = sqrt(c/(n−1))·Σ_i z_i·(g_i − ḡ)
                else:
                    var = centred.square().sum(dim=0).div_(n - 1)  # diag S
                    z = torch.randn(p.shape, dtype=p.dtype, device=p.device,
                                    generator=self.generator)
                    xi = var.mul_(c).sqrt_().mul_(z)  # ξ = sqrt(c·diag S) ⊙ z
                if p.grad is None:
                    p.grad = mean  # never modified in place below
                else:
                    p.grad.copy_(mean)
                d_p = mean
                if weight_decay != 0:
                    d_p = d_p.add(p, alpha=weight_decay)  # ḡ + λ·θ
                d_p = d_p.add(xi)  # g̃ = ḡ + λ·θ + ξ
                heavy_ball_step(p, d_p, self.state[p], lr, momentum)
        return result

    def _match(self, per_sample: Any) -> tuple[list[list[tuple[Tensor, Tensor]]], int]:
        """Per group, the (parameter, per-sample gradients) pairs; and n, checked for all."""
        if isinstance(per_sample, Mapping):
            matched = self._match_names(per_sample)
        elif isinstance(per_sample, Sequence) and not isinstance(per_sample, str | Tensor):
            matched = self._match_order(per_sample)
        else:
            raise ValueError(
                f"invalid per_sample: a {type(per_sample).__name__} (must be a dict name -> "
                "(n, *param.shape) tensor, or a list of such tensors in the optimizer's order)"
            )
        sizes: dict[str, int] = {}
        for pairs in matched:
            for label, p, g in pairs:
                if not isinstance(g, Tensor) or g.dim() != p.dim() + 1 or g.shape[1:] != p.shape:
                    shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                    raise ValueError(
                        f"invalid per-sample gradients for parameter {label!r}: shape {shape} "
                        f"(must be (n, {', '.join(map(str, p.shape))}) for a parameter of shape "
                        f"{tuple(p.shape)})"
                    )
                sizes[label] = g.shape[0]
        if not sizes:
            raise ValueError("per_sample holds no gradient for any parameter of this optimizer")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"invalid per-sample gradients: numbers of samples differ: {sizes}")
        n = next(iter(sizes.values()))
        if n < 2:
            raise ValueError(
                f"invalid per-sample gradients: n={n} sample(s) (a covariance needs n >= 2)"
            )
        return [[(p, g) for _, p, g in pairs] for pairs in matched], n

    def _match_names(self, per_sample: Mapping[str, Tensor]) -> list[list[tuple[str, Tensor, Any]]]:
        if any("param_names" not in group for group in self.param_groups):
            raise ValueError(
                "per-sample gradients keyed by name need an optimizer built from named "
                "parameters, e.g. CovarianceNoiseSGD(model.named_parameters(), ...); or pass "
                "list(per_sample.values()) in the optimizer's parameter order"
            )
        names = [name for group in self.param_groups for name in group["param_names"]]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"parameter names {repeated} appear more than once in this optimizer's groups; "
                "give each parameter its full name from model.named_parameters()"
            )
        extra = sorted(set(per_sample) - set(names))
        if extra:
            raise ValueError(
                f"per_sample has gradients of parameters not in this optimizer: {extra}"
            )
        matched = []
        for group in self.param_groups:
            pairs = []
            for name, p in zip(group["param_names"], group["params"], strict=True):
                if name in per_sample:
                    pairs.append((name, p, per_sample[name]))
                elif p.requires_grad:
                    raise ValueError(f"per_sample has no gradients for parameter {name!r}")
            matched.append(pairs)
        return matched

    def _match_order(self, per_sample: Sequence[Any]) -> list[list[tuple[str, Tensor, Any]]]:
        params = [p for group in self.param_groups for p in group["params"]]
        if len(per_sample) != len(params):
            raise ValueError(
                f"invalid per_sample: {len(per_sample)} entries for the {len(params)} "
                "parameters of this optimizer (one per parameter, None to skip one)"
            )
        entries = iter(enumerate(per_sample))
        matched = []
        for group in self.param_groups:
            pairs = []
            for p in group["params"]:
                index, g = next(entries)
                if g is not None:
                    pairs.append((f"#{index}", p, g))
            matched.append(pairs)
        return matched
