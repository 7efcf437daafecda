"""The per-sample gradient of a parameter at each torch operation it enters: one rule each.

A rule is called, during the recording pass, on an operation that has a trainable parameter
among its operands (:class:`Op`). It returns a :class:`Plan`: which parameter operands it
takes, which operands its formula needs, and a function that turns those operands and the
signal δ (the gradient of each sample's loss at the operation's output) into one term per
parameter (:mod:`sgn_lab.grads.terms`). A parameter operand the rule does not take goes to
the ``vmap`` route (a per-sample copy of the parameter) with the rule's reason.

Every tensor a rule's ``terms`` receives has the samples first: the recording pass runs the
model under ``vmap``, which knows where each tensor's sample axis is (sequence-first inputs,
reshapes, broadcasts), and moves it to the front. An operand without a sample axis (a
position-id table, a buffer) is given one by the pass before the operation runs (the plan's
``sample`` operand), so the signal at the output is per sample. Shapes below are those a
single sample sees (its "logical" shape); T counts the positions, every axis but the
feature axis.

To support a new operation, write one function here and register it for the torch
functions that reach it (``torch.add`` and ``Tensor.add`` are different functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from sgn_lab.grads.terms import Dense, Outer, Rows, Term, compute_dtype, outer_route
from sgn_lab.grads.vmap import max_norm_error

TermsFn = Callable[[dict[str, Any], Tensor], dict[str, Term]]


@dataclass(frozen=True)
class Op:
    """One call: its operands by slot name (list items as ``"slot.i"``) and its parameters."""

    name: str
    operands: dict[str, Any]
    params: dict[str, str]  # slot -> name of the trainable parameter in that slot


@dataclass(frozen=True)
class Plan:
    """What a rule does with one call.

    ``takes``: the parameter slots whose terms ``terms`` returns; ``declined``: reasons for
    the parameter slots it leaves to the vmap route; ``keep``: operand slots ``terms`` reads
    (saved with the samples first, detached); ``sample``: the operand to give a sample axis
    when no operand has one.
    """

    takes: tuple[str, ...] = ()
    declined: dict[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = ()
    sample: str | None = None
    terms: TermsFn | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    slots: tuple[str, ...]
    defaults: dict[str, Any]
    plan: Callable[[Op], Plan]

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Operands by slot name, defaults filled in, list operands also item by item."""
        operands = dict(self.defaults)
        operands.update(zip(self.slots, args, strict=False))
        operands.update(kwargs)
        for slot, value in list(operands.items()):
            if isinstance(value, list | tuple):
                operands.update({f"{slot}.{i}": item for i, item in enumerate(value)})
        return operands


RULES: dict[Callable, Rule] = {}


def register(*funcs: Callable, slots: tuple[str, ...], **defaults: Any) -> Callable:
    """Register ``plan`` as the rule of every torch function in ``funcs``."""

    def decorate(plan: Callable[[Op], Plan]) -> Callable[[Op], Plan]:
        for func in funcs:
            RULES[func] = Rule(plan.__name__, slots, defaults, plan)
        return plan

    return decorate


def positions(t: Tensor) -> Tensor:
    """(n, ..., features) -> (n, T, features): every axis between is a position."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def reduce_to(signal: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Per-sample gradient (n, numel) of a tensor of ``shape`` broadcast to the signal's shape."""
    n, out = signal.shape[0], signal.shape[1:]
    lead = len(out) - len(shape)
    if lead > 0:
        signal = signal.sum(dim=tuple(range(1, 1 + lead)))
    ones = tuple(1 + i for i, (size, full) in enumerate(zip(shape, signal.shape[1:], strict=True))
                 if size == 1 and full != 1)
    if ones:
        signal = signal.sum(dim=ones, keepdim=True)
    return signal.reshape(n, -1)


def _align(t: Tensor, logical_dims: int) -> Tensor:
    """A samples-first tensor with singleton axes after the sample axis, to broadcast."""
    missing = logical_dims - (t.dim() - 1)
    return t.reshape(t.shape[0], *([1] * missing), *t.shape[1:]) if missing > 0 else t


# --- matrix products ----------------------------------------------------------------------


