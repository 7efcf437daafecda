"""The ``critical-batch`` sweep: McCandlish et al.'s noise scale against the critical batch size.

McCandlish et al. 2018 (arXiv 1812.06162): with the best step size at every batch size B, the
steps S and samples E = B·S to reach a given loss trade off as

    S = S_min·(1 + B_noise/B),   E = E_min·(1 + B/B_noise),   i.e. (S/S_min − 1)(E/E_min − 1) = 1,

with B_crit = E_min/S_min ≈ B_noise = tr(HΣ)/(GᵀHG) and, when H ∝ I, ≈ B_simple = tr Σ/|G|².
The sweep measures this from one state, the *branch point* (a checkpoint: ``branch_steps`` SGD
steps at ``branch_batch`` and ``branch_lr`` from the initial state, saved), for three problems:

``linreg``       online Gaussian linear regression (σ = ``noise_std``, H with eigenvalues
                 log-spaced over ``condition``, start at |δ| = ``distance``); every step a fresh
                 minibatch; the loss is the exact population loss ½(δᵀHδ + σ²).
``mlp``          an MLP (``width``, ``depth``) on ``teacher-student`` regression (inputs of
                 ``dim``, ``dataset_size`` training samples, minibatches with replacement); the
                 loss is measured on the held-out split.
``transformer``  a GPT-2 of ``width``, ``depth``, 2 heads (:func:`sgn_lab.models.build_transformer`)
                 on the built-in ``markov`` language (vocabulary 16, context ``dim``); the loss
                 is the next-token cross entropy on held-out windows.

The protocol, identical for the three:

- target: L_target = L* + φ·(L_branch − L*), φ = ``target_fraction``; L* is the optimum (σ²/2
  for linreg, ½·label_noise² = 0 for the noiseless teacher, the entropy rate of the Markov
  chain for the transformer: :func:`sgn_lab.data.load_task`'s ``info``).
- steps: for every B of ``grid``, every lr of ``lr_grid`` and ``repeats`` seeds, plain SGD from
  the branch point until the loss first falls to the target; S = that step. The seeds' data
  (minibatches) are shared across the learning rates (common random numbers).
- step size: the *measured* optimal lr per B, i.e. the lr of the grid with the smallest mean S
  over the seeds (a grid of factor √2 by default) — McCandlish et al.'s tuned lr, not the
  theory's ε_opt(B), so that nothing of the theory enters the measurement. A run that has
  not reached the target when it can no longer beat the best lr is stopped (S = ∞, never
  selected).
- fit: S_min, E_min by least squares of the model S = S_min + E_min/B in *relative* residuals
  (S_i − S_min − E_min/B_i)/S_i (S spans decades; each B weighs alike), linear in the two
  parameters (:func:`fit_critical_batch`); B_noise_fit = E_min/S_min.
- CI: percentile bootstrap over seeds (``bootstrap`` replicates), stratified by B: each
  replicate resamples the seeds of every B with replacement, redoes the lr selection and the
  fit. Per-B rows: mean ± t-quantile·sd/√n over the seeds at the selected lr.
- B_simple at the branch point: :func:`sgn_lab.noise_stats` of ``probe_samples`` per-sample
  gradients (its ``noise_scale``, CI ± 1.96 × its jackknife standard error).

Rows (sweep, x, quantity, measured, ci_low, ci_high, theory, rel_error): per B (x = B)
``steps``, ``samples`` (E = B·S) and ``lr`` (the selected one, no CI); per sweep (x = NaN)
``s_min``, ``e_min``, ``b_noise_fit``, ``b_simple``, and ``branch_loss``, ``target_loss``,
``lr_grid_low``, ``lr_grid_high`` (no CI; a B whose selected lr is an end of the grid is
flagged by :func:`lr_at_edge`: its S is an upper bound). Theory, linreg only (NaN otherwise):

- ``b_noise_fit`` and ``b_simple``: the closed forms at the branch point,
  :func:`sgn_lab.theory.linreg_noise_scales`;
- ``steps``, ``samples``, ``lr``, ``s_min``, ``e_min``: the same protocol (lr grid, target,
  selection, fit) applied to the exact expected loss of online SGD
  (:func:`sgn_lab.theory.linreg_steps_to_loss`). Its fitted E_min/S_min is what the
  measurement must reproduce; its distance from the closed-form B_noise at the branch point is
  the model error of McCandlish's one-point law for this problem (the noise scale changes along
  the way to the target, and a finite step is not infinitesimal), not a statistical error.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import Tensor

from sgn_lab import theory
from sgn_lab.data import load_task
from sgn_lab.grads import flatten_grads, per_sample_grads
from sgn_lab.run.rundir import load_checkpoint, save_checkpoint
from sgn_lab.seeds import SweepPurpose, derive
from sgn_lab.stats.noise import noise_stats
from sgn_lab.sweeps.config import SWEEPS, Z95, Progress, SweepConfig
from sgn_lab.sweeps.linreg import (
    DTYPE,
    half_squared_error,
    keyed_generator,
    linear_model,
    linreg_problem,
)
from sgn_lab.version import __version__

SWEEP_KEY = SWEEPS.index("critical-batch")
# Keys of this sweep's own seeds, beside SweepPurpose's (derive(seed, SWEEP_KEY, key)).
PROBE_KEY, BOOTSTRAP_KEY, INIT_KEY = 100, 101, 102
EVAL_SAMPLES = 256  # held-out samples (windows) on which mlp and transformer check the target
DIVERGENCE_FACTOR = 1e6
"""A branch whose loss exceeds this many times the loss at the branch point has diverged."""

# --------------------------------------------------------------------------------------------
# the fit


@dataclass(frozen=True)
class CriticalFit:
    """The fitted S = S_min·(1 + B_noise/B): ``s_min``, ``e_min`` and ``b_noise`` = E_min/S_min.

    ``b_noise`` is +inf when S_min <= 0 (no plateau within the grid: B_noise beyond it) and 0
    when E_min <= 0 (no gain from a larger batch).
    """

    s_min: float
    e_min: float
    b_noise: float


def fit_critical_batch(batch_sizes: Any, steps: Any) -> CriticalFit:
    """Least-squares fit of S = S_min + E_min/B to steps S at batch sizes B.

    The residuals are relative, (S_i − S_min − E_min/B_i)/S_i, so that every batch size weighs
    alike although S spans decades; the model is linear in (S_min, E_min), so the fit is one
    weighted linear least-squares solve (weights 1/S_i²) and exact on data that follow the
    model. E = B·S then follows E = E_min·(1 + B/B_noise) with the same parameters.

    Raises ValueError unless ``batch_sizes`` and ``steps`` are equally long, with at least 2
    distinct positive batch sizes and positive finite steps.
    """
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if b.ndim != 1 or s.shape != b.shape:
        raise ValueError(f"batch_sizes and steps must be 1-D and equally long, got shapes "
                         f"{b.shape} and {s.shape}")
    if not (np.isfinite(b).all() and (b > 0).all()) or len(np.unique(b)) < 2:
        raise ValueError(f"batch_sizes must hold at least 2 distinct positive numbers, got "
                         f"{b.tolist()!r}")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"steps must be positive and finite, got {s.tolist()!r}")
    s_min, e_min = _fit(1.0 / b, s[None, :])
    return CriticalFit(float(s_min[0]), float(e_min[0]), float(_b_noise(s_min, e_min)[0]))


def _fit(inverse: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative least squares of S = a + b·x, x = 1/B, for every row of ``steps`` (R, k)."""
    w = 1.0 / steps**2
    s0, s1, s2 = w.sum(axis=1), (w * inverse).sum(axis=1), (w * inverse**2).sum(axis=1)
    r0, r1 = (w * steps).sum(axis=1), (w * inverse * steps).sum(axis=1)
    det = s0 * s2 - s1**2
    return (s2 * r0 - s1 * r1) / det, (s0 * r1 - s1 * r0) / det


