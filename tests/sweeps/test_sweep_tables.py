"""What `sgn-lab scaling` prints (sgn_lab.sweeps.tables): the table's cells and the advice
when a best lr lies at an end of the lr grid, from hand-made sweep tables.

(Not test_tables.py: tests/run/ has one, and test folders are not packages.)"""

from __future__ import annotations

import math

import pandas as pd

from sgn_lab.sweeps import COLUMNS
from sgn_lab.sweeps.tables import lr_edge_advice, scaling_table

NAN = math.nan


def _sweep(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (quantity, x, measured, ci_low, ci_high, theory, rel_error)."""
    return pd.DataFrame([("critical-batch", row[1], row[0], *row[2:]) for row in rows],
                        columns=list(COLUMNS))


def test_scaling_table_shows_a_symmetric_ci_as_half_width_and_a_bootstrap_ci_as_its_ends():
    table = scaling_table("critical-batch", _sweep([
        ("steps", 4.0, 1.5, 1.3, 1.7, 1.6, -0.07),          # symmetric: ± half-width
        ("b_noise_fit", NAN, 36.15, 33.2, 38.7, 23.62, 0.53),  # bootstrap: [low, high]
        ("branch_loss", NAN, 0.01521, NAN, NAN, NAN, NAN),  # no CI, no theory
    ]))
    assert table.title == "critical-batch sweep: measured ± 95% CI half-width against theory"
    assert [(c.header, c.align) for c in table.columns] == [
        ("quantity", "left"), ("x", "right"), ("measured", "right"), ("theory", "right"),
        ("rel. error", "right")]
    assert table.rows == (
        ("steps", "4", "1.5 ± 0.2", "1.6", "-7.0%"),
        ("b_noise_fit", "–", "36.15 [33.2, 38.7]", "23.62", "+53.0%"),
        ("branch_loss", "–", "0.01521", "–", "–"),
    )


GRID = (0.2, 0.316, 0.5)


def _lr_rows(chosen: dict[float, float]) -> pd.DataFrame:
    """A critical-batch table's lr rows: the chosen lr per batch size, and the grid's ends."""
    rows = [("lr", b, lr, NAN, NAN, NAN, NAN) for b, lr in chosen.items()]
    rows += [("lr_grid_low", NAN, min(GRID), NAN, NAN, NAN, NAN),
             ("lr_grid_high", NAN, max(GRID), NAN, NAN, NAN, NAN)]
    return _sweep(rows)


def test_lr_edge_advice_names_the_batch_sizes_and_a_grid_two_steps_wider_at_each_end():
    table = _lr_rows({1: 0.2, 2: 0.2, 4: 0.316, 8: 0.5, 16: 0.5})
    # Grid ratio √2.5: two steps below 0.2 is 0.08, two above 0.5 is 1.25; 3 + 2·2 points.
    assert lr_edge_advice(table, GRID, {"repeats": 3}) == [
        "warning: at B = 1, 2 the best lr is the lowest of lr_grid: S there is an upper bound "
        "and B_noise_fit biased; extend lr_grid below it",
        "warning: at B = 8, 16 the best lr is the highest of lr_grid: S there is an upper "
        "bound and B_noise_fit biased; extend lr_grid above it",
        "rerun with --options repeats=3,lr_grid=0.08:1.25:7 (or a figure config's problem "
        "options)",
    ]


def test_lr_edge_advice_widens_only_the_end_that_was_chosen():
    table = _lr_rows({1: 0.316, 64: 0.5})
    given = {"lr_grid": GRID, "problem": "mlp"}
    assert lr_edge_advice(table, GRID, given) == [
        "warning: at B = 64 the best lr is the highest of lr_grid: S there is an upper bound "
        "and B_noise_fit biased; extend lr_grid above it",
        "rerun with --options lr_grid=0.2:1.25:5,problem=mlp (or a figure config's problem "
        "options)",
    ]


def test_lr_edge_advice_is_empty_when_every_best_lr_is_inside_the_grid():
    assert lr_edge_advice(_lr_rows({1: 0.316, 2: 0.316}), GRID, {}) == []