@register(F.linear, slots=("input", "weight", "bias"), bias=None)
def linear(op: Op) -> Plan:
    """y = x Wᵀ + b on the last axis: g_i(W) = Σ_t δ_it ⊗ x_it, g_i(b) = Σ_t δ_it."""
    takes, declined = [], {}
    if "weight" in op.params:
        if op.operands["weight"].dim() == 2:
            takes.append("weight")
        else:
            declined["weight"] = "a linear weight that is not 2-D"
    bias_shape = tuple(op.operands["bias"].shape) if "bias" in op.params else ()
    if "bias" in op.params:
        takes.append("bias")

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        out: dict[str, Term] = {}
        delta = positions(signal)
        if "weight" in takes:
            out["weight"] = Outer(delta, positions(saved["input"]), "linear")
        if "bias" in takes:  # one position: the same view of δ as the weight's (one δ δᵀ)
            single = delta.shape[1] == 1 and bias_shape == (delta.shape[2],)
            out["bias"] = Dense(delta[:, 0] if single else reduce_to(signal, bias_shape),
                                "linear")
        return out

    keep = ("input",) if "weight" in takes else ()
    return Plan(tuple(takes), declined, keep, "input", terms)


def _matrix_factor(op: Op, left: str, right: str) -> tuple[dict, dict, str]:
    """Terms of y = L @ R when one factor is a 2-D parameter and the other carries samples.

    Parameter on the right (k, m): g_i = Σ_t l_it ⊗ δ_it over the rows t of L. On the left
    (p, k): g_i = Σ_t δ_it ⊗ r_it over the columns t of R and δ (every batch axis too).
    """
    both = left in op.params and right in op.params
    takes, declined = {}, {}
    for slot, other in ((right, left), (left, right)):
        if slot not in op.params:
            continue
        if both:
            declined[slot] = "a product of two parameters"
        elif op.operands[slot].dim() != 2:
            declined[slot] = f"a {op.operands[slot].dim()}-D parameter factor of {op.name}"
        else:
            takes[slot] = other
    sample = next(iter(takes.values()), left if left not in op.params else right)
    return takes, declined, sample


def _matrix_terms(takes: dict[str, str], right_slot: str, scale: Any, op: str) -> TermsFn:
    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        out: dict[str, Term] = {}
        for slot, other in takes.items():
            factor = saved[other] * scale if scale != 1 else saved[other]
            if slot == right_slot:
                out[slot] = Outer(positions(factor), positions(signal), op)
            elif factor.dim() == 2:  # a vector operand: one position
                out[slot] = Outer(signal.unsqueeze(1), factor.unsqueeze(1), op)
            else:
                out[slot] = Outer(positions(signal.transpose(-1, -2)),
                                  positions(factor.transpose(-1, -2)), op)
        return out

    return terms


@register(torch.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm, slots=("input", "other"))
def matmul(op: Op) -> Plan:
    """y = A @ B with a 2-D parameter factor (a Linear written as a product, HF's Conv1D)."""
    takes, declined, sample = _matrix_factor(op, "input", "other")
    terms = _matrix_terms(takes, "other", 1, "matmul")
    return Plan(tuple(takes), declined, tuple(takes.values()), sample, terms)


@register(torch.addmm, torch.Tensor.addmm, slots=("input", "mat1", "mat2", "beta", "alpha"),
          beta=1, alpha=1)
def addmm(op: Op) -> Plan:
    """y = β·c + α·(A B): A, B as in :func:`matmul` scaled by α; g_i(c) = β Σ_t δ_it."""
    takes, declined, sample = _matrix_factor(op, "mat1", "mat2")
    alpha, beta = op.operands["alpha"], op.operands["beta"]
    product = _matrix_terms(takes, "mat2", alpha, "addmm")
    bias_shape = tuple(op.operands["input"].shape) if "input" in op.params else None

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        out = product(saved, signal)
        if bias_shape is not None:
            out["input"] = Dense(reduce_to(signal, bias_shape) * beta, "addmm")
        return out

    slots = (*takes, "input") if bias_shape is not None else tuple(takes)
    return Plan(slots, declined, tuple(takes.values()), sample, terms)


@register(torch.baddbmm, torch.Tensor.baddbmm,
          slots=("input", "batch1", "batch2", "beta", "alpha"), beta=1, alpha=1)
def baddbmm(op: Op) -> Plan:
    """y = β·c + α·(A B) batched: only the added c (a bias) is taken, g_i(c) = β Σ δ."""
    declined = {slot: "a factor of a batched matrix product"
                for slot in ("batch1", "batch2") if slot in op.params}
    if "input" not in op.params:
        return Plan((), declined, (), "batch1")
    bias_shape, beta = tuple(op.operands["input"].shape), op.operands["beta"]

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        return {"input": Dense(reduce_to(signal, bias_shape) * beta, "baddbmm")}

    return Plan(("input",), declined, (), "batch1", terms)


