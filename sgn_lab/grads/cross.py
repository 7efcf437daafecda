"""Inner products g_i·h_j between the per-sample gradients of two sample sets.

The Gram of a probe set split in blocks (over processes, :mod:`sgn_lab.distributed`) is
assembled from the diagonal blocks, each a Gram path call of its own, and the off-diagonal
blocks ``K_AB[i, j] = g_i·h_j`` (i in A, j in B) computed here from what one set can send the
other: each parameter's per-sample gradients as *factors* (the term groups of one Gram-path
pass, :func:`sgn_lab.grads.gram.gram_factors`) or as *gradients* (an (n, numel) matrix),
by bytes and by the cost of the cross products (:func:`compact`).

Cross products of terms (a from A, b from B; the same kinds as :mod:`~sgn_lab.grads.terms`):

    Outer·Outer   Σ_{t,s} (left_a[i,t]·left_b[j,s]) (right_a[i,t]·right_b[j,s]), or both
                  sets' per-sample gradients multiplied, whichever the cost model prefers
    Rows·Outer    the embedding rows picked in A against the dense (rows, q) factor of B
    Rows·Rows     the per-sample gradients restricted to the rows either set touches
    any · Dense   the other's per-sample gradients against the dense ones

all exact, in the model's precision (at least float32) and summed in float64.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from sgn_lab.grads.rules.aliases import Region
from sgn_lab.grads.terms import (
    MATERIALISE_BYTES,
    Dense,
    Outer,
    Rows,
    Term,
    compute_dtype,
    materialise,
    outer_cross,
    route,
    rows_outer_cross,
)

Groups = list[tuple[Region | None, list[Term]]]  # one parameter's merged terms by region
Factors = dict[str, Groups]  # parameter name -> its groups, named_parameters() order


def term_bytes(term: Term) -> int:
    """The bytes of a term's tensors."""
    return sum(t.numel() * t.element_size() for t in _tensors(term))


def gradient_bytes(groups: Groups, n: int, numel: int) -> int:
    """The bytes of the parameter's per-sample gradients (n, numel) in compute precision."""
    if not groups:
        return 0
    values = next(t for t in _tensors(groups[0][1][0]) if t.is_floating_point())
    return n * numel * torch.empty((), dtype=compute_dtype(values)).element_size()


def compact(factors: Factors, shapes: dict[str, tuple[int, ...]], n: int
            ) -> tuple[Factors, dict[str, str]]:
    """Each parameter as factors or as dense per-sample gradients (n, numel), as
    :func:`sent_as_gradients` decides; a parameter whose terms are all per-sample gradients
    already (biases, norms, the vmap route, and those :func:`sgn_lab.grads.gram.gram_factors`
    formed once for sending) travels as they are. Returns the payload and each parameter's
    choice (``factors`` or ``gradients``).
    """
    payload, choice = {}, {}
    for name, groups in factors.items():
        terms = [t for _, group in groups for t in group]
        if sent_as_gradients(groups, shapes[name], n):
            payload[name] = [(None, [Dense(whole_gradients(groups, shapes[name]), "gathered")])]
            choice[name] = "gradients"
        else:
            payload[name] = groups
            choice[name] = "gradients" if terms and all(isinstance(t, Dense) for t in terms) \
                else "factors"
    return payload, choice


def sent_as_gradients(groups: Groups, shape: tuple[int, ...], n: int) -> bool:
    """Whether a parameter's factors should become its per-sample gradients to be sent.

    Gradients where they are fewer bytes, or where the Gram path's cost model multiplies
    gradients rather than factors (:func:`sgn_lab.grads.terms.route`; the cross products of
    factors over T positions cost n_A·n_B·T²·(p+q), of gradients n_A·n_B·p·q), but never
    per-sample gradients above ``MATERIALISE_BYTES`` (the Gram path's own bound), and never
    for terms that are per-sample gradients already.
    """
    terms = [t for _, group in groups for t in group]
    if not terms or all(isinstance(t, Dense) for t in terms):
        return False
    dense_bytes = gradient_bytes(groups, n, int(torch.Size(shape).numel()))
    as_factors = sum(term_bytes(t) for t in terms)
    cheaper_dense = any(isinstance(t, Outer) and route(t) == "per-sample" for t in terms)
    return dense_bytes <= MATERIALISE_BYTES and (cheaper_dense or dense_bytes < as_factors)


