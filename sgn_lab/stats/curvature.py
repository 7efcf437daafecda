"""Curvature of the loss and its alignment with the stochastic gradient noise.

Notation. ``theta`` (shape ``(d,)``) is the flat vector of the model's trainable parameters
(``requires_grad``), in ``model.named_parameters()`` order, the same order as the columns of the
per-sample gradient matrix ``G`` (shape ``(n, d)``, row ``i`` = gradient of sample ``i``'s loss).

- ``H = ∇² L(theta)`` is the Hessian of the mean loss ``L = loss_fn(model(inputs), targets)``.
- ``S = 1/(n-1) Σ_i c_i c_iᵀ`` with ``c_i = g_i - ḡ`` is the per-sample gradient covariance.

Zhu et al. (2019, arXiv:1803.00195) show that the escape of SGD from a minimum is driven by
``tr(HS)``. Isotropic noise of the same power, ``S = (tr S / d) I``, would give
``tr(H) tr(S) / d``; the ratio of the two, ``d tr(HS) / (tr H · tr S)``, is the alignment:
above 1 the noise prefers the sharp directions.

Hessian-vector products are forward-over-reverse (``jvp`` of ``grad``) through
:func:`torch.func.functional_call`, so the model is never modified and no hooks are involved.
Randomness in the forward pass (dropout in train mode) makes ``H`` ill-defined and is refused by
:func:`torch.func.vmap` with a ``RuntimeError``; BatchNorm using batch statistics is refused with
a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from sgn_lab import checks

__all__ = [
    "CurvatureStats",
    "curvature_stats",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_vector_product",
    "trace_hs",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Inputs = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class _Objective:
    """The mean loss as a function of the flat parameter vector, with everything else fixed."""

    model: nn.Module
    loss_fn: LossFn
    args: tuple[Tensor, ...]
    targets: Tensor
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    buffers: dict[str, Tensor]
    theta: Tensor

    @property
    def d(self) -> int:
        return self.theta.numel()

    @property
    def n(self) -> int:
        return self.targets.shape[0]

    def __call__(self, theta: Tensor) -> Tensor:
        chunks = theta.split([math.prod(s) for s in self.shapes])
        params = {k: c.view(s) for k, c, s in zip(self.names, chunks, self.shapes, strict=True)}
        out = functional_call(self.model, {**self.buffers, **params}, self.args)
        return self.loss_fn(out, self.targets)

    def hvp(self, vectors: Tensor, chunk_size: int | None = None) -> Tensor:
        """``(m, d) -> (m, d)`` rows ``H v``, in the parameters' dtype."""
        grad_fn = grad(self)

        def one(v: Tensor) -> Tensor:
            return jvp(grad_fn, (self.theta,), (v,))[1]

        # Always through vmap, even for one vector: its randomness='error' default then refuses
        # active dropout, whose "Hessian" would change from one product to the next.
        return vmap(one, chunk_size=chunk_size)(vectors)


def _objective(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor) -> _Objective:
    for name, module in model.named_modules():
        # Batch statistics make each sample's output depend on the others, so neither the
        # per-sample gradients nor this Hessian would describe the per-sample losses.
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise ValueError(
                f"{type(module).__name__} module {name or '<root>'!r} normalises with batch "
                "statistics, which couple the samples; call .eval() on it (with running stats)."
            )
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameters with requires_grad=True")
    dtypes = {p.dtype for _, p in named}
    if len(dtypes) > 1:
        raise ValueError(
            f"trainable parameters must share one dtype, got {sorted(map(str, dtypes))}"
        )
    device = named[0][1].device
    args = tuple(x.to(device) for x in (inputs if isinstance(inputs, tuple) else (inputs,)))
    targets = targets.to(device)
    n = targets.shape[0] if targets.ndim else -1
    if not args or any(x.ndim == 0 or x.shape[0] != n for x in args):
        raise ValueError(
            f"inputs and targets must share the batch dimension 0: targets {tuple(targets.shape)}, "
            f"inputs {[tuple(x.shape) for x in args]}"
        )
    obj = _Objective(
        model=model,
        loss_fn=loss_fn,
        args=args,
        targets=targets,
        names=tuple(k for k, _ in named),
        shapes=tuple(p.shape for _, p in named),
        buffers=dict(model.named_buffers()),
        theta=torch.cat([p.detach().reshape(-1) for _, p in named]),
    )
    with torch.no_grad():
        loss = obj(obj.theta)
    if loss.ndim != 0:
        raise ValueError(
            f"loss_fn must return a scalar (mean-reduced) loss, got shape {tuple(loss.shape)}"
        )
    if not torch.isfinite(loss):
        raise ValueError(f"loss is not finite: {loss.item()}")
    return obj


def _generator(seed: int) -> torch.Generator:
    # Draws happen on CPU so that a seed gives the same numbers on every device.
    return torch.Generator(device="cpu").manual_seed(seed)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None:
        checks.integer("chunk_size", chunk_size, 1)


