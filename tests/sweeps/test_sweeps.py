"""Tests of sgn_lab.sweeps: each sweep's measurements against the exact theory, with CIs.

The quick sweeps (module fixtures, each run once) are the default tests; the full sweeps are
marked slow. Statistical assertions use each row's own 95% CI, widened to 99.9% (×3.29/1.96)
where *every* row must pass, so that the expected 1-in-20 misses of a 95% interval do not fail
a test by design; the share of rows inside the plain 95% interval is checked separately.
Every sweep is deterministic under its seed, so these outcomes do not change from run to run.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from sgn_lab import theory
from sgn_lab.plots import METRIC_LABELS, plot_scaling
from sgn_lab.sweeps import (
    COLUMNS,
    SWEEPS,
    Z95,
    SweepConfig,
    format_sweep_options,
    parse_sweep_options,
    run_sweep,
    sweep_config,
)

Z999 = 3.2905267314919255  # two-sided 99.9%
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows(table: pd.DataFrame, quantity: str) -> pd.DataFrame:
    part = table[table["quantity"] == quantity]
    assert len(part), f"no rows for {quantity!r}; quantities: {sorted(set(table['quantity']))}"
    return part


def inside(part: pd.DataFrame, *, z: float = Z95, value: str = "theory") -> np.ndarray:
    """Whether ``value`` lies in each row's CI, widened from 95% to the quantile ``z``."""
    centre = part["measured"].to_numpy()
    scale = z / Z95
    low = centre - scale * (centre - part["ci_low"].to_numpy())
    high = centre + scale * (part["ci_high"].to_numpy() - centre)
    v = part[value].to_numpy()
    return (low <= v) & (v <= high)


def assert_matches_theory(part: pd.DataFrame, *, min_share_95: float = 0.75) -> None:
    """Every row within its 99.9% CI of the theory, most within the 95% CI."""
    bad = part[~inside(part, z=Z999)]
    assert bad.empty, f"outside the 99.9% CI:\n{bad.to_string()}"
    share = inside(part).mean()
    assert share >= min_share_95, f"only {share:.0%} of the 95% CIs hold the theory:\n{part}"


@pytest.fixture(scope="module")
def batch_table() -> pd.DataFrame:
    return run_sweep("batch", quick=True)


@pytest.fixture(scope="module")
def beta0_table() -> pd.DataFrame:
    return run_sweep("beta0", quick=True)


@pytest.fixture(scope="module")
def sigma_table() -> pd.DataFrame:
    return run_sweep("sigma", quick=True)


@pytest.fixture(scope="module")
def large_batch_table() -> pd.DataFrame:
    return run_sweep("large-batch", quick=True)


# ------------------------------------------------------------------------------------------
# API


def test_sweeps_and_columns(sigma_table: pd.DataFrame) -> None:
    assert SWEEPS == ("batch", "beta0", "sigma", "large-batch", "critical-batch")
    assert tuple(sigma_table.columns) == COLUMNS == (
        "sweep", "x", "quantity", "measured", "ci_low", "ci_high", "theory", "rel_error",
    )
    assert (sigma_table["sweep"] == "sigma").all()
    assert (sigma_table["ci_low"] <= sigma_table["measured"]).all()
    assert (sigma_table["measured"] <= sigma_table["ci_high"]).all()
    nonzero = sigma_table[sigma_table["theory"] != 0]
    np.testing.assert_allclose(
        nonzero["rel_error"], (nonzero["measured"] - nonzero["theory"]) / nonzero["theory"]
    )
    assert sigma_table.loc[sigma_table["theory"] == 0, "rel_error"].isna().all()


def test_unknown_sweep_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'nope'") as info:
        run_sweep("nope", quick=True)
    assert "large-batch" in str(info.value)  # lists the choices
    with pytest.raises(ValueError, match="'Batch'"):
        sweep_config("Batch")


def test_bad_options_are_value_errors_naming_them() -> None:
    with pytest.raises(ValueError, match="'beta1'"):
        run_sweep("batch", quick=True, beta1=0.5)  # an option of another sweep
    with pytest.raises(ValueError, match="512"):
        sweep_config("batch", quick=True, grid=(1, 512))  # B = N: no noise left to measure
    with pytest.raises(ValueError, match="repeats"):
        sweep_config("sigma", repeats=1)
    with pytest.raises(ValueError, match="small_batch"):
        sweep_config("large-batch", grid=(16,))  # B_L must exceed B_S = 16
    with pytest.raises(ValueError, match="lr"):
        run_sweep("beta0", quick=True, lr=5.0)  # past PNM's stability bound: the theory says so


