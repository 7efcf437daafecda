"""The per-sample Gram matrix K_ij = g_i·g_j without materialising per-sample gradients.

For a Linear layer y = a Wᵀ + b the per-sample gradient of W is a sum over positions t (a
sequence, or the pixels of a convolution after unfolding) of outer products,
``G_i = Σ_t δ_it a_itᵀ``, where a_it is the layer's input and δ_it the gradient of sample i's
loss with respect to the layer's output. Hence

    G_i·G_j = Σ_{t,s} (δ_it·δ_js)(a_it·a_js),

which without positions is just (δ_i·δ_j)(a_i·a_j): the n×n Gram of the layer comes from two
small Gram matrices of activations and signals, at about the cost of one backward pass (the
"ghost" trick of Goodfellow 2015 and of ghost clipping). With positions the cheaper of two
exact routes is taken: the (nT)×(nT) Grams summed over blocks, or the per-sample gradients of
that one layer (n × out × in; for a convolution, one weight-gradient convolution with the
samples as groups). Embeddings, LayerNorm/GroupNorm affine parameters and biases have their
own exact forms; any other parameter falls back to ``torch.func`` per-sample gradients of just
that parameter.

One forward pass records, for each call of a supported layer, its input and the autograd edge
of its output; one backward pass then asks autograd for the signals δ at those edges only, so
no parameter gradient is computed at all (a plain backward pass computes them all). Each
layer's Gram is formed in the model's precision (at least float32) and the layers are summed
in float64, so K is as accurate as G Gᵀ from per-sample gradients in the model's precision.

The formulas hold only if a parameter enters the model through its own layer's call and
nowhere else. A ``torch.overrides.TorchFunctionMode`` watches every torch function of the
forward pass: a parameter that appears in any other call (weight tying, a parameter shared
by two layers, ``nn.MultiheadAttention`` reading ``out_proj.weight`` directly, a subclass
whose ``forward`` transforms the weight or the input) goes to the vmap fallback instead, so
the result stays exact. Only operators called through ``torch.ops`` directly escape that
watch. The hooks exist only during the one forward pass and are removed before any
``torch.func`` transform runs (module hooks break vmap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from sgn_lab.grads import _as_tuple, _batchnorm_policy, _num_samples, per_sample_grads

LossFn = Callable[[Tensor, Tensor], Tensor]

# Supported layer types and the one functional each calls with its parameters.
GHOST_OPS: dict[type, Callable] = {
    nn.Linear: F.linear,
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Embedding: F.embedding,
    nn.LayerNorm: F.layer_norm,
    nn.GroupNorm: F.group_norm,
}
GHOST_MODULES = tuple(GHOST_OPS)

# Reading these creates no gradient path, so it is not a use of a parameter.
_METADATA = frozenset({
    "shape", "dtype", "device", "layout", "ndim", "requires_grad", "is_leaf", "is_cuda",
    "size", "dim", "numel", "nelement", "stride", "element_size", "is_contiguous",
    "is_floating_point", "is_complex",
})

# Work (in multiply-adds) above which the pair route of the embedding Gram is cut into pieces.
_PAIR_CHUNK = 1 << 24


def per_sample_gram(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    *,
    batchnorm: str = "error",
    chunk_size: int | None = None,
) -> Tensor:
    """The (n, n) float64 Gram matrix ``K_ij = g_i·g_j`` of the per-sample gradients.

    The per-sample gradients are those of :func:`sgn_lab.per_sample_grads` (every parameter
    with ``requires_grad``; ``loss_fn`` the usual mean-reduced loss, so g_i is the gradient of
    sample i's loss alone), but for Linear (also over extra sequence dimensions), Conv1d/2d,
    Embedding and LayerNorm/GroupNorm layers they are never formed: see the module docstring.
    Other parameters fall back to vmap per-sample gradients of just those parameters
    (``chunk_size`` bounds that part).

    The centred Gram of the SGN is ``C K C`` with ``C = I − 11ᵀ/n``;
    ``sgn_lab.noise_stats(gram=K, dim=d)`` takes K directly. Random layers such as dropout draw
    from torch's global generator; when some parameters fall back to vmap, that pass draws its
    own masks, so for a model with active dropout the two parts see different masks.
    """
    return _gram(model, loss_fn, inputs, targets, batchnorm, chunk_size, with_mean=False)[0]


def gram_and_mean_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    *,
    batchnorm: str = "error",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`per_sample_gram` and, from the same pass, the mean gradient ḡ (d,) in float64.

    ḡ is flattened in ``model.named_parameters()`` order (the order of
    :func:`sgn_lab.flatten_grads`), so ``noise_stats(gram=K, dim=d, mean=ḡ)`` reports the
    mean exactly. It costs about one weight-gradient computation more than the Gram alone.
    """
    K, mean = _gram(model, loss_fn, inputs, targets, batchnorm, chunk_size, with_mean=True)
    assert mean is not None
    return K, mean


def _gram(model, loss_fn, inputs, targets, batchnorm, chunk_size, *, with_mean):
    xs = _as_tuple(inputs)
    n = _num_samples(xs, targets)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no parameter with requires_grad=True")
    device = next(iter(trainable.values())).device
    xs = tuple(x.to(device) for x in xs)
    targets = targets.to(device)

    ghost = {name: m for name, m in model.named_modules() if _ghost_supported(m)}
    K = torch.zeros((n, n), dtype=torch.float64, device=device)
    sums: dict[str, Tensor | None] = {}
    with _batchnorm_policy(model, batchnorm):
        if ghost:
            ghost_K, sums = _ghost_gram(model, loss_fn, xs, targets, ghost, with_mean)
            K += ghost_K
        rest = [name for name in trainable if name not in sums]
        if rest:
            rest_K, rest_sums = _fallback_gram(model, loss_fn, xs, targets, rest, chunk_size)
            K += rest_K
            sums.update(rest_sums)
    if not with_mean:
        return K, None
    mean = torch.cat([sums[name].reshape(-1).double() for name in trainable]) / n
    return K, mean


def per_sample_gram_coverage(model: nn.Module) -> tuple[list[str], list[str]]:
    """(parameters with a ghost Gram, parameters that fall back to vmap), by name.

    Decided from the module types alone. At run time a parameter that the forward pass uses
    outside its own layer's call (tied weights, attention's ``out_proj``) also falls back, so
    the result stays exact; it is only slower.
    """
    ghost = {name for name, m in model.named_modules() if _ghost_supported(m)}
    fast, slow = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if name.rpartition(".")[0] in ghost else slow).append(name)
    return fast, slow


