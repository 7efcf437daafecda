"""The one reference the grads tests compare against: a float64 loop of single-sample
backward passes (``helpers.loop_grads``), never sgn_lab itself.

``check`` holds the Gram path (its Gram and mean gradient) and, with ``vmap=True``, the vmap
path's per-sample gradients to the loop's; ``check_each_parameter`` holds both paths to it
parameter by parameter (for models where some parameters get no gradient). ``labels`` makes
class targets from their own generator.
"""

import torch
from helpers import loop_grads, loop_matrix, relative_error
from torch.nn import functional as F

from sgn_lab.grads import flatten_grads, gram_result, per_sample_grads

D = torch.float64


def labels(n, classes=3, seed=0):
    """``n`` class labels in ``range(classes)``, drawn from a generator seeded with ``seed``."""
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def check(model, x, y, loss_fn=F.cross_entropy, rtol=1e-10, *, vmap=False, **options):
    """The Gram and the mean gradient of ``gram_result`` equal the loop's; with ``vmap=True``
    the per-sample gradients of ``per_sample_grads`` (and their G Gᵀ) too. ``options`` go to
    both paths. Returns the Gram's coverage."""
    result = gram_result(model, loss_fn, x, y, with_mean=True, **options)
    G = flatten_grads(per_sample_grads(model, loss_fn, x, y, **options)).double() if vmap else None
    want = loop_matrix(model, loss_fn, x, y)
    n = len(y)
    assert result.gram.dtype == D and result.gram.shape == (n, n)
    assert torch.equal(result.gram, result.gram.T)
    assert relative_error(result.gram, want @ want.T) <= rtol
    assert relative_error(result.mean, want.mean(dim=0)) <= rtol
    if G is not None:
        assert relative_error(G, want) <= rtol
        assert relative_error(G @ G.T, want @ want.T) <= rtol
    return result.coverage


def check_each_parameter(model, x, y, loss=F.cross_entropy, samples="independent"):
    """Per-sample gradients of both paths against the loop, parameter by parameter (relative
    to the whole where a parameter's gradient is zero), and the Gram; returns the coverage."""
    reference = loop_grads(model, loss, x, y)
    G = torch.cat([g.reshape(g.shape[0], -1) for g in reference.values()], dim=1).double()
    scale = float(torch.linalg.norm(G))
    grads = per_sample_grads(model, loss, x, y, samples=samples)
    assert list(grads) == list(reference)
    for name, want in reference.items():
        error = float(torch.linalg.norm(grads[name] - want))
        assert error <= 1e-10 * max(float(torch.linalg.norm(want)), 1e-6 * scale), name
    result = gram_result(model, loss, x, y, with_mean=True, samples=samples)
    assert relative_error(result.gram, G @ G.T) <= 1e-10
    assert relative_error(result.mean, G.mean(dim=0)) <= 1e-10
    return result.coverage