def test_options_text_with_lists() -> None:
    options = parse_sweep_options("problem=mlp,grid=4/16/64,lr_grid=0.01:1:5,repeats=3")
    assert options["problem"] == "mlp" and options["repeats"] == 3
    assert options["grid"] == (4, 16, 64)
    np.testing.assert_allclose(options["lr_grid"], np.logspace(-2, 0, 5), rtol=1e-12)
    assert options["lr_grid"][0] == 0.01 and options["lr_grid"][-1] == 1.0  # ends exactly
    assert parse_sweep_options("grid=2:64:6")["grid"] == (2, 4, 8, 16, 32, 64)  # rounded
    assert parse_sweep_options("lr_grid=0.5")["lr_grid"] == (0.5,)  # one value, a list
    config = sweep_config("critical-batch", quick=True,
                          **parse_sweep_options("grid=64/4/16,lr_grid=0.5/0.125"))
    assert config.grid == (4, 16, 64) and config.lr_grid == (0.125, 0.5)
    for text in ("problem=mlp,grid=4/16/64,lr_grid=0.01/0.1/1", "dim=5,distance=0.5"):
        assert format_sweep_options(parse_sweep_options(text)) == text  # its inverse
    with pytest.raises(ValueError, match="COUNT must be at least 2, got 1"):
        parse_sweep_options("lr_grid=0.01:1:1")
    with pytest.raises(ValueError, match="lr_grid=1:2: write KEY=v1/v2"):
        parse_sweep_options("lr_grid=1:2")
    with pytest.raises(ValueError, match="lr_grid value"):  # sweep_config checks the values
        sweep_config("critical-batch", **parse_sweep_options("lr_grid=0.1/x"))


def test_defaults_per_sweep() -> None:
    beta0 = sweep_config("beta0")
    assert isinstance(beta0, SweepConfig)
    assert beta0.grid == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    batch = sweep_config("batch")
    n = batch.dataset_size
    assert min(batch.grid) == 1 and max(batch.grid) < n and max(batch.grid) >= n - n // 64
    assert 0.0 in sweep_config("sigma").grid
    quick = sweep_config("large-batch", quick=True, seed=3, repeats=100, groups=10)
    assert quick.quick and quick.seed == 3 and quick.repeats == 100
    assert quick.to_dict()["grid"] == list(quick.grid)


def test_progress_reports_every_unit_until_done() -> None:
    calls: list[tuple[int, int]] = []
    run_sweep("sigma", quick=True, repeats=50, progress=lambda done, total: calls.append(
        (done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    run_sweep("batch", quick=True, repeats=20, draws=4, progress=lambda d, t: calls.append((d, t)))
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1)) and calls[-1][0] == calls[-1][1]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("batch", dict(repeats=16, draws=4)),
        ("beta0", dict(repeats=8, burn_in=10, steps=20)),
        ("sigma", dict(repeats=64)),
        ("large-batch", dict(repeats=40, groups=4)),
    ],
)
def test_same_seed_same_table(name: str, options: dict) -> None:
    first = run_sweep(name, quick=True, seed=7, **options)
    again = run_sweep(name, quick=True, seed=7, **options)
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    other = run_sweep(name, quick=True, seed=8, **options)
    assert not np.array_equal(first["measured"].to_numpy(), other["measured"].to_numpy())


