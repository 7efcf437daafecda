"""The per-sample Gram matrix K_ij = g_i·g_j without materialising per-sample gradients.

For a Linear layer y = a Wᵀ + b the per-sample gradient of W is a sum over positions t (a
sequence, the pixels of a convolution after unfolding) of outer products,
``G_i = Σ_t δ_it a_itᵀ``, where a_it is the layer's input and δ_it the gradient of sample i's
loss with respect to the layer's output. Hence

    G_i·G_j = Σ_{t,s} (δ_it·δ_js)(a_it·a_js),

which without positions is just (δ_i·δ_j)(a_i·a_j): the n×n Gram of the layer comes from
activations and backpropagated signals at about the cost of one backward pass (the "ghost"
trick of Goodfellow 2015 and of ghost clipping).

How it is computed (``sgn_lab.grads``):

1. The recording pass (:mod:`~sgn_lab.grads.record`) runs the model once under ``vmap`` and
   watches every torch function it calls. Each operation with a trainable parameter operand
   is handled by its rule (:mod:`~sgn_lab.grads.rules`, one file per family: linear, matmul,
   addmm, convolutions, embedding, layer/group/RMS norm, adding, multiplying or concatenating
   a parameter to activations), which states that use's per-sample gradient in factored form
   (:mod:`~sgn_lab.grads.terms`). Any other use gives the parameter a per-sample copy, whose
   gradient is its per-sample gradient (the ``vmap`` route). One backward pass gives every
   signal.
   A chain whose structure keeps the samples on axis 0 and apart (:mod:`~sgn_lab.grads.chain`:
   ``nn.Sequential`` of Linear and row-wise layers) is recorded by one plain batched pass
   with the same linear rule.
2. Each parameter's Gram is the sum over its uses (tied or shared parameters get their exact
   cross terms), each by the cheaper exact route of the cost model in
   :mod:`~sgn_lab.grads.terms`: ``ghost`` (from the factors' Grams) or ``per-sample`` (that
   use's per-sample gradients, formed from its factors).
3. :class:`GramCoverage` reports, for the call at hand, each parameter's route and why.

Nothing is assumed about layouts: the sample axis of every tensor comes from vmap, so
sequence-first inputs, inputs broadcast over the batch (position ids, a class token, a
buffer) and parameters used outside their own module are all exact; what no rule covers is
only slower. ``verify=k`` checks the result against vmap per-sample gradients on k samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from sgn_lab.grads.chain import record_chain
from sgn_lab.grads.common import (
    Inputs,
    LossFn,
    as_tuple,
    autograd_on,
    batchnorm_policy,
    num_samples,
)
from sgn_lab.grads.consistency import (
    check_independent,
    check_samples_option,
    checked,
    remember,
    structure,
)
from sgn_lab.grads.cross import sent_as_gradients, whole_gradients
from sgn_lab.grads.record import Recording, record
from sgn_lab.grads.rng import rng_changed, rng_state, set_rng_state
from sgn_lab.grads.rules.aliases import Region
from sgn_lab.grads.terms import (
    Dense,
    Term,
    Workspace,
    added,
    cost,
    materialise,
    merge,
    parameter_gram,
    route,
    samples,
    total,
)
from sgn_lab.grads.vmap import last_resort, per_sample_grads
from sgn_lab.models.wrapped import measured

ROUTES = ("ghost", "per-sample", "vmap", "loop", "none")
ROUTE_HELP = {
    "ghost": "the Gram from the operation's factors (activations, signals); no per-sample "
             "gradient is formed",
    "per-sample": "that use's per-sample gradients, formed from its factors",
    "vmap": "a per-sample copy of the parameter inside the vmapped pass (any operation)",
    "loop": "one backward pass per sample: the last resort where vmap cannot get through",
    "none": "no gradient path to the loss (unused, or used without gradient)",
}
AUTO_VERIFY = 4
"""Samples of the spot check on the first call for a model (``verify=None``)."""
# Relative Frobenius error per parameter that verify= accepts, by the model's precision.
_VERIFY_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
_VERIFY_RTOL_LOW = 3e-2  # bfloat16, float16


@dataclass(frozen=True)
class ParameterRoute:
    """How one parameter's share of the Gram was computed, and why."""

    name: str
    route: str  # one of ROUTES
    operations: str  # the torch operations it enters through
    reason: str