def _centred(obj: _Objective, per_sample: Tensor) -> Tensor:
    if per_sample.ndim != 2 or tuple(per_sample.shape) != (obj.n, obj.d):
        raise ValueError(
            f"per_sample must have shape (n, d) = ({obj.n}, {obj.d}) (n samples in inputs, d "
            f"trainable parameters), got {tuple(per_sample.shape)}"
        )
    if obj.n < 2:
        raise ValueError(f"the gradient covariance needs n >= 2 samples, got n={obj.n}")
    g = per_sample.to(device=obj.theta.device, dtype=torch.float64)
    return g - g.mean(dim=0)


def _trace_hs(obj: _Objective, c: Tensor, chunk_size: int | None) -> float:
    hc = obj.hvp(c.to(obj.theta.dtype), chunk_size).double()
    return ((c * hc).sum() / (obj.n - 1)).item()


def _top_eigenvalue(obj: _Objective, max_iter: int, tol: float, seed: int) -> float:
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(1, -1)).to(obj.theta)
        return obj.hvp(v)[0].double().cpu().numpy()

    if obj.d == 1:  # ARPACK needs k < d
        return float(matvec(np.ones(1))[0])
    v0 = torch.randn(obj.d, generator=_generator(seed), dtype=torch.float64, device="cpu")
    op = LinearOperator((obj.d, obj.d), matvec=matvec, dtype=np.float64)
    vals = eigsh(
        op, k=1, which="LA", v0=v0.numpy(), maxiter=max_iter, tol=tol, return_eigenvectors=False
    )
    return float(vals[0])


