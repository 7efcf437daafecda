"""What both per-sample routes (``vmap`` and the Gram path) share: checking the inputs, the
BatchNorm policy, seeding random layers, refusing non-finite values and embeddings with
``max_norm``, and the (n, d) layout of per-sample gradients.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from sgn_lab.checks import NonFiniteError

LossFn = Callable[[Tensor, Tensor], Tensor]
Inputs = Tensor | Sequence[Tensor]

BATCHNORM_POLICIES = ("error", "eval")


def as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not xs or not all(isinstance(x, Tensor) for x in xs):
        raise TypeError("inputs must be a Tensor or a non-empty sequence of Tensors")
    return xs


def num_samples(xs: tuple[Tensor, ...], targets: Tensor) -> int:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
    lengths = [x.shape[0] if x.dim() > 0 else None for x in xs]
    n = targets.shape[0] if targets.dim() > 0 else None
    if n is None or any(m != n for m in lengths):
        raise ValueError(
            f"inputs and targets must have the same number of samples along dim 0; got inputs "
            f"{[tuple(x.shape) for x in xs]} and targets {tuple(targets.shape)}"
        )
    if n == 0:
        raise ValueError("got 0 samples")
    return n


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Torch's generators seeded with ``seed`` inside, the caller's state restored after;
    ``None``: the global generators as they are (and advanced)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd on, whatever the caller's mode: the Gram path differentiates (as
    ``torch.func.grad`` does on the vmap path), and under ``torch.no_grad()`` or
    ``torch.inference_mode()`` — an evaluation loop — it would otherwise find no gradient."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def one_sample_loss(loss: object) -> Tensor:
    """``loss_fn``'s value for one sample, checked to be a scalar (a mean-reduced loss)."""
    return scalar_loss(loss, of="one sample")


def scalar_loss(loss: object, *, of: str = "") -> Tensor:
    """``loss_fn``'s value (``of``: for what, said in the message), checked to be a scalar."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (a mean-reduced loss); "
                         f"{f'for {of} ' if of else ''}it returned shape {shape}")
    return loss


def check_finite(losses: Tensor, grads: dict[str, Tensor], *, offset: int = 0) -> None:
    """Raise a :class:`~sgn_lab.checks.NonFiniteError` (a ValueError) naming the first sample
    (and parameter) with a NaN or inf."""
    bad = ~torch.isfinite(losses)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise NonFiniteError(f"non-finite loss {losses[i].item()} for sample {offset + i}")
    for name, g in grads.items():
        rows = g.reshape(g.shape[0], -1)
        # A row's sum is finite when all its entries are (one read of G, no n×d mask); a
        # non-finite sum is then checked entry by entry, since finite values can overflow it.
        suspect = (~torch.isfinite(rows.sum(dim=1))).nonzero()[:, 0]
        if len(suspect):
            bad = suspect[~torch.isfinite(rows[suspect]).all(dim=1)]
            if len(bad):
                i = int(bad[0])
                raise NonFiniteError(
                    f"non-finite gradient for sample {offset + i} in parameter '{name}'"
                )


def flatten_grads(grads: dict[str, Tensor]) -> Tensor:
    """Concatenate per-sample gradients into one (n, d) matrix, in the dict's order.

    When they are the column blocks of one (n, d) matrix in order (as
    :func:`per_sample_grads` returns them), that matrix itself is returned: no copy.
    """
    if not grads:
        raise ValueError("flatten_grads got an empty dict of gradients")
    sizes = {k: g.shape[0] for k, g in grads.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"per-sample gradients disagree on the number of samples: {sizes}")
    whole = _whole(list(grads.values()))
    if whole is not None:
        return whole
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def _whole(grads: list[Tensor]) -> Tensor | None:
    """The (n, d) matrix whose consecutive column blocks ``grads`` are, if they are."""
    base = grads[0]._base
    if base is None or base.dim() != 2 or not base.is_contiguous():
        return None
    offset = base.storage_offset()
    for g in grads:
        if (g._base is not base or g.storage_offset() != offset or g.shape[0] != base.shape[0]
                or (g.dim() > 1 and g.stride(0) != base.stride(0))
                or not g[0].is_contiguous()):
            return None
        offset += g[0].numel()
    return base if offset == base.storage_offset() + base.shape[1] else None


def trainable_dim(model: nn.Module) -> int:
    """Number of scalar parameters with requires_grad: the d of the (n, d) gradient matrix."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` (any dimension, SyncBatchNorm included)."""
    batchnorm = nn.modules.batchnorm._BatchNorm
    return [(k, m) for k, m in model.named_modules() if isinstance(m, batchnorm)]


@contextlib.contextmanager
def batchnorm_policy(model: nn.Module, policy: str) -> Iterator[None]:
    """Inside, the BatchNorm layers in train mode use their running statistics (``"eval"``),
    or a ValueError says why no per-sample gradient exists (``"error"``)."""
    if policy not in BATCHNORM_POLICIES:
        raise ValueError(f"unknown batchnorm policy {policy!r}; choose one of {BATCHNORM_POLICIES}")
    coupled = [(k, m) for k, m in batchnorm_modules(model) if m.training or m.running_mean is None]
    for k, m in coupled:
        if m.running_mean is None:
            raise ValueError(
                f"BatchNorm layer '{k}' keeps no running statistics (track_running_stats=False), "
                "so it always normalises with batch statistics, which couple the samples; "
                "replace it with sgn_lab.batchnorm_to_groupnorm(model)"
            )
        if policy == "error":
            raise ValueError(
                f"BatchNorm layer '{k}' is in train mode: its batch statistics couple the samples, "
                "so per-sample gradients do not exist. Choose batchnorm='eval' (use its running "
                "statistics), sgn_lab.batchnorm_to_groupnorm(model) (replace it by GroupNorm), "
                "or put it in eval mode yourself."
            )
    try:
        for _, m in coupled:
            m.eval()
        yield
    finally:
        for _, m in coupled:
            m.train()


def batchnorm_to_groupnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """A copy of ``model`` with every BatchNorm layer replaced by GroupNorm.

    GroupNorm normalises within each sample, so per-sample gradients exist. A layer with C
    channels gets the largest number of groups that divides C, is at most ``num_groups`` and
    leaves at least two channels in each group (a group of one channel normalises a flat
    BatchNorm1d input to a constant); affine weights are copied with their dtype and device.
    This changes the model (its function and its training dynamics): it is an explicit
    choice, never applied silently. The input model is left untouched.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    new = copy.deepcopy(model)
    for name, bn in batchnorm_modules(new):
        channels = bn.num_features
        groups = max(
            g for g in range(1, min(num_groups, channels) + 1)
            if channels % g == 0 and (channels // g >= 2 or g == 1)
        )
        gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
        if bn.affine:
            gn.to(device=bn.weight.device, dtype=bn.weight.dtype)
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, gn)
    return new


def refuse_max_norm(model: nn.Module) -> None:
    """A ValueError for an embedding with max_norm, which no per-sample route supports."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.max_norm is not None
                and module.weight.requires_grad):
            raise max_norm_error(name, module.max_norm)


def max_norm_error(name: str, max_norm: float) -> ValueError:
    return ValueError(
        f"the embedding '{name}' has max_norm={max_norm}: it renormalises its weight in place "
        "in every forward pass, so a sample's gradient depends on the samples run before it, "
        "and no per-sample route supports it; renormalise once (torch.embedding_renorm_) and "
        "set max_norm=None for the measurement")