def _ghost_op(module: nn.Module) -> Callable | None:
    for kind, op in GHOST_OPS.items():
        if isinstance(module, kind):
            return op
    return None


def _ghost_supported(module: nn.Module) -> bool:
    if _ghost_op(module) is None:
        return False
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return False
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        # Grouped convolutions, non-zero padding modes and the asymmetric padding of
        # padding="same" with an even span are left to the vmap fallback.
        asymmetric = module.padding == "same" and any(
            dilation * (k - 1) % 2 for k, dilation in zip(module.kernel_size, module.dilation,
                                                           strict=True))
        return module.groups == 1 and module.padding_mode == "zeros" and not asymmetric
    if isinstance(module, nn.Embedding):
        return module.max_norm is None  # max_norm renormalises the weight in place
    return True


class _Recorder(TorchFunctionMode):
    """One forward pass: each ghost layer call's (input, output edge), and stray parameter use.

    A parameter counts as used by its own layer only when the torch function touching it is
    the layer's functional (``GHOST_OPS``), called while that layer is the innermost ghost
    layer running, on the very tensor the layer received as input. Anything else marks it
    ``foreign``.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.calls: dict[str, list[tuple[Tensor, GradientEdge]]] = {k: [] for k in modules}
        owners: dict[int, list[str]] = {}
        for prefix, module in modules.items():
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    owners.setdefault(id(p), []).append(prefix)
        # A parameter held by several layers (tied) has cross terms no single layer sees.
        self.owner = {key: prefixes[0] for key, prefixes in owners.items()}
        self.foreign = {key for key, prefixes in owners.items() if len(prefixes) > 1}
        # Ghost layer calls in progress: (prefix, input, functional, parameters it used).
        self.running: list[tuple[str, Tensor | None, Callable, set[int]]] = []
        self.modules = modules

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_metadata(func):
            return func(*args, **kwargs)
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, list | tuple) else (value,):
                key = id(item)
                if key in self.owner and not self._own_use(key, func, args):
                    self.foreign.add(key)
        return func(*args, **kwargs)

    def _own_use(self, key: int, func: Callable, args: tuple) -> bool:
        """Whether this use is the layer's own functional call, the first in this call."""
        if not self.running:
            return False
        prefix, layer_input, op, seen = self.running[-1]
        if prefix != self.owner[key] or func is not op or not args or args[0] is not layer_input:
            return False
        if key in seen:  # the functional applied twice in one call: not a single layer
            return False
        seen.add(key)
        return True

    @contextlib.contextmanager
    def hooked(self) -> Iterator[_Recorder]:
        def before(prefix: str, op: Callable) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:
                self.running.append((prefix, args[0] if args else None, op, set()))
            return hook

        def after(prefix: str) -> Callable:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                _, layer_input, _, seen = self.running.pop()
                for p in module.parameters(recurse=False):
                    if id(p) in self.owner and id(p) not in seen:  # the call bypassed it
                        self.foreign.add(id(p))
                if isinstance(output, Tensor) and output.requires_grad and layer_input is not None:
                    self.calls[prefix].append((layer_input.detach(), get_gradient_edge(output)))
            return hook

        handles = []
        try:
            for prefix, module in self.modules.items():
                # The pre-hook runs after any of the user's (it sees the input the layer gets),
                # the post-hook before any of theirs (it sees the layer's own output).
                handles.append(module.register_forward_pre_hook(before(prefix, _ghost_op(module))))
                handles.append(module.register_forward_hook(after(prefix), prepend=True))
            with self:
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self.running.clear()


