"""SGN statistics: moments, spectrum, ranks, power law, tails, curvature, streaming.

``noise``      noise_stats and NoiseStats: trace, noise scale with its jackknife error,
               spectrum, ranks, power law, isotropic reference
``tails``      tail index and Gaussianity of the noise
``curvature``  Hessian-vector products, λ_max, tr H, tr(HS), alignment
``streaming``  the same over chunks of samples: exact moments, Gram across chunks, sketch
"""

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

__all__ = [
    "CurvatureStats",
    "Moments",
    "NoiseStats",
    "ShapeStats",
    "curvature_stats",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_vector_product",
    "isotropic_spectrum",
    "layer_noise_scale",
    "minibatch_factor",
    "minibatch_noise_shape",
    "noise_stats",
    "shape_stats",
    "streaming_moments",
    "streaming_noise_stats",
    "tail_index",
    "trace_hs",
]
