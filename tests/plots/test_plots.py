"""Tests of sgn_lab.plots on small synthetic run tables (2 methods x 2 seeds x 5 steps)."""

from __future__ import annotations

import dataclasses
import importlib
import io
import warnings

import matplotlib

matplotlib.use("Agg")  # the tests' own pyplot figures; the library itself never uses pyplot

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import is_color_like, to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text

import sgn_lab.optim
from sgn_lab.plots import (
    DEFAULT_COLUMNS,
    LOG_METRICS,
    METHOD_COLORS,
    METHODS,
    METRIC_LABELS,
    REFERENCE_COLOR,
    method_color,
    plot_metrics,
    plot_run,
    plot_spectra,
    plot_style,
    save_figure,
)
from sgn_lab.plots import measurements as plots
from sgn_lab.stats.curvature import CurvatureStats
from sgn_lab.stats.noise import NoiseStats

ALL_METHODS = tuple(sgn_lab.optim.METHODS)  # the registry: each one needs a colour
STEPS = (0, 100, 200, 300, 400)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_metrics(methods: tuple[str, ...] = ("sgd", "pnm"), seeds: tuple[int, ...] = (0, 1)):
    """Tidy metrics table as load_run gives it: one row per (method, seed, step)."""
    rng = np.random.default_rng(0)
    rows = []
    for i, method in enumerate(methods):
        for seed in seeds:
            for step in STEPS:
                t = step / STEPS[-1]
                trace = 10.0 * (1 + i) * np.exp(-2 * t) * rng.uniform(0.8, 1.2)
                grad_sq = 2.0 * np.exp(-3 * t) + 0.01
                rows.append(
                    {
                        "run": f"{method}-s{seed}",
                        "method": method,
                        "seed": seed,
                        "step": step,
                        "epoch": step / 100,
                        "lr": 0.1 if seed == 0 else 0.05,
                        "batch_size": 32,
                        "train_loss": 2.0 * np.exp(-t) + 0.05,
                        "test_loss": 2.1 * np.exp(-t) + 0.1,
                        "train_accuracy": 0.5 + 0.4 * t,
                        "test_accuracy": 0.45 + 0.4 * t + rng.normal(0, 0.01),
                        "trace": trace,
                        "grad_sq_norm": grad_sq,
                        "noise_scale": trace / grad_sq,
                        "minibatch_trace": trace / 32,
                        "noise_to_signal": trace / 32 / grad_sq,
                        "effective_rank": 5.0 + 10 * t + i + rng.uniform(0, 1),
                        "isotropic_effective_rank": 300.0 + rng.uniform(-5, 5),
                        "participation_ratio": 3.0 + 5 * t,
                        "stable_rank": 2.0 + 3 * t,
                        "top1_energy": 0.5 - 0.2 * t,
                        "powerlaw_exponent": 1.2 + 0.3 * i,
                        "tail_index": 1.8 + rng.uniform(-0.1, 0.1),
                    }
                )
    return pd.DataFrame(rows)


def make_spectra(methods: tuple[str, ...] = ("sgd", "pnm"), seeds: tuple[int, ...] = (0, 1)):
    """Power-law SGN spectra λ_k ∝ k^-s and the near-flat isotropic reference of equal trace."""
    rng = np.random.default_rng(1)
    k = np.arange(1, 41)
    parts = []
    for i, method in enumerate(methods):
        for seed in seeds:
            for step in STEPS:
                sgn = 5.0 * (1 + step / 400) * k ** -(1.1 + 0.4 * i) * rng.uniform(0.9, 1.1, k.size)
                iso = sgn.sum() / k.size * np.linspace(1.3, 0.7, k.size)
                for kind, values in (("sgn", sgn), ("isotropic", iso)):
                    parts.append(
                        pd.DataFrame(
                            {
                                "run": f"{method}-s{seed}",
                                "method": method,
                                "seed": seed,
                                "step": step,
                                "k": k,
                                "eigenvalue": values,
                                "kind": kind,
                            }
                        )
                    )
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def metrics() -> pd.DataFrame:
    return make_metrics()