def whole_gradients(groups: Groups, shape: tuple[int, ...]) -> Tensor:
    """The per-sample gradients (n, numel) of a parameter from its term groups."""
    first = materialise(groups[0][1][0])
    n = first.shape[0]
    full = torch.zeros((n, *shape), dtype=first.dtype, device=first.device)
    for region, group in groups:
        box = full[(slice(None), *(() if region is None else
                                   tuple(slice(s, t) for s, t in region)))]
        for term in group:
            box += materialise(term).to(first.dtype).view(box.shape)
    return full.reshape(n, -1)


def cross_gram(a: Factors, b: Factors, shapes: dict[str, tuple[int, ...]]) -> Tensor:
    """K[i, j] = g_i·h_j (float64, (n_A, n_B)) summed over the parameters of both payloads."""
    K = None
    for name, groups_a in a.items():
        groups_b = b.get(name, [])
        if not groups_a or not groups_b:
            continue
        block = _parameter_cross(groups_a, groups_b, shapes[name])
        K = block if K is None else K + block
    if K is None:
        raise ValueError("the two sample sets share no parameter with a gradient")
    return K


def _parameter_cross(a: Groups, b: Groups, shape: tuple[int, ...]) -> Tensor:
    regions_a, regions_b = [r for r, _ in a], [r for r, _ in b]
    if regions_a == regions_b:  # disjoint boxes have no cross terms
        return sum(_terms_cross(ta, tb) for (_, ta), (_, tb) in zip(a, b, strict=True))
    whole_a = Dense(whole_gradients(a, shape), "whole")
    whole_b = Dense(whole_gradients(b, shape), "whole")
    return _pair(whole_a, whole_b)


def _terms_cross(a: list[Term], b: list[Term]) -> Tensor:
    return sum(_pair(ta, tb) for ta in a for tb in b)


def _pair(a: Term, b: Term) -> Tensor:
    """[i, j] = a_i·b_j for a term a of one sample set and b of the other."""
    if isinstance(a, Outer) and isinstance(b, Outer) and _ghost_cheaper(a, b):
        dtype = torch.promote_types(compute_dtype(a.left), compute_dtype(b.left))
        return outer_cross(a.left.to(dtype), a.right.to(dtype), b.left.to(dtype), b.right.to(dtype))
    if isinstance(a, Rows) and isinstance(b, Outer):
        return rows_outer_cross(a, b)
    if isinstance(a, Outer) and isinstance(b, Rows):
        return rows_outer_cross(b, a).T
    if isinstance(a, Rows) and isinstance(b, Rows):
        a, b = _restricted(a, b), _restricted(b, a)
    g_a, g_b = materialise(a), materialise(b)
    dtype = torch.promote_types(compute_dtype(g_a), compute_dtype(g_b))
    return (g_a.to(dtype) @ g_b.to(dtype).T).double()


def _ghost_cheaper(a: Outer, b: Outer) -> bool:
    """The cost model of :func:`sgn_lab.grads.terms.outer_route` for a cross block: from the
    factors, n_a·n_b·T_a·T_b·(p+q) multiply-adds, or from both sets' per-sample gradients,
    (n_a·T_a + n_b·T_b)·p·q + n_a·n_b·p·q, never forming more than ``MATERIALISE_BYTES``."""
    (n_a, T_a, p), (n_b, T_b, _) = a.left.shape, b.left.shape
    q = a.right.shape[2]
    if (n_a + n_b) * p * q * a.left.element_size() > MATERIALISE_BYTES:
        return True
    return n_a * n_b * T_a * T_b * (p + q) <= (n_a * T_a + n_b * T_b) * p * q + n_a * n_b * p * q


def _restricted(term: Rows, other: Rows) -> Rows:
    """The term on the table of the rows either term touches (same order for both), so that
    materialising it costs n·U·q instead of n·rows·q."""
    vocab = torch.unique(torch.cat([term.index.reshape(-1), other.index.reshape(-1)]))
    return replace(term, index=torch.searchsorted(vocab, term.index), rows=len(vocab))


def _tensors(term: Term) -> list[Tensor]:
    if isinstance(term, Outer):
        return [term.left, term.right]
    if isinstance(term, Rows):
        return [term.index, term.values]
    return [term.grads]
