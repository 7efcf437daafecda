"""Per-sample gradients and their Gram matrix.

``vmap``: per-sample gradients through ``torch.func`` (the reference route, any module with a
functional forward). ``gram``: the n×n Gram matrix of the per-sample gradients from one
recording pass, with one rule per torch operation (``rules``) stating each use of a
parameter in factored form (``terms``), never forming an n × d matrix.
"""

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
from sgn_lab.grads.vmap import (
    BATCHNORM_POLICIES,
    batchnorm_modules,
    batchnorm_to_groupnorm,
    check_finite,
    flatten_grads,
    per_sample_grads,
    trainable_dim,
)

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
