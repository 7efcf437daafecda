"""Sweeps that put SGN theory against measurement, with confidence intervals.

Each sweep varies one quantity (the x of the table), measures a noise figure at every grid
point from repeated independent draws, and sets the closed form of :mod:`sgn_lab.theory`
beside it. All four run on Gaussian linear regression (x ~ N(0, H), y = xᵀw* + ε,
ε ~ N(0, σ²), loss ½(xᵀw − y)², δ = w − w*), where the theory is exact, so a disagreement
larger than the confidence interval is a finding (or a bug), not an approximation error.

``batch``  (x = batch size B, quantity ``minibatch_trace``)
    tr Cov[g_B] of a minibatch drawn without replacement from N samples at a fixed w = w* + δ,
    against the population closed form (1/B − 1/N)·tr Σ(w) (:func:`theory.minibatch_noise_trace`
    of :func:`theory.linreg_gradient_covariance`): slope −1 on log–log axes, bending down to 0
    as B → N. One repeat is a fresh data set of N samples (per-sample gradients from
    :func:`sgn_lab.per_sample_grads` on an ``nn.Linear`` without bias) and ``draws``
    minibatches of every size from it; its value is the mean of |g_B − G|² over the draws, G
    the data set's exact mean gradient. Averaging over fresh data sets is what makes the
    comparison with the *population* Σ(w) unbiased: with one fixed data set the measurement
    estimates (1/B − 1/N)·tr S of that data set, which differs from tr Σ(w) by a few percent
    at N ≈ 2000 (per-sample gradients of linear regression are heavy-tailed), a bias no number
    of minibatches removes and that a CI over minibatches alone would not cover.

``beta0``  (x = PNM's β0)
    PNM (:class:`sgn_lab.optim.PNM` itself, at fixed lr η and β1) on *online* linear
    regression: every step a fresh minibatch of B samples per chain, so the state-dependent
    noise model :func:`theory.linreg_noise_model` holds exactly and
    :func:`theory.pnm_stationary` (exact discrete Lyapunov solution) is the prediction. The R
    chains are the rows of one (R, d) parameter tensor (PNM is elementwise, so rows evolve
    independently), each fed the gradient of its own minibatch. The baseline, plain SGD
    (``torch.optim.SGD``) at η/√Γ (the lr with PNM's drift), runs beside it on the same
    minibatches (common random numbers: it makes the ratios precise), against
    :func:`theory.heavy_ball_stationary`. After ``burn_in`` steps each chain's time averages
    over ``steps`` steps are one draw; CIs are over chains. Quantities (prefix ``sgd_``: the
    baseline; no prefix: PNM):

    - ``update_trace``, ``sgd_update_trace``: tr Cov[Δθ], Δθ_t = θ_{t+1} − θ_t at
      stationarity (unconditional, so it includes the fluctuation of the drift);
    - ``parameter_trace``, ``sgd_parameter_trace``: tr Cov[θ − w*] = E|θ − w*|², the
      long-horizon fluctuation;
    - ``update_lag1_correlation``, ``sgd_update_lag1_correlation``:
      E[Δθ_{t+1}·Δθ_t] / E|Δθ_t|² (PNM's consecutive updates partly cancel);
    - ``update_trace_ratio``, ``parameter_trace_ratio``: PNM / SGD at η/√Γ. The PNM paper's
      "Γ times more noise" is per step and against momentum; against SGD at equal drift the
      per-step ratio is ≈ Γ·(1−β1²)/(1+β1²) while the long-horizon ratio stays near 1.

``sigma``  (x = injected σ)
    :class:`sgn_lab.optim.GaussianNoiseSGD` at a fixed w = w* + δ, one step from there on a
    fresh (online) minibatch of B samples; R draws in one (R, d) parameter tensor.
    ``noise_trace``: tr Cov[Δθ/η] = E|Δθ/η + ∇L(w)|² (the exact population gradient ∇L = Hδ
    is known, so each draw is an unbiased term), against tr Σ(w)/B + d·σ²
    (:func:`theory.minibatch_noise_trace`, :func:`theory.injected_noise_covariance`);
    ``injected_trace``: the added part alone, measured as the difference from the same draw
    without injection (its cross term with the minibatch noise included), against d·σ². The
    rows at σ = 0 have theory 0 and ``rel_error`` NaN.

``large-batch``  (x = large batch B_L, fixed small batch B_S)
    :class:`sgn_lab.optim.CovarianceNoiseSGD` (Wen et al. 2020) on a data set of N samples at a
    fixed w; every draw is one step from w on its own minibatch of B_L drawn without
    replacement. The noise of the step is n = −Δθ/η − G (G the exact full-data gradient). Every
    row is compared with the small-batch target the method claims to reach: the covariance
    (1/B_S − 1/N)·S of a batch of B_S (:func:`theory.covariance_noise_target` with
    ``total=True``, which is the injected (1/B_S − 1/B_L)·S plus the large batch's own
    (1/B_L − 1/N)·S), S the exact per-sample covariance of the data set (the method emulates
    the small batch of *this* data set). Methods, as the prefix of the quantity:
    ``full_`` and ``diagonal_`` (the two variants), ``isotropic_`` (GaussianNoiseSGD with
    σ² = c·tr S/d: the same trace, no structure) and ``large_batch_`` (the plain large batch,
    no injection). Metrics: ``noise_trace`` = tr Cov[n] (mean of |n|² over draws, normal CI);
    ``top1_energy`` = λ_1/tr and ``effective_rank`` = exp(entropy) of the spectrum of the
    measured covariance (1/R)·Σ n nᵀ, with a delete-a-group jackknife (``groups`` groups)
    for the bias correction and the CI. With ``rotate`` (default here) H is rotated by a
    random orthogonal matrix, so S is not diagonal in the parameter basis and the diagonal
    variant loses its structure; on an axis-aligned H it loses only the rank-one part HδδᵀH.
    The four methods see the same minibatches (common random numbers).

``critical-batch``  (x = batch size B; the fit's rows have x = NaN)
    McCandlish et al.'s S = S_min(1 + B_noise/B) measured by branching SGD runs from one
    checkpoint, on linear regression, an MLP or a small transformer: see
    :mod:`sgn_lab.sweeps.critical`.

The table (:data:`COLUMNS`) has one row per grid point and quantity: ``measured`` with its 95%
normal confidence interval ``[ci_low, ci_high]`` (mean ± 1.96·sd/√R over R independent
draws, chains or data sets; the delta method for ratios; the jackknife for spectral
figures), ``theory`` and ``rel_error`` = (measured − theory)/theory (NaN where the theory is
0). Everything is deterministic under ``seed``: each grid point and repeat draws from its own
seed, :func:`sgn_lab.seeds.derive` of (seed, sweep, point, purpose).
"""