# --- convolutions -------------------------------------------------------------------------


@register(F.conv1d, F.conv2d, F.conv3d,
          slots=("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
          bias=None, stride=1, padding=0, dilation=1, groups=1)
def convolution(op: Op) -> Plan:
    """A convolution: g_i(W) = Σ_t δ_it ⊗ (the input patch at output position t), by im2col
    (an Outer term) or by one weight-gradient convolution with the samples as groups (Dense);
    g_i(b) = Σ_t δ_it per output channel."""
    takes = tuple(slot for slot in ("weight", "bias") if slot in op.params)
    weight = op.operands["weight"]
    spatial = weight.dim() - 2
    geometry = {key: _expand(op.operands[key], spatial) for key in ("stride", "dilation")}
    padding, groups = op.operands["padding"], op.operands["groups"]
    kernel, weight_shape = tuple(weight.shape[2:]), tuple(weight.shape)

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        x, delta = saved["input"], signal
        if x.dim() == spatial + 2:  # an input without a batch axis
            x, delta = x.unsqueeze(1), delta.unsqueeze(1)
        x, pad = _explicit_padding(x, padding, kernel, geometry["dilation"])
        out: dict[str, Term] = {}
        if "weight" in takes:
            out["weight"] = _conv_weight(x, delta, weight_shape, pad, groups, **geometry)
        if "bias" in takes:
            out["bias"] = Dense(delta.sum(dim=(1, *range(3, delta.dim()))), "conv")
        return out

    return Plan(takes, {}, ("input",) if "weight" in takes else (), "input", terms)


def _expand(value: int | tuple[int, ...], spatial: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,) * spatial


def _explicit_padding(x: Tensor, padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
                      ) -> tuple[Tensor, tuple[int, ...]]:
    """Integer padding; ``"same"`` becomes an explicit pad (asymmetric when the span is odd)."""
    if padding == "valid":
        return x, (0,) * len(kernel)
    if padding != "same":
        return x, _expand(padding, len(kernel))
    pads: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]  # torch puts the extra one on the right
    batch = x.shape[:2]
    padded = F.pad(x.reshape(-1, *x.shape[2:]), pads)
    return padded.reshape(*batch, *padded.shape[1:]), (0,) * len(kernel)


_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}


def _conv_weight(x: Tensor, delta: Tensor, weight_shape: tuple[int, ...], padding: tuple[int, ...],
                 groups: int, stride: tuple[int, ...], dilation: tuple[int, ...]) -> Term:
    """x (n, B, C_in, *space), δ (n, B, C_out, *space'): the weight's term, the cheaper way.

    The grouped weight-gradient kernel is slow with few input channels per group (measured:
    2x slower than im2col + bmm at 3 channels, 2x faster at 32), so im2col is kept for those
    and for the ghost route, which needs the im2col factors.
    """
    n, batch, channels = x.shape[:3]
    c_out, spatial = weight_shape[0], len(weight_shape) - 2
    dtype = compute_dtype(delta)
    x, delta = x.to(dtype), delta.to(dtype)
    if groups == 1 and spatial <= 2:
        positions_ = batch * delta[0, 0, 0].numel()
        fan_in = math.prod(weight_shape[1:])
        ghost = outer_route(n, positions_, c_out, fan_in, delta.element_size()) == "ghost"
        if ghost or channels < 8:
            return _im2col(x, delta, weight_shape, padding, stride, dilation)
    grads = _WEIGHT_GRAD[spatial](
        x.transpose(0, 1).reshape(batch, n * channels, *x.shape[3:]),
        (n * c_out, *weight_shape[1:]),
        delta.transpose(0, 1).reshape(batch, n * c_out, *delta.shape[3:]),
        stride=stride, padding=padding, dilation=dilation, groups=n * groups,
    )
    return Dense(grads.reshape(n, -1), "conv")


def _im2col(x: Tensor, delta: Tensor, weight_shape: tuple[int, ...], padding: tuple[int, ...],
            stride: tuple[int, ...], dilation: tuple[int, ...]) -> Outer:
    n, batch = x.shape[:2]
    flat_x = x.reshape(n * batch, *x.shape[2:])
    kernel = weight_shape[2:]
    if len(kernel) == 1:  # as a 2-D convolution of height 1
        flat_x = flat_x.unsqueeze(-2)
        kernel, padding = (1, *kernel), (0, *padding)
        stride, dilation = (1, *stride), (1, *dilation)
    columns = F.unfold(flat_x, kernel, dilation=dilation, padding=padding, stride=stride)
    right = columns.transpose(1, 2).reshape(n, -1, columns.shape[1])
    left = delta.reshape(n * batch, weight_shape[0], -1).transpose(1, 2)
    return Outer(left.reshape(n, -1, weight_shape[0]), right, "conv")