def _b_noise(s_min: np.ndarray, e_min: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s_min > 0, np.clip(e_min, 0.0, None) / s_min, np.inf)


def select_lr(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lr with the fewest mean steps per batch size.

    ``steps`` (batch sizes, lrs, seeds), ∞ where a run did not reach the target. Returns
    (index of the selected lr, its mean steps) per batch size; mean ∞ (index 0) where no lr
    reached the target with every seed.
    """
    means = steps.mean(axis=2)
    chosen = np.argmin(means, axis=1)
    return chosen, means[np.arange(len(means)), chosen]


def bootstrap_fit(
    batch_sizes: Any, steps: np.ndarray, replicates: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Percentile-bootstrap replicates of the fit, over seeds, stratified by batch size.

    Each replicate resamples the seeds of every batch size with replacement (the same draw
    for all its learning rates: they share the seeds' data), selects the lr again
    (:func:`select_lr`) and refits (:func:`fit_critical_batch`). Returns arrays
    ``s_min``, ``e_min``, ``b_noise`` of the replicates (NaN where a batch size had no lr with
    every resampled seed at the target).
    """
    inverse = 1.0 / np.asarray(batch_sizes, dtype=np.float64)
    k, _, n = steps.shape
    selected = np.empty((replicates, k))
    for j in range(k):
        idx = rng.integers(n, size=(replicates, n))
        means = steps[j][:, idx].mean(axis=2)  # (lrs, replicates)
        selected[:, j] = means.min(axis=0)
    ok = np.isfinite(selected).all(axis=1)
    s_min, e_min = np.full(replicates, np.nan), np.full(replicates, np.nan)
    s_min[ok], e_min[ok] = _fit(inverse, selected[ok])
    b = np.full(replicates, np.nan)
    b[ok] = _b_noise(s_min[ok], e_min[ok])
    return {"s_min": s_min, "e_min": e_min, "b_noise": b}


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """2.5% and 97.5% percentiles (no interpolation, so that ±∞ replicates are kept)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(values, [0.025, 0.975], method="inverted_cdf")
    return float(low), float(high)


def _t_ci(values: np.ndarray) -> tuple[float, float, float]:
    mean = float(values.mean())
    if not np.isfinite(values).all():
        return mean, math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1)
                 / math.sqrt(values.size))
    return mean, mean - half, mean + half


# --------------------------------------------------------------------------------------------
# running the branches


@dataclass
class _Branched:
    """What a problem hands back: steps (B, lr, seed), the branch point and its theory."""

    steps: np.ndarray
    branch_loss: float
    floor: float
    target: float
    b_simple: tuple[float, float, float]
    theory: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Kept:
    """The steps (lrs, seeds) of every batch size finished so far, saved to ``path`` after
    each one (None: nowhere), so that an interrupted sweep resumes at the next.

    A saved file is used only when it was written for the same config, sgn-lab version and
    target loss (recomputed from the branch point): the kept batch sizes are then exactly what
    a rerun would compute, as every batch size draws from seeds of its own.
    """

    path: Path | None
    record: dict[str, Any]
    steps: np.ndarray  # (B, lrs, seeds); NaN for a batch size not finished

    @classmethod
    def open(cls, path: Path | None, c: SweepConfig, target: float) -> _Kept:
        record = {"sgn_lab": __version__, **c.to_dict(), "target": float(target)}
        steps = np.full((len(c.grid), len(c.lr_grid), c.repeats), np.nan)
        if path is not None and path.is_file():
            state = load_checkpoint(path)
            if state.get("record") == record and tuple(state["steps"].shape) == steps.shape:
                steps = state["steps"].numpy().copy()
        return cls(path, record, steps)

    def over_grid(self, grid: tuple[int, ...], progress: Progress,
                  run: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """Steps (B, lrs, seeds): for each batch size ``grid[j]`` the kept steps, or else
        ``run(j, B)``'s (lrs, seeds), saved as soon as they are computed."""
        for j, batch in enumerate(grid):
            if np.isnan(self.steps[j]).any():
                self.steps[j] = run(j, batch)
                if self.path is not None:
                    save_checkpoint(self.path, {"record": self.record,
                                                "steps": torch.from_numpy(self.steps.copy())})
            progress(j + 1, len(grid))
        return self.steps.copy()


def _target(c: SweepConfig, branch_loss: float, floor: float) -> float:
    if not branch_loss > floor:
        raise ValueError(f"the branch point's loss {branch_loss:.6g} is not above the optimum "
                         f"{floor:.6g}: train it less (branch_steps={c.branch_steps})")
    return floor + c.target_fraction * (branch_loss - floor)


def _b_simple(grads: Tensor) -> tuple[float, float, float]:
    measured = noise_stats(grads, shape=False)
    value, se = measured.noise_scale, measured.noise_scale_se
    return value, value - Z95 * se, value + Z95 * se


def beyond_best(done: np.ndarray, dead: np.ndarray, t: int) -> bool:
    """True when no unfinished run can give its lr a mean below that of the best lr whose
    seeds have all finished. ``done`` (lrs, seeds): the step a run reached the target, ∞ while
    it has not (at step t: at least t); ``dead``: diverged runs (never)."""
    complete = np.isfinite(done).all(axis=1)
    if not complete.any():
        return False
    best = done[complete].mean(axis=1).min()
    pending = ~complete
    bound = np.where(dead[pending], np.inf,
                     np.where(np.isfinite(done[pending]), done[pending], t)).mean(axis=1)
    return bool((bound > best).all())


# linreg -------------------------------------------------------------------------------------


def _branch_linreg(c: SweepConfig, progress: Progress, state_file: Path | None) -> _Branched:
    problem = linreg_problem(c, SWEEP_KEY)
    H, sigma = problem.H, problem.noise_std
    w_star = problem.w_star
    # The branch point: branch_steps of online SGD from w* + δ0, then saved.
    gen = keyed_generator(c.seed, SWEEP_KEY, SweepPurpose.PROBLEM, SweepPurpose.DRAWS)
    w = (w_star + problem.delta).clone()
    for _ in range(c.branch_steps):
        x, y = problem.sample((c.branch_batch,), gen)
        w = w - c.branch_lr * x.T @ (x @ w - y) / c.branch_batch
    buffer = io.BytesIO()
    torch.save(w, buffer)
    w_branch = torch.load(io.BytesIO(buffer.getvalue()))
    delta = (w_branch - w_star).numpy()
    Ht = torch.from_numpy(H)

    def loss(theta: Tensor) -> Tensor:  # exact population loss, any leading shape
        d = theta - w_star
        return 0.5 * (torch.einsum("...i,ij,...j->...", d, Ht, d) + sigma**2)

    branch_loss, floor = float(loss(w_branch)), 0.5 * sigma**2
    target = _target(c, branch_loss, floor)
    x, y = problem.sample((c.probe_samples,), keyed_generator(c.seed, SWEEP_KEY, PROBE_KEY))
    grads = flatten_grads(per_sample_grads(linear_model(w_branch), half_squared_error, x, y))
    b_simple = _b_simple(grads.to(DTYPE))

    rates = torch.tensor(c.lr_grid, dtype=DTYPE)
    limit = DIVERGENCE_FACTOR * branch_loss

    def branches(j: int, batch: int) -> np.ndarray:
        gen = keyed_generator(c.seed, SWEEP_KEY, j, SweepPurpose.DRAWS)
        theta = w_branch.expand(len(rates), c.repeats, -1).clone()  # (lrs, seeds, d)
        done = np.full((len(rates), c.repeats), np.inf)
        dead = np.zeros(done.shape, dtype=bool)
        for t in range(1, c.max_steps + 1):
            x, y = problem.sample((c.repeats, batch), gen)  # shared by the lrs
            live = torch.from_numpy(np.isinf(done) & ~dead)[..., None]
            residual = torch.einsum("sbd,lsd->lsb", x, theta) - y
            update = torch.einsum("sbd,lsb->lsd", x, residual) / batch
            theta -= torch.where(live, rates[:, None, None] * update, 0.0)
            current = loss(theta).numpy()
            pending = np.isinf(done) & ~dead
            done[pending & (current <= target)] = t
            blown = pending & (~np.isfinite(current) | (current > limit))
            dead |= blown
            theta[torch.from_numpy(blown)] = w_branch  # parked (finite), no longer updated
            if (np.isfinite(done) | dead).all() or beyond_best(done, dead, t):
                break
        return done

    steps = _Kept.open(state_file, c, target).over_grid(c.grid, progress, branches)

    predicted = np.stack([
        theory.linreg_steps_to_loss(H, delta, sigma, c.lr_grid, b, target,
                                    max_steps=c.max_steps)
        for b in c.grid
    ])  # (B, lrs)
    chosen = np.argmin(predicted, axis=1)
    best = predicted[np.arange(len(c.grid)), chosen]
    b_noise, b_simple_theory = theory.linreg_noise_scales(H, delta, sigma)
    fit = (fit_critical_batch(c.grid, best) if np.isfinite(best).all()
           else CriticalFit(math.nan, math.nan, math.nan))
    return _Branched(
        steps=steps, branch_loss=branch_loss, floor=floor, target=target, b_simple=b_simple,
        theory=dict(steps=best, lr=np.asarray(c.lr_grid)[chosen], s_min=fit.s_min,
                    e_min=fit.e_min, b_noise_fit=b_noise, b_simple=b_simple_theory,
                    b_crit=fit.b_noise),
    )


# mlp and transformer ------------------------------------------------------------------------


def _branch_network(c: SweepConfig, progress: Progress, state_file: Path | None) -> _Branched:
    task_seed = derive(c.seed, SWEEP_KEY, SweepPurpose.PROBLEM) % 2**32
    if c.problem == "mlp":
        task = load_task("teacher-student", seed=task_seed, n=c.dataset_size, dim=c.dim)
        floor = 0.5 * float(task.info.get("label_noise", 0.0)) ** 2
    else:
        task = load_task("markov", seed=task_seed, n=c.dataset_size, context=c.dim)
        floor = float(task.info["entropy_rate"])
    torch.manual_seed(derive(c.seed, SWEEP_KEY, INIT_KEY))  # the initial weights
    if c.problem == "mlp":
        from sgn_lab.models import build_model

        model = build_model("mlp", task.input_shape, 1, width=c.width, depth=c.depth,
                            activation="tanh")
    else:
        from sgn_lab.models import build_transformer

        model = build_transformer("gpt2", task, width=c.width, depth=c.depth, heads=2)
    loss_fn = task.loss_fn
    x_train, y_train = task.x_train, task.y_train
    x_eval, y_eval = task.x_test[:EVAL_SAMPLES], task.y_test[:EVAL_SAMPLES]  # a fixed held-out set
    n = len(x_train)

    def evaluate() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x_eval), y_eval))

    model.train(False)  # no dropout: the GPT-2 has none, the MLP no random layers
    # The branch point: branch_steps of SGD from the initial weights.
    gen = torch.Generator().manual_seed(derive(c.seed, SWEEP_KEY, SweepPurpose.PROBLEM,
                                               SweepPurpose.DRAWS))
    opt = torch.optim.SGD(model.parameters(), lr=c.branch_lr)
    for _ in range(c.branch_steps):
        idx = torch.randint(n, (c.branch_batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    branch_loss = evaluate()
    target = _target(c, branch_loss, floor)
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(
        derive(c.seed, SWEEP_KEY, PROBE_KEY)))[: c.probe_samples]
    grads = flatten_grads(per_sample_grads(model, loss_fn, x_train[probe], y_train[probe]))
    b_simple = _b_simple(grads.to(DTYPE))

    branch_params = {k: p.detach() for k, p in model.named_parameters()}

    def branches(j: int, batch: int) -> np.ndarray:
        gens = [torch.Generator().manual_seed(derive(c.seed, SWEEP_KEY, j, r, SweepPurpose.DRAWS))
                for r in range(c.repeats)]
        return run_branches(model, loss_fn, branch_params, (x_train, y_train),
                            (x_eval, y_eval), lrs=c.lr_grid, batch_size=batch,
                            generators=gens, target=target, max_steps=c.max_steps)

    steps = _Kept.open(state_file, c, target).over_grid(c.grid, progress, branches)
    return _Branched(steps=steps, branch_loss=branch_loss, floor=floor, target=target,
                     b_simple=b_simple)


def run_branches(
    model: torch.nn.Module,
    loss_fn: Any,
    params: dict[str, Tensor],
    train: tuple[Tensor, Tensor],
    held_out: tuple[Tensor, Tensor],
    *,
    lrs: Any,
    batch_size: int,
    generators: list[torch.Generator],
    target: float,
    max_steps: int,
) -> np.ndarray:
    """Steps of plain SGD from ``params`` until the held-out loss first falls to ``target``.

    One run per (lr, seed): seed r draws its minibatches (``batch_size`` indices with
    replacement per step) from ``generators[r]``, the same for every lr (common random
    numbers). After every step each run's loss on ``held_out`` is checked. Returns steps
    (lrs, seeds), ∞ for a run that did not reach the target: it diverged (a non-finite loss,
    or one above 10⁶ times the loss at ``params``), ran ``max_steps``, or was stopped once it
    could no longer make its lr's mean the fewest (:func:`beyond_best`).

    The runs still going take their steps together, as one ``torch.func.vmap`` of the gradient
    over their stacked parameters; their held-out losses are computed one run at a time, which
    is faster than a vmap whose parameters are batched and inputs are not (3× on the sweep's
    GPT-2). Against the runs one at a time (``benchmarks/bench_branches.py``) this is about 2×
    faster on the sweep's MLP; on its GPT-2 the held-out losses take most of the time in both,
    so the gain is small.
    """
    from torch.func import functional_call, grad, vmap

    fixed = {k: b.detach() for k, b in model.named_buffers()}

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, (p, fixed), (x,)), y)

    gradient = vmap(grad(loss))
    x_train, y_train = train
    rates = torch.tensor([float(lr) for lr in lrs], dtype=next(iter(params.values())).dtype)
    seeds = len(generators)
    done = np.full((len(rates), seeds), np.inf)
    dead = np.zeros(done.shape, dtype=bool)
    # The runs still going, lr-major, and their stacked parameters (runs, ...).
    live = np.arange(done.size)
    theta = {k: v.detach().expand(done.size, *v.shape).clone() for k, v in params.items()}
    with torch.no_grad():
        start = float(loss({k: v.detach() for k, v in params.items()}, *held_out))
    limit = DIVERGENCE_FACTOR * start if start > 0 else math.inf
    n = len(x_train)
    for t in range(1, max_steps + 1):
        idx = torch.stack([torch.randint(n, (batch_size,), generator=g) for g in generators])
        idx = idx[torch.from_numpy(live % seeds)]  # each run its seed's minibatch
        g = gradient(theta, x_train[idx], y_train[idx])
        step = rates[torch.from_numpy(live // seeds)]
        with torch.no_grad():
            for k, v in theta.items():
                v -= step.view(-1, *([1] * (v.dim() - 1))) * g[k]
            current = np.array([float(loss({k: v[i] for k, v in theta.items()}, *held_out))
                                for i in range(live.size)])
        lr_i, seed_i = np.divmod(live, seeds)
        reached = current <= target
        done[lr_i[reached], seed_i[reached]] = t
        # Stopped once far above the start, not only at an overflow: a run that blows up
        # would otherwise be stepped (and counted as pending) until its floats run out.
        blown = ~np.isfinite(current) | (current > limit)
        dead[lr_i[blown], seed_i[blown]] = True
        keep = ~(reached | blown)
        if not keep.all():
            live = live[keep]
            kept = torch.from_numpy(np.flatnonzero(keep))
            theta = {k: v[kept] for k, v in theta.items()}
        if live.size == 0 or beyond_best(done, dead, t):
            break
    return done


# --------------------------------------------------------------------------------------------
# the sweep


def sweep_critical(c: SweepConfig, progress: Progress,
                   state_file: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of the critical-batch sweep (see the module docstring); each batch size's
    steps are kept in ``state_file`` as they finish (:class:`_Kept`)."""
    state_file = Path(state_file) if state_file is not None else None
    branched = (_branch_linreg if c.problem == "linreg" else _branch_network)(c, progress,
                                                                              state_file)
    th = branched.theory
    nan = math.nan
    grid = np.asarray(c.grid, dtype=np.float64)
    chosen, best = select_lr(branched.steps)
    rows: list[dict[str, Any]] = []

    def row(x: float, quantity: str, estimate: tuple[float, float, float], value: float) -> None:
        measured, low, high = estimate
        rows.append(dict(x=x, quantity=quantity, measured=measured, ci_low=low, ci_high=high,
                         theory=float(value)))

    for j, b in enumerate(c.grid):
        per_seed = branched.steps[j, chosen[j]]
        s = _t_ci(per_seed)
        row(float(b), "steps", s, th["steps"][j] if th else nan)
        row(float(b), "samples", tuple(v * b for v in s), th["steps"][j] * b if th else nan)
        lr = c.lr_grid[chosen[j]] if np.isfinite(best[j]) else nan
        row(float(b), "lr", (lr, nan, nan), th["lr"][j] if th else nan)
    if np.isfinite(best).all():
        fit = fit_critical_batch(grid, best)
        rng = np.random.default_rng(derive(c.seed, SWEEP_KEY, BOOTSTRAP_KEY))
        boot = bootstrap_fit(grid, branched.steps, c.bootstrap, rng)
    else:  # some batch size never reached the target: no fit
        fit = CriticalFit(nan, nan, nan)
        boot = {k: np.full(1, np.nan) for k in ("s_min", "e_min", "b_noise")}
    for name, value in (("s_min", fit.s_min), ("e_min", fit.e_min), ("b_noise_fit", fit.b_noise)):
        low, high = _percentiles(boot[name.removesuffix("_fit")])
        row(nan, name, (value, low, high), th.get(name, nan) if th else nan)
    row(nan, "b_simple", branched.b_simple, th["b_simple"] if th else nan)
    row(nan, "branch_loss", (branched.branch_loss, nan, nan), nan)
    row(nan, "target_loss", (branched.target, nan, nan), nan)
    row(nan, "lr_grid_low", (min(c.lr_grid), nan, nan), nan)
    row(nan, "lr_grid_high", (max(c.lr_grid), nan, nan), nan)
    return rows


def lr_at_edge(table: Any) -> list[tuple[float, str]]:
    """The batch sizes whose selected lr is an end of the lr grid: (B, "low" or "high").

    There the best lr may lie outside the grid, so S at that B is only an upper bound on the
    steps at the optimal lr, and the fit through it is biased (towards a larger B_noise when
    the small batches are the ones affected). From the table alone (its ``lr`` rows and
    ``lr_grid_low``/``lr_grid_high``).
    """
    values = {q: table.loc[table["quantity"] == q, "measured"] for q in
              ("lr_grid_low", "lr_grid_high")}
    if any(v.empty for v in values.values()):
        return []
    low, high = float(values["lr_grid_low"].iloc[0]), float(values["lr_grid_high"].iloc[0])
    chosen = table[table["quantity"] == "lr"]
    return [(float(b), "low" if lr == low else "high")
            for b, lr in zip(chosen["x"], chosen["measured"], strict=True)
            if lr in (low, high)]