@pytest.fixture(scope="module")
def spectra() -> pd.DataFrame:
    return make_spectra()


def legend_texts(fig: Figure) -> list[str]:
    assert len(fig.legends) == 1, "one figure legend expected"
    return [t.get_text() for t in fig.legends[0].get_texts()]


def solid_line_colors(ax) -> set[str]:
    return {to_hex(line.get_color()) for line in ax.get_lines() if line.get_linestyle() == "-"}


def check_written(paths, stem) -> None:
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
    png, pdf = paths
    assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert pdf.read_bytes()[:4] == b"%PDF"


# ------------------------------------------------------------------------------------------
# colours and labels


def test_method_colors_cover_all_methods_and_are_fixed():
    assert set(METHOD_COLORS) == set(ALL_METHODS) == set(METHODS)
    assert all(is_color_like(c) for c in METHOD_COLORS.values())
    assert len({to_hex(c) for c in METHOD_COLORS.values()}) == len(ALL_METHODS), "distinct"
    assert to_hex(REFERENCE_COLOR) not in {to_hex(c) for c in METHOD_COLORS.values()}
    for m in ALL_METHODS:
        assert method_color(m) == METHOD_COLORS[m]
    # names outside the table get a colour that does not change between calls
    assert method_color("my-method") == method_color("my-method")
    assert is_color_like(method_color("my-method"))


def test_same_method_same_colour_in_every_figure(spectra):
    fig_a = plot_metrics(make_metrics(("sgd", "pnm")), columns=("trace",))
    fig_b = plot_metrics(make_metrics(("pnm", "adam", "adaptive-hb")), columns=("trace",))
    colours_a = solid_line_colors(fig_a.axes[0])
    colours_b = solid_line_colors(fig_b.axes[0])
    assert colours_a == {to_hex(METHOD_COLORS[m]) for m in ("sgd", "pnm")}
    assert colours_b == {to_hex(METHOD_COLORS[m]) for m in ("pnm", "adam", "adaptive-hb")}
    # spectra panels are titled in the method's colour
    fig_s = plot_spectra(spectra)
    for ax in fig_s.axes:
        name = ax.get_title(loc="left")
        (title,) = [t for t in ax.get_children() if isinstance(t, Text) and t.get_text() == name]
        assert to_hex(title.get_color()) == to_hex(METHOD_COLORS[name])


def test_metric_labels_cover_the_stats_fields():
    scalar_fields = [
        f.name for f in dataclasses.fields(NoiseStats) if f.type in ("int", "float", int, float)
    ]
    assert "trace" in scalar_fields and "noise_scale" in scalar_fields
    names = [*scalar_fields, *(f.name for f in dataclasses.fields(CurvatureStats))]
    names += ["step", "epoch", "k", "eigenvalue", "update_trace", "test_accuracy", "train_loss"]
    missing = [n for n in names if n not in METRIC_LABELS]
    assert not missing, f"no axis label for {missing}"
    assert METRIC_LABELS["trace"] == "tr S (SGN trace)"
    assert METRIC_LABELS["noise_scale"] == "B_simple = tr S / |G|²"
    assert len(set(METRIC_LABELS.values())) == len(METRIC_LABELS), "one label per concept"
    assert LOG_METRICS <= set(METRIC_LABELS)


