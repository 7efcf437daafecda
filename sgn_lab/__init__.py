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

import importlib
from typing import TYPE_CHECKING, Any

from sgn_lab.version import __version__ as __version__

# Each public name -> the module that defines it (read by __getattr__ and __all__).
_HOME = {
    **dict.fromkeys(
        ("GramCoverage", "GramMismatchError", "SampleMixingError", "SampleMixingWarning",
         "batchnorm_to_groupnorm", "flatten_grads", "gram_and_mean_gradient",
         "per_sample_grads", "per_sample_gram", "per_sample_gram_coverage"),
        "sgn_lab.grads"),
    **dict.fromkeys(
        ("Instrument", "Measurement", "NoiseProbe", "ProbeResult", "Run", "RunConfig",
         "load_run", "load_runs", "run_measurement"),
        "sgn_lab.run"),
    **dict.fromkeys(
        ("CurvatureStats", "curvature_stats", "hessian_top_eigenvalue", "hessian_trace",
         "hessian_vector_product", "trace_hs"),
        "sgn_lab.stats.curvature"),
    "layer_noise_scale": "sgn_lab.stats.layers",
    **dict.fromkeys(("NoiseStats", "isotropic_spectrum", "minibatch_factor", "noise_stats"),
                    "sgn_lab.stats.noise"),
    **dict.fromkeys(("Moments", "streaming_moments", "streaming_noise_stats"),
                    "sgn_lab.stats.streaming"),
    **dict.fromkeys(("ShapeStats", "minibatch_noise_shape", "shape_stats", "tail_index"),
                    "sgn_lab.stats.tails"),
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use; or a subpackage
    (``sgn_lab.models``), as ``import sgn_lab`` followed by attribute access expects."""
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f"sgn_lab.{name}")
        except ModuleNotFoundError as missing:
            if missing.name != f"sgn_lab.{name}":
                raise
            raise AttributeError(f"module 'sgn_lab' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'sgn_lab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