# --- embeddings ---------------------------------------------------------------------------


@register(F.embedding, slots=("input", "weight", "padding_idx", "max_norm", "norm_type",
                              "scale_grad_by_freq", "sparse"),
          padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False)
def embedding(op: Op) -> Plan:
    """Rows of the table picked by the index: g_i(E) = Σ_t e_{x_it} ⊗ δ_it."""
    if "weight" not in op.params:
        return Plan((), {}, (), "input")
    if op.operands["max_norm"] is not None:
        name = op.params["weight"]
        raise max_norm_error(name.rpartition(".")[0] or name, op.operands["max_norm"])
    rows = op.operands["weight"].shape[0]
    padding = op.operands["padding_idx"]
    if padding is not None and padding < 0:
        padding += rows
    return _rows_plan(rows, padding, bool(op.operands["scale_grad_by_freq"]))


@register(torch.embedding, slots=("weight", "input", "padding_idx", "scale_grad_by_freq",
                                  "sparse"),
          padding_idx=-1, scale_grad_by_freq=False, sparse=False)
def embedding_op(op: Op) -> Plan:
    """``torch.embedding`` (what F.embedding calls): padding_idx −1 means none."""
    if "weight" not in op.params:
        return Plan((), {}, (), "input")
    padding = op.operands["padding_idx"]
    return _rows_plan(op.operands["weight"].shape[0], None if padding < 0 else padding,
                      bool(op.operands["scale_grad_by_freq"]))


def _rows_plan(rows: int, padding: int | None, scale_by_frequency: bool) -> Plan:
    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        n = signal.shape[0]
        index = saved["input"].reshape(n, -1).long()
        values = signal.reshape(n, index.shape[1], -1)
        if padding is not None:  # that row gets no gradient
            values = values * (index != padding).unsqueeze(-1)
        if scale_by_frequency:  # divided by the row's count in this sample's index
            keys = torch.arange(n, device=index.device).unsqueeze(1) * rows + index
            _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
            values = values / counts[inverse].unsqueeze(-1).to(values.dtype)
        return {"weight": Rows(index, values, rows, "embedding")}

    return Plan(("weight",), {}, ("input",), "input", terms)


# --- normalisation layers -----------------------------------------------------------------


@register(F.layer_norm, torch.layer_norm, slots=("input", "normalized_shape", "weight", "bias",
                                                 "eps"),
          weight=None, bias=None, eps=1e-5)
def layer_norm(op: Op) -> Plan:
    """y = x̂ ⊙ γ + β over the last axes: g_i(γ) = Σ_t δ_it ⊙ x̂_it, g_i(β) = Σ_t δ_it."""
    shape = tuple(op.operands["normalized_shape"])

    def normalise(x: Tensor) -> Tensor:  # x̂ by the layer's own fused kernel, without γ, β
        return F.layer_norm(x, shape, None, None, op.operands["eps"])

    return _affine_plan(op, normalise, lambda signal: shape)


@register(F.rms_norm, torch.rms_norm, slots=("input", "normalized_shape", "weight", "eps"),
          weight=None, eps=None)
def rms_norm(op: Op) -> Plan:
    """y = x / rms(x) ⊙ γ over the last axes: g_i(γ) = Σ_t δ_it ⊙ x̂_it."""
    shape, eps = tuple(op.operands["normalized_shape"]), op.operands["eps"]
    eps_ = torch.finfo(op.operands["input"].dtype).eps if eps is None else eps

    def normalise(x: Tensor) -> Tensor:
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps_)

    return _affine_plan(op, normalise, lambda signal: shape)


@register(F.group_norm, torch.group_norm, slots=("input", "num_groups", "weight", "bias", "eps"),
          weight=None, bias=None, eps=1e-5)
