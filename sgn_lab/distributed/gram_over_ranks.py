"""The probe set's Gram, mean and per-coordinate variance from a probe set split over ranks.

Each rank holds a contiguous block of the n probe samples (:meth:`Ranks.shard`) and computes
its own per-sample gradients' share: the diagonal block K_rr of the Gram by the ordinary
route (the Gram path, or vmap per-sample gradients), and the sum Σ g_i over its samples. The
off-diagonal blocks need the other ranks' gradients, which travel as a *payload*, one
broadcast per rank:

=========== ============================================================ ===================
route       payload of rank r, per parameter of numel d_p                bytes (float32)
=========== ============================================================ ===================
factors     the Gram path's factors: Outer n_r·T·(p+q) numbers, Rows     4·(factor numbers),
            n_r·T·q numbers and n_r·T int64 indices, Dense n_r·d_p       8 per index
gradients   the per-sample gradients, n_r × d_p                          4·n_r·d_p
=========== ============================================================ ===================

(8 bytes a number for float64 models.) A parameter travels as factors where they are fewer
bytes *and* the Gram path itself takes their ghost route (:func:`sgn_lab.grads.terms.route`),
as gradients otherwise (:func:`sgn_lab.grads.cross.compact`): a Linear layer over many
positions has compact factors whose cross products cost n_r·n_s·T²·(p+q), far more than
multiplying gradients. The vmap path has only gradients. Every payload is broadcast in turn,
so each rank receives every other rank's, Σ_{s≠r} bytes_s, about (N−1)/N of the whole probe
set's payload; it keeps those it needs (⌊N/2⌋ of them) and, once all have travelled,
computes its share of the off-diagonal blocks (about (N−1)/2 blocks,
:meth:`Ranks.cross_tasks`) while the others compute theirs. Where the payloads kept would
exceed ``HELD_BYTES`` (4 GiB), each block is computed as its payload arrives and the payload
dropped: one other rank's payload in memory, at the price of ranks taking turns. The blocks
meet in one all-reduce of the n×n float64 matrix (8·n² bytes), where every entry comes from
exactly one rank, so the sum is exact; the mean is an all-reduce of d float64 values, and the
vmap path's diag(S) one more (Chan et al.'s merge of per-rank moments).

Every rank ends with the same K and mean: the statistics are then computed identically on
every rank, and instruments run unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sgn_lab.distributed.ranks import Ranks
from sgn_lab.grads.cross import Factors, compact, cross_gram
from sgn_lab.grads.gram import GramCoverage, gram_factors
from sgn_lab.grads.terms import Dense, Outer, Rows, Term, samples
from sgn_lab.grads.vmap import per_sample_grads

LossFn = Callable[[Tensor, Tensor], Tensor]
# Received payloads a rank may hold at once before blocks are computed as payloads arrive.
HELD_BYTES = 4 * 2**30


@dataclass(frozen=True)
class SplitGram:
    """What every rank holds after :func:`split_gram`."""

    gram: Tensor  # (n, n) float64, probe order
    mean: Tensor  # (d,) float64
    diag_variance: Tensor | None  # (d,) float64, the vmap route only
    coverage: GramCoverage | None  # the Gram path's routes on this rank's block
    payload: dict[str, str]  # parameter -> "factors" or "gradients"


def split_gram(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    ranks: Ranks,
    *,
    grads: str = "gram",
    batchnorm: str = "error",
    chunk_size: int | None = None,
    verify: int = 0,
    block_grads: dict[str, Tensor] | None = None,
) -> SplitGram:
    """The Gram and mean gradient of the n samples (x, y), each rank working on its block.

    ``x`` and ``y`` are the whole probe batch, the same on every rank; ``grads`` is ``"gram"``
    (the Gram path; ``chunk_size`` is not supported there: the split already bounds a rank's
    memory) or ``"vmap"`` (per-sample gradients, chunked by ``chunk_size``). ``verify`` checks
    each rank's diagonal block as :func:`sgn_lab.per_sample_gram` does. ``block_grads``
    (vmap only): this rank's block's per-sample gradients, where the caller has them already.
    """
    n = len(y)
    if n < ranks.size:
        raise ValueError(f"the probe set of {n} samples cannot be split over {ranks.size} "
                         "processes: use at most as many processes as probe samples")
    if block_grads is not None and grads != "vmap":
        raise ValueError("block_grads are per-sample gradients: they go with grads='vmap'")
    block = ranks.shard(n)
    x_r, y_r = x[block], y[block]
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    coverage, diag = None, None
    if grads == "gram":
        if chunk_size is not None:
            raise ValueError("chunk_size with a probe set split over processes is not "
                             "supported on the Gram path: add processes to bound memory, or "
                             "use grads='vmap'")
        local, groups = gram_factors(model, loss_fn, x_r, y_r, batchnorm=batchnorm,
                                     verify=verify)
        coverage, own_block, total = local.coverage, local.gram, local.mean
        del local  # total is then the only d-long vector
        payload, choice = compact(groups, shapes, len(y_r))
        del groups
    elif grads == "vmap":
        g = block_grads if block_grads is not None else per_sample_grads(
            model, loss_fn, x_r, y_r, chunk_size=chunk_size, batchnorm=batchnorm)
        payload = {name: [(None, [Dense(t.reshape(len(y_r), -1), "vmap", "vmap")])]
                   for name, t in g.items()}
        choice = dict.fromkeys(payload, "gradients")
        G = torch.cat([t.reshape(len(y_r), -1) for t in g.values()], dim=1)
        del g
        own_block = cross_gram(payload, payload, shapes)
        total = G.sum(dim=0, dtype=torch.float64)
    else:
        raise ValueError(f"grads must be 'gram' or 'vmap', got {grads!r}")

    bounds = ranks.bounds(n)
    K = torch.zeros((n, n), dtype=torch.float64, device=own_block.device)
    K[block, block] = own_block
    tasks = ranks.cross_tasks()
    needed = {s if r == ranks.rank else r for r, s, _, _ in tasks}
    packed = _pack(payload)
    # Every payload travels first, so that the ranks then compute their blocks side by side;
    # where the payloads a rank would hold exceed HELD_BYTES, each block is computed as its
    # payload arrives instead (one other payload in memory; the ranks then take turns).
    held = sum(t.numel() * t.element_size() for t in packed[1]) * len(needed)
    eager = held > HELD_BYTES
    received = {ranks.rank: payload}
    for src in range(ranks.size):
        mine = src == ranks.rank
        spec = ranks.broadcast_object(packed[0] if mine else None, src)
        tensors = ranks.broadcast_tensors(packed[1] if mine else None, src, kind="payload")
        if src in needed:
            received[src] = _unpack(spec, [t.to(own_block.device) for t in tensors])
        del tensors
        if eager and src in needed:
            _cross_blocks(K, [t for t in tasks if src in t[:2]], received, bounds, shapes)
            del received[src]
    if not eager:
        _cross_blocks(K, tasks, received, bounds, shapes)
    del received
    K = ranks.sum(K)
    mean = ranks.sum_(total).div_(n)  # in place: one d-long vector
    if grads == "vmap":
        diag = _merged_variance(G, mean, n, ranks)
    return SplitGram(K, mean, diag, coverage, choice)


def _merged_variance(G: Tensor, mean: Tensor, n: int, ranks: Ranks) -> Tensor:
    """diag(S) over all ranks (Chan, Golub & LeVeque 1979): M = Σ_r M_r + n_r (m_r − m)²,
    each rank's M_r two-pass about its own mean m_r."""
    G = G.to(torch.float64)
    m_r = G.mean(dim=0)
    M_r = ((G - m_r) ** 2).sum(dim=0) + len(G) * (m_r - mean.to(G.device)) ** 2
    return ranks.sum(M_r) / (n - 1)


