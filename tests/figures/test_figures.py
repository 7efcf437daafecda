"""Paper figures: configs, one quick figure end to end, and the analysis notebook."""

from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from sgn_lab.figures import CONFIGS, FIGURES, make_figure, read_figure_config
from sgn_lab.run.rundir import load_run

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"  # the analysis notebook


def test_every_figure_has_a_config_with_quick_and_full_modes():
    for name in FIGURES:
        quick = read_figure_config(CONFIGS, name, quick=True)
        full = read_figure_config(CONFIGS, name, quick=False)
        assert quick["mode"] == "quick" and full["mode"] == "full" and quick != full


def test_unknown_figure_and_missing_config_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown figure 'nope'"):
        read_figure_config(CONFIGS, "nope", quick=True)
    with pytest.raises(FileNotFoundError, match="spectrum.toml"):
        read_figure_config(tmp_path, "spectrum", quick=True)


def make_small_spectrum(out):
    # The quick config, made smaller still: the tests check the plumbing, not the science.
    config = read_figure_config(CONFIGS, "spectrum", quick=True)
    config["run"].update(steps=40, measure_every=20, probe_samples=32, width=16)
    from sgn_lab.figures import spectrum

    spectrum.make(config, out)
    return out


@pytest.fixture(scope="module")
def spectrum_figure(tmp_path_factory):
    return make_small_spectrum(tmp_path_factory.mktemp("figures"))


def test_a_figure_is_deterministic_under_its_seed(spectrum_figure, tmp_path):
    again = make_small_spectrum(tmp_path)
    assert (again / "spectrum.csv").read_bytes() == (spectrum_figure / "spectrum.csv").read_bytes()


def test_spectrum_figure_writes_table_and_images(spectrum_figure):
    for suffix in ("csv", "png", "pdf"):
        assert (spectrum_figure / f"spectrum.{suffix}").stat().st_size > 0
    run = load_run(spectrum_figure / "runs" / "spectrum")
    assert run.complete and list(run.metrics["step"]) == [0, 20, 40]


def test_make_figure_reuses_a_complete_run_and_refuses_other_settings(spectrum_figure):
    with pytest.raises(ValueError, match="other settings"):
        make_figure("spectrum", spectrum_figure, experiments=CONFIGS, quick=True)