def test_every_label_renders_without_missing_glyphs():
    fig = Figure(figsize=(6, 14))
    ax = fig.subplots()
    for i, label in enumerate(METRIC_LABELS.values()):
        ax.text(0, i, label)
    ax.set_ylim(-1, len(METRIC_LABELS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font" is a UserWarning
        for fmt in ("png", "pdf"):
            fig.savefig(io.BytesIO(), format=fmt)


# ------------------------------------------------------------------------------------------
# plot_metrics


def test_plot_metrics_panels_labels_scales_and_legend(metrics):
    fig = plot_metrics(metrics)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == len(DEFAULT_COLUMNS) == 4
    expected_scale = {
        "trace": "log",
        "noise_scale": "log",
        "effective_rank": "log",
        "test_accuracy": "linear",
    }
    for ax, col in zip(fig.axes, DEFAULT_COLUMNS, strict=True):
        assert ax.get_xlabel() == METRIC_LABELS["step"] == "training step"
        assert ax.get_ylabel() == METRIC_LABELS[col]
        assert ax.get_yscale() == expected_scale[col], col
        # one mean line per method, in the method's colour, and a ±sd band per method (2 seeds)
        assert solid_line_colors(ax) == {to_hex(METHOD_COLORS[m]) for m in ("sgd", "pnm")}
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2, col
    texts = legend_texts(fig)
    assert texts[:2] == ["sgd", "pnm"]
    assert any("isotropic" in t for t in texts)
    assert fig.legends[0].get_title().get_text() == "method"


def test_mean_line_is_geometric_on_log_axis(metrics):
    fig = plot_metrics(metrics, columns=("trace",))
    ax = fig.axes[0]
    sgd = metrics[metrics["method"] == "sgd"]
    expected = np.exp(np.log(sgd["trace"]).groupby(sgd["step"]).mean())
    (line,) = [ln for ln in ax.get_lines() if to_hex(ln.get_color()) == METHOD_COLORS["sgd"]]
    np.testing.assert_allclose(line.get_xdata(), expected.index)
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy(), rtol=1e-10)


def test_effective_rank_panel_shows_isotropic_reference_dashed_grey(metrics):
    fig = plot_metrics(metrics, columns=("effective_rank",))
    ax = fig.axes[0]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 2  # one per method
    for ln in dashed:
        assert to_hex(ln.get_color()) == to_hex(REFERENCE_COLOR)
        assert np.all(ln.get_ydata() > 290)
    # without the reference column: no dashed line, no legend entry
    fig = plot_metrics(
        metrics.drop(columns="isotropic_effective_rank"), columns=("effective_rank",)
    )
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert not any("isotropic" in t for t in legend_texts(fig))


def test_missing_or_all_nan_column_is_skipped_with_a_note(metrics):
    table = metrics.drop(columns="noise_scale").assign(test_accuracy=np.nan)
    fig = plot_metrics(table)
    assert len(fig.axes) == 4
    by_col = dict(zip(DEFAULT_COLUMNS, fig.axes, strict=True))
    assert "'noise_scale' not in the table" in " ".join(
        t.get_text() for t in by_col["noise_scale"].texts
    )
    assert "no finite values" in " ".join(t.get_text() for t in by_col["test_accuracy"].texts)
    for col in ("noise_scale", "test_accuracy"):
        assert by_col[col].get_ylabel() == METRIC_LABELS[col]
        assert not by_col[col].get_lines()
    assert by_col["trace"].get_lines(), "the columns with data are still drawn"


def test_non_positive_values_on_log_axis_are_left_out_with_a_note(metrics):
    table = metrics.copy()
    table.loc[table.index[:3], "noise_scale"] = -1.0
    fig = plot_metrics(table, columns=("noise_scale",))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_title(loc="right") == "3 values ≤ 0 omitted"
    assert all(np.all(ln.get_ydata() > 0) for ln in ax.get_lines())


def test_other_hue_colours_by_level_and_styles_methods(metrics):
    fig = plot_metrics(metrics, columns=("trace", "test_accuracy"), hue="lr")
    texts = legend_texts(fig)
    assert texts[:2] == ["0.05", "0.1"]
    assert "method" in texts and "sgd" in texts and "pnm" in texts
    assert fig.legends[0].get_title().get_text() == METRIC_LABELS["lr"]
    assert len(fig.axes[0].get_lines()) == 4  # 2 lr x 2 methods


def test_epoch_axis_and_single_column_string(metrics):
    fig = plot_metrics(metrics, columns="trace", x="epoch")
    assert len(fig.axes) == 1
    assert fig.axes[0].get_xlabel() == METRIC_LABELS["epoch"]


def test_plot_metrics_bad_input(metrics):
    with pytest.raises(ValueError, match="empty"):
        plot_metrics(metrics.iloc[:0])
    with pytest.raises(ValueError, match="'step'"):
        plot_metrics(metrics.drop(columns="step"))
    with pytest.raises(ValueError, match="'method'"):
        plot_metrics(metrics.drop(columns="method"))
    with pytest.raises(ValueError, match="noise_scale") as err:
        plot_metrics(
            metrics.drop(columns=["trace", "noise_scale", "effective_rank"]).assign(
                test_accuracy=np.nan
            )
        )
    for col in DEFAULT_COLUMNS:
        assert col in str(err.value)
    with pytest.raises(ValueError, match="columns"):
        plot_metrics(metrics, columns=())
    with pytest.raises(TypeError, match="DataFrame"):
        plot_metrics(metrics.to_dict())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# plot_spectra


def test_plot_spectra_loglog_one_panel_per_method_default_steps(spectra):
    fig = plot_spectra(spectra)
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["sgd", "pnm"]
    for ax in fig.axes:
        assert ax.get_xscale() == ax.get_yscale() == "log"
        assert ax.get_xlabel() == METRIC_LABELS["k"] == "rank k"
        assert ax.get_ylabel() == METRIC_LABELS["eigenvalue"]
        solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(solid) == 3 and len(dashed) == 3  # first, middle, last step
        for ln in dashed:  # isotropic reference: grey
            r, g, b, _ = matplotlib.colors.to_rgba(ln.get_color())
            assert r == g == b
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 3
    texts = legend_texts(fig)
    assert texts[:3] == ["0", "200", "400"]
    assert any("isotropic" in t for t in texts)
    assert fig.legends[0].get_title().get_text() == "training step"


def test_plot_spectra_slope_is_the_power_law(spectra):
    fig = plot_spectra(spectra[spectra["method"] == "sgd"], steps=[100])
    (ax,) = fig.axes
    assert ax.get_title(loc="left") == "sgd"
    (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    slope = np.polyfit(np.log(line.get_xdata()), np.log(line.get_ydata()), 1)[0]
    assert slope == pytest.approx(-1.1, abs=0.05)
    assert legend_texts(fig)[0] == "100"


def test_plot_spectra_hue_method_single_panel(spectra):
    fig = plot_spectra(spectra, hue="method", steps=[0, 400])
    assert len(fig.axes) == 1
    assert solid_line_colors(fig.axes[0]) >= {to_hex(METHOD_COLORS["sgd"])}
    texts = legend_texts(fig)
    assert texts[:2] == ["sgd", "pnm"] and "training step" in texts


def test_plot_spectra_non_positive_eigenvalues_noted_in_their_panel(spectra):
    table = spectra.copy()
    bad = table.index[(table["method"] == "pnm") & (table["step"] == 0) & (table["k"] > 38)]
    table.loc[bad, "eigenvalue"] = 0.0  # 2 seeds x 2 kinds x k = 39, 40
    fig = plot_spectra(table)
    by_title = {ax.get_title(loc="left"): ax for ax in fig.axes}
    assert by_title["pnm"].get_title(loc="right") == "8 λ ≤ 0 or NaN omitted"
    assert by_title["sgd"].get_title(loc="right") == ""


def test_plot_spectra_bad_input(spectra):
    with pytest.raises(ValueError, match="999"):
        plot_spectra(spectra, steps=[999])
    with pytest.raises(ValueError, match="empty"):
        plot_spectra(spectra.iloc[:0])
    with pytest.raises(ValueError, match="'eigenvalue'"):
        plot_spectra(spectra.drop(columns="eigenvalue"))
    with pytest.raises(ValueError, match="sgn"):
        plot_spectra(spectra[spectra["kind"] == "isotropic"])
    with pytest.raises(ValueError, match="bogus"):
        plot_spectra(spectra.assign(kind="bogus"))


# ------------------------------------------------------------------------------------------
# files


def test_save_figure_writes_png_and_pdf_atomically(metrics, tmp_path):
    target = tmp_path / "a" / "b" / "fig"
    paths = save_figure(plot_metrics(metrics), target)
    assert all(p.parent == tmp_path / "a" / "b" for p in paths)
    check_written(paths, "fig")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["fig.pdf", "fig.png"]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    for p in paths:  # same permissions as any new file (umask), not mkstemp's 0o600
        assert p.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    image = mpimg.imread(paths[0])
    height, width = image.shape[:2]
    assert image.ndim == 3 and height > 300 and width > 500
    assert image.std() > 0.01, "not a blank image"


@pytest.mark.parametrize("name", ["fig.png", "fig.pdf", "fig.PNG"])
def test_save_figure_strips_png_pdf_suffix(tmp_path, name):
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([1, 3, 2])
    paths = save_figure(fig, tmp_path / name)
    check_written(paths, "fig")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]


def test_save_figure_keeps_other_suffixes_and_closes_pyplot_figures(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    paths = save_figure(fig, tmp_path / "fig.v2")
    assert [p.name for p in paths] == ["fig.v2.png", "fig.v2.pdf"]
    assert not plt.fignum_exists(fig.number)


def test_save_figure_failure_leaves_no_partial_or_temporary_file(metrics, tmp_path, monkeypatch):
    fig = plot_metrics(metrics, columns=("trace",))
    (tmp_path / "fig.pdf").write_bytes(b"%PDF old")
    original = Figure.savefig

    def failing_savefig(self, fname, *args, **kwargs):
        if kwargs.get("format") == "pdf":
            fname.write(b"%PDF half")
            raise RuntimeError("disk full")
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, tmp_path / "fig")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]
    assert (tmp_path / "fig.pdf").read_bytes() == b"%PDF old", "old file untouched"
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_run_writes_metrics_and_spectra(metrics, spectra, tmp_path):
    out = tmp_path / "run" / "plots"
    paths = plot_run(metrics, spectra, out)
    check_written(paths[:2], "metrics")
    check_written(paths[2:], "spectra")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    assert mpimg.imread(out / "spectra.png").shape[0] > 300


