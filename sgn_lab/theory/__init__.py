"""Closed-form predictions for stochastic gradient noise (SGN) and the optimizers that shape it.

What it covers (each formula with its source in the docstring of its function):

- minibatch noise: Cov[g_B] = c·S with or without replacement (:func:`minibatch_noise_covariance`);
- Gaussian linear regression: the exact per-sample gradient covariance Σ(w) and the
  state-dependent minibatch noise it induces along an SGD trajectory
  (:func:`linreg_gradient_covariance`, :func:`linreg_noise_model`); McCandlish et al.'s
  noise scales B_noise and B_simple (:func:`linreg_noise_scales`) and the exact expected-loss
  curve of online SGD, for the steps to a target loss (:func:`linreg_steps_to_loss`);
- stationary fluctuations on a quadratic ½θᵀHθ with gradient noise of covariance C: exact for
  SGD, heavy-ball momentum (torch SGD) and PNM, from the discrete Lyapunov equation of the
  linear recursion, plus the small-learning-rate (Ornstein–Uhlenbeck) limit and the 1-D closed
  forms (:func:`sgd_stationary_covariance`, :func:`heavy_ball_stationary`,
  :func:`pnm_stationary`, :func:`small_lr_stationary_covariance`,
  :func:`sgd_stationary_variance_1d`);
- PNM's per-step noise: the noise factor Γ, the update-noise ratio against momentum and the
  lag-1 correlation of consecutive updates (:func:`pnm_noise_factor`,
  :func:`pnm_update_noise_ratio`, :func:`pnm_lag1_autocorrelation`);
- noise injection: Gaussian, covariance noise (Wen et al. 2020) and S-SGD on a quadratic.

The key message. The PNM paper predicts (1+β0)²+β0² times more noise than momentum at equal
effective step. That holds per step; consecutive PNM updates are anti-correlated, so over many
steps on a quadratic the stationary fluctuation stays close to SGD's at the same effective
learning rate. :func:`pnm_stationary` gives both numbers exactly (per-step update covariance and
long-horizon parameter covariance), so a measurement can be compared with each.

Conventions: numpy float64 arrays in and out (torch tensors are accepted and converted);
the quadratic has its minimum at 0 and gradient g_t = Hθ_t + ξ_t, E[ξ_t | past] = 0,
Cov[ξ_t | past] = C. C may also be a callable P ↦ C(P), affine in the second moment
P = E[θθᵀ], for state-dependent noise (:func:`linreg_noise_model`): the second-moment recursion
then still closes and the stationary solvers solve its fixed point exactly. Invalid input
raises ValueError naming the offending value; so does a learning rate past the stability bound.
"""


from sgn_lab.optim.pnm import pnm_noise_factor
from sgn_lab.theory.inputs import NoiseModel
from sgn_lab.theory.linreg import (
    linreg_gradient_covariance,
    linreg_noise_model,
    linreg_noise_scales,
    linreg_steps_to_loss,
)
from sgn_lab.theory.methods import (
    covariance_noise_target,
    injected_noise_covariance,
    symmetric_noise_gradient_quadratic,
)
from sgn_lab.theory.minibatch import minibatch_noise_covariance, minibatch_noise_trace
from sgn_lab.theory.pnm import (
    pnm_lag1_autocorrelation,
    pnm_max_lr,
    pnm_stationary,
    pnm_update_noise_ratio,
)
from sgn_lab.theory.stationary import (
    Stationary,
    heavy_ball_max_lr,
    heavy_ball_stationary,
    sgd_stationary_covariance,
    sgd_stationary_variance_1d,
    small_lr_stationary_covariance,
)

__all__ = [
    "NoiseModel",
    "Stationary",
    "covariance_noise_target",
    "heavy_ball_max_lr",
    "heavy_ball_stationary",
    "injected_noise_covariance",
    "linreg_gradient_covariance",
    "linreg_noise_model",
    "linreg_noise_scales",
    "linreg_steps_to_loss",
    "minibatch_noise_covariance",
    "minibatch_noise_trace",
    "pnm_lag1_autocorrelation",
    "pnm_max_lr",
    "pnm_noise_factor",
    "pnm_stationary",
    "pnm_update_noise_ratio",
    "sgd_stationary_covariance",
    "sgd_stationary_variance_1d",
    "small_lr_stationary_covariance",
    "symmetric_noise_gradient_quadratic",
]