from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sgn_lab import theory
from sgn_lab.grads import flatten_grads, per_sample_grads
from sgn_lab.optim import PNM, CovarianceNoiseSGD, GaussianNoiseSGD
from sgn_lab.seeds import SweepPurpose, derive
from sgn_lab.stats.noise import spectrum_summary
from sgn_lab.sweeps.config import (
    COLUMNS,
    SWEEPS,
    Z95,
    Progress,
    SweepConfig,
    check_sweep,
    sweep_config,
)
from sgn_lab.sweeps.critical import sweep_critical
from sgn_lab.sweeps.linreg import (
    DTYPE,
    LinregProblem,
    half_squared_error,
    keyed_generator,
    linear_model,
    linreg_problem,
)

# --------------------------------------------------------------------------------------------
# entry points


def run_sweep(
    name: str,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
    state_file: str | Path | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Run sweep ``name`` (one of :data:`SWEEPS`) and return its tidy table.

    Parameters
    ----------
    name
        ``"batch"``, ``"beta0"``, ``"sigma"``, ``"large-batch"`` (see the module docstring) or
        ``"critical-batch"`` (:mod:`sgn_lab.sweeps.critical`).
    quick
        The small variant (fewer points, draws and dimensions): seconds instead of a minute,
        still resolving the theory to a few percent; the tests run it.
    seed
        Seeds every draw: the same seed gives the same table.
    progress
        Called as ``progress(done, total)`` each time a unit of work finishes (a grid point;
        for ``batch`` a block of data sets, since all its points finish together).
    state_file
        A file where ``critical-batch`` keeps each batch size's runs as they finish (minutes
        to an hour each in full mode): a rerun with the same file and config resumes after the
        last one kept, to the same table. The caller removes it once the table is written. The
        other sweeps take seconds to minutes in all and write nothing there.
    **options
        Overrides of the sweep's defaults (:func:`sweep_config`), e.g. ``grid=(1, 4, 16)``,
        ``repeats=100``, ``lr=0.1``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS`: sweep, x, quantity, measured, ci_low, ci_high (95%), theory,
        rel_error; sorted by quantity (in the sweep's order) then x.
    """
    config = sweep_config(name, quick=quick, seed=seed, **options)
    return run_config(config, progress=progress, state_file=state_file)


def run_config(config: SweepConfig, *, progress: Progress | None = None,
               state_file: str | Path | None = None) -> pd.DataFrame:
    """Run a sweep from its :class:`SweepConfig` (see :func:`run_sweep`)."""
    if not isinstance(config, SweepConfig):
        raise TypeError(f"config must be a SweepConfig, got {type(config).__name__}")
    check_sweep(config.sweep)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable(done, total) or None, got {progress!r}")
    progress = progress or (lambda done, total: None)
    if config.sweep == "critical-batch":
        rows = _sweep_critical_batch(config, progress, state_file)
    else:  # seconds to minutes in all: nothing worth keeping
        rows = _RUNNERS[config.sweep](config, progress)
    table = _tidy(config.sweep, rows)
    return table


def _tidy(sweep: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table.insert(0, "sweep", sweep)
    theory_values = table["theory"].to_numpy(dtype=np.float64)
    measured = table["measured"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(theory_values != 0, (measured - theory_values) / theory_values, np.nan)
    table["rel_error"] = rel
    order = {q: i for i, q in enumerate(dict.fromkeys(table["quantity"]))}
    table = table.assign(_order=table["quantity"].map(order))
    table = table.sort_values(["_order", "x"], kind="stable").drop(columns="_order")
    table["x"] = table["x"].astype(np.float64)
    return table.loc[:, list(COLUMNS)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# statistics


def _mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% normal CI of independent draws (axis 0)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    half = Z95 * float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, mean - half, mean + half


def _ratio_ci(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """mean(a)/mean(b) over paired independent units, 95% CI by the delta method."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ratio = float(a.mean() / b.mean())
    residual = (a - ratio * b) / b.mean()
    half = Z95 * float(residual.std(ddof=1)) / math.sqrt(a.size)
    return ratio, ratio - half, ratio + half


def _jackknife(
    statistic: Callable[[np.ndarray], np.ndarray], sums: np.ndarray, counts: np.ndarray
) -> list[tuple[float, float, float]]:
    """Delete-a-group jackknife of statistic(second-moment matrix), 95% normal CIs.

    ``sums[k]`` = Σ n nᵀ over the draws of group k, ``counts[k]`` their number; ``statistic``
    returns a vector of figures. For each figure: the bias-corrected estimate (the mean of the
    pseudo-values, which removes the O(1/R) bias of a spectral figure of a sample covariance)
    and estimate ± Z95·se, se = sd(pseudo-values)/√K.
    """
    total, count = sums.sum(axis=0), counts.sum()
    full = statistic(total / count)
    leave_out = np.stack([statistic((total - s) / (count - c)) for s, c in
                          zip(sums, counts, strict=True)])
    k = len(sums)
    pseudo = k * full - (k - 1) * leave_out  # (K, figures)
    estimate = pseudo.mean(axis=0)
    half = Z95 * pseudo.std(axis=0, ddof=1) / math.sqrt(k)
    return [(float(e), float(e - h), float(e + h)) for e, h in zip(estimate, half, strict=True)]


_SPECTRAL = ("top1_energy", "effective_rank")


def _spectrum(matrix: np.ndarray) -> np.ndarray:
    """The :data:`_SPECTRAL` figures of a covariance matrix (as :func:`noise_stats` has them)."""
    lam = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))[::-1].copy()
    summary = spectrum_summary(torch.from_numpy(np.clip(lam, 0.0, None)))
    return np.array([summary[name] for name in _SPECTRAL])


def _row(x: float, quantity: str, estimate: tuple[float, float, float], theory_value: float
         ) -> dict[str, Any]:
    measured, low, high = estimate
    return dict(x=x, quantity=quantity, measured=measured, ci_low=low, ci_high=high,
                theory=float(theory_value))


# --------------------------------------------------------------------------------------------
# batch: minibatch noise against B


_BATCH_BLOCK = 8  # data sets per per_sample_grads call (and per progress tick)


def _sweep_batch(c: SweepConfig, progress: Progress) -> list[dict[str, Any]]:
    key = SWEEPS.index("batch")
    problem = linreg_problem(c, key)
    n, sizes = c.dataset_size, np.array(c.grid, dtype=np.int64)
    trace_sigma = float(np.trace(problem.gradient_covariance()))
    predicted = [theory.minibatch_noise_trace(trace_sigma, int(b), dataset_size=n)
                 for b in sizes]
    model = linear_model(problem.w_star + problem.delta)
    values = np.empty((c.repeats, len(sizes)))
    blocks = range(0, c.repeats, _BATCH_BLOCK)
    for done, start in enumerate(blocks, 1):
        stop = min(start + _BATCH_BLOCK, c.repeats)
        gen = keyed_generator(c.seed, key, start, SweepPurpose.DRAWS)
        x, y = problem.sample((stop - start, n), gen)
        grads = flatten_grads(per_sample_grads(model, half_squared_error, x.reshape(-1, c.dim),
                                               y.reshape(-1)))
        grads = grads.to(DTYPE).reshape(stop - start, n, c.dim)
        for j in range(stop - start):
            centred = grads[j] - grads[j].mean(dim=0)  # g_i − G
            # Each draw is a random permutation; its first B samples are a minibatch of B
            # without replacement, for every B at once (prefix sums).
            order = torch.rand(c.draws, n, generator=gen, dtype=DTYPE).argsort(dim=1)
            prefix = centred[order].cumsum(dim=1)[:, sizes - 1, :]  # (draws, |grid|, d)
            noise = prefix / torch.from_numpy(sizes).to(DTYPE)[None, :, None]  # g_B − G
            values[start + j] = noise.square().sum(dim=-1).mean(dim=0).numpy()
        progress(done, len(blocks))
    return [
        _row(float(b), "minibatch_trace", _mean_ci(values[:, i]), predicted[i])
        for i, b in enumerate(sizes)
    ]


# --------------------------------------------------------------------------------------------
# beta0: PNM's per-step and long-horizon noise


def _sweep_beta0(c: SweepConfig, progress: Progress) -> list[dict[str, Any]]:
    key = SWEEPS.index("beta0")
    problem = linreg_problem(c, key)
    noise_model = theory.linreg_noise_model(problem.H, problem.noise_std, c.batch_size)
    # The theory first: an unstable lr fails here, before any simulation.
    predictions = []
    for beta0 in c.grid:
        sgd_lr = c.lr / math.sqrt(theory.pnm_noise_factor(beta0))
        predictions.append((
            theory.pnm_stationary(problem.H, noise_model, c.lr, beta0=beta0, beta1=c.beta1),
            theory.heavy_ball_stationary(problem.H, noise_model, sgd_lr),
        ))
    rows: list[dict[str, Any]] = []
    for j, beta0 in enumerate(c.grid):
        pnm_theory, sgd_theory = predictions[j]
        sgd_lr = c.lr / math.sqrt(theory.pnm_noise_factor(beta0))
        measured = _simulate_pnm_and_sgd(c, problem, beta0, sgd_lr, keyed_generator(c.seed, key, j))
        pnm, sgd = measured["pnm"], measured["sgd"]
        for prefix, m, t in (("", pnm, pnm_theory), ("sgd_", sgd, sgd_theory)):
            rows.append(_row(beta0, f"{prefix}update_trace", _mean_ci(m["update"]),
                             t.update_trace))
            rows.append(_row(beta0, f"{prefix}parameter_trace", _mean_ci(m["parameter"]),
                             t.parameter_trace))
            rows.append(_row(beta0, f"{prefix}update_lag1_correlation",
                             _ratio_ci(m["lag1"], m["update"]), t.update_lag1_correlation))
        rows.append(_row(beta0, "update_trace_ratio", _ratio_ci(pnm["update"], sgd["update"]),
                         pnm_theory.update_trace / sgd_theory.update_trace))
        rows.append(_row(beta0, "parameter_trace_ratio",
                         _ratio_ci(pnm["parameter"], sgd["parameter"]),
                         pnm_theory.parameter_trace / sgd_theory.parameter_trace))
        progress(j + 1, len(c.grid))
    return rows


def _simulate_pnm_and_sgd(
    c: SweepConfig, problem: LinregProblem, beta0: float, sgd_lr: float, gen: torch.Generator
) -> dict[str, dict[str, np.ndarray]]:
    """R chains of PNM (lr, β0, β1) and of SGD at ``sgd_lr`` on the same online minibatches.

    Returns, per optimizer, per-chain time averages over ``steps`` steps after ``burn_in``:
    ``update`` = mean |Δθ_t|², ``parameter`` = mean |θ_t − w*|², ``lag1`` = mean Δθ_t·Δθ_{t+1}.
    """
    R, B, w_star = c.repeats, c.batch_size, problem.w_star
    start = w_star.expand(R, -1).clone()  # at the minimum; burn-in reaches stationarity
    chains = {
        "pnm": torch.nn.Parameter(start.clone()),
        "sgd": torch.nn.Parameter(start.clone()),
    }
    optimizers = {
        "pnm": PNM([chains["pnm"]], lr=c.lr, betas=(c.beta1, beta0)),
        "sgd": torch.optim.SGD([chains["sgd"]], lr=sgd_lr),
    }
    sums = {name: {k: torch.zeros(R, dtype=DTYPE) for k in ("update", "parameter", "lag1")}
            for name in chains}
    previous: dict[str, Tensor | None] = dict.fromkeys(chains)
    total = c.burn_in + c.steps + 1  # one more step: the lag-1 pair of the last update
    with torch.no_grad():
        for t in range(total):
            x, y = problem.sample((R, B), gen)  # a fresh minibatch per chain
            recorded = t >= c.burn_in
            for name, theta in chains.items():
                residual = torch.einsum("rbd,rd->rb", x, theta) - y
                theta.grad = torch.einsum("rbd,rb->rd", x, residual) / B  # ∇ of ½·mean sq. err.
                before = theta.detach().clone()
                optimizers[name].step()
                update = theta.detach() - before
                s = sums[name]
                if recorded and previous[name] is not None:
                    s["lag1"] += (previous[name] * update).sum(dim=1)
                if recorded and t < total - 1:
                    s["update"] += update.square().sum(dim=1)
                    s["parameter"] += (before - w_star).square().sum(dim=1)
                previous[name] = update if recorded else None
    return {name: {k: (v / c.steps).numpy() for k, v in s.items()} for name, s in sums.items()}


# --------------------------------------------------------------------------------------------
# sigma: Gaussian noise injection


def _sweep_sigma(c: SweepConfig, progress: Progress) -> list[dict[str, Any]]:
    key = SWEEPS.index("sigma")
    problem = linreg_problem(c, key)
    trace_sigma = float(np.trace(problem.gradient_covariance()))
    minibatch = theory.minibatch_noise_trace(trace_sigma, c.batch_size)  # online: N = ∞
    w = problem.w_star + problem.delta
    full_gradient = torch.from_numpy(problem.H @ problem.delta.numpy())  # ∇L(w) = Hδ
    rows: list[dict[str, Any]] = []
    for j, sigma in enumerate(c.grid):
        gen = keyed_generator(c.seed, key, j, SweepPurpose.DRAWS)
        x, y = problem.sample((c.repeats, c.batch_size), gen)
        residual = x @ w - y
        minibatch_grad = torch.einsum("rbd,rb->rd", x, residual) / c.batch_size
        seed = derive(c.seed, key, j, SweepPurpose.OPTIMIZER)
        # The step with injection, and the same step without it (σ = 0: plain SGD).
        total, without = (
            (_gaussian_step(w, minibatch_grad, c.lr, s, seed) - full_gradient)
            .square().sum(dim=1).numpy()  # |(g_B − ∇L) + σz|², |g_B − ∇L|²
            for s in (sigma, 0.0)
        )
        injected = float(np.trace(theory.injected_noise_covariance(sigma, c.dim)))
        rows.append(_row(sigma, "noise_trace", _mean_ci(total), minibatch + injected))
        rows.append(_row(sigma, "injected_trace", _mean_ci(total - without), injected))
        progress(j + 1, len(c.grid))
    return rows


# --------------------------------------------------------------------------------------------
# large-batch: covariance noise (Wen et al.)

_LARGE_BATCH_METHODS = ("full", "diagonal", "isotropic", "large_batch")


def _sweep_large_batch(c: SweepConfig, progress: Progress) -> list[dict[str, Any]]:
    key = SWEEPS.index("large-batch")
    problem = linreg_problem(c, key)
    n, d = c.dataset_size, c.dim
    x, y = problem.sample((n,), keyed_generator(c.seed, key, SweepPurpose.PROBLEM,
                                                SweepPurpose.DRAWS))
    model = linear_model(problem.w_star + problem.delta)
    grads = flatten_grads(per_sample_grads(model, half_squared_error, x, y)).to(DTYPE)
    full_gradient = grads.mean(dim=0)  # G
    centred = grads - full_gradient
    S = (centred.T @ centred / (n - 1)).numpy()  # exact per-sample covariance of the data
    target = theory.covariance_noise_target(S, c.small_batch, int(c.grid[-1]), dataset_size=n,
                                            total=True)
    target_trace = float(np.trace(target))
    target_spectrum = dict(zip(_SPECTRAL, _spectrum(target), strict=True))
    w = model.weight.detach().reshape(-1).clone()
    rows: list[dict[str, Any]] = []
    for j, large in enumerate(c.grid):
        large = int(large)
        gen = keyed_generator(c.seed, key, j, SweepPurpose.DRAWS)
        weights = torch.ones(c.repeats, n, dtype=DTYPE)
        batches = torch.multinomial(weights, large, replacement=False, generator=gen)
        injected = theory.covariance_noise_target(S, c.small_batch, large, dataset_size=n)
        sigma = math.sqrt(float(np.trace(injected)) / d)  # isotropic, equal trace
        noise = {
            "full": _covariance_steps(c, grads, batches, w, "full", key, j),
            "diagonal": _covariance_steps(c, grads, batches, w, "diagonal", key, j),
            "isotropic": _gaussian_step(w, grads[batches].mean(dim=1), c.lr, sigma,
                                        derive(c.seed, key, j, SweepPurpose.ISOTROPIC)),
            "large_batch": grads[batches].mean(dim=1),  # plain SGD's step direction
        }
        for method in _LARGE_BATCH_METHODS:
            n_r = (noise[method] - full_gradient).numpy()  # noise of the step, (R, d)
            rows.append(_row(large, f"{method}_noise_trace",
                             _mean_ci((n_r**2).sum(axis=1)), target_trace))
            groups = np.array_split(np.arange(c.repeats), c.groups)
            sums = np.stack([n_r[g].T @ n_r[g] for g in groups])
            counts = np.array([len(g) for g in groups], dtype=np.float64)
            estimates = _jackknife(_spectrum, sums, counts)
            for metric, estimate in zip(_SPECTRAL, estimates, strict=True):
                rows.append(_row(large, f"{method}_{metric}", estimate, target_spectrum[metric]))
        progress(j + 1, len(c.grid))
    return rows


def _covariance_steps(
    c: SweepConfig, grads: Tensor, batches: Tensor, w: Tensor, variant: str, key: int, j: int
) -> Tensor:
    """The step direction −Δθ/η of CovarianceNoiseSGD from w, one step per minibatch.

    One step per draw, on a (d,) parameter: the "full" variant draws one z for all the tensors
    it updates, so stacking the draws in one tensor would make them share z.
    """
    theta = torch.nn.Parameter(w.clone())
    purpose = SweepPurpose.OPTIMIZER if variant == "full" else SweepPurpose.DIAGONAL
    opt = CovarianceNoiseSGD([theta], lr=c.lr, small_batch=c.small_batch,
                             large_batch=int(batches.shape[1]), variant=variant,
                             seed=derive(c.seed, key, j, purpose))
    out = torch.empty(len(batches), w.numel(), dtype=DTYPE)
    with torch.no_grad():
        for r, batch in enumerate(batches):
            theta.copy_(w)
            opt.step([grads[batch]])
            out[r] = (w - theta) / c.lr
    return out


def _gaussian_step(w: Tensor, grads: Tensor, lr: float, sigma: float, seed: int) -> Tensor:
    """Step directions −Δθ/η of GaussianNoiseSGD from w, one row per draw (gradient ``grads[r]``).

    The rows are independent draws: the optimizer's noise is elementwise.
    """
    theta = torch.nn.Parameter(w.expand(len(grads), -1).clone())
    opt = GaussianNoiseSGD([theta], lr=lr, sigma=sigma, seed=seed)
    theta.grad = grads.clone()
    opt.step()
    return (w - theta.detach()) / lr


def _sweep_critical_batch(c: SweepConfig, progress: Progress,
                          state_file: str | Path | None = None) -> list[dict[str, Any]]:
    """The critical-batch sweep lives in :mod:`sgn_lab.sweeps.critical`."""
    return sweep_critical(c, progress, state_file)


_RUNNERS: dict[str, Callable[[SweepConfig, Progress], list[dict[str, Any]]]] = {
    "batch": _sweep_batch,
    "beta0": _sweep_beta0,
    "sigma": _sweep_sigma,
    "large-batch": _sweep_large_batch,
}
"""The sweeps that run in one go; critical-batch, which keeps a state file, is called by
:func:`run_config` itself."""

