"""The layers figure: its config, the tracking statistics, and a small run end to end."""

import math

import numpy as np
import pandas as pd
import pytest

import sgn_lab.figures as figures
from sgn_lab.figures import CONFIGS, read_figure_config
from sgn_lab.run.config import parse
from sgn_lab.run.rundir import load_run

pytest.importorskip("transformers", reason="the hf extra is not installed")


@pytest.fixture
def registered(monkeypatch):
    """The figure registered as `sgn-lab figures` will have it."""
    monkeypatch.setattr(figures, "FIGURES", {**figures.FIGURES, "layers": "layers"})


def test_quick_and_full_configs_parse_and_measure_layers(registered):
    quick = read_figure_config(CONFIGS, "layers", quick=True)
    full = read_figure_config(CONFIGS, "layers", quick=False)
    assert quick != full and quick["group"] == full["group"] == "layernorm"
    for config in (quick, full):
        run = parse({**config["run"], "name": "x"})
        assert "layers" in run.probe.instruments and run.model.name == "gpt2"


def test_tracking_of_a_part_proportional_to_the_total():
    steps = [0, 10, 20, 30]
    total = np.array([1.0, 2.0, 8.0, 4.0])
    rows = []
    for i, step in enumerate(steps):
        rows.append({"step": step, "name": "total", "kind": "total", "noise_scale": total[i]})
        rows.append({"step": step, "name": "layernorm", "kind": "group",
                     "noise_scale": 3 * total[i]})
        rows.append({"step": step, "name": "fc", "kind": "module",
                     "noise_scale": [5.0, math.nan, 1.0, 2.0][i]})
    from sgn_lab.figures.layers import tracking

    table = tracking(pd.DataFrame(rows))
    group = table[table["name"] == "layernorm"]
    np.testing.assert_allclose(group["ratio_to_total"], 3.0)
    np.testing.assert_allclose(group["log_correlation"], 1.0)
    np.testing.assert_allclose(group["median_ratio"], 3.0)
    assert (group["steps_compared"] == 4).all()
    fc = table[table["name"] == "fc"].iloc[0]
    assert fc["steps_compared"] == 3  # the NaN step is left out
    x, y = np.log([5.0, 1.0, 2.0]), np.log([1.0, 8.0, 4.0])
    assert fc["log_correlation"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert fc["ratio_min"] == pytest.approx(1 / 8) and fc["ratio_max"] == 5


def small(config):
    # The quick config, smaller still: the test checks the plumbing, not the science.
    config["run"].update(steps=20, measure_every=10, probe_samples=16, width=16, depth=1,
                         batch_size=8, task_options={"context": 8, "n": 200})
    return config


def test_quick_figure_end_to_end_is_deterministic(registered, tmp_path):
    from sgn_lab.figures import layers

    config = small(read_figure_config(CONFIGS, "layers", quick=True))
    csv = layers.make(config, tmp_path / "a")
    for suffix in ("png", "pdf"):
        assert (tmp_path / "a" / f"layers.{suffix}").stat().st_size > 0
    table = pd.read_csv(csv)
    run = load_run(tmp_path / "a" / "runs" / "layers")
    assert run.complete and len(table) == len(run.layers)
    assert sorted(table["step"].unique()) == [0, 10, 20]
    group = table[(table["kind"] == "group") & (table["name"] == "layernorm")]
    assert len(group) == 3 and group["steps_compared"].iloc[0] <= 3
    assert {"ratio_to_total", "log_correlation", "median_ratio"} <= set(table.columns)
    again = layers.make(small(read_figure_config(CONFIGS, "layers", quick=True)),
                        tmp_path / "b")
    assert again.read_bytes() == csv.read_bytes()


def test_a_run_without_the_layers_instrument_is_named(registered, tmp_path):
    from sgn_lab.figures import layers

    config = small(read_figure_config(CONFIGS, "layers", quick=True))
    config["run"].update(instruments=["sgn"], steps=0)
    with pytest.raises(ValueError, match="add 'layers' to its instruments"):
        layers.make(config, tmp_path)