@dataclass(frozen=True)
class GramCoverage:
    """The route of each trainable parameter in one call of the Gram path."""

    parameters: tuple[ParameterRoute, ...]
    samples: int

    @property
    def routes(self) -> dict[str, str]:
        return {p.name: p.route for p in self.parameters}

    def names(self, route_: str) -> list[str]:
        """The parameters that took ``route_``."""
        return [p.name for p in self.parameters if p.route == route_]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(p) for p in self.parameters],
                            columns=["name", "route", "operations", "reason"])

    def summary(self, *, names: int = 6) -> str:
        """Each route with its parameters (the first ``names`` of them); vmap and none with
        each parameter's reason."""
        lines = [f"Gram path, n = {self.samples}: routes of the {len(self.parameters)} "
                 "trainable parameters"]
        for r in ROUTES:
            chosen = [p for p in self.parameters if p.route == r]
            if not chosen:
                continue
            if r in ("vmap", "loop", "none"):
                lines += [f"  {r:<10} {p.name}: {p.reason}" for p in chosen]
                continue
            shown = ", ".join(p.name for p in chosen[:names])
            more = f" and {len(chosen) - names} more" if len(chosen) > names else ""
            lines.append(f"  {r:<10} {shown}{more}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_frame().to_string(index=False)


@dataclass(frozen=True)
class GramResult:
    gram: Tensor  # (n, n) float64
    mean: Tensor | None  # (d,) float64, in named_parameters() order
    coverage: GramCoverage
    # With per_parameter=True: name -> (n, n) float64 Gram K^p_ij = g_i^p·g_j^p of each
    # trainable parameter (named_parameters() order, zeros for one without a gradient path);
    # they sum to ``gram``.
    parameter_grams: dict[str, Tensor] | None = None


class GramMismatchError(ValueError):
    """The fast Gram disagrees with vmap per-sample gradients (``verify=``)."""


def per_sample_gram(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    batchnorm: str = "error",
    chunk_size: int | None = None,
    verify: int | None = None,
    samples: str = "independent",
) -> Tensor:
    """The (n, n) float64 Gram matrix ``K_ij = g_i·g_j`` of the per-sample gradients.

    The per-sample gradients are those of :func:`sgn_lab.per_sample_grads` (every parameter
    with ``requires_grad``; ``loss_fn`` the usual mean-reduced loss, so g_i is the gradient of
    sample i's loss alone), computed without an n × d matrix: see the module docstring.

    Parameters
    ----------
    batchnorm
        BatchNorm policy, as in :func:`sgn_lab.per_sample_grads`.
    chunk_size
        None: one pass over all n samples. An integer c < n: K is assembled from passes over
        pairs of chunks of c samples, which bounds the memory by 2c samples' activations and
        signals at about n/c times the work. A forward pass that draws random numbers
        (dropout) cannot be chunked this way (the blocks would see different draws): that is
        a ValueError.
    verify
        The checks of the call. ``None`` (default): on the first call for a model (and again
        when its structure changes; :mod:`sgn_lab.grads.consistency`), the spot check on
        ``AUTO_VERIFY`` samples and the consistency check below; later calls skip them.
        k > 0: both on every call, the spot check on the first k samples. 0: neither.
        The spot check computes vmap per-sample gradients of the first k samples and
        compares each parameter's Gram block with theirs: :class:`GramMismatchError` names
        the parameters that disagree beyond the precision of the model's dtype. The
        consistency check compares the batched forward of a few samples with their
        batch-of-one passes (:func:`~sgn_lab.grads.consistency.check_independent`).
    samples
        ``"independent"`` (default): a forward pass that mixes samples (``h - h.mean(0)``,
        batch statistics, in-batch negatives) is a
        :class:`~sgn_lab.grads.consistency.SampleMixingError`, since each g_i would be the
        gradient of a batch of one rather than sample i's share of the batch's gradient.
        ``"batch-of-one"``: those are the gradients wanted; mixing is a warning.

    Notes
    -----
    Random layers such as dropout draw from torch's global generator, once per call.
    The centred Gram of the SGN is ``C K C`` with ``C = I − 11ᵀ/n``;
    ``sgn_lab.noise_stats(gram=K, dim=d)`` takes K directly.
    """
    return gram_result(model, loss_fn, inputs, targets, batchnorm=batchnorm,
                       chunk_size=chunk_size, verify=verify, samples=samples).gram


def gram_and_mean_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    batchnorm: str = "error",
    chunk_size: int | None = None,
    verify: int | None = None,
    samples: str = "independent",
) -> tuple[Tensor, Tensor]:
    """:func:`per_sample_gram` and, from the same pass, the mean gradient ḡ (d,) in float64.

    ḡ is flattened in ``model.named_parameters()`` order (the order of
    :func:`sgn_lab.flatten_grads`), so ``noise_stats(gram=K, dim=d, mean=ḡ)`` reports the
    mean exactly.
    """
    result = gram_result(model, loss_fn, inputs, targets, with_mean=True, batchnorm=batchnorm,
                         chunk_size=chunk_size, verify=verify, samples=samples)
    assert result.mean is not None
    return result.gram, result.mean


