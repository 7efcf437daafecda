"""Optimizers that shape stochastic gradient noise, and the registry that names them.

Baselines are torch's own (``torch.optim.SGD``, ``torch.optim.Adam``); the methods under study
are ``torch.optim.Optimizer`` subclasses:

==============  =====================  ==================================================
name            class                  what it does to the noise
==============  =====================  ==================================================
sgd             torch.optim.SGD        the natural SGN
momentum        torch.optim.SGD        heavy-ball momentum (momentum=0.9 by default)
adam            torch.optim.Adam       adaptive baseline
gaussian        GaussianNoiseSGD       adds isotropic N(0, σ²I) to the gradient
covariance      CovarianceNoiseSGD     large batch + noise of covariance (1/B_S − 1/B_L)·S
symmetric       SymmetricNoiseSGD      gradients at w+ε and w−ε averaged (S-SGD)
pnm             PNM                    positive-negative momentum (Xie et al. 2021)
adapnm          AdaPNM                 PNM inside Adam/AMSGrad
adaptive-hb     AdaptiveHeavyBall      momentum from a secant curvature (Sun et al. 2021)
==============  =====================  ==================================================

Each method takes its input to ``step`` in one of three ways (:attr:`Method.step_input`):
``"gradient"`` (``loss.backward(); opt.step()``), ``"closure"`` (``opt.step(closure)`` with a
closure that recomputes loss and gradients) or ``"per_sample"`` (``opt.step(per_sample)``
with the dict of :func:`sgn_lab.per_sample_grads`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgn_lab.lazy import homes, lazy_exports

# Each public name -> the module that defines it, imported on first use (sgn_lab.lazy).
_HOME = {
    **homes("sgn_lab.optim.registry", (
        "COVARIANCE_VARIANTS", "METHODS", "SETTINGS", "STEP_INPUTS", "Method", "matched_lr",
        "pnm_noise_factor",
    )),
    **homes("sgn_lab.optim.build", (
        "build_optimizer", "heavy_ball", "optimizer_kwargs", "train_step",
    )),
    **homes("sgn_lab.optim.adaptive_hb", ("AdaptiveHeavyBall",)),
    **homes("sgn_lab.optim.injection", ("CovarianceNoiseSGD", "GaussianNoiseSGD")),
    **homes("sgn_lab.optim.pnm", ("PNM", "AdaPNM")),
    **homes("sgn_lab.optim.symmetric", ("SymmetricNoiseSGD",)),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOME)

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from sgn_lab.optim.adaptive_hb import AdaptiveHeavyBall
    from sgn_lab.optim.build import build_optimizer, heavy_ball, optimizer_kwargs, train_step
    from sgn_lab.optim.injection import CovarianceNoiseSGD, GaussianNoiseSGD
    from sgn_lab.optim.pnm import PNM, AdaPNM
    from sgn_lab.optim.registry import (
        COVARIANCE_VARIANTS,
        METHODS,
        SETTINGS,
        STEP_INPUTS,
        Method,
        matched_lr,
        pnm_noise_factor,
    )
    from sgn_lab.optim.symmetric import SymmetricNoiseSGD
