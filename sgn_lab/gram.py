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
that one layer (n × out × in). Embeddings, LayerNorm/GroupNorm affine parameters and biases
have their own exact forms; any other parameter falls back to ``torch.func`` per-sample
gradients of just that parameter.

Activations and signals are captured with a forward hook that stores the layer input and puts
a tensor hook on its output. The hooks exist only during that one forward/backward pass and
are removed before any ``torch.func`` transform runs (module hooks break vmap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn import functional as F

from sgn_lab.grads import _as_tuple, _batchnorm_policy, _num_samples, per_sample_grads

LossFn = Callable[[Tensor, Tensor], Tensor]

# Module types whose parameters get their Gram from activations and signals.
GHOST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)


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
    return gram_and_mean_gradient(
        model, loss_fn, inputs, targets, batchnorm=batchnorm, chunk_size=chunk_size
    )[0]


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
    mean exactly.
    """
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
    sums: dict[str, Tensor] = {}
    with _batchnorm_policy(model, batchnorm):
        if ghost:
            ghost_K, sums = _ghost_gram(model, loss_fn, xs, targets, ghost)
            K += ghost_K
        rest = [name for name in trainable if name not in sums]
        if rest:
            rest_K, rest_sums = _fallback_gram(model, loss_fn, xs, targets, rest, chunk_size)
            K += rest_K
            sums.update(rest_sums)
    mean = torch.cat([sums[name].reshape(-1).double() for name in trainable]) / n
    return K, mean


def per_sample_gram_coverage(model: nn.Module) -> tuple[list[str], list[str]]:
    """(parameters with a ghost Gram, parameters that fall back to vmap), by name.

    Decided from the module types alone. At run time a parameter the sum check finds used
    outside its module's call (tied weights, attention's ``out_proj``) also falls back, so
    the result stays exact; it is only slower.
    """
    ghost = {name for name, m in model.named_modules() if _ghost_supported(m)}
    fast, slow = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if name.rpartition(".")[0] in ghost else slow).append(name)
    return fast, slow


def _ghost_supported(module: nn.Module) -> bool:
    if not isinstance(module, GHOST_MODULES):
        return False
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return False
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        # Grouped convolutions and non-zero padding modes are left to the vmap fallback.
        return module.groups == 1 and module.padding_mode == "zeros"
    if isinstance(module, nn.Embedding):
        return module.max_norm is None  # max_norm renormalises the weight in place
    return True


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
    """Record (input, grad of output) of every call of each module, hooks removed on exit."""
    records: dict[str, list] = {name: [] for name in modules}

    def forward_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            entry = [args[0].detach(), None]
            records[name].append(entry)
            if output.requires_grad:
                # A tensor hook on the output gives ∂L/∂output even when a later layer
                # modifies it in place (unlike module full-backward hooks).
                output.register_hook(lambda grad: entry.__setitem__(1, grad.detach()))

        return hook

    handles = [m.register_forward_hook(forward_hook(name)) for name, m in modules.items()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _ghost_gram(model, loss_fn, xs, targets, modules) -> tuple[Tensor, dict[str, Tensor]]:
    """Gram of the ghost modules' parameters, and Σ_i g_i of each parameter it covers.

    A parameter's Gram is kept only if the sum over samples of its per-sample gradients, formed
    from the same activations and signals, equals the batch gradient autograd computes: a
    parameter also used outside its module's own call (tied weights, ``nn.MultiheadAttention``
    reading ``out_proj.weight`` directly) fails that check and goes to the vmap fallback.
    """
    n = targets.shape[0]
    with _capture(modules) as records:
        outputs = model(*xs)
        losses = _per_sample_losses(loss_fn, outputs, targets)
        params = [p for m in modules.values() for p in m.parameters(recurse=False)
                  if p.requires_grad]
        # Gradients of Σ_i loss_i: the signal reaching each layer is per sample, unscaled.
        batch_grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
    batch_grad = {id(p): g for p, g in zip(params, batch_grads, strict=True)}
    K = torch.zeros((n, n), dtype=torch.float64, device=targets.device)
    covered: dict[str, Tensor] = {}
    for prefix, module in modules.items():
        calls = [(a, d) for a, d in records[prefix] if d is not None]
        if not calls:
            continue
        for pname, (gram, total) in _parameter_terms(module, calls, n).items():
            p = getattr(module, pname)
            if _sums_match(total, batch_grad[id(p)]):
                K += gram
                # Checked equal, so autograd's batch gradient is this parameter's Σ_i g_i.
                covered[f"{prefix}.{pname}" if prefix else pname] = batch_grad[id(p)]
    return K, covered


class _BilinearSum:
    """Σ_{i,t} δ_it a_itᵀ (a weight's summed per-sample gradient), seen through uᵀ · v.

    Comparing uᵀ(Σ δ aᵀ)v = Σ (uᵀδ_it)(a_itᵀv) with uᵀ G v for fixed random u, v detects any
    missing contribution almost surely, at O(n·T·(in + out)) instead of the O(n·T·in·out) of
    forming the sum.
    """

    def __init__(self, d: Tensor, a: Tensor) -> None:
        gen = torch.Generator().manual_seed(0)
        self.u = torch.randn(d.shape[-1], generator=gen, dtype=torch.float64).to(d.device)
        self.v = torch.randn(a.shape[-1], generator=gen, dtype=torch.float64).to(a.device)
        self.value = float(((d @ self.u) * (a @ self.v)).sum())

    def matches(self, batch: Tensor) -> bool:
        G = batch.double().reshape(self.u.numel(), self.v.numel())
        tolerance = 1e-4 * float(self.u.norm() * G.norm() * self.v.norm()) + 1e-12
        return abs(self.value - float(self.u @ G @ self.v)) <= tolerance


def _sums_match(total: Tensor | _BilinearSum, batch: Tensor | None) -> bool:
    """Whether the per-sample gradients formed from the hooks sum to the batch gradient."""
    if batch is None:  # the parameter was not used at all
        return isinstance(total, Tensor) and bool(total.abs().max() == 0)
    if isinstance(total, _BilinearSum):
        return total.matches(batch)
    batch = batch.double()
    tolerance = 1e-4 * float(batch.norm()) + 1e-12
    return float((total.reshape(batch.shape) - batch).norm()) <= tolerance


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


def _parameter_terms(
    module: nn.Module, calls: list[tuple[Tensor, Tensor]], n: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """For each trainable parameter of ``module``: (its n×n Gram, Σ_i of its g_i or a view).

    Shared modules (called several times) contribute the positions of every call.
    """
    terms: dict[str, tuple[Tensor, Tensor]] = {}
    trainable = {k for k, p in module.named_parameters(recurse=False) if p.requires_grad}
    if isinstance(module, nn.Embedding):
        tokens = torch.cat([a.reshape(n, -1) for a, _ in calls], dim=1)
        d = torch.cat([d.reshape(n, -1, module.embedding_dim) for _, d in calls], dim=1).double()
        if module.padding_idx is not None:
            d = d * (tokens != module.padding_idx).unsqueeze(-1)  # that row gets no gradient
        total = torch.zeros_like(module.weight, dtype=torch.float64)
        total.index_add_(0, tokens.reshape(-1), d.reshape(-1, module.embedding_dim))
        terms["weight"] = (_embedding_gram(tokens, d), total)
    elif isinstance(module, nn.LayerNorm | nn.GroupNorm):
        weight, bias = zip(*(_norm_per_sample(module, a, d) for a, d in calls), strict=True)
        for name, parts in (("weight", weight), ("bias", bias)):
            if name in trainable:
                g = sum(parts)
                terms[name] = (g @ g.T, g.sum(dim=0))
    else:  # Linear and convolutions: inputs (n, T, in), signals (n, T, out) over positions T
        acts, sigs = zip(*(_positions(module, a, d) for a, d in calls), strict=True)
        a = (acts[0] if len(acts) == 1 else torch.cat(acts, dim=1)).double()
        d = (sigs[0] if len(sigs) == 1 else torch.cat(sigs, dim=1)).double()
        if "weight" in trainable:
            terms["weight"] = (_outer_product_gram(a, d), _BilinearSum(d, a))
        if "bias" in trainable:
            b = d.sum(dim=1)
            terms["bias"] = (b @ b.T, b.sum(dim=0))
    return {k: v for k, v in terms.items() if k in trainable}


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
        total = module.dilation[axis] * (module.kernel_size[axis] - 1)
        if total % 2:
            raise NotImplementedError("asymmetric 'same' padding")
        return total // 2
    return module.padding[axis]


def _outer_product_gram(a: Tensor, d: Tensor) -> Tensor:
    """Σ_{t,s} (δ_it·δ_js)(a_it·a_js) for a (n, T, in) and d (n, T, out), the cheaper way."""
    n, T, fan_in = a.shape
    fan_out = d.shape[2]
    if T == 1:
        return (a[:, 0] @ a[:, 0].T) * (d[:, 0] @ d[:, 0].T)
    if (n * T) ** 2 * (fan_in + fan_out) <= n * T * fan_in * fan_out + n * n * fan_in * fan_out:
        block = (a.reshape(n * T, fan_in) @ a.reshape(n * T, fan_in).T) * (
            d.reshape(n * T, fan_out) @ d.reshape(n * T, fan_out).T
        )
        return block.reshape(n, T, n, T).sum(dim=(1, 3))
    grads = torch.einsum("nto,nti->noi", d, a).reshape(n, -1)
    return grads @ grads.T


def _embedding_gram(tokens: Tensor, d: Tensor) -> Tensor:
    """Σ_{t,s} [tok_it = tok_js] (δ_it·δ_js): the rows of the weight both samples hit."""
    n, T = tokens.shape
    flat_tokens, flat_d = tokens.reshape(n * T), d.reshape(n * T, -1)
    same = (flat_tokens[:, None] == flat_tokens[None, :]).double()
    return (same * (flat_d @ flat_d.T)).reshape(n, T, n, T).sum(dim=(1, 3))


def _norm_per_sample(module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample gradients (n, C) of a LayerNorm's or GroupNorm's weight and bias."""
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
    G = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1).double()
    return G @ G.T, {name: g.double().sum(dim=0) for name, g in grads.items()}