def _reads_metadata(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property such as .shape: named by its descriptor
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name in _METADATA


def _ghost_gram(model, loss_fn, xs, targets, modules, with_mean):
    """Gram of the ghost layers' parameters, and Σ_i g_i of each (None without ``with_mean``).

    Returns only the parameters whose every use was their own layer's call; the others are
    left to the vmap fallback.
    """
    n = targets.shape[0]
    recorder = _Recorder(modules)
    with recorder.hooked():
        outputs = model(*xs)
    losses = _per_sample_losses(loss_fn, outputs, targets)
    order = [(prefix, i) for prefix, calls in recorder.calls.items() for i in range(len(calls))]
    edges = [recorder.calls[prefix][i][1] for prefix, i in order]
    # Gradients of Σ_i loss_i at the layer outputs only: the signal reaching each layer is
    # per sample and unscaled, and autograd skips every parameter gradient.
    signals = torch.autograd.grad(losses.sum(), edges, allow_unused=True) if edges else ()
    received: dict[str, list[tuple[Tensor, Tensor]]] = {prefix: [] for prefix in modules}
    for (prefix, i), d in zip(order, signals, strict=True):
        if d is not None:  # a call whose output does not reach the loss adds nothing
            received[prefix].append((recorder.calls[prefix][i][0], d.detach()))

    K = torch.zeros((n, n), dtype=torch.float64, device=targets.device)
    covered: dict[str, Tensor | None] = {}
    for prefix, module in modules.items():
        mine = {pname: p for pname, p in module.named_parameters(recurse=False)
                if p.requires_grad and id(p) not in recorder.foreign}
        if not mine:
            continue
        if received[prefix]:
            terms = _parameter_terms(module, received[prefix], n, set(mine), with_mean)
        else:  # never called, or its output never reached the loss: g_i = 0
            terms = {pname: (None, torch.zeros_like(p, dtype=torch.float64) if with_mean
                             else None) for pname, p in mine.items()}
        for pname, (gram, total) in terms.items():
            if gram is not None:
                K += gram
            covered[f"{prefix}.{pname}" if prefix else pname] = total
    return K, covered


def _per_sample_losses(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    def one(output: Tensor, target: Tensor) -> Tensor:
        loss = loss_fn(output.unsqueeze(0), target.unsqueeze(0))
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar (a mean-reduced loss); for one sample it "
                f"returned shape {tuple(loss.shape)}"
            )
        return loss

    losses = vmap(one)(outputs, targets)
    bad = ~torch.isfinite(losses)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"non-finite loss {losses[i].item()} for sample {i}")
    return losses


