"""sgn-lab: measure stochastic gradient noise (SGN) in PyTorch models.

The public API (stable names)::

    g = sgn_lab.per_sample_grads(model, loss_fn, inputs, targets, chunk_size=None)
    G = sgn_lab.flatten_grads(g)          # (n, d)
    K = sgn_lab.per_sample_gram(model, loss_fn, inputs, targets)   # (n, n), no n×d matrix
    r = sgn_lab.noise_stats(G)            # or noise_stats(g) for a per-layer breakdown
    c = sgn_lab.curvature_stats(model, loss_fn, inputs, targets, G)
    run = sgn_lab.load_run("runs/demo")   # .config (dict), .metrics, .spectra (pandas)
"""

from sgn_lab.grads import (
    GramCoverage,
    GramMismatchError,
    SampleMixingError,
    SampleMixingWarning,
    batchnorm_to_groupnorm,
    flatten_grads,
    gram_and_mean_gradient,
    per_sample_grads,
    per_sample_gram,
    per_sample_gram_coverage,
)
from sgn_lab.run import (
    Instrument,
    Measurement,
    NoiseProbe,
    ProbeResult,
    Run,
    RunConfig,
    load_run,
    load_runs,
    run_measurement,
)
from sgn_lab.stats.curvature import (
    CurvatureStats,
    curvature_stats,
    hessian_top_eigenvalue,
    hessian_trace,
    hessian_vector_product,
    trace_hs,
)
from sgn_lab.stats.layers import layer_noise_scale
from sgn_lab.stats.noise import NoiseStats, isotropic_spectrum, minibatch_factor, noise_stats
from sgn_lab.stats.streaming import Moments, streaming_moments, streaming_noise_stats
from sgn_lab.stats.tails import ShapeStats, minibatch_noise_shape, shape_stats, tail_index
from sgn_lab.version import __version__ as __version__

__all__ = [
    "CurvatureStats",
    "GramCoverage",
    "GramMismatchError",
    "Instrument",
    "Measurement",
    "Moments",
    "NoiseProbe",
    "NoiseStats",
    "ProbeResult",
    "Run",
    "RunConfig",
    "SampleMixingError",
    "SampleMixingWarning",
    "ShapeStats",
    "batchnorm_to_groupnorm",
    "curvature_stats",
    "flatten_grads",
    "gram_and_mean_gradient",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_vector_product",
    "isotropic_spectrum",
    "layer_noise_scale",
    "load_run",
    "load_runs",
    "minibatch_factor",
    "minibatch_noise_shape",
    "noise_stats",
    "per_sample_grads",
    "per_sample_gram",
    "per_sample_gram_coverage",
    "run_measurement",
    "shape_stats",
    "streaming_moments",
    "streaming_noise_stats",
    "tail_index",
    "trace_hs",
]
