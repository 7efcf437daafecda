"""The critical-batch sweep (McCandlish et al. 2018): the fit, its bootstrap CI, and the
measurement on Gaussian linear regression against the closed forms.

Tolerances are derived, not tuned: the fit is exact on data that follow the model (rounding
only); the CI's coverage is a binomial count, checked against the coverage a percentile
bootstrap of n seeds is expected to have; the linear-regression checks use each row's own CI
(widened to 99.9% where every row must pass) plus, for B_noise, the model error that the exact
expected-loss recursion puts between McCandlish's law and this finite problem.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from scipy import stats

from sgn_lab import theory
from sgn_lab.plots import plot_scaling
from sgn_lab.plots.sweeps import plot_critical_batch
from sgn_lab.sweeps import COLUMNS, Z95, run_sweep, sweep_config
from sgn_lab.sweeps.critical import bootstrap_fit, fit_critical_batch, lr_at_edge, select_lr

Z999 = 3.2905267314919255


def value(table: pd.DataFrame, quantity: str, column: str = "measured") -> float:
    part = table[table["quantity"] == quantity]
    assert len(part) == 1, quantity
    return float(part[column].iloc[0])


# ------------------------------------------------------------------------------------------
# the fit


@pytest.mark.parametrize("s_min, b_noise", [(10.0, 20.0), (3.0, 1000.0), (250.0, 0.5)])
def test_fit_recovers_the_model_exactly(s_min, b_noise):
    batch = np.array([1, 3, 8, 30, 100, 1000], dtype=float)
    steps = s_min * (1 + b_noise / batch)
    fit = fit_critical_batch(batch, steps)
    # Exact up to rounding: a 2x2 weighted least-squares solve of data on the model.
    assert fit.s_min == pytest.approx(s_min, rel=1e-9)
    assert fit.e_min == pytest.approx(s_min * b_noise, rel=1e-9)
    assert fit.b_noise == pytest.approx(b_noise, rel=1e-9)
    # The same parameters give the samples: E = E_min (1 + B/B_noise), and the hyperbola.
    samples = batch * steps
    np.testing.assert_allclose(samples, fit.e_min * (1 + batch / fit.b_noise), rtol=1e-9)
    np.testing.assert_allclose((steps / fit.s_min - 1) * (samples / fit.e_min - 1), 1.0,
                               rtol=1e-8)


def test_fit_is_not_fooled_by_data_off_the_model():
    # S ∝ 1/B exactly (perfect scaling, no plateau): S_min = 0, B_noise beyond any grid.
    batch = np.array([1, 2, 4, 8], dtype=float)
    fit = fit_critical_batch(batch, 100 / batch)
    assert fit.s_min == pytest.approx(0.0, abs=1e-9) or fit.b_noise > 1e6
    # S flat in B (no gain from a larger batch): E_min = 0, B_noise = 0.
    flat = fit_critical_batch(batch, np.full(4, 7.0))
    assert flat.s_min == pytest.approx(7.0) and flat.b_noise == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "batch, steps, message",
    [
        ([1, 2, 4], [1, 2], "equally long"),
        ([4, 4, 4], [1, 2, 3], "at least 2 distinct positive"),
        ([0, 2, 4], [1, 2, 3], "at least 2 distinct positive"),
        ([1, 2, 4], [3, 0, 1], "positive and finite"),
        ([1, 2, 4], [3, np.inf, 1], "positive and finite"),
    ],
)
def test_fit_rejects_bad_input(batch, steps, message):
    with pytest.raises(ValueError, match=message):
        fit_critical_batch(batch, steps)


def test_lr_selection_takes_the_fewest_mean_steps_and_skips_misses():
    steps = np.array([[[10, 12], [8, 9], [5, np.inf]]], dtype=float)  # 1 B, 3 lrs, 2 seeds
    chosen, best = select_lr(steps)
    assert chosen.tolist() == [1] and best.tolist() == [8.5]


def test_bootstrap_ci_covers_the_truth_at_about_the_nominal_rate():
    """400 synthetic experiments with known S_min, B_noise: per B and seed, steps with a 10%
    Gaussian spread around the model, and a second, worse lr (1.3× the steps) that the lr
    selection must discard. The percentile bootstrap of n seeds narrows the spread by
    sqrt((n−1)/n), so its coverage lies between that of the normal interval with the narrowed
    width (≈ 0.942 at n = 16) and — if the smallest effective degrees of freedom, those of one
    B's mean, governed — the t-distribution's (≈ 0.923); plus ±3 binomial standard errors."""
    rng = np.random.default_rng(2024)
    batch = np.array([1, 2, 4, 8, 16, 32, 64, 128], dtype=float)
    s_min, b_noise, seeds, experiments = 20.0, 16.0, 16, 400
    truth = s_min * (1 + b_noise / batch)
    covered = 0
    for _ in range(experiments):
        good = truth[:, None] * (1 + 0.1 * rng.standard_normal((len(batch), seeds)))
        steps = np.stack([good, 1.3 * good], axis=1)  # (B, lrs, seeds)
        boot = bootstrap_fit(batch, steps, 400, rng)
        low, high = np.quantile(boot["b_noise"], [0.025, 0.975], method="inverted_cdf")
        covered += low <= b_noise <= high
    coverage = covered / experiments
    squeeze = Z95 * math.sqrt((seeds - 1) / seeds)
    lowest = 2 * stats.t.cdf(squeeze, seeds - 1) - 1
    se = math.sqrt(0.95 * 0.05 / experiments)
    assert lowest - 3 * se <= coverage <= 0.95 + 3 * se, coverage


# ------------------------------------------------------------------------------------------
# configuration and bad input


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(problem="cnn"), "problem must be one of linreg, mlp, transformer, got 'cnn'"),
        (dict(grid=(4, 8)), "at least 3 distinct batch sizes"),
        (dict(grid=(1, 2.5, 4)), "invalid grid value 2.5"),
        (dict(lr_grid=(0.1, -0.2)), "lr_grid value must be a finite number > 0"),
        (dict(lr_grid=()), "lr_grid must be a non-empty sequence"),
        (dict(target_fraction=1.5), r"target_fraction must lie in \(0, 1\)"),
        (dict(repeats=1), "repeats must be an integer >= 2"),
        (dict(small_batch=4), "takes no option 'small_batch'"),
        (dict(branch_steps=-1), "branch_steps must be an integer >= 0"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        sweep_config("critical-batch", quick=True, **options)


def test_problems_have_their_own_defaults():
    linreg = sweep_config("critical-batch", quick=True)
    mlp = sweep_config("critical-batch", quick=True, problem="mlp")
    assert linreg.problem == "linreg" and mlp.problem == "mlp"
    assert mlp.width is not None and linreg.width is None
    full = sweep_config("critical-batch", problem="transformer")
    assert full.grid == tuple(sorted(full.grid)) and full.to_dict()["problem"] == "transformer"


def test_a_branch_point_at_the_optimum_is_refused():
    # σ > 0 and a start at the minimum: the branch loss is the floor, no target above it.
    with pytest.raises(ValueError, match="not above the optimum"):
        run_sweep("critical-batch", quick=True, noise_std=0.5, distance=0.0, branch_steps=0,
                  grid=(1, 2, 4), repeats=2)


def test_cli_runs_the_sweep_and_names_bad_input(tmp_path, monkeypatch, capsys):
    from helpers import run_main

    code, out, _ = run_main(monkeypatch, capsys, "scaling", "--sweep", "critical-batch",
                            "--quick", "--options", "grid=1,repeats=3", "--out",
                            str(tmp_path))
    assert code == 2  # "grid=1" is a grid of one batch size: the fit needs three
    code, out, err = run_main(monkeypatch, capsys, "scaling", "--sweep", "critical-batch",
                              "--quick", "--options", "problem=cnn", "--out", str(tmp_path))
    assert code == 2
    assert "problem must be one of linreg, mlp, transformer, got 'cnn'" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_main(monkeypatch, capsys, "scaling", "--sweep", "critical-batch",
                              "--quick", "--options", "repeats=3,bootstrap=200", "--out",
                              str(tmp_path))
    assert code == 0, err
    assert "b_noise_fit" in out and "b_simple" in out
    for suffix in ("csv", "png", "pdf"):
        assert (tmp_path / f"scaling_critical-batch.{suffix}").is_file()
    assert not (tmp_path / "scaling_critical-batch.state").exists()  # done: not kept


# ------------------------------------------------------------------------------------------
# linear regression: the measurement against the closed forms


@pytest.fixture(scope="module")
def linreg() -> pd.DataFrame:
    return run_sweep("critical-batch", quick=True)


def test_table_shape(linreg):
    config = sweep_config("critical-batch", quick=True)
    assert tuple(linreg.columns) == COLUMNS
    assert (linreg["sweep"] == "critical-batch").all()
    for quantity in ("steps", "samples", "lr"):
        part = linreg[linreg["quantity"] == quantity]
        assert part["x"].tolist() == list(config.grid)
    for quantity in ("s_min", "e_min", "b_noise_fit", "b_simple", "branch_loss", "target_loss",
                     "lr_grid_low", "lr_grid_high"):
        assert math.isnan(value(linreg, quantity, "x"))
    assert value(linreg, "lr_grid_low") == min(config.lr_grid)
    assert value(linreg, "lr_grid_high") == max(config.lr_grid)
    steps = linreg[linreg["quantity"] == "steps"]
    samples = linreg[linreg["quantity"] == "samples"]
    np.testing.assert_allclose(samples["measured"], steps["measured"] * steps["x"])
    # The target is half way from the branch loss to the optimum σ²/2 = 0.
    assert value(linreg, "target_loss") == pytest.approx(0.5 * value(linreg, "branch_loss"))
    # The fit's own consistency: B_noise = E_min / S_min.
    assert value(linreg, "b_noise_fit") == pytest.approx(
        value(linreg, "e_min") / value(linreg, "s_min"))


def test_sweep_is_deterministic_under_its_seed(linreg):
    again = run_sweep("critical-batch", quick=True)
    pd.testing.assert_frame_equal(linreg, again)


def test_b_simple_measured_matches_the_closed_form(linreg):
    # noise_stats' B_simple on per-sample gradients at the branch point, against
    # tr Σ/|G|² = 2L tr H/|G|² + 1 there; 99.9% of its jackknife CI.
    measured, low, high = (value(linreg, "b_simple", c) for c in ("measured", "ci_low",
                                                                    "ci_high"))
    exact = value(linreg, "b_simple", "theory")
    assert abs(measured - exact) <= Z999 / Z95 * (high - low) / 2


def test_steps_are_not_slower_than_the_exact_expected_loss_recursion(linreg):
    """Per B, the measured steps (mean over seeds at the selected lr) against the same
    protocol on the exact expected loss E[L_t]. Each seed stops at its own first passage,
    and a loss that decays by random factors has E[L_t] above its typical value (Jensen), so
    the expected loss reaches the target later than a typical seed: the measured steps may lie
    below the recursion (by 15–25% here at small B, where a step's factor fluctuates most), not
    above it beyond the 99.9% CI and the rounding of a step (+1)."""
    part = linreg[linreg["quantity"] == "steps"]
    half = Z999 / Z95 * (part["ci_high"] - part["ci_low"]) / 2
    assert (part["measured"] <= part["theory"] + half + 1).all(), part.to_string()
    lr = linreg[linreg["quantity"] == "lr"]
    # The selected lr grows with B, as McCandlish's ε_opt(B) = ε_max/(1 + B_noise/B) does.
    assert np.all(np.diff(lr["measured"].to_numpy()) >= 0)


def test_fitted_b_noise_agrees_with_the_closed_form(linreg):
    """McCandlish's law puts the fitted B_noise at the closed-form B_noise of the branch point
    (and, H not ∝ I, near B_simple). It is exact only for infinitesimal steps and a noise
    scale that stays put on the way to the target. The exact expected-loss recursion run
    through the same protocol measures how far this finite problem is from that limit: its
    B_crit = E_min/S_min differs from the closed forms by a model error, which the tolerance
    adds to the bootstrap CI (no statistical slack beyond the CI itself)."""
    fit, low, high = (value(linreg, "b_noise_fit", c) for c in ("measured", "ci_low", "ci_high"))
    b_crit = value(linreg, "e_min", "theory") / value(linreg, "s_min", "theory")
    for closed in (value(linreg, "b_noise_fit", "theory"), value(linreg, "b_simple", "theory")):
        model_error = abs(b_crit - closed)
        assert low - model_error <= closed <= high + model_error, (fit, low, high, closed, b_crit)
    # And the fit is a real measurement: a CI of finite, positive width around the fit.
    assert 0 < low < fit < high < math.inf


def test_closed_forms_of_the_noise_scales():
    # H ∝ I: B_noise = B_simple (McCandlish), and with σ = 0 both equal d + 1 at every δ.
    d = 7
    H = 3.0 * np.eye(d)
    delta = np.random.default_rng(0).standard_normal(d)
    b_noise, b_simple = theory.linreg_noise_scales(H, delta, 0.0)
    assert b_noise == pytest.approx(d + 1) and b_simple == pytest.approx(d + 1)
    # Against the definitions tr(HΣ)/GᵀHG and tr Σ/|G|² with Σ from the covariance.
    H = np.diag([4.0, 1.0, 0.25])
    delta = np.array([0.3, -1.0, 2.0])
    sigma = theory.linreg_gradient_covariance(H, delta, 0.5)
    g = H @ delta
    b_noise, b_simple = theory.linreg_noise_scales(H, delta, 0.5)
    assert b_noise == pytest.approx(np.trace(H @ sigma) / (g @ H @ g))
    assert b_simple == pytest.approx(np.trace(sigma) / (g @ g))


def test_expected_loss_recursion_against_the_one_dimensional_closed_form():
    # d = 1, σ = 0: E δ'² = δ²((1 − ηh)² + 2η²h²/B) exactly (E x⁴ = 3h²), so
    # E L_t = L_0 ρ^t and the first t with E L_t <= L_0/2 is ceil(log 2 / −log ρ).
    h, eta, batch = 2.0, 0.1, 4
    rho = (1 - eta * h) ** 2 + 2 * eta**2 * h**2 / batch
    expected = math.ceil(math.log(2) / -math.log(rho))
    steps = theory.linreg_steps_to_loss([[h]], [1.0], 0.0, eta, batch, 0.5 * 0.5 * h,
                                        max_steps=1000)
    assert steps.tolist() == [expected]
    # A step past the stability bound never gets there.
    assert np.isinf(theory.linreg_steps_to_loss([[h]], [1.0], 0.0, 1.5, batch, 0.1,
                                                max_steps=1000)).all()


# ------------------------------------------------------------------------------------------
# the figure of the sweep


def test_plot_draws_one_panel_per_problem_and_the_noise_scales(linreg):
    fig = plot_critical_batch(linreg)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    both = pd.concat([linreg.assign(problem="linreg"), linreg.assign(problem="other")])
    assert len(plot_critical_batch(both).axes) == 3
    assert len(plot_scaling(linreg).axes) == 2  # the scaling command's plot dispatches here
    with pytest.raises(ValueError, match="critical-batch rows only"):
        plot_critical_batch(linreg.assign(sweep="batch"))


# ------------------------------------------------------------------------------------------
# networks: the vectorised branches against one torch.optim.SGD run at a time


def _reference_steps(model, loss_fn, params, train, held_out, lr, batch_size, generator,
                     target, max_steps):
    """One branch the plain way: load the branch point, step torch.optim.SGD, check the loss."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = train
    losses = []
    for t in range(1, max_steps + 1):
        idx = torch.randint(len(x), (batch_size,), generator=generator)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            losses.append(float(loss_fn(model(held_out[0]), held_out[1])))
        if losses[-1] <= target:
            return float(t), losses
        if not math.isfinite(losses[-1]):
            return math.inf, losses
    return math.inf, losses


@pytest.mark.parametrize("problem", ["mlp", "transformer"])
def test_branches_step_like_separate_sgd_runs(problem):
    from sgn_lab.data import load_task
    from sgn_lab.models import build_model, build_transformer
    from sgn_lab.sweeps.critical import run_branches

    torch.manual_seed(0)
    if problem == "mlp":
        task = load_task("teacher-student", seed=1, n=300, dim=6)
        model = build_model("mlp", task.input_shape, 1, width=16, depth=1, activation="tanh")
    else:
        task = load_task("markov", seed=1, n=300, context=8)
        model = build_transformer("gpt2", task, width=16, depth=1, heads=2)
    model.train(False)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    train, held_out = (task.x_train, task.y_train), (task.x_test[:64], task.y_test[:64])
    with torch.no_grad():
        start = float(task.loss_fn(model(held_out[0]), held_out[1]))
    # A target that some learning rates reach within the budget and others do not (the
    # smallest lr is too slow, the largest diverges on the transformer).
    lrs, seeds, batch, max_steps = (0.01, 0.1, 0.4, 3.0), 3, 8, 60
    target = start - (0.12 if problem == "transformer" else 0.5 * start)

    def generators():
        return [torch.Generator().manual_seed(100 + r) for r in range(seeds)]

    steps = run_branches(model, task.loss_fn, params, train, held_out, lrs=lrs,
                         batch_size=batch, generators=generators(), target=target,
                         max_steps=max_steps)
    assert steps.shape == (len(lrs), seeds)
    reference = np.full(steps.shape, np.inf)
    near = np.zeros(steps.shape, dtype=bool)  # a loss within rounding of the target
    for i, lr in enumerate(lrs):
        for r, gen in enumerate(generators()):
            reference[i, r], losses = _reference_steps(
                model, task.loss_fn, params, train, held_out, lr, batch, gen, target, max_steps)
            near[i, r] = np.min(np.abs(np.asarray(losses) - target)) < 1e-5 * abs(target)
    assert np.isfinite(reference).any() and not np.isfinite(reference).all()
    # Runs that reached the target give the same step; a run stopped early because its lr
    # could no longer be the best is ∞ here but must not be faster than the best lr's mean.
    best = np.nanmin(np.where(np.isfinite(reference).all(axis=1), reference.mean(axis=1),
                              np.nan))
    finite = np.isfinite(steps)
    np.testing.assert_array_equal(steps[finite & ~near], reference[finite & ~near])
    stopped = ~finite & np.isfinite(reference) & ~near
    for i in np.unique(np.nonzero(stopped)[0]):
        assert reference[i].mean() > best
    # The selection is the loop's.
    assert np.argmin(steps.mean(axis=1)) == np.argmin(reference.mean(axis=1))


def test_a_run_far_above_its_start_is_stopped_as_diverged():
    from sgn_lab.data import load_task
    from sgn_lab.models import build_model
    from sgn_lab.sweeps.critical import run_branches

    torch.manual_seed(0)
    task = load_task("teacher-student", seed=1, n=300, dim=6)
    model = build_model("mlp", task.input_shape, 1, width=16, depth=1, activation="tanh")
    model.train(False)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    train, held_out = (task.x_train, task.y_train), (task.x_test[:64], task.y_test[:64])
    gen = torch.Generator().manual_seed(7)
    steps = run_branches(model, task.loss_fn, params, train, held_out, lrs=(5.0,),
                         batch_size=8, generators=[gen], target=-1.0, max_steps=3000)
    assert steps.tolist() == [[math.inf]]
    # The steps it took: the minibatches drawn from its generator.
    drawn, replay = 0, torch.Generator().manual_seed(7)
    while not torch.equal(replay.get_state(), gen.get_state()):
        torch.randint(len(train[0]), (8,), generator=replay)
        drawn += 1
    with torch.no_grad():
        start = float(task.loss_fn(model(held_out[0]), held_out[1]))
    _, losses = _reference_steps(model, task.loss_fn, params, train, held_out, 5.0, 8,
                                 torch.Generator().manual_seed(7), -1.0, 3000)
    first_above = 1 + next(t for t, v in enumerate(losses) if v > 1e6 * start)
    assert drawn == first_above < len(losses)  # stopped there, before the overflow


def test_a_best_lr_at_an_end_of_the_grid_is_flagged():
    rows = [dict(x=b, quantity="lr", measured=lr) for b, lr in
            ((4, 0.01), (16, 0.02), (64, 0.04), (256, 0.08))]
    rows += [dict(x=math.nan, quantity="lr_grid_low", measured=0.01),
             dict(x=math.nan, quantity="lr_grid_high", measured=0.08)]
    assert lr_at_edge(pd.DataFrame(rows)) == [(4.0, "low"), (256.0, "high")]
    assert lr_at_edge(pd.DataFrame(rows[:4])) == []  # a table without the grid's ends


def test_cli_warns_where_the_best_lr_is_an_end_of_the_grid(tmp_path, monkeypatch, capsys):
    from helpers import run_main

    # A grid of two lrs, too narrow for every batch size, given through --options.
    code, out, err = run_main(monkeypatch, capsys, "scaling", "--sweep", "critical-batch",
                              "--quick", "--out", str(tmp_path), "--options",
                              "grid=2/8/32,repeats=3,bootstrap=100,lr_grid=0.25/0.5")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith(("warning:", "rerun"))]
    assert lines == [
        "warning: at B = 2 the best lr is the lowest of lr_grid: S there is an upper bound and "
        "B_noise_fit biased; extend lr_grid below it",
        "warning: at B = 8, 32 the best lr is the highest of lr_grid: S there is an upper bound "
        "and B_noise_fit biased; extend lr_grid above it",
        # Two steps (factor 2) wider at both ends: 0.25/4 to 0.5·4, 6 points.
        "rerun with --options grid=2/8/32,repeats=3,bootstrap=100,lr_grid=0.0625:2:6 (or a "
        "figure config's problem options)",
    ]