def _hutchinson(
    obj: _Objective, n_probes: int, seed: int, chunk_size: int | None
) -> tuple[float, float]:
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    z = torch.randint(0, 2, (n_probes, obj.d), generator=_generator(seed), device="cpu")
    z = (2.0 * z - 1.0).to(device=obj.theta.device, dtype=torch.float64)
    quad = (z * obj.hvp(z.to(obj.theta.dtype), chunk_size).double()).sum(dim=1)
    se = (quad.std() / math.sqrt(n_probes)).item() if n_probes > 1 else math.nan
    return quad.mean().item(), se


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    vectors: Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Hessian-vector products ``H v`` of the mean loss, forward-over-reverse.

    Parameters
    ----------
    model
        Module whose ``requires_grad`` parameters span the ``d`` coordinates; it is not modified.
    loss_fn
        Mean-reduced loss ``loss_fn(outputs, targets) -> scalar``.
    inputs
        Tensor or tuple of tensors (positional model arguments), batched along dim 0: ``(n, ...)``.
    targets
        Tensor ``(n, ...)``.
    vectors
        ``(d,)`` or ``(m, d)``, flat in ``named_parameters()`` order.
    chunk_size
        Vectors per vectorised pass; ``None`` does all ``m`` at once. Bounds memory.

    Returns
    -------
    Tensor
        ``H v`` with the shape of ``vectors``, in the parameters' dtype and on their device, where
        ``H = ∇²_theta loss_fn(model(*inputs), targets)``.

    Raises
    ------
    ValueError
        Wrong ``vectors`` shape, mismatched batch sizes, non-finite loss, BatchNorm using batch
        statistics.
    """
    _check_chunk_size(chunk_size)
    obj = _objective(model, loss_fn, inputs, targets)
    if vectors.ndim not in (1, 2) or vectors.shape[-1] != obj.d:
        raise ValueError(
            f"vectors must have shape (d,) or (m, d) with d={obj.d}, got {tuple(vectors.shape)}"
        )
    rows = vectors.reshape(-1, obj.d).to(obj.theta)
    return obj.hvp(rows, chunk_size).reshape(vectors.shape)


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
) -> float:
    """Sharpness ``λ_max(H)``: the largest algebraic eigenvalue of the loss Hessian.

    Implicitly restarted Lanczos (ARPACK, :func:`scipy.sparse.linalg.eigsh` with ``k=1``,
    ``which='LA'``) on a float64 :class:`~scipy.sparse.linalg.LinearOperator` whose products are
    :func:`hessian_vector_product`; ``H`` is never formed.

    Parameters
    ----------
    model, loss_fn, inputs, targets
        As in :func:`hessian_vector_product`.
    max_iter
        ARPACK's ``maxiter``: restarts of the Lanczos basis (each costs up to ``ncv`` products).
    tol
        ARPACK's relative tolerance on the Ritz value (0 means machine precision). With float32
        models the products carry ~1e-7 relative error, which bounds the attainable accuracy.
    seed
        Seeds the Gaussian start vector ``v0`` (shape ``(d,)``).

    Returns
    -------
    float
        ``max_i λ_i(H)`` (negative eigenvalues of a non-convex loss are not "sharpness").

    Raises
    ------
    scipy.sparse.linalg.ArpackNoConvergence
        When ``max_iter`` restarts do not reach ``tol``.
    """
    return _top_eigenvalue(_objective(model, loss_fn, inputs, targets), max_iter, tol, seed)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    n_probes: int = 64,
    seed: int = 0,
    chunk_size: int | None = None,
) -> tuple[float, float]:
    """Hutchinson estimate of ``tr H`` with Rademacher probes.

    ``tr H ≈ (1/K) Σ_k z_kᵀ H z_k`` with ``z_k ∈ {-1, +1}^d`` i.i.d. uniform, unbiased since
    ``E[z zᵀ] = I``. Its variance is ``2 Σ_{i≠j} H_ij²`` per probe, so the estimate is exact
    for a diagonal ``H``.

    Parameters
    ----------
    model, loss_fn, inputs, targets
        As in :func:`hessian_vector_product`.
    n_probes
        Number ``K >= 1`` of probes (one HVP each).
    seed
        Seeds the probes ``Z`` (shape ``(K, d)``).
    chunk_size
        Probes per vectorised HVP pass.

    Returns
    -------
    estimate, standard_error : float
        Mean of ``z_kᵀ H z_k`` and its sample std (``ddof=1``) over ``sqrt(K)``, in float64;
        the standard error is NaN for ``K = 1``.
    """
    _check_chunk_size(chunk_size)
    return _hutchinson(_objective(model, loss_fn, inputs, targets), n_probes, seed, chunk_size)


def trace_hs(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    per_sample: Tensor,
    *,
    chunk_size: int | None = None,
) -> float:
    """Exact ``tr(HS)``, the quantity driving escape from minima (Zhu et al., 2019).

    ``tr(HS) = 1/(n-1) Σ_i c_iᵀ H c_i`` with ``c_i = g_i - ḡ``: ``n`` HVPs, no ``d×d`` matrix.

    Parameters
    ----------
    model, loss_fn, inputs, targets
        As in :func:`hessian_vector_product`; ``H`` is the Hessian of the mean loss over these
        same ``n`` samples.
    per_sample
        ``G``, shape ``(n, d)``: row ``i`` is the gradient of sample ``i``'s loss for this
        model, loss and data (computed by the caller). Centred in float64.
    chunk_size
        Rows per vectorised HVP pass.

    Returns
    -------
    float
        ``tr(HS)``, accumulated in float64.

    Raises
    ------
    ValueError
        ``per_sample`` not ``(n, d)``, or ``n < 2``.
    """
    _check_chunk_size(chunk_size)
    obj = _objective(model, loss_fn, inputs, targets)
    return _trace_hs(obj, _centred(obj, per_sample), chunk_size)


@dataclass(frozen=True)
class CurvatureStats:
    """Curvature of the loss and its alignment with the gradient noise (float64 values).

    Attributes
    ----------
    hessian_top_eigenvalue
        Sharpness ``λ_max(H)`` (Lanczos).
    hessian_trace, hessian_trace_se
        Hutchinson ``tr H`` and its standard error.
    trace_hs
        Exact ``tr(HS)``.
    curvature_alignment
        ``d tr(HS) / (tr H · tr S)``: 1 for isotropic noise ``S ∝ I``, above 1 when the noise
        concentrates on sharp directions. Uses the Hutchinson ``tr H`` and so inherits its
        relative error ``hessian_trace_se / hessian_trace``; NaN when ``tr H · tr S = 0``.
    """

    hessian_top_eigenvalue: float
    hessian_trace: float
    hessian_trace_se: float
    trace_hs: float
    curvature_alignment: float

    def to_dict(self) -> dict[str, float]:
        """Field name -> value."""
        return asdict(self)


def curvature_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    per_sample: Tensor,
    *,
    n_probes: int = 64,
    max_iter: int = 100,
    seed: int = 0,
    chunk_size: int | None = None,
) -> CurvatureStats:
    """All curvature statistics for one batch, see :class:`CurvatureStats`.

    Parameters
    ----------
    model, loss_fn, inputs, targets
        As in :func:`hessian_vector_product`.
    per_sample
        Per-sample gradient matrix ``G``, shape ``(n, d)``, as in :func:`trace_hs`.
    n_probes
        Hutchinson probes for ``tr H``.
    max_iter
        Lanczos restarts for ``λ_max``.
    seed
        Seeds both the Lanczos start vector and the Hutchinson probes.
    chunk_size
        Vectors per vectorised HVP pass.

    Returns
    -------
    CurvatureStats
        With ``tr S = Σ_i |c_i|² / (n-1)`` in the alignment ratio.
    """
    _check_chunk_size(chunk_size)
    obj = _objective(model, loss_fn, inputs, targets)
    c = _centred(obj, per_sample)
    if n_probes < 1:  # fail before the expensive parts
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    top = _top_eigenvalue(obj, max_iter, 1e-6, seed)
    tr_h, tr_h_se = _hutchinson(obj, n_probes, seed, chunk_size)
    ths = _trace_hs(obj, c, chunk_size)
    tr_s = (c.square().sum() / (obj.n - 1)).item()
    denom = tr_h * tr_s
    return CurvatureStats(
        hessian_top_eigenvalue=top,
        hessian_trace=tr_h,
        hessian_trace_se=tr_h_se,
        trace_hs=ths,
        curvature_alignment=obj.d * ths / denom if denom != 0 else math.nan,
    )
