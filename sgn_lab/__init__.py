"""sgn-lab: measure stochastic gradient noise (SGN) in PyTorch models.

The public API (stable names)::

    g = sgn_lab.per_sample_grads(model, loss_fn, inputs, targets, chunk_size=None)
    G = sgn_lab.flatten_grads(g)          # (n, d)
    K = sgn_lab.per_sample_gram(model, loss_fn, inputs, targets)   # (n, n), no n×d matrix
    r = sgn_lab.noise_stats(G)            # or noise_stats(g) for a per-layer breakdown
    c = sgn_lab.curvature_stats(model, loss_fn, inputs, targets, G)
    run = sgn_lab.load_run("runs/demo")   # .config (dict), .metrics, .spectra (pandas)

Importing the package loads nothing heavy: each public name is imported from the module that
defines it when it is first used (``sgn_lab.per_sample_grads`` loads torch then), so that
``sgn-lab --help`` answers without loading torch, scipy or pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgn_lab.lazy import homes, lazy_exports
from sgn_lab.version import __version__ as __version__

# Each public name -> the module that defines it.
_HOME = {
    **homes("sgn_lab.grads", (
        "GramCoverage", "GramMismatchError", "SampleMixingError", "SampleMixingWarning",
        "batchnorm_to_groupnorm", "flatten_grads", "gram_and_mean_gradient",
        "per_sample_grads", "per_sample_gram", "per_sample_gram_coverage")),
    **homes("sgn_lab.run", (
        "Instrument", "Measurement", "NoiseProbe", "ProbeResult", "Run", "RunConfig",
        "load_run", "load_runs", "run_measurement")),
    **homes("sgn_lab.stats.curvature", (
        "CurvatureStats", "curvature_stats", "hessian_top_eigenvalue", "hessian_trace",
        "hessian_vector_product", "trace_hs")),
    **homes("sgn_lab.stats.layers", ("layer_noise_scale",)),
    **homes("sgn_lab.stats.noise",
            ("NoiseStats", "isotropic_spectrum", "minibatch_factor", "noise_stats")),
    **homes("sgn_lab.stats.streaming", ("Moments", "streaming_moments", "streaming_noise_stats")),
    **homes("sgn_lab.stats.tails",
            ("ShapeStats", "minibatch_noise_shape", "shape_stats", "tail_index")),
}

# A subpackage (sgn_lab.models) is an attribute too, as `import sgn_lab` users expect.
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOME, submodules=True)

if TYPE_CHECKING:  # the same names, for type checkers and editors
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
