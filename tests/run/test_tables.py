"""The summary tables of measure and compare (sgn_lab.run.tables): cells of hand-made
metrics, every format checked as text."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from sgn_lab.run.tables import (
    Column,
    TextTable,
    measure_table,
    seeds_table,
    tuned_summary_table,
    tuning_table,
)

NAN = math.nan


def _headers(table: TextTable) -> tuple[str, ...]:
    return tuple(c.header for c in table.columns)


def test_measure_table_shows_the_quantities_a_run_has_with_the_jackknife_error():
    metrics = pd.DataFrame({
        "step": [0, 10],
        "noise_scale": [12.345, 8.0],
        "noise_scale_se": [4.2, NAN],
        "trace": [NAN, 0.001234],
        "test_accuracy": [0.5, 0.75],
        "train_loss": [1.0, 0.5],  # not a summary column: left out
    })
    table = measure_table(metrics, "over training")
    assert table.title == "over training"
    # The order of SUMMARY_COLUMNS, not of the DataFrame.
    assert _headers(table) == ("step", "test acc", "tr S", "B_simple")
    assert {c.align for c in table.columns} == {"right"}
    assert table.rows == (
        ("0", "0.500", "–", "12.3 ± 4.2"),
        ("10", "0.750", "0.00123", "8"),  # no error: no "±"
    )


def test_seeds_table_averages_the_final_measurement_over_seeds():
    rows = [  # run, label, step, test_accuracy, trace
        ("sgd-s0", "sgd", 0, 0.1, 9.0), ("sgd-s0", "sgd", 4, 0.4, 1.0),
        ("sgd-s1", "sgd", 4, 0.6, 3.0), ("sgd-s1", "sgd", 0, 0.2, 9.0),
        ("pnm-s0", "pnm", 4, 0.7, NAN),
    ]
    metrics = pd.DataFrame(rows, columns=["run", "label", "step", "test_accuracy", "trace"])
    table = seeds_table(metrics, [0, 1])
    assert table.title == "final measurement, mean ± sd over seeds 0,1"
    assert _headers(table) == ("run", "test acc", "tr S")
    assert table.columns[0] == Column("run", "left", wrap=True)
    # sgd: final steps 0.4 and 0.6 -> 0.5 ± 0.141; pnm: one seed (no sd), no trace at all.
    assert table.rows == (
        ("sgd", "0.500 ± 0.141", "2 ± 1.41"),
        ("pnm", "0.700", "–"),
    )


def _tuning_result() -> SimpleNamespace:
    tuning = pd.DataFrame({
        "method": ["sgd", "sgd", "pnm", "pnm"],
        "lr": [0.1, 1.0, 0.1, 0.1],
        "beta0": [NAN, NAN, 0.5, 2.0],
        "seed": [3, 3, 3, 3],
        "val_loss": [0.0123456, NAN, 0.5, 0.25],
        "val_accuracy": [0.9, 0.1, 0.5, 0.6],
        "diverged": ["", "loss is nan at step 7", "", ""],
        "selected": [True, False, False, True],
    })
    summary = pd.DataFrame({
        "method": ["sgd", "pnm"], "lr": [0.1, 0.1], "beta0": [NAN, 2.0],
        "seeds": [2, 2], "diverged": [0, 1],
        "test_loss_mean": [0.123456, 0.5], "test_loss_sd": [0.01, NAN],
        "test_accuracy_mean": [NAN, NAN], "test_accuracy_sd": [NAN, NAN],
        "trace_mean": [2.5, NAN], "trace_sd": [0.25, NAN],
    })
    choices = (SimpleNamespace(setting={"lr": 0.1}),
               SimpleNamespace(setting={"lr": 0.1, "beta0": 2.0}))
    return SimpleNamespace(metric="val_loss", tuning=tuning, summary=summary, choices=choices)


def test_tuning_table_marks_diverged_points_and_each_methods_choice():
    table = tuning_table(_tuning_result())
    assert table.title == "tuning at seed 3: val_loss at the final measurement"
    # The optimizer's keys only (not seed), then the metric and the choice.
    assert _headers(table) == ("method", "lr", "beta0", "val_loss", "chosen")
    assert [c.align for c in table.columns] == ["left", "right", "right", "right", "right"]
    assert table.rows == (
        ("sgd", "0.1", "–", "0.01235", "✓"),
        ("sgd", "1", "–", "diverged", ""),
        ("pnm", "0.1", "0.5", "0.5", ""),
        ("pnm", "0.1", "2", "0.25", "✓"),
    )


def test_tuned_summary_table_shows_the_chosen_settings_mean_and_sd_over_seeds():
    table = tuned_summary_table(_tuning_result(), [0, 1])
    assert table.title == ("chosen settings (by val_loss): final measurement, mean ± sd over "
                           "seeds 0,1 (1 diverged runs left out)")
    # test acc is measured nowhere: left out.
    assert _headers(table) == ("method", "lr", "beta0", "test loss", "tr S")
    assert table.rows == (
        ("sgd", "0.1", "–", "0.1235 ± 0.01", "2.5 ± 0.25"),
        ("pnm", "0.1", "2", "0.5", "–"),
    )


def test_tuned_summary_title_without_diverged_runs_says_nothing_of_them():
    result = _tuning_result()
    result.summary["diverged"] = 0
    assert tuned_summary_table(result, [4]).title.endswith("over seeds 4")


def test_a_row_must_have_a_cell_per_column():
    with pytest.raises(ValueError, match="a row of 1 cells in a table of 2 columns"):
        TextTable("t", (Column("a"), Column("b")), (("x",),))