def test_the_command_writes_the_table_and_the_figure(tmp_path, sigma_table: pd.DataFrame,
                                                     monkeypatch) -> None:
    from sgn_lab.cli.app import main

    folder = tmp_path / "deep" / "out"
    monkeypatch.setattr("sys.argv", ["sgn-lab", "scaling", "--sweep", "sigma", "--quick",
                                     "--out", str(folder)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    table = sigma_table
    back = pd.read_csv(folder / "scaling_sigma.csv")
    assert tuple(back.columns) == COLUMNS
    pd.testing.assert_frame_equal(back, table, check_exact=False, rtol=1e-12)
    assert (folder / "scaling_sigma.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (folder / "scaling_sigma.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in folder.iterdir()) == [
        "scaling_sigma.csv", "scaling_sigma.pdf", "scaling_sigma.png",
    ]  # no temporary files left behind


# ------------------------------------------------------------------------------------------
# batch: minibatch noise against the population closed form


def test_batch_sweep_within_5_percent_of_theory(batch_table: pd.DataFrame) -> None:
    part = rows(batch_table, "minibatch_trace")
    config = sweep_config("batch", quick=True)
    assert list(part["x"]) == list(config.grid)
    worst = part["rel_error"].abs().max()
    assert worst < 0.05, f"|rel_error| up to {worst:.3f}:\n{part}"
    share = inside(part).mean()
    assert share >= 0.75, f"only {share:.0%} of the CIs hold the theory:\n{part}"
    assert inside(part, z=Z999).all(), part


def test_batch_sweep_theory_is_the_population_form(batch_table: pd.DataFrame) -> None:
    part = rows(batch_table, "minibatch_trace")
    n = sweep_config("batch", quick=True).dataset_size
    factor = np.array([1 / b - 1 / n for b in part["x"]])
    trace = part["theory"].to_numpy() / factor  # tr Σ(w): one value for every B
    np.testing.assert_allclose(trace, trace[0], rtol=1e-12)
    assert theory.minibatch_noise_trace(trace[0], 4, dataset_size=n) == pytest.approx(
        float(part.loc[part["x"] == 4, "theory"].iloc[0]), rel=1e-12
    )


def test_batch_sweep_slope_minus_one_then_bends(batch_table: pd.DataFrame) -> None:
    part = rows(batch_table, "minibatch_trace")
    x, y = part["x"].to_numpy(), part["measured"].to_numpy()
    small = x <= x.max() / 8
    slope = np.polyfit(np.log(x[small]), np.log(y[small]), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.03)
    # Close to N the finite data set takes the noise far below the 1/B line.
    assert y[-1] * x[-1] < 0.05 * y[0] * x[0]


# ------------------------------------------------------------------------------------------
# beta0: PNM against the exact Lyapunov solution


@pytest.mark.parametrize(
    "quantity",
    [
        "update_trace",
        "parameter_trace",
        "update_lag1_correlation",
        "sgd_update_trace",
        "sgd_parameter_trace",
        "sgd_update_lag1_correlation",
        "update_trace_ratio",
        "parameter_trace_ratio",
    ],
)
def test_beta0_sweep_matches_exact_theory(beta0_table: pd.DataFrame, quantity: str) -> None:
    part = rows(beta0_table, quantity)
    assert list(part["x"]) == [0.0, 1.0, 3.0]
    bad = part[~inside(part, z=Z999)]
    assert bad.empty, f"outside the 99.9% CI:\n{bad.to_string()}"


def test_beta0_sweep_most_95_percent_intervals_hold(beta0_table: pd.DataFrame) -> None:
    share = inside(beta0_table).mean()
    assert share >= 0.8, f"only {share:.0%} of the 95% CIs hold the theory"


def test_beta0_per_step_noise_grows_while_long_horizon_stays(beta0_table: pd.DataFrame) -> None:
    """The PNM paper's Γ-fold noise is per step; the stationary fluctuation is SGD's."""
    per_step = rows(beta0_table, "update_trace_ratio").set_index("x")["measured"]
    long_run = rows(beta0_table, "parameter_trace_ratio").set_index("x")["measured"]
    lag1 = rows(beta0_table, "update_lag1_correlation").set_index("x")["measured"]
    assert per_step[3.0] > 20 * per_step[0.0]  # Γ = 25 at β0 = 3, 1 at β0 = 0
    assert long_run[3.0] == pytest.approx(1.0, abs=0.05)
    assert 0.8 < long_run[0.0] < 0.95  # lr 0.3 is not small: SGD's fluctuation is larger
    assert lag1[3.0] < -0.8 < lag1[0.0]  # consecutive PNM updates cancel


# ------------------------------------------------------------------------------------------
# sigma: Gaussian noise injection


def test_sigma_sweep_added_noise_is_d_sigma_squared(sigma_table: pd.DataFrame) -> None:
    dim = sweep_config("sigma", quick=True).dim
    added = rows(sigma_table, "injected_trace")
    np.testing.assert_allclose(added["theory"], dim * added["x"] ** 2, rtol=1e-12)
    zero = added[added["x"] == 0]
    assert len(zero) == 1 and (zero[["measured", "ci_low", "ci_high"]] == 0).all(axis=None)
    assert_matches_theory(added[added["x"] > 0], min_share_95=0.5)


def test_sigma_sweep_total_is_minibatch_plus_injected(sigma_table: pd.DataFrame) -> None:
    total = rows(sigma_table, "noise_trace")
    added = rows(sigma_table, "injected_trace")
    minibatch = total["theory"].to_numpy() - added["theory"].to_numpy()
    np.testing.assert_allclose(minibatch, minibatch[0], rtol=1e-12)  # independent of σ
    assert_matches_theory(total, min_share_95=0.6)


# ------------------------------------------------------------------------------------------
# large-batch: covariance noise (Wen et al.)


def test_large_batch_full_and_diagonal_match_the_target_trace(
    large_batch_table: pd.DataFrame,
) -> None:
    for method in ("full", "diagonal", "isotropic"):
        assert_matches_theory(rows(large_batch_table, f"{method}_noise_trace"), min_share_95=0.5)
    # All rows compare with the same small-batch target (1/B_S − 1/N)·tr S.
    assert large_batch_table.groupby("quantity")["theory"].nunique().eq(1).all()
    plain = rows(large_batch_table, "large_batch_noise_trace")
    assert (plain["ci_high"] < 0.5 * plain["theory"]).all()  # the large batch alone: too quiet


def test_large_batch_structure_full_matches_diagonal_does_not(
    large_batch_table: pd.DataFrame,
) -> None:
    full = rows(large_batch_table, "full_top1_energy")
    assert_matches_theory(full, min_share_95=0.5)
    assert_matches_theory(rows(large_batch_table, "full_effective_rank"), min_share_95=0.5)
    # The diagonal variant has the right trace but not the structure: its top eigenvalue
    # carries far less of the trace, and isotropic noise of equal trace even less.
    for method in ("diagonal", "isotropic"):
        part = rows(large_batch_table, f"{method}_top1_energy")
        assert not inside(part, z=Z999).any(), part
        assert (part["rel_error"] < -0.3).all(), part
    # Without injection the structure is S's (only the trace is short).
    assert_matches_theory(rows(large_batch_table, "large_batch_top1_energy"), min_share_95=0.5)


# ------------------------------------------------------------------------------------------
# figure


def test_plot_scaling_panels_and_scales(batch_table, beta0_table, large_batch_table) -> None:
    fig = plot_scaling(batch_table)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert ax.get_xlabel() == METRIC_LABELS["batch_size"]
    assert ax.get_ylabel() == METRIC_LABELS["minibatch_trace"]
    assert ax.containers, "measurements are drawn with error bars"

    fig = plot_scaling(beta0_table)
    labels = [a.get_ylabel() for a in fig.axes]
    assert labels == [METRIC_LABELS[q] for q in (
        "update_trace", "parameter_trace", "update_lag1_correlation", "update_trace_ratio",
        "parameter_trace_ratio",
    )]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "PNM" in legend and "SGD at η/√Γ" in legend

    fig = plot_scaling(large_batch_table)
    assert [a.get_ylabel() for a in fig.axes] == [
        METRIC_LABELS[q] for q in ("noise_trace", "top1_energy", "effective_rank")
    ]
    assert all(a.get_xscale() == "log" for a in fig.axes)
    assert len(fig.axes[0].containers) == 4  # full, diagonal, isotropic, large batch alone


def test_plot_scaling_rejects_bad_tables(batch_table, sigma_table) -> None:
    with pytest.raises(ValueError, match="several sweeps"):
        plot_scaling(pd.concat([batch_table, sigma_table]))
    with pytest.raises(ValueError, match="theory"):
        plot_scaling(batch_table.drop(columns="theory"))
    with pytest.raises(ValueError, match="empty"):
        plot_scaling(batch_table.iloc[:0])


# ------------------------------------------------------------------------------------------
# full sweeps (slow)


@pytest.mark.slow
# critical-batch fits a curve rather than matching theory point by point: its own tests are
# in test_critical_batch.py.
@pytest.mark.parametrize("name", [s for s in SWEEPS if s != "critical-batch"])
def test_full_sweep_matches_theory(name: str) -> None:
    table = run_sweep(name)
    config = sweep_config(name)
    assert sorted(set(table["x"])) == sorted(config.grid)
    if name == "batch":
        assert table["rel_error"].abs().max() < 0.05
    exact = table
    if name == "large-batch":  # only the methods that claim the target, and structure-free ones
        keep = ("full_", "diagonal_noise_trace", "isotropic_noise_trace", "large_batch_top1",
                "large_batch_effective")
        exact = table[table["quantity"].str.startswith(keep)]
    exact = exact[exact["theory"] != 0]
    bad = exact[~inside(exact, z=Z999)]
    assert bad.empty, f"outside the 99.9% CI:\n{bad.to_string()}"
    assert inside(exact).mean() >= 0.85
    assert math.isfinite(table["measured"].sum())