def test_plot_run_adds_optional_panels_and_tolerates_missing_spectra(
    metrics, tmp_path, monkeypatch
):
    saved = {}

    def record(fig, path):
        saved[path.name] = fig
        return [path]

    monkeypatch.setattr(plots, "save_figure", record)
    table = metrics.assign(update_trace=metrics["trace"] * 0.01, curvature_alignment=np.nan)
    assert plot_run(table, None, tmp_path) == [tmp_path / "metrics"]
    labels = [ax.get_ylabel() for ax in saved["metrics"].axes]
    assert labels == [METRIC_LABELS[c] for c in (*DEFAULT_COLUMNS, "update_trace")]
    assert plot_run(table, pd.DataFrame(), tmp_path) == [tmp_path / "metrics"]


def test_plot_run_bad_spectra_writes_nothing(metrics, spectra, tmp_path):
    with pytest.raises(ValueError, match="999"):
        plot_run(metrics, spectra, tmp_path / "out", steps=[999])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# style


def test_style_is_scoped_not_global(metrics, spectra, tmp_path):
    before = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    plot_metrics(metrics)
    plot_spectra(spectra)
    save_figure(plot_metrics(metrics, columns=("trace",)), tmp_path / "fig")
    with plot_style():
        assert matplotlib.rcParams["axes.facecolor"] == "white"
        assert matplotlib.rcParams["axes.grid"]
    after = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    assert after == before


def test_import_changes_no_rcparams():
    before = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    importlib.reload(plots)  # runs the module's import-time code again
    after = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    assert after == before