def per_sample_gram_coverage(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    batchnorm: str = "error",
    verify: int | None = None,
    samples: str = "independent",
) -> GramCoverage:
    """Each trainable parameter's route in :func:`per_sample_gram` on these inputs, and why.

    Routes (``ROUTES``): ``ghost`` and ``per-sample`` are the fast exact routes, chosen by
    the cost model; ``vmap`` is the exact route for uses no rule covers; ``none`` a parameter
    without a gradient path. The routes depend on the call (the operations the forward pass
    runs, the number of samples and positions), so this runs one Gram computation, with the
    checks of ``verify`` and ``samples`` as in :func:`per_sample_gram`.
    """
    return gram_result(model, loss_fn, inputs, targets, batchnorm=batchnorm, verify=verify,
                       samples=samples).coverage


def gram_result(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    with_mean: bool = False,
    per_parameter: bool = False,
    batchnorm: str = "error",
    chunk_size: int | None = None,
    verify: int | None = None,
    samples: str = "independent",
) -> GramResult:
    """The Gram, the mean gradient (``with_mean``) and the coverage report of one call.

    ``per_parameter``: also each trainable parameter's own (n, n) float64 Gram
    K^p_ij = g_i^p·g_j^p (``parameter_grams``, whose sum is ``gram``), from the same pass at
    no extra cost but n² numbers per parameter; the per-layer noise scale
    (:func:`sgn_lab.layer_noise_scale`) comes from them. The other options are those of
    :func:`per_sample_gram`.
    """
    for label, value, low in (("chunk_size", chunk_size, 1), ("verify", verify, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    check_samples_option(samples)
    with measured(model) as module:
        return _gram_result(module, loss_fn, inputs, targets, with_mean, per_parameter,
                            batchnorm, chunk_size, verify, samples)


def _gram_result(model, loss_fn, inputs, targets, with_mean, per_parameter, batchnorm,
                 chunk_size, verify, samples):
    """:func:`gram_result` on the module to measure, its options checked."""
    model, xs, targets, params, n = _prepared(model, inputs, targets)
    key = (*structure("gram", model, loss_fn, xs, targets), samples)
    if verify is None:
        verify = 0 if checked(model, key) else min(AUTO_VERIFY, n)
    with autograd_on(), batchnorm_policy(model, batchnorm):
        result, blocks, randomness = _chunked(model, loss_fn, xs, targets, params, with_mean,
                                              chunk_size or n, verify, per_parameter)
        if verify:
            _verify(model, loss_fn, xs, targets, params, blocks, randomness)
            check_independent(model, loss_fn, xs, targets, samples=samples)
            remember(model, key)
    return result


def _prepared(model, inputs, targets):
    """(the module to measure, inputs as a tuple and targets on its device, its trainable
    parameters by name, the number of samples)."""
    xs = as_tuple(inputs)
    n = num_samples(xs, targets)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True")
    device = next(iter(params.values())).device
    return model, tuple(x.to(device) for x in xs), targets.to(device), params, n


def _chunked(model, loss_fn, xs, targets, params, with_mean, chunk, verify,
             per_parameter=False):
    """The Gram from one pass, or from passes over pairs of chunks of ``chunk`` samples."""
    n = targets.shape[0]
    if chunk >= n:
        result, blocks, randomness = _one_pass(model, loss_fn, xs, targets, params,
                                               slice(0, n) if with_mean else None, verify,
                                               per_parameter=per_parameter)
        if result.mean is not None:
            result.mean.div_(n)  # in place: the pass's own sum, d float64 numbers
        return result, blocks, randomness
    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    K = torch.zeros((n, n), dtype=torch.float64, device=targets.device)
    Ks = ({name: torch.zeros_like(K) for name in params} if per_parameter else None)
    mean = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64,
                       device=targets.device) if with_mean else None
    first = None
    for a, (a0, a1) in enumerate(bounds):
        for b0, b1 in bounds[a + 1:]:
            result, blocks = _pair_pass(model, loss_fn, xs, targets, params, (a0, a1),
                                        (b0, b1), with_mean and a == 0,
                                        verify if first is None else 0, per_parameter, chunk)
            _place(K, result.gram, (a0, a1), (b0, b1))
            for name in Ks or ():
                _place(Ks[name], result.parameter_grams[name], (a0, a1), (b0, b1))
            if mean is not None and result.mean is not None:
                mean += result.mean
            first = first or (result.coverage, blocks)
            # Released before the next pass: its mean alone is d float64 numbers.
            del result
    coverage, blocks = first
    if mean is not None:
        mean /= n
    return GramResult(K, mean, GramCoverage(coverage.parameters, n), Ks), blocks, False


def _pair_pass(model, loss_fn, xs, targets, params, a, b, with_mean, verify, per_parameter,
               chunk):
    """One pass over the samples of chunks a and b (both [start, stop)); its mean sums the
    rows that are chunk a's and b's share of the whole mean when ``with_mean`` (a is the
    first chunk): chunk c's share comes from the pass (0, c), chunk 0's from (0, 1)."""
    (a0, a1), (b0, b1) = a, b
    pick = torch.cat([torch.arange(a0, a1), torch.arange(b0, b1)]).to(targets.device)
    rows = None
    if with_mean:
        rows = slice(0, a1 - a0 + b1 - b0) if b0 == a1 else slice(a1 - a0, None)
    result, blocks, randomness = _one_pass(
        model, loss_fn, tuple(x[pick] for x in xs), targets[pick], params, rows, verify,
        per_parameter=per_parameter)
    if randomness:
        raise ValueError(
            f"the forward pass draws random numbers (dropout?), so a Gram assembled "
            f"from passes over chunks of {chunk} samples would mix different draws; "
            "use chunk_size=None, or put the model in eval mode")
    return result, blocks


def _place(whole: Tensor, part: Tensor, a: tuple[int, int], b: tuple[int, int]) -> None:
    """Write the Gram ``part`` of the samples of chunks a then b into their blocks of
    ``whole``."""
    (a0, a1), (b0, b1) = a, b
    m = a1 - a0
    whole[a0:a1, a0:a1] = part[:m, :m]
    whole[b0:b1, b0:b1] = part[m:, m:]
    whole[a0:a1, b0:b1] = part[:m, m:]
    whole[b0:b1, a0:a1] = part[m:, :m]


def _one_pass(model, loss_fn, xs, targets, params, sum_rows, verify, *, keep=False,
              per_parameter=False):
    """(GramResult, per-parameter blocks of the first ``verify`` samples, randomness), and
    with ``keep`` also every parameter's term groups (the factors of the pass).

    The result's ``mean`` is Σ_i g_i over the samples ``sum_rows`` (None: not computed);
    with ``per_parameter`` its ``parameter_grams`` hold each parameter's (n, n) Gram.
    """
    n = targets.shape[0]
    start = rng_state(targets.device)
    try:
        rec = record_chain(model, loss_fn, xs, targets, params)
        if rec is None:
            rec = record(model, loss_fn, xs, targets, params)
    except RuntimeError as refusal:  # vmap cannot transform some module: the last resort
        rec = _loop_recording(model, loss_fn, xs, targets, params, refusal)
    if rec.unseen:  # from the same random draws (dropout masks) as the recording pass
        with torch.random.fork_rng(devices=_cuda(targets)):
            set_rng_state(start, targets.device)
            _vmap_unseen(model, loss_fn, xs, targets, rec)
    K = torch.zeros((n, n), dtype=torch.float64, device=targets.device)
    routes, blocks, workspace, kept = [], {}, Workspace(), {}
    # Σ_i g_i in float64, written in place parameter by parameter: d numbers held once.
    summed = None if sum_rows is None else torch.zeros(
        sum(p.numel() for p in params.values()), dtype=torch.float64, device=targets.device)
    offset = 0
    grams: dict[str, Tensor] | None = {} if per_parameter else None
    for name, p in params.items():
        workspace.next_parameter()
        groups = _by_region(rec.terms.pop(name, []), tuple(p.shape))
        routes.append(_route(name, groups, rec))
        if keep and sent_as_gradients(groups, tuple(p.shape), n):
            # Formed once, here: its Gram and sum come from them, and they are what is sent.
            groups = [(None, [Dense(whole_gradients(groups, tuple(p.shape)), "gathered")])]
        if keep:
            kept[name] = groups
        if groups:
            K_p = added(parameter_gram(group, workspace) for _, group in groups)
            K += K_p
            if verify:
                blocks[name] = K_p[:verify, :verify].clone()
            if grams is not None:
                grams[name] = (K_p + K_p.T) / 2  # symmetric as K is
        elif grams is not None:
            grams[name] = torch.zeros_like(K)
        if summed is not None:
            part = summed[offset:offset + p.numel()].view(p.shape)
            for region, group in groups:
                box = part[_index(region)]
                for t in group:
                    box += total(samples(t, sum_rows)).view(box.shape)
        offset += p.numel()
    K = (K + K.T) / 2  # blocked matrix products leave it symmetric only to rounding
    result = GramResult(K, summed, GramCoverage(tuple(routes), n), grams)
    if keep:
        return result, blocks, rec.randomness, kept
    return result, blocks, rec.randomness


def gram_factors(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    batchnorm: str = "error",
    verify: int = 0,
) -> tuple[GramResult, dict[str, list[tuple[Region | None, list[Term]]]]]:
    """One pass of the Gram path that keeps its factors, for Grams across sample sets.

    Returns the :func:`gram_result` of these samples (``mean`` is here the sum Σ_i g_i, not
    the mean) and each trainable parameter's term groups: (region, merged terms), the
    parameter's per-sample gradients in factored form (:mod:`sgn_lab.grads.terms`), from
    which :func:`sgn_lab.grads.cross.cross_gram` gives the inner products with another sample
    set's. A parameter better sent as its per-sample gradients
    (:func:`~sgn_lab.grads.cross.sent_as_gradients`) has them formed once, in this pass, as
    one ``Dense`` term: its Gram and sum come from them, and nothing forms them again.
    """
    with measured(model) as module:
        return _factors(module, loss_fn, inputs, targets, batchnorm, verify)


def _factors(model, loss_fn, inputs, targets, batchnorm, verify):
    """:func:`gram_factors` on the module to measure."""
    model, xs, targets, params, n = _prepared(model, inputs, targets)
    with autograd_on(), batchnorm_policy(model, batchnorm):
        result, blocks, randomness, groups = _one_pass(model, loss_fn, xs, targets, params,
                                                       slice(0, n), verify, keep=True)
        if verify:
            _verify(model, loss_fn, xs, targets, params, blocks, randomness)
    return result, groups


def _by_region(entries: list[tuple[Region | None, Term]], shape: tuple[int, ...]
               ) -> list[tuple[Region | None, list[Term]]]:
    """A parameter's terms as merged groups whose Grams add up.

    Uses of disjoint boxes of the parameter (the q, k and v rows of a packed in-projection)
    have no cross terms: each box is a group of its own. Overlapping uses are all placed on
    the whole parameter first.
    """
    regions = sorted({region for region, _ in entries}, key=lambda r: (r is not None, r or ()))
    if not regions:
        return []
    if regions == [None]:
        return [(None, merge([t for _, t in entries]))]
    if None not in regions and all(_disjoint(a, b) for i, a in enumerate(regions)
                                   for b in regions[i + 1:]):
        return [(r, merge([t for q, t in entries if q == r])) for r in regions]
    whole = [t if r is None else _embed(t, r, shape) for r, t in entries]
    return [(None, merge(whole))]


def _disjoint(a: Region, b: Region) -> bool:
    return any(s >= v or u >= t for (s, t), (u, v) in zip(a, b, strict=True))


def _index(region: Region | None) -> tuple[slice, ...]:
    return () if region is None else tuple(slice(s, t) for s, t in region)


def _embed(term: Term, region: Region, shape: tuple[int, ...]) -> Dense:
    """A term on a box of the parameter as per-sample gradients of the whole parameter."""
    grads = materialise(term)
    n = grads.shape[0]
    full = grads.new_zeros((n, *shape))
    box = full[(slice(None), *_index(region))]
    box.copy_(grads.view(box.shape))
    return Dense(full.reshape(n, -1), term.op, route(term) if isinstance(term, Dense)
                 else "per-sample")


def _route(name: str, groups: list[tuple[Region | None, list[Term]]], rec: Recording
           ) -> ParameterRoute:
    terms = [t for _, group in groups for t in group]
    if not terms:
        return ParameterRoute(name, "none", "", ROUTE_HELP["none"])
    chosen = [route(t) for t in terms]
    slowest = max(chosen, key=ROUTES.index)
    operations = " + ".join(t.op for t in terms)
    if slowest in ("vmap", "loop"):
        reason = "; ".join(dict.fromkeys(rec.reasons.get(name, [])))
    else:
        reason = "; ".join(f"{t.op}: {r} ({cost(t)})" for t, r in zip(terms, chosen,
                                                                      strict=True))
    if any(len(group) > 1 for _, group in groups):
        reason += "; cross terms of its uses from their factors"
    return ParameterRoute(name, slowest, operations, reason)


def _loop_recording(model, loss_fn, xs, targets, params, refusal) -> Recording:
    """Every parameter's per-sample gradients from per-sample backward passes (the ``loop``
    route), when the recording pass cannot run under vmap."""
    pick = slice(0, min(2, targets.shape[0]))

    def attempt() -> None:
        record(model, loss_fn, tuple(x[pick] for x in xs), targets[pick], params)

    state = rng_state(targets.device)
    grads, why = last_resort(model, loss_fn, xs, targets, refusal, attempt)
    terms = {name: [(None, Dense(g.reshape(g.shape[0], -1), "loop", "loop"))]
             for name, g in grads.items()}
    return Recording(terms, {name: [why] for name in grads}, [],
                     rng_changed(state, targets.device))


def _vmap_unseen(model, loss_fn, xs, targets, rec: Recording) -> None:
    """Per-sample gradients by vmap of the parameters whose uses the pass could not see."""
    names = set(rec.unseen)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        grads = per_sample_grads(model, loss_fn, xs, targets, verify=0)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    why = ("used by an operation the pass could not see (not a torch function: TorchScript, "
           "a C++ extension; or a tensor derived before the pass)")
    for name, g in grads.items():
        rec.terms[name] = [(None, Dense(g.reshape(g.shape[0], -1), "unseen", "vmap"))]
        rec.reasons[name] = [why]


def _verify(model, loss_fn, xs, targets, params, blocks, randomness) -> None:
    """Compare each parameter's Gram block with vmap per-sample gradients of k samples."""
    k = min(len(next(iter(blocks.values()), torch.empty(0))), targets.shape[0]) if blocks else 0
    if not k:
        return
    sub, sub_targets = tuple(x[:k] for x in xs), targets[:k]
    # The check draws nothing from the caller's random state: a checked call leaves it
    # where an unchecked one does.
    with torch.random.fork_rng(devices=_cuda(targets)):
        if randomness:  # both computations on the k samples under the same seed
            start = rng_state(targets.device)
            _, blocks, _ = _one_pass(model, loss_fn, sub, sub_targets, params, None, k)
            set_rng_state(start, targets.device)
        reference = per_sample_grads(model, loss_fn, sub, sub_targets, verify=0)
    dtype = min((p.dtype for p in params.values()), key=lambda t: torch.finfo(t).bits)
    rtol = _VERIFY_RTOL.get(dtype, _VERIFY_RTOL_LOW)
    # Each block's error against its own size, or against rtol·‖K‖ where that is larger:
    # a parameter whose gradient is zero (a key bias before a softmax) has only rounding.
    expected = {name: _gram_of(g.reshape(k, -1)) for name, g in reference.items()}
    floor = rtol * float(torch.linalg.norm(sum(expected.values())))
    errors = {}
    for name, want in expected.items():
        got = blocks.get(name, torch.zeros_like(want))
        scale = max(float(torch.linalg.norm(want)), floor, torch.finfo(torch.float64).tiny)
        error = float(torch.linalg.norm(got - want)) / scale
        if not error <= rtol:
            errors[name] = error
    if errors:
        listed = ", ".join(f"{name} (relative error {e:.2g})" for name, e in errors.items())
        raise GramMismatchError(
            f"the fast Gram disagrees with vmap per-sample gradients on {k} samples beyond "
            f"{rtol:g} for {listed}; please report the model, and use grads='vmap' meanwhile")


def _gram_of(G: Tensor) -> Tensor:
    G = G.double()
    return G @ G.T


def _cuda(t: Tensor) -> list:
    return [t.device] if t.device.type == "cuda" else []