def group_norm(op: Op) -> Plan:
    """x (B, C, *space) normalised per sample and group: per channel, as for layer_norm."""
    groups, eps = op.operands["num_groups"], op.operands["eps"]

    def normalise(x: Tensor) -> Tensor:
        grouped = x.reshape(*x.shape[:2], groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        var = grouped.var(dim=-1, keepdim=True, unbiased=False)
        return ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)

    def channel_shape(signal: Tensor) -> tuple[int, ...]:
        return (signal.shape[2],) + (1,) * (signal.dim() - 3)  # channels, broadcast over space

    return _affine_plan(op, normalise, channel_shape)


def _affine_plan(op: Op, normalise: Callable[[Tensor], Tensor],
                 affine_shape: Callable[[Tensor], tuple[int, ...]]) -> Plan:
    """g_i(weight) = Σ δ ⊙ x̂ and g_i(bias) = Σ δ, over the axes the affine is broadcast on.

    x̂ is recomputed from the saved input (samples first) in the model's precision (at least
    float32), as the layer computes it.
    """
    takes = tuple(slot for slot in ("weight", "bias") if slot in op.params)

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        dtype = compute_dtype(signal)
        delta = signal.to(dtype)
        shape = affine_shape(signal)
        out: dict[str, Term] = {}
        if "weight" in takes:
            x = saved["input"].to(dtype)
            out["weight"] = Dense(reduce_to(delta * normalise(x), shape), op.name)
        if "bias" in takes:
            out["bias"] = Dense(reduce_to(delta, shape), op.name)
        return out

    return Plan(takes, {}, ("input",) if "weight" in takes else (), "input", terms)


# --- parameters combined with activations -------------------------------------------------


@register(torch.add, torch.Tensor.add, torch.Tensor.add_, slots=("input", "other", "alpha"),
          alpha=1)
def add(op: Op) -> Plan:
    """y = x + α·P (a bias, a position embedding): g_i(P) = α Σ δ_i over the broadcast axes."""
    return _sum_plan(op, 1)


@register(torch.sub, torch.Tensor.sub, torch.Tensor.sub_, slots=("input", "other", "alpha"),
          alpha=1)
def sub(op: Op) -> Plan:
    """y = x − α·P: as :func:`add` with −α."""
    return _sum_plan(op, -1)


def _sum_plan(op: Op, sign: int) -> Plan:
    scales = {"input": 1, "other": sign * op.operands["alpha"]}
    shapes = {slot: tuple(op.operands[slot].shape) for slot in op.params}
    sample = next((slot for slot in ("input", "other") if slot not in op.params), None)

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        return {slot: Dense(reduce_to(signal, shape) * scales[slot], op.name)
                for slot, shape in shapes.items()}

    return Plan(tuple(shapes), {}, (), sample, terms)


@register(torch.mul, torch.Tensor.mul, torch.Tensor.mul_, slots=("input", "other"))
def mul(op: Op) -> Plan:
    """y = x ⊙ P (a learned scale): g_i(P) = Σ δ_i ⊙ x_i over the broadcast axes."""
    if len(op.params) == 2:
        return Plan((), {slot: "a product of two parameters" for slot in op.params}, (), None)
    slot = next(iter(op.params))
    other = "other" if slot == "input" else "input"
    if not isinstance(op.operands[other], Tensor):
        return Plan((), {slot: "scaled by a number, not by an activation"}, (), None)
    shape = tuple(op.operands[slot].shape)

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        x = _align(saved[other], signal.dim() - 1)
        return {slot: Dense(reduce_to(signal * x, shape), "mul")}

    return Plan((slot,), {}, (other,), other, terms)


@register(torch.cat, torch.concat, torch.concatenate, slots=("tensors", "dim"), dim=0)
def cat(op: Op) -> Plan:
    """A parameter concatenated to activations (a class token): its slice of δ_i."""
    items = [value for key, value in op.operands.items() if key.startswith("tensors.")]
    dim = op.operands["dim"]
    slices, offset = {}, 0
    for i, item in enumerate(items):
        if item.dim() == 1 and item.shape[0] == 0:  # torch.cat skips legacy empty tensors
            continue
        size = item.shape[dim]
        if f"tensors.{i}" in op.params:
            slices[f"tensors.{i}"] = (offset, size)
        offset += size
    sample = next((f"tensors.{i}" for i in range(len(items)) if f"tensors.{i}" not in op.params),
                  None)
    axis = dim + 1 if dim >= 0 else dim  # the samples come first

    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        n = signal.shape[0]
        return {slot: Dense(signal.narrow(axis, start, size).reshape(n, -1), "cat")
                for slot, (start, size) in slices.items()}

    return Plan(tuple(slices), {}, (), sample, terms)
