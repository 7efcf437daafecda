"""The critical-batch figure: its config (quick and full), and a small quick figure end to end."""

from __future__ import annotations

import pandas as pd
import pytest

from sgn_lab import figures
from sgn_lab.figures import CONFIGS, read_figure_config


@pytest.fixture
def registered(monkeypatch):
    # The registry entry is added where the figures are listed; the recipe is tested here.
    monkeypatch.setitem(figures.FIGURES, "critical-batch", "critical_batch")


def test_config_has_quick_and_full_modes_with_a_transformer_in_full(registered):
    quick = read_figure_config(CONFIGS, "critical-batch", quick=True)
    full = read_figure_config(CONFIGS, "critical-batch", quick=False)
    assert quick["quick_sweep"] is True and full["quick_sweep"] is False
    assert list(quick["problems"]) == ["linreg", "mlp"]
    assert list(full["problems"]) == ["linreg", "mlp", "transformer"]


def test_recipe_writes_table_and_images(registered, tmp_path):
    from sgn_lab.figures import critical_batch

    config = read_figure_config(CONFIGS, "critical-batch", quick=True)
    # Smaller still: the test checks the plumbing; the sweep's science is tested in
    # tests/sweeps/test_critical_batch.py.
    config["problems"] = {
        "linreg": dict(grid=(1, 8, 64), repeats=3, bootstrap=200),
        "mlp": dict(grid=(8, 32, 128), repeats=2, bootstrap=200, lr_grid=(0.1, 0.4),
                    branch_steps=50, max_steps=400, probe_samples=64),
    }
    csv = critical_batch.make(config, tmp_path)
    for suffix in ("csv", "png", "pdf"):
        assert (tmp_path / f"critical-batch.{suffix}").is_file()
    table = pd.read_csv(csv)
    assert set(table["problem"]) == {"linreg", "mlp"}
    assert set(table["quantity"]) >= {"steps", "samples", "lr", "s_min", "e_min",
                                      "b_noise_fit", "b_simple"}
    with pytest.raises(ValueError, match="at least one entry in 'problems'"):
        critical_batch.make({**config, "problems": {}}, tmp_path)


def test_an_interrupted_figure_keeps_the_problems_it_finished(registered, tmp_path,
                                                              monkeypatch):
    from sgn_lab.figures import critical_batch, measure

    config = {"name": "critical-batch", "seed": 0, "quick_sweep": True, "problems": {
        "linreg": dict(grid=(1, 8, 64), repeats=3, bootstrap=200),
        "mlp": dict(grid=(8, 32, 128), repeats=2, bootstrap=200, lr_grid=(0.1, 0.4),
                    branch_steps=50, max_steps=400, probe_samples=64)}}
    real, ran = measure.run_config, []

    def interrupted(c, **kwargs):
        ran.append(c.problem)
        if c.problem == "mlp" and len(ran) == 2:
            raise KeyboardInterrupt  # stopped during the second problem
        return real(c, **kwargs)

    monkeypatch.setattr(measure, "run_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        critical_batch.make(config, tmp_path)
    kept = pd.read_csv(tmp_path / "sweeps" / "critical-batch-linreg.csv")
    assert not (tmp_path / "sweeps" / "critical-batch-mlp.json").exists()
    # The rerun runs only what was not finished, and its table holds the kept one as it was.
    critical_batch.make(config, tmp_path)
    assert ran == ["linreg", "mlp", "mlp"]
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir()) == [
        "critical-batch-linreg.csv", "critical-batch-linreg.json", "critical-batch-mlp.csv",
        "critical-batch-mlp.json"]  # the finished sweeps' states are gone
    table = pd.read_csv(tmp_path / "critical-batch.csv")
    pd.testing.assert_frame_equal(
        table[table["problem"] == "linreg"].drop(columns="problem").reset_index(drop=True),
        kept)
    # Other settings of a problem run it again.
    config["problems"]["linreg"] = dict(grid=(1, 8, 64), repeats=3, bootstrap=100)
    critical_batch.make(config, tmp_path)
    assert ran == ["linreg", "mlp", "mlp", "linreg"]
