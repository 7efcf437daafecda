"""Per-sample gradients and their Gram matrix.

Two routes, one result: ``vmap`` gives the per-sample gradients through ``torch.func`` (the
reference route, any module with a functional forward); ``gram`` gives the n×n Gram matrix of
the per-sample gradients from one recording pass (``record``), with one rule per torch
operation (the ``rules`` package, one file per family) stating each use of a parameter in
factored form (``terms``), never forming an n × d matrix; a chain of linear and row-wise
layers is recorded by one plain batched pass (``chain``). ``cross`` gives inner products
between two sample sets' gradients (the Gram over processes). What both routes share (input
checks, BatchNorm policy, seeding, the (n, d) layout) is in ``common``; ``consistency``
checks that a forward pass does not mix samples; ``batched`` holds the few functorch
internals the recording pass reads, ``rng`` torch's random state, ``hf_masks`` a patch that
lets Hugging Face's mask code run under vmap.
"""

from sgn_lab.grads.common import (
    BATCHNORM_POLICIES,
    batchnorm_modules,
    batchnorm_to_groupnorm,
    check_finite,
    flatten_grads,
    trainable_dim,
)
from sgn_lab.grads.consistency import SAMPLES, SampleMixingError, SampleMixingWarning
from sgn_lab.grads.gram import (
    ROUTES,
    GramCoverage,
    GramMismatchError,
    GramResult,
    ParameterRoute,
    gram_and_mean_gradient,
    gram_result,
    per_sample_gram,
    per_sample_gram_coverage,
)
from sgn_lab.grads.vmap import per_sample_grads

__all__ = [
    "BATCHNORM_POLICIES",
    "ROUTES",
    "SAMPLES",
    "GramCoverage",
    "GramMismatchError",
    "GramResult",
    "ParameterRoute",
    "SampleMixingError",
    "SampleMixingWarning",
    "batchnorm_modules",
    "batchnorm_to_groupnorm",
    "check_finite",
    "flatten_grads",
    "gram_and_mean_gradient",
    "gram_result",
    "per_sample_gram",
    "per_sample_gram_coverage",
    "per_sample_grads",
    "trainable_dim",
]