def _cross_blocks(K: Tensor, tasks: list[tuple[int, int, float, float]],
                  received: dict[int, Factors], bounds: list[tuple[int, int]],
                  shapes: dict[str, tuple[int, ...]]) -> None:
    """Fill K's blocks of ``tasks`` (:meth:`Ranks.cross_tasks`) and their transposes."""
    for r, s, lo, hi in tasks:
        (r0, r1), (s0, s1) = bounds[r], bounds[s]
        first, last = r0 + round(lo * (r1 - r0)), r0 + round(hi * (r1 - r0))
        if last > first:
            rows = _restricted(received[r], slice(first - r0, last - r0))
            cross = cross_gram(rows, received[s], shapes)
            K[first:last, s0:s1] = cross
            K[s0:s1, first:last] = cross.T


def _restricted(payload: Factors, rows: slice) -> Factors:
    """The payload of the samples ``rows`` only."""
    return {name: [(region, [samples(t, rows) for t in terms]) for region, terms in groups]
            for name, groups in payload.items()}


# --- payloads as (spec, tensors) for broadcast --------------------------------------------

_KINDS = {"Outer": Outer, "Rows": Rows, "Dense": Dense}


def _pack(payload: Factors) -> tuple[list, list[Tensor]]:
    """The payload's tensors in a flat list, and a small picklable spec of the rest."""
    spec, tensors = [], []
    for name, groups in payload.items():
        entry = []
        for region, terms in groups:
            packed_terms = []
            for term in terms:
                fields = {}
                for f in dataclasses.fields(term):
                    value = getattr(term, f.name)
                    if isinstance(value, Tensor):
                        fields[f.name] = len(tensors)
                        tensors.append(value)
                    else:
                        fields[f.name] = ("value", value)
                packed_terms.append((type(term).__name__, fields))
            entry.append((region, packed_terms))
        spec.append((name, entry))
    return spec, tensors


def _unpack(spec: list, tensors: list[Tensor]) -> Factors:
    payload = {}
    for name, entry in spec:
        groups = []
        for region, packed_terms in entry:
            terms: list[Term] = []
            for kind, fields in packed_terms:
                values = {key: v[1] if isinstance(v, tuple) else tensors[v]
                          for key, v in fields.items()}
                terms.append(_KINDS[kind](**values))
            groups.append((region, terms))
        payload[name] = groups
    return payload
