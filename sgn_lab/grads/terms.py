"""Per-sample gradients in factored form, and the Gram matrix of their inner products.

Each rule (:mod:`sgn_lab.grads.rules`) states the per-sample gradient g_i of one use of a
parameter as one of three terms, n samples first in every tensor:

``Outer(left, right)``
    g_i = Σ_t left[i, t] ⊗ right[i, t]: the parameter viewed as a (p, q) matrix is a sum of
    outer products over T positions (a Linear or matmul weight, δ ⊗ a; a convolution after
    im2col). ``left`` is (n, T, p), ``right`` (n, T, q).
``Rows(index, values, rows)``
    g_i = Σ_t e_{index[i, t]} ⊗ values[i, t]: rows of a (rows, q) table picked by an index (an
    embedding). The left factor is one-hot, so it is never formed.
``Dense(grads)``
    g_i itself, (n, numel): a bias, a norm's affine parameter, a parameter added to the
    activations, or the per-sample copy of the ``vmap`` route.

A parameter's g_i is the sum over its uses, and its Gram K_ij = g_i·g_j the sum of the inner
products of every pair of its terms. Terms of one kind merge first (Outer and Rows terms
concatenate their positions, Dense terms add), so a parameter has at most one term of each
kind and the only cross products are Outer·Rows (an embedding tied to an output layer),
Outer·Dense and Rows·Dense.

Cost model, per Outer term (multiply-adds; n samples, T positions, a (p, q) parameter):

    ghost       Σ_{t,s} (left_it·left_js)(right_it·right_js) from two (nT)×(nT) Grams, worked
                in row blocks of bounded memory: n²T²(p + q); with T = 1 it is
                (left leftᵀ) ⊙ (right rightᵀ), n²(p + q).
    per-sample  the n per-sample gradients of this use (batched matmuls) and their Gram:
                nTpq + n²pq, formed a block of the weight's rows at a time (4 MiB, which
                stays in the cache and is never fresh memory); across terms of one
                parameter, memory n·p·q.

The cheaper route is taken, as Bu et al. (ICML 2023) choose per layer between ghost norms and
per-sample gradients, except that per-sample gradients larger than ``MATERIALISE_BYTES`` are
never formed. Rows terms choose the same way between the per-sample gradients restricted to
the rows the batch touches and the dot products of pairs of rows with the same index.

Products are formed in the model's precision (at least float32, since bf16 products would
lose the Gram) and summed in float64.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, replace
from itertools import combinations

import torch
from torch import Tensor

# Per-sample gradients of one term above this size are never formed (the ghost route is taken).
MATERIALISE_BYTES = 2 * 2**30
# Entries of one working block of the ghost route's (rows × nT) products.
_BLOCK_ENTRIES = 2**24
# Bytes of one block of per-sample gradients on the per-sample route (cache-sized).
_BLOCK_BYTES = 2**22


@dataclass(frozen=True)
class Outer:
    """g_i = Σ_t left[i, t] ⊗ right[i, t] over a (p, q) view of the parameter."""

    left: Tensor  # (n, T, p)
    right: Tensor  # (n, T, q)
    op: str


@dataclass(frozen=True)
class Rows:
    """g_i = Σ_t e_{index[i, t]} ⊗ values[i, t] over a (rows, q) table."""

    index: Tensor  # (n, T), int64
    values: Tensor  # (n, T, q)
    rows: int
    op: str


@dataclass(frozen=True)
class Dense:
    """g_i given, (n, numel), and the route that gave it: ``per-sample`` (a rule's formula),
    ``vmap`` (a per-sample copy of the parameter) or ``loop`` (per-sample backward passes)."""

    grads: Tensor
    op: str
    route: str = "per-sample"


Term = Outer | Rows | Dense
_SLOWER = ("ghost", "per-sample", "vmap", "loop")  # routes, fastest first


def compute_dtype(t: Tensor) -> torch.dtype:
    """The model's precision, at least float32."""
    return torch.promote_types(t.dtype, torch.float32)


def transposed(term: Term, shape: tuple[int, int]) -> Term:
    """The term of a parameter P from the term of its 2-D transpose Pᵀ of ``shape``."""
    if isinstance(term, Outer):
        return Outer(term.right, term.left, term.op)
    grads = materialise(term)
    n = grads.shape[0]
    return Dense(grads.reshape(n, *shape).transpose(1, 2).reshape(n, -1), term.op,
                 term.route if isinstance(term, Dense) else "per-sample")


def scaled(term: Term, factor: float) -> Term:
    """The term of c·P's use as a term of P: the gradient with respect to P is c times it."""
    if isinstance(term, Outer):
        return replace(term, left=term.left * factor)
    if isinstance(term, Rows):
        return replace(term, values=term.values * factor)
    return replace(term, grads=term.grads * factor)


def merge(terms: list[Term]) -> list[Term]:
    """At most one term of each kind, in the order Outer, Rows, Dense."""
    merged: list[Term] = []
    for kind in (Outer, Rows, Dense):
        same = [t for t in terms if isinstance(t, kind)]
        if len(same) <= 1:
            merged.extend(same)
            continue
        op = " + ".join(t.op for t in same)
        if kind is Dense:
            dtype = _common_dtype([t.grads for t in same])
            total = sum(t.grads.to(dtype) for t in same)
            merged.append(Dense(total, op, max((t.route for t in same), key=_SLOWER.index)))
        elif kind is Outer:
            dtype = _common_dtype([t.left for t in same])
            merged.append(Outer(torch.cat([t.left.to(dtype) for t in same], dim=1),
                                torch.cat([t.right.to(dtype) for t in same], dim=1), op))
        else:
            dtype = _common_dtype([t.values for t in same])
            merged.append(Rows(torch.cat([t.index for t in same], dim=1),
                               torch.cat([t.values.to(dtype) for t in same], dim=1),
                               same[0].rows, op))
    return merged


def _common_dtype(tensors: list[Tensor]) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --- routes ------------------------------------------------------------------------------


def outer_route(n: int, T: int, p: int, q: int, itemsize: int) -> str:
    """``"ghost"`` or ``"per-sample"`` for an Outer term, by the cost model above."""
    if n * p * q * itemsize > MATERIALISE_BYTES:
        return "ghost"
    ghost = n * n * (p + q) * (T * T if T > 1 else 1)
    per_sample = n * T * p * q + n * n * p * q
    return "ghost" if ghost <= per_sample else "per-sample"


def route(term: Term) -> str:
    """The route the Gram of ``term`` takes: ``ghost``, ``per-sample`` or ``vmap``."""
    if isinstance(term, Dense):
        return term.route
    if isinstance(term, Outer):
        n, T, p = term.left.shape
        return outer_route(n, T, p, term.right.shape[2], term.left.element_size())
    return _rows_route(_summed_rows(term), term.index.shape[0])


def cost(term: Term) -> str:
    """The cost model's figures for ``term``, for the coverage report."""
    if isinstance(term, Outer):
        n, T, p = term.left.shape
        q = term.right.shape[2]
        ghost = n * n * (p + q) * (T * T if T > 1 else 1)
        return (f"T={T}, ({p}×{q}): ghost {ghost:.2g}, per-sample "
                f"{n * T * p * q + n * n * p * q:.2g} multiply-adds")
    if isinstance(term, Rows):
        summed = _summed_rows(term)
        n = term.index.shape[0]
        return f"{len(summed.vocab)} rows touched, {summed.pairs} row pairs ({n} samples)"
    return f"{term.grads.shape[1]} values per sample"


# --- the Gram ----------------------------------------------------------------------------


class Workspace:
    """What the Grams of one pass share, parameter after parameter.

    One buffer, grown as needed, for the per-sample gradients formed one term at a time:
    fresh memory costs page faults, and on a CPU first touching the n·p·q values of a layer's
    per-sample gradients can take as long as multiplying them. And the products X Xᵀ of the
    current and the previous parameter, by view: a Linear layer's weight (T = 1) and bias
    share their signal's δ δᵀ.
    """

    def __init__(self) -> None:
        self.buffer: Tensor | None = None
        self.products: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.earlier: dict[tuple, tuple[Tensor, Tensor]] = {}

    def next_parameter(self) -> None:
        self.earlier, self.products = self.products, {}

    def product(self, x: Tensor) -> Tensor:
        """x xᵀ for a 2-D x (n, f), in x's precision (at least float32)."""
        key = (x.data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
        found = self.products.get(key) or self.earlier.get(key)
        if found is None:
            y = x.to(compute_dtype(x))
            found = (x, y @ y.T)  # x kept alive, so that its address stays its own
        self.products[key] = found
        return found[1]

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape``, valid until the next ``take``."""
        numel = math.prod(shape)
        b = self.buffer
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != device:
            self.buffer = b = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel].view(shape)


def parameter_gram(terms: list[Term], workspace: Workspace | None = None) -> Tensor:
    """K_ij = g_i·g_j in float64 for one parameter, g_i the sum of ``terms`` (merged)."""
    workspace = workspace or Workspace()
    K = added(_self_gram(t, workspace) for t in terms)
    for a, b in combinations(terms, 2):
        cross = _cross_gram(a, b)
        K = K + cross + cross.T
    return K


def added(tensors: Iterable[Tensor]) -> Tensor:
    """The sum of one or more tensors, without the ``0 + t`` that ``sum()`` starts with (an
    n × n float64 copy per parameter, a tenth of an MLP's Gram at n = 256)."""
    return functools.reduce(operator.add, tensors)


def _self_gram(term: Term, workspace: Workspace) -> Tensor:
    if isinstance(term, Dense):
        return workspace.product(term.grads).double()
    if isinstance(term, Rows):
        return _rows_gram(term, workspace)
    n, T, p = term.left.shape
    if route(term) == "per-sample":
        return _per_sample_gram(term, workspace)
    if T == 1:
        return (workspace.product(term.left[:, 0]) * workspace.product(term.right[:, 0])
                ).double()
    return outer_cross(term.left, term.right, term.left, term.right)


def _per_sample_gram(term: Outer, workspace: Workspace) -> Tensor:
    """Σ_k g_k g_kᵀ over blocks of the weight's rows, g_k the per-sample gradients of block k.

    The same products as forming all of g at once, but a block of ``_BLOCK_BYTES`` stays in
    the cache between being written and being read, and is never fresh memory: a whole g of a
    wide layer (n·p·q floats, 34 MB for BERT's FFN at n = 32) would be mapped anew, page by
    page, on every call.
    """
    n, _, p = term.left.shape
    q = term.right.shape[2]
    dtype = compute_dtype(term.left)
    left = term.left.to(dtype).transpose(1, 2)  # (n, p, T)
    right = term.right.to(dtype)
    rows = max(1, _BLOCK_BYTES // (n * q * torch.finfo(dtype).bits // 8))
    K = None
    for start in range(0, p, rows):
        stop = min(start + rows, p)
        g = workspace.take((n, stop - start, q), dtype, left.device)
        torch.bmm(left[:, start:stop], right, out=g)
        g = g.reshape(n, -1)
        block = (g @ g.T).double()
        K = block if K is None else K.add_(block)
    return K


def outer_cross(left_a: Tensor, right_a: Tensor, left_b: Tensor, right_b: Tensor) -> Tensor:
    """Σ_{t,s} (left_a[i,t]·left_b[j,s])(right_a[i,t]·right_b[j,s]), in row blocks."""
    n_a, T_a, _ = left_a.shape
    n_b, T_b, _ = left_b.shape
    flat_left = left_b.reshape(n_b * T_b, -1)
    flat_right = right_b.reshape(n_b * T_b, -1)
    K = torch.empty((n_a, n_b), dtype=torch.float64, device=left_a.device)
    step = max(1, _BLOCK_ENTRIES // (T_a * n_b * T_b))
    for start in range(0, n_a, step):
        stop = min(start + step, n_a)
        rows_left = left_a[start:stop].reshape((stop - start) * T_a, -1)
        rows_right = right_a[start:stop].reshape((stop - start) * T_a, -1)
        block = (rows_left @ flat_left.T) * (rows_right @ flat_right.T)
        K[start:stop] = block.double().reshape(stop - start, T_a, n_b, T_b).sum(dim=(1, 3))
    return K


def _cross_gram(a: Term, b: Term) -> Tensor:
    """[i, j] = a_i·b_j for two terms of one parameter (a before b in the kind order).

    An Outer and a Rows term (a tied embedding and output layer): from their factors,
    n²ST(q + 2) multiply-adds, or from both per-sample gradients, nTpq + n²pq, the cheaper
    within the memory bound; any other pair from its per-sample gradients.
    """
    if isinstance(a, Outer) and isinstance(b, Rows):
        n, T, p = a.left.shape
        q, S = a.right.shape[2], b.index.shape[1]
        factored = n * n * S * T * (q + 2)
        if (n * p * q * a.left.element_size() > MATERIALISE_BYTES
                or factored <= n * T * p * q + n * n * p * q):
            return rows_outer_cross(b, a).T
    g_a, g_b = materialise(a), materialise(b)
    dtype = torch.promote_types(compute_dtype(g_a), compute_dtype(g_b))
    return (g_a.to(dtype) @ g_b.to(dtype).T).double()


def rows_outer_cross(rows: Rows, outer: Outer) -> Tensor:
    """[i, j] = Σ_{s,t} outer.left[j,t][index[i,s]] · (values[i,s]·outer.right[j,t]).

    The two terms may belong to different sample sets: K is (n_rows, n_outer)."""
    n, S = rows.index.shape
    m, T = outer.left.shape[:2]
    dtype = torch.promote_types(compute_dtype(rows.values), compute_dtype(outer.left))
    flat_left = outer.left.reshape(m * T, -1).to(dtype)  # (mT, rows)
    flat_right = outer.right.reshape(m * T, -1).to(dtype)  # (mT, q)
    index = rows.index.reshape(-1)
    values = rows.values.reshape(n * S, -1).to(dtype)
    K = torch.empty((n, m), dtype=torch.float64, device=values.device)
    step = max(1, _BLOCK_ENTRIES // (S * m * T))
    for start in range(0, n, step):
        stop = min(start + step, n)
        part = slice(start * S, stop * S)
        block = (values[part] @ flat_right.T) * flat_left[:, index[part]].T
        K[start:stop] = block.double().reshape(stop - start, S, m, T).sum(dim=(1, 3))
    return K


def materialise(term: Term) -> Tensor:
    """The per-sample gradients (n, numel) of a term, in its compute precision."""
    if isinstance(term, Dense):
        return term.grads
    if isinstance(term, Outer):
        dtype = compute_dtype(term.left)
        n = term.left.shape[0]
        return torch.bmm(term.left.to(dtype).transpose(1, 2), term.right.to(dtype)).reshape(n, -1)
    n, T = term.index.shape
    q = term.values.shape[2]
    grads = term.values.new_zeros((n, term.rows, q), dtype=compute_dtype(term.values))
    samples = torch.arange(n, device=term.index.device).repeat_interleave(T)
    grads.index_put_((samples, term.index.reshape(-1)),
                     term.values.reshape(n * T, q).to(grads.dtype), accumulate=True)
    return grads.reshape(n, -1)


def total(term: Term) -> Tensor:
    """Σ_i g_i of a term, flattened, in float64."""
    if isinstance(term, Dense):
        return term.grads.double().sum(dim=0)
    if isinstance(term, Outer):
        p, q = term.left.shape[2], term.right.shape[2]
        left = term.left.reshape(-1, p).double()
        return (left.T @ term.right.reshape(-1, q).double()).reshape(-1)
    q = term.values.shape[2]
    out = torch.zeros((term.rows, q), dtype=torch.float64, device=term.values.device)
    out.index_add_(0, term.index.reshape(-1), term.values.reshape(-1, q).double())
    return out.reshape(-1)


def samples(term: Term, rows: slice) -> Term:
    """The term restricted to the samples ``rows``."""
    if isinstance(term, Dense):
        return replace(term, grads=term.grads[rows])
    if isinstance(term, Outer):
        return replace(term, left=term.left[rows], right=term.right[rows])
    return replace(term, index=term.index[rows], values=term.values[rows])


# --- rows of an embedding -----------------------------------------------------------------


@dataclass(frozen=True)
class _Summed:
    """Signals of one sample for one row, summed: one entry r = (sample, row rank, vector)."""

    sample: Tensor
    rank: Tensor  # index into vocab
    vectors: Tensor
    vocab: Tensor  # distinct rows touched, sorted
    counts: Tensor  # samples touching each row of vocab
    pairs: int  # Σ counts², the pairs of entries sharing a row


def _summed_rows(term: Rows) -> _Summed:
    n, T = term.index.shape
    q = term.values.shape[2]
    values = term.values.to(compute_dtype(term.values))
    samples_ = torch.arange(n, device=term.index.device).repeat_interleave(T)
    vocab, token_rank = torch.unique(term.index.reshape(-1), return_inverse=True)
    keys, entry = torch.unique(samples_ * len(vocab) + token_rank, return_inverse=True)
    vectors = values.new_zeros((len(keys), q)).index_add_(0, entry, values.reshape(n * T, q))
    sample, rank = keys // len(vocab), keys % len(vocab)
    counts = torch.bincount(rank, minlength=len(vocab))
    return _Summed(sample, rank, vectors, vocab, counts, int((counts * counts).sum()))


def _rows_route(summed: _Summed, n: int) -> str:
    return "per-sample" if n * len(summed.vocab) <= summed.pairs else "ghost"


def _rows_gram(term: Rows, workspace: Workspace) -> Tensor:
    """Σ_{t,s} [index_it = index_js] (values_it·values_js).

    Two exact routes, the cheaper one taken: the per-sample gradients restricted to the U
    rows the batch touches (n × U·q), or the dot products of the P pairs of summed entries
    that share a row. Positions (every sample touches every row) favour the first, a large
    vocabulary the second.
    """
    n = term.index.shape[0]
    s = _summed_rows(term)
    q = s.vectors.shape[1]
    if _rows_route(s, n) == "per-sample":
        grads = workspace.take((n, len(s.vocab), q), s.vectors.dtype, s.vectors.device)
        grads.zero_()
        grads[s.sample, s.rank] = s.vectors
        grads = grads.reshape(n, -1)
        return (grads @ grads.T).double()
    # Entries grouped by row; rows with between c/2 and c entries (c a power of two) are
    # padded to c and their c × c Grams formed by one batched matmul, so the work stays
    # within 4x the pairs however skewed the rows' counts.
    by_row = torch.argsort(s.rank, stable=True)
    vectors, sample, rank = s.vectors[by_row], s.sample[by_row], s.rank[by_row]
    slot = torch.arange(len(rank), device=rank.device) - (torch.cumsum(s.counts, 0)
                                                          - s.counts)[rank]
    capacity = 2 ** torch.ceil(torch.log2(s.counts.double())).long()
    flat = torch.zeros((n + 1) * (n + 1), dtype=torch.float64, device=vectors.device)
    for c in torch.unique(capacity).tolist():
        rows = (capacity == c).nonzero()[:, 0]
        step = max(1, _BLOCK_ENTRIES // (c * max(c, q)))
        for first in range(0, len(rows), step):
            part = rows[first:first + step]
            place = torch.full((s.counts.shape[0],), -1, dtype=torch.long, device=rank.device)
            place[part] = torch.arange(len(part), device=rank.device)
            mine = (place[rank] >= 0).nonzero()[:, 0]
            padded = vectors.new_zeros((len(part), c, q))
            padded[place[rank[mine]], slot[mine]] = vectors[mine]
            who = torch.full((len(part), c), n, dtype=torch.long, device=rank.device)
            who[place[rank[mine]], slot[mine]] = sample[mine]
            dots = torch.bmm(padded, padded.transpose(1, 2)).double()
            keys = who.unsqueeze(2) * (n + 1) + who.unsqueeze(1)
            flat.index_add_(0, keys.reshape(-1), dots.reshape(-1))
    return flat.reshape(n + 1, n + 1)[:n, :n]