# ------------------------------------------------------------------------------------------
# an interrupted sweep


class _Stop(Exception):
    pass


def _stop_after(units: int):
    def progress(done: int, total: int) -> None:
        if done == units:
            raise _Stop
    return progress


@pytest.mark.parametrize("problem, options", [
    ("linreg", dict(grid=(1, 8, 64), repeats=3, bootstrap=200)),
    ("mlp", dict(grid=(8, 32, 128), repeats=2, bootstrap=200, lr_grid=(0.1, 0.4),
                 branch_steps=50, max_steps=400, probe_samples=64)),
])
def test_an_interrupted_sweep_resumes_to_the_same_table(problem, options, tmp_path):
    from sgn_lab.run.rundir import load_checkpoint, save_checkpoint

    whole = run_sweep("critical-batch", quick=True, problem=problem, **options)
    state = tmp_path / "sweep.state"
    with pytest.raises(_Stop):  # stopped once the first two batch sizes are done
        run_sweep("critical-batch", quick=True, problem=problem, state_file=state,
                  progress=_stop_after(2), **options)
    kept = load_checkpoint(state)
    assert np.isfinite(kept["steps"][:2].numpy()).any()
    assert np.isnan(kept["steps"][2].numpy()).all()  # not finished: not kept
    resumed = run_sweep("critical-batch", quick=True, problem=problem, state_file=state,
                        **options)
    pd.testing.assert_frame_equal(resumed, whole)
    # The kept batch sizes are read, not rerun: doubled steps there show in the table.
    doubled = kept["steps"].clone()
    doubled[0] *= 2
    save_checkpoint(state, {**kept, "steps": doubled})
    marked = run_sweep("critical-batch", quick=True, problem=problem, state_file=state,
                       **options)
    steps = [value(t[t["x"] == options["grid"][0]], "steps") for t in (whole, marked)]
    assert steps[1] == pytest.approx(2 * steps[0])
    # Another config does not use the state of this one.
    other = {**options, "bootstrap": 100}
    pd.testing.assert_frame_equal(
        run_sweep("critical-batch", quick=True, problem=problem, state_file=state, **other),
        run_sweep("critical-batch", quick=True, problem=problem, **other))