Term = tuple[Tensor | None, Tensor | None]  # (n×n Gram in float64, Σ_i g_i in float64 or None)


def _parameter_terms(
    module: nn.Module, calls: list[tuple[Tensor, Tensor]], n: int, names: set[str],
    with_mean: bool,
) -> dict[str, Term]:
    """For each parameter in ``names``: its n×n Gram and (``with_mean``) its Σ_i g_i.

    ``calls`` holds (input, output signal) of each call: a layer called several times (a
    shared block) contributes the positions of every call.
    """
    terms: dict[str, Term] = {}
    if isinstance(module, nn.Embedding):
        tokens = torch.cat([a.reshape(n, -1) for a, _ in calls], dim=1)
        d = torch.cat([d.reshape(n, -1, module.embedding_dim) for _, d in calls], dim=1)
        d = d.to(_compute_dtype(d))
        if module.padding_idx is not None:
            d = d * (tokens != module.padding_idx).unsqueeze(-1)  # that row gets no gradient
        total = None
        if with_mean:
            total = torch.zeros_like(module.weight, dtype=torch.float64)
            total.index_add_(0, tokens.reshape(-1), d.reshape(-1, module.embedding_dim).double())
        terms["weight"] = (_embedding_gram(tokens, d), total)
    elif isinstance(module, nn.LayerNorm | nn.GroupNorm):
        weight, bias = zip(*(_norm_per_sample(module, a, d) for a, d in calls), strict=True)
        for name, parts in (("weight", weight), ("bias", bias)):
            g = sum(parts)
            terms[name] = (g @ g.T, g.sum(dim=0) if with_mean else None)
    else:  # Linear and convolutions: inputs (n, T, in), signals (n, T, out) over positions T
        dtype = _compute_dtype(calls[0][1])
        calls = [(a.to(dtype), d.to(dtype)) for a, d in calls]
        # The grouped weight-gradient kernel is slow with few input channels per group
        # (measured: 2x slower than im2col + bmm at 3 channels, 2x faster at 32).
        if isinstance(module, nn.Conv1d | nn.Conv2d) and module.in_channels >= 8 and not (
            _blocks_cheaper(n, sum(d[0, 0].numel() for _, d in calls),
                            module.weight[0].numel(), module.out_channels)
        ):
            terms.update(_convolution_terms(module, calls, names, with_mean))
        else:
            acts, sigs = zip(*(_positions(module, a, d) for a, d in calls), strict=True)
            a = acts[0] if len(acts) == 1 else torch.cat(acts, dim=1)
            d = sigs[0] if len(sigs) == 1 else torch.cat(sigs, dim=1)
            terms.update(_outer_product_terms(a, d, names, with_mean))
    return {k: v for k, v in terms.items() if k in names}


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The model's precision, at least float32 (bf16/fp16 products would lose the Gram)."""
    return torch.promote_types(t.dtype, torch.float32)


