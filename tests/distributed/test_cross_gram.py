"""Cross blocks of the Gram between two sample sets, against the loop of backward passes.

The probe set split over ranks needs K_AB[i, j] = g_i·h_j for samples i of one rank and j of
another, from what one rank sends the other (factors or gradients, sgn_lab.grads.cross). Here
the two sets are two slices of one batch in one process, on every layer kind of the Gram
path's zoo and the real architectures (float64, relative 1e-10), with each payload sent as
chosen, as factors only and as gradients only. Also the rank split and the pair owners.
"""

from __future__ import annotations

import copy

import pytest
import torch
from grads.test_gram_models import PROBLEMS
from grads.test_zoo import ZOO
from grads.test_zoo import labels as zoo_labels
from helpers import loop_grads, relative_error, seeded
from torch.nn.parameter import UninitializedParameter

from sgn_lab.distributed import Ranks
from sgn_lab.grads.cross import compact, cross_gram, whole_gradients
from sgn_lab.grads.gram import gram_factors

pytestmark = pytest.mark.usefixtures("one_thread")


def cases():
    for name, model, x in ZOO:
        xs = x if isinstance(x, tuple) else (x,)
        yield name, (lambda m=model, xs=xs: _zoo_model(m, xs)), xs, zoo_labels(len(xs[0])), None
    for name, make, x, y, loss in PROBLEMS:
        yield name, make, (x,), y, loss


def _zoo_model(model, xs):
    """A copy of the zoo's model (other tests convert it in place), lazy layers shaped."""
    model = copy.deepcopy(model)
    dtypes = {p.dtype for p in model.parameters() if not isinstance(p, UninitializedParameter)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    with seeded(2):
        model(*(t.to(dtype) if t.is_floating_point() else t for t in xs))
    return model


CASES = list(cases())


@pytest.mark.parametrize(("make", "xs", "y", "loss"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
@pytest.mark.parametrize("send", ["chosen", "factors", "gradients"])
def test_cross_block_equals_the_loop(make, xs, y, loss, send):
    from torch.nn import functional as F

    loss = loss or F.cross_entropy
    with seeded(0):
        model = make().double().eval()
    xs = tuple(t.double() if t.is_floating_point() else t for t in xs)
    n = len(y)
    cut = n // 2
    reference = loop_grads(model, loss, xs if len(xs) > 1 else xs[0], y)
    G = torch.cat([g.reshape(n, -1) for g in reference.values()], dim=1).double()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}

    def factors(rows):
        part = tuple(t[rows] for t in xs)
        return gram_factors(model, loss, part if len(part) > 1 else part[0], y[rows])

    (local_a, a), (_, b) = factors(slice(0, cut)), factors(slice(cut, n))
    if send == "chosen":
        b, _ = compact(b, shapes, n - cut)
    elif send == "gradients":
        b = {name: [(None, [_dense(whole_gradients(groups, shapes[name]))])] if groups else []
             for name, groups in b.items()}
    block = cross_gram(a, b, shapes)
    assert block.shape == (cut, n - cut)
    assert relative_error(block, G[:cut] @ G[cut:].T) <= 1e-10
    # the factors' own sums and diagonal block, as the ranks use them
    assert relative_error(local_a.gram, G[:cut] @ G[:cut].T) <= 1e-10
    assert relative_error(local_a.mean, G[:cut].sum(dim=0)) <= 1e-10


def _dense(grads):
    from sgn_lab.grads.terms import Dense

    return Dense(grads, "test")


def test_compact_sends_the_smaller_form():
    """A wide Linear layer over few positions sends factors (n(p+q) < npq), a layer seen at
    many positions with a small weight sends its gradients (nT(p+q) > npq)."""
    wide = torch.nn.Linear(64, 64).double()
    model = torch.nn.Sequential(wide)
    x = torch.randn(4, 64, dtype=torch.float64)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    loss = lambda out, y: (out**2).mean()  # noqa: E731
    _, f = gram_factors(model, loss, x, x)
    # the bias's term is its per-sample gradients already: it travels as it is
    assert compact(f, shapes, 4)[1] == {"0.weight": "factors", "0.bias": "gradients"}
    narrow = torch.nn.Sequential(torch.nn.Linear(2, 2)).double()
    xs = torch.randn(4, 50, 2, dtype=torch.float64)  # T = 50 positions
    _, f = gram_factors(narrow, loss, xs, xs)
    shapes = {name: tuple(p.shape) for name, p in narrow.named_parameters()}
    payload, choice = compact(f, shapes, 4)
    assert choice["0.weight"] == "gradients"
    # formed once, by the Gram pass itself: compact sends that very tensor
    (_, (term,)), = f["0.weight"]
    assert payload["0.weight"][0][1][0].grads is term.grads
    want = loop_grads(narrow, loss, xs, xs)["0.weight"].reshape(4, -1)
    assert relative_error(term.grads, want) <= 1e-12


@pytest.mark.parametrize(("n", "size", "sizes"), [(11, 2, [6, 5]), (11, 3, [4, 4, 3]),
                                                  (3, 3, [1, 1, 1]), (8, 4, [2, 2, 2, 2]),
                                                  (7, 1, [7])])
def test_split_is_contiguous_in_probe_order_first_ranks_one_more(n, size, sizes):
    bounds = Ranks(0, size).bounds(n)
    assert [hi - lo for lo, hi in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(size - 1))
    assert [Ranks(r, size).shard(n) for r in range(size)] == [slice(lo, hi) for lo, hi in bounds]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
def test_every_off_diagonal_entry_is_computed_once_and_work_is_balanced(size):
    """The ranks' cross tasks tile each pair's block (rows of one rank's samples against the
    other's) exactly once; each rank's share of the pairs differs by at most half a block."""
    covered = {}
    work = []
    for rank in range(size):
        tasks = Ranks(rank, size).cross_tasks()
        work.append(sum(hi - lo for _, _, lo, hi in tasks))
        for r, s, lo, hi in tasks:
            assert r != s and rank in (r, s) and 0 <= lo < hi <= 1
            covered.setdefault(frozenset((r, s)), []).append((lo, hi) if r < s else None)
    assert len(covered) == size * (size - 1) // 2
    for pieces in covered.values():  # one whole block, or two halves of the same orientation
        assert None not in pieces or pieces == [None]
        if None not in pieces:
            assert sorted(pieces) in ([(0.0, 1.0)], [(0.0, 0.5), (0.5, 1.0)])
    assert max(work) - min(work) <= 0.5 + 1e-12 if size > 1 else work == [0]
