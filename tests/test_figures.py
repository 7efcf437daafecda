"""Paper figures: configs, one quick figure end to end, and the analysis notebook."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from sgn_lab.figures import FIGURES, make_figure, read_figure_config
from sgn_lab.results import load_run

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_every_figure_has_a_config_with_quick_and_full_modes():
    for name in FIGURES:
        quick = read_figure_config(EXPERIMENTS, name, quick=True)
        full = read_figure_config(EXPERIMENTS, name, quick=False)
        assert quick["mode"] == "quick" and full["mode"] == "full" and quick != full


def test_unknown_figure_and_missing_config_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown figure 'nope'"):
        read_figure_config(EXPERIMENTS, "nope", quick=True)
    with pytest.raises(FileNotFoundError, match="spectrum.toml"):
        read_figure_config(tmp_path, "spectrum", quick=True)


def make_small_spectrum(out):
    # The quick config, made smaller still: the tests check the plumbing, not the science.
    config = read_figure_config(EXPERIMENTS, "spectrum", quick=True)
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
        make_figure("spectrum", spectrum_figure, experiments=EXPERIMENTS, quick=True)


def test_analysis_notebook_runs_on_quick_data(spectrum_figure, monkeypatch):
    monkeypatch.setenv("SGN_LAB_FIGURES", str(spectrum_figure))
    notebook = nbformat.read(EXPERIMENTS / "analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(spectrum_figure)}}).execute()
    outputs = "".join(
        o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", [])
    )
    assert "spectrum" in outputs and "effective_rank" in outputs