def _positions(module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Layer inputs and output signals as (n, T, features) over the T positions."""
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        return a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1])
    if isinstance(module, nn.Conv1d):
        a, d = a.unsqueeze(-2), d.unsqueeze(-2)  # as a 2-D convolution of height 1
        kernel, stride = (1, module.kernel_size[0]), (1, module.stride[0])
        padding, dilation = (0, _padding(module, 0)), (1, module.dilation[0])
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        padding = (_padding(module, 0), _padding(module, 1))
    # im2col: each output position sees a column of C_in·k patch values.
    columns = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    return columns.transpose(1, 2), d.reshape(n, d.shape[1], -1).transpose(1, 2)


def _padding(module: nn.Module, axis: int) -> int:
    if isinstance(module.padding, str):  # 'same' with stride 1: symmetric when k odd
        if module.padding == "valid":
            return 0
        return module.dilation[axis] * (module.kernel_size[axis] - 1) // 2  # symmetric here
    return module.padding[axis]


def _outer_product_terms(a: Tensor, d: Tensor, names: set[str], with_mean: bool
                         ) -> dict[str, Term]:
    """Weight and bias terms of a Linear layer over positions, the cheaper way.

    The weight's Gram is Σ_{t,s} (δ_it·δ_js)(a_it·a_js) and its sum Σ_{i,t} δ_it a_itᵀ; the
    bias's per-sample gradient is Σ_t δ_it. ``a`` is (n, T, in), ``d`` is (n, T, out), both
    in the compute precision.
    """
    n, T, fan_in = a.shape
    fan_out = d.shape[2]
    terms: dict[str, Term] = {}
    b = d[:, 0] if T == 1 else d.sum(dim=1)
    bias_gram = (b @ b.T).double() if "bias" in names or T == 1 else None
    if "bias" in names:
        terms["bias"] = (bias_gram, b.sum(dim=0).double() if with_mean else None)
    if "weight" not in names:
        return terms
    if T == 1:  # (a_i·a_j)(δ_i·δ_j), and δ_i·δ_j is the bias's Gram
        a1 = a[:, 0]
        terms["weight"] = ((a1 @ a1.T).double() * bias_gram,
                           (b.T @ a1).double() if with_mean else None)
    elif _blocks_cheaper(n, T, fan_in, fan_out):
        flat_a, flat_d = a.reshape(n * T, fan_in), d.reshape(n * T, fan_out)
        block = ((flat_a @ flat_a.T) * (flat_d @ flat_d.T)).double()
        terms["weight"] = (block.reshape(n, T, n, T).sum(dim=(1, 3)),
                           (flat_d.T @ flat_a).double() if with_mean else None)
    else:  # the per-sample gradients of this layer alone, (n, out·in)
        grads = torch.bmm(d.transpose(1, 2), a).reshape(n, -1)
        terms["weight"] = ((grads @ grads.T).double(),
                           grads.sum(dim=0).double() if with_mean else None)
    return terms


def _blocks_cheaper(n: int, T: int, fan_in: int, fan_out: int) -> bool:
    """Whether the (nT)×(nT) block route costs less than forming the layer's n·in·out grads."""
    return (n * T) ** 2 * (fan_in + fan_out) <= n * T * fan_in * fan_out + n * n * fan_in * fan_out


def _convolution_terms(module: nn.Module, calls: list[tuple[Tensor, Tensor]], names: set[str],
                       with_mean: bool) -> dict[str, Term]:
    """Weight and bias terms of a convolution from its per-sample weight gradients.

    The per-sample weight gradients are the weight gradient of one convolution with the
    samples stacked as groups (input (1, n·C_in, ...), signals (1, n·C_out, ...), n groups):
    the batched weight-gradient kernel without the im2col copy of the input.
    """
    grads, biases = 0, 0
    conv2d = isinstance(module, nn.Conv2d)
    weight_grad = torch.nn.grad.conv2d_weight if conv2d else torch.nn.grad.conv1d_weight
    padding = tuple(_padding(module, axis) for axis in range(len(module.kernel_size)))
    for a, d in calls:
        n = a.shape[0]
        grads = grads + weight_grad(
            a.reshape(1, -1, *a.shape[2:]), (n * module.out_channels, *module.weight.shape[1:]),
            d.reshape(1, -1, *d.shape[2:]), stride=module.stride, padding=padding,
            dilation=module.dilation, groups=n,
        ).reshape(n, -1)
        biases = biases + d.reshape(n, module.out_channels, -1).sum(dim=2)
    terms: dict[str, Term] = {}
    if "weight" in names:
        terms["weight"] = ((grads @ grads.T).double(),
                           grads.sum(dim=0).double() if with_mean else None)
    if "bias" in names:
        terms["bias"] = ((biases @ biases.T).double(),
                         biases.sum(dim=0).double() if with_mean else None)
    return terms


def _embedding_gram(tokens: Tensor, d: Tensor) -> Tensor:
    """Σ_{t,s} [tok_it = tok_js] (δ_it·δ_js): the rows of the weight both samples hit.

    Signals of one sample for one token are summed first (that row of its gradient), giving
    rows r = (sample i_r, token v_r, vector S_r); then K_ij = Σ_{v_r = v_s} [i_r=i, i_s=j] S_r·S_s.
    Two exact routes, the cheaper one taken: the per-sample gradients restricted to the U
    distinct tokens of the batch (n × U·dim), or the dot products of the P pairs of rows that
    share a token. Positions (every sample hits every row) favour the first, a large
    vocabulary the second.
    """
    n, T = tokens.shape
    dim = d.shape[-1]
    samples = torch.arange(n, device=tokens.device).repeat_interleave(T)
    vocab, token_rank = torch.unique(tokens.reshape(-1), return_inverse=True)
    keys, row = torch.unique(samples * len(vocab) + token_rank, return_inverse=True)
    S = d.new_zeros((len(keys), dim)).index_add_(0, row, d.reshape(n * T, dim))
    sample, rank = keys // len(vocab), keys % len(vocab)  # keys are sorted by (sample, token)

    counts = torch.bincount(rank, minlength=len(vocab))  # samples that hit each token
    pairs = int((counts * counts).sum())
    if n * len(vocab) <= pairs:
        grads = d.new_zeros((n, len(vocab), dim))
        grads[sample, rank] = S
        grads = grads.reshape(n, -1)
        return (grads @ grads.T).double()
    # Rows sorted by token; each row pairs with every row of its token's group.
    by_token = torch.argsort(rank, stable=True)
    S, sample, rank = S[by_token], sample[by_token], rank[by_token]
    starts = torch.cumsum(counts, 0) - counts
    width = counts[rank]  # partners of each row
    K = torch.zeros((n, n), dtype=torch.float64, device=d.device)
    rows_per_piece = max(1, _PAIR_CHUNK // max(1, dim * int(width.max())))
    for first in range(0, len(S), rows_per_piece):
        left = torch.arange(first, min(first + rows_per_piece, len(S)), device=d.device)
        reps = width[left]
        left = left.repeat_interleave(reps)
        offset = torch.arange(len(left), device=d.device) - (torch.cumsum(reps, 0) - reps
                                                              ).repeat_interleave(reps)
        right = starts[rank[left]] + offset
        dots = (S[left] * S[right]).sum(dim=1).double()
        K.index_put_((sample[left], sample[right]), dots, accumulate=True)
    return K


def _norm_per_sample(module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample gradients (n, C) in float64 of a LayerNorm's or GroupNorm's weight and bias."""
    n = a.shape[0]
    a, d = a.double(), d.double()
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(a.dim() - len(module.normalized_shape), a.dim()))
        mean = a.mean(dim=dims, keepdim=True)
        var = a.var(dim=dims, keepdim=True, unbiased=False)
        normalised = (a - mean) / torch.sqrt(var + module.eps)
        # Sum over the positions between the sample axis and the normalised axes.
        summed = tuple(range(1, a.dim() - len(module.normalized_shape)))
    else:
        grouped = a.reshape(n, module.num_groups, -1)
        mean = grouped.mean(dim=2, keepdim=True)
        var = grouped.var(dim=2, keepdim=True, unbiased=False)
        normalised = ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(a.shape)
        summed = tuple(range(2, a.dim()))  # spatial positions of each channel
    weight, bias = d * normalised, d
    if summed:
        weight, bias = weight.sum(dim=summed), bias.sum(dim=summed)
    return weight.reshape(n, -1), bias.reshape(n, -1)


def _fallback_gram(model, loss_fn, xs, targets, names, chunk_size):
    """G Gᵀ and Σ_i g_i from vmap per-sample gradients of only the named parameters."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        # BatchNorm layers are already in the state the caller's policy asked for.
        grads = per_sample_grads(model, loss_fn, xs, targets, chunk_size)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    G = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
    G = G.to(_compute_dtype(G))
    return (G @ G.T).double(), {name: g.double().sum(dim=0) for name, g in grads.items()}