def test_analysis_notebook_runs_on_quick_data(spectrum_figure, monkeypatch):
    monkeypatch.setenv("SGN_LAB_FIGURES", str(spectrum_figure))
    notebook = nbformat.read(EXPERIMENTS / "analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(spectrum_figure)}}).execute()
    outputs = "".join(
        o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", [])
    )
    assert "spectrum" in outputs and "effective_rank" in outputs


# Every other recipe end to end, on its quick config made tiny: the plumbing from config to
# runs to table to image, and the quantities the table derives from the runs.

TINY_RUN = {"width": 8, "steps": 4, "measure_every": 2, "probe_samples": 16,
            "update_repeats": 3}


def tiny_config(name, **edits):
    return {**read_figure_config(CONFIGS, name, quick=True), **edits}


def assert_images(out, name):
    for suffix in ("png", "pdf"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0


def test_large_batch_figure_scales_update_noise_by_lr(tmp_path):
    import pandas as pd

    from sgn_lab.figures import large_batch

    config = tiny_config("large-batch")
    config["base"] = {**config["base"], **TINY_RUN}
    csv = large_batch.make(config, tmp_path)
    table = pd.read_csv(csv)
    assert_images(tmp_path, "large-batch")
    final = table[table["k"].isna()].set_index("setting")
    assert list(final.index) == list(config["grid"])
    lr = config["base"]["lr"]
    assert (final["noise_trace"] * lr**2).to_numpy() == pytest.approx(
        final["update_trace"].to_numpy(), rel=1e-12)
    # The spectrum rows are the final update-noise eigenvalues over lr²: summed, the trace.
    spectrum = table[table["k"].notna()].groupby("setting")["noise_eigenvalue"].sum()
    assert spectrum.loc[list(final.index)].to_numpy() == pytest.approx(
        final["noise_trace"].to_numpy(), rel=1e-6)


def test_methods_figure_runs_each_method_at_its_tuned_lr(tmp_path):
    import pandas as pd

    from sgn_lab.figures import methods

    config = tiny_config("methods", seeds=[0, 1], tune=["lr=0.01,0.3"])
    config["tasks"] = {task: {**fields, **TINY_RUN, "measure_every": 4}
                       for task, fields in config["tasks"].items()}
    config["methods"] = {m: config["methods"][m] for m in ("sgd", "pnm")}
    table = pd.read_csv(methods.make(config, tmp_path))
    tuning = pd.read_csv(tmp_path / "methods-tuning.csv")
    assert_images(tmp_path, "methods")
    tasks = len(config["tasks"])
    assert len(table) == tasks * 2 * 2 and len(tuning) == tasks * 2 * 2
    assert set(table["method"]) == {"sgd", "pnm"} and set(table["seed"]) == {0, 1}
    assert table["generalization_gap"].to_numpy() == pytest.approx(
        (table["train_accuracy"] - table["test_accuracy"]).to_numpy())
    assert table[["hessian_top_eigenvalue", "trace", "effective_rank"]].notna().all().all()
    # One choice per task and method: the best validation accuracy of its grid (the lower
    # validation loss on a tie is the recipe's rule; here the check only needs the maximum),
    # and every seed's run at that lr.
    for (task, method), rows in tuning.groupby(["task", "method"]):
        assert rows["selected"].sum() == 1
        chosen = rows[rows["selected"]]
        assert float(chosen["value"].iloc[0]) == rows["value"].max()
        runs = table[(table["task"] == task) & (table["method"] == method)]
        assert set(runs["lr"]) == {float(chosen["lr"].iloc[0])}


def test_symmetric_figure_has_each_method_at_each_batch_size(tmp_path):
    import pandas as pd

    from sgn_lab.figures import symmetric

    config = tiny_config("symmetric", batch_sizes=[8, 32])
    config["base"] = {**config["base"], **TINY_RUN, "measure_every": 4}
    table = pd.read_csv(symmetric.make(config, tmp_path))
    assert_images(tmp_path, "symmetric")
    assert sorted(zip(table["method"], table["batch_size"], strict=True)) == [
        ("sgd", 8), ("sgd", 32), ("symmetric", 8), ("symmetric", 32)]
    assert (table["step"] == 4).all() and table["hessian_top_eigenvalue"].notna().all()


def test_tails_figure_has_one_row_per_step_and_minibatch_size(tmp_path):
    import pandas as pd

    from sgn_lab.figures import tails

    config = tiny_config("tails")
    config["run"] = {**config["run"], **TINY_RUN, "shape_draws": 32}
    sizes = sorted(config["run"]["shape_batch_sizes"])
    assert sizes[0] == 1 and sizes[-1] >= TINY_RUN["probe_samples"]  # some B are too large
    table = pd.read_csv(tails.make(config, tmp_path))
    assert_images(tmp_path, "tails")
    assert list(table.columns)[-5:] == ["batch_size", *tails.SHAPE]
    assert list(zip(table["step"], table["batch_size"], strict=True)) == [
        (step, b) for step in (0, 2, 4) for b in sizes]
    # A B not below the 16 probe samples is NaN; the others are measured.
    measured = table["batch_size"] < TINY_RUN["probe_samples"]
    assert table.loc[measured, list(tails.SHAPE)].notna().all().all()
    assert table.loc[~measured, list(tails.SHAPE)].isna().all().all()
    # The table is the run's tail_index_b<B>, ... columns, reshaped.
    metrics = load_run(tmp_path / "runs" / "tails").metrics.set_index("step")
    for row in table[measured].itertuples():
        for column in tails.SHAPE:
            assert getattr(row, column) == pytest.approx(
                metrics.loc[row.step, f"{column}_b{row.batch_size}"], rel=1e-12)


def test_tails_table_needs_the_minibatch_tails_columns():
    import pandas as pd

    from sgn_lab.figures import tails

    with pytest.raises(ValueError, match="add 'minibatch-tails'"):
        tails.tidy(pd.DataFrame({"step": [0], "tail_index": [1.5]}))


@pytest.mark.parametrize("name, options", [
    ("batch", {"repeats": 20, "draws": 4}),
    ("beta0", {"repeats": 8, "burn_in": 10, "steps": 20}),
])
def test_scaling_figures_carry_theory_next_to_measurement(name, options, tmp_path):
    import pandas as pd

    from sgn_lab.figures import scaling_sweeps

    # The sweeps' agreement with theory is tested in test_scaling; here only the recipe.
    config = tiny_config(name, options=options)
    table = pd.read_csv(scaling_sweeps.make(config, tmp_path))
    assert_images(tmp_path, name)
    assert {"x", "quantity", "measured", "theory"} <= set(table.columns)
    assert table["theory"].notna().any() and table["measured"].notna().all()


def test_a_kept_sweep_reads_back_as_it_was_run(tmp_path, monkeypatch):
    from sgn_lab.figures import measure

    options = dict(repeats=200, grid=(0.0, 0.1))
    table = measure.figure_sweep(tmp_path, "s", "sigma", quick=True, seed=3, options=options)
    monkeypatch.setattr(measure, "run_config", lambda *a, **k: pytest.fail("ran again"))
    again = measure.figure_sweep(tmp_path, "s", "sigma", quick=True, seed=3, options=options)
    pd.testing.assert_frame_equal(again, table)  # every value, NaN and dtype, read back
    for change in (dict(seed=4, options=options), dict(seed=3, options={**options,
                                                                         "repeats": 201})):
        with pytest.raises(pytest.fail.Exception, match="ran again"):
            measure.figure_sweep(tmp_path, "s", "sigma", quick=True, **change)
