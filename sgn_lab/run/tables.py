"""The summary tables that ``sgn-lab measure`` and ``compare`` print, as plain text.

Each function turns a run's metrics (a pandas DataFrame, as :func:`sgn_lab.run.load_run`
gives it) or a :class:`sgn_lab.run.TuneResult` into a :class:`TextTable`: a title, columns
and rows of formatted strings, nothing else. Drawing it (a terminal table, Markdown, ...) is
the caller's; the CLI draws them with rich. Light: no torch, no pandas import, no rich.

Cells: a missing value (NaN) is "–"; an estimate with an error is "value ± error", both in
the column's format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sgn_lab.run.config import FIELDS

if TYPE_CHECKING:
    from sgn_lab.run.tuning import TuneResult

MISSING = "–"
"""The cell of a value that is not there (NaN): a run without that instrument, say."""

ColumnSpec = tuple[str, str, str]
"""(metrics column, header, format): one quantity of a summary table."""

SUMMARY_COLUMNS: tuple[ColumnSpec, ...] = (
    ("step", "step", "{:.0f}"),
    ("test_accuracy", "test acc", "{:.3f}"),
    ("trace", "tr S", "{:.3g}"),
    ("noise_scale", "B_simple", "{:.3g}"),
    ("effective_rank", "rank", "{:.1f}"),
    ("isotropic_effective_rank", "iso", "{:.0f}"),
    ("powerlaw_exponent", "s", "{:.2f}"),
    ("tail_index", "α", "{:.2f}"),
    ("update_trace", "update tr", "{:.3g}"),
)
"""The quantities of :func:`measure_table` and :func:`seeds_table`, those a run has. rank/iso:
effective rank of the SGN and of isotropic noise of equal trace; s: power-law exponent; α:
tail index; update tr: tr Cov[Δθ], the per-step update noise of the optimizer."""

ERRORS: dict[str, str] = {"noise_scale": "noise_scale_se"}
"""Metrics column -> the column of its jackknife standard error, shown as "± error" by
:func:`measure_table`."""

TUNED_COLUMNS: tuple[ColumnSpec, ...] = (
    ("test_loss", "test loss", "{:.4g}"),
    ("test_accuracy", "test acc", "{:.3f}"),
    ("train_accuracy", "train acc", "{:.3f}"),
    ("generalization_gap", "gap", "{:.3f}"),
    ("trace", "tr S", "{:.3g}"),
    ("effective_rank", "rank", "{:.1f}"),
    ("hessian_top_eigenvalue", "λ_max", "{:.3g}"),
)
"""The quantities of :func:`tuned_summary_table`: ``summary.csv``'s ``<column>_mean`` and
``<column>_sd``, those measured in at least one row."""


@dataclass(frozen=True)
class Column:
    """A column's header and alignment; ``wrap``: its cells may break over lines where the
    table is wider than the screen (the others are cut short instead)."""

    header: str
    align: Literal["left", "right"] = "right"
    wrap: bool = False


@dataclass(frozen=True)
class TextTable:
    """A table as plain strings: a title, its columns, and rows of one cell per column."""

    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"a row of {len(row)} cells in a table of "
                                 f"{len(self.columns)} columns: {row!r}")


def _estimate(value: float, error: float, fmt: str) -> str:
    """``value ± error`` in the format ``fmt``; "–" for a missing value, no "± ..." for a
    missing error."""
    if value != value:  # NaN
        return MISSING
    return fmt.format(value) + (f" ± {fmt.format(error)}" if error == error else "")


def measure_table(metrics: Any, title: str) -> TextTable:
    """One run over training: a row per measurement (its metrics DataFrame), a column per
    quantity of :data:`SUMMARY_COLUMNS` it has, B_simple ± its jackknife standard error."""
    present = [spec for spec in SUMMARY_COLUMNS if spec[0] in metrics.columns]
    rows = tuple(
        tuple(_estimate(row[key], row.get(ERRORS.get(key, ""), float("nan")), fmt)
              for key, _, fmt in present)
        for _, row in metrics.iterrows())
    return TextTable(title, tuple(Column(header) for _, header, _ in present), rows)


def seeds_table(metrics: Any, seeds: Sequence[int]) -> TextTable:
    """Runs of several seeds (their metrics, as :func:`sgn_lab.run.load_runs` gives them):
    the final measurement of each run, mean ± sd over the seeds, a row per label."""
    final = metrics.sort_values("step").groupby("run").tail(1)
    shown = [spec for spec in SUMMARY_COLUMNS if spec[0] in final and spec[0] != "step"]
    summary = final.groupby("label", sort=False)[[key for key, _, _ in shown]].agg(
        ["mean", "std"])
    rows = tuple(
        (str(label), *(_estimate(row[(key, "mean")], row[(key, "std")], fmt)
                       for key, _, fmt in shown))
        for label, row in summary.iterrows())
    # The label may wrap on a narrow screen: the numbers keep their line.
    columns = (Column("run", "left", wrap=True), *(Column(header) for _, header, _ in shown))
    return TextTable(f"final measurement, mean ± sd over seeds {_seeds(seeds)}", columns, rows)


def tuning_table(result: TuneResult) -> TextTable:
    """Every grid point of every method of ``compare --tune`` (``tuning.csv``): its
    hyperparameters, the validation metric at the final measurement ("diverged" for a run
    that diverged), and ✓ at each method's chosen point."""
    tuning, metric = result.tuning, result.metric
    keys = [key for key in tuning.columns
            if key != "method" and key in FIELDS and FIELDS[key][0] == "optimizer"]
    rows = []
    for _, row in tuning.iterrows():
        value = row[metric]
        shown = "diverged" if row["diverged"] else f"{value:.4g}" if value == value else MISSING
        rows.append((str(row["method"]), *(_grid_value(row[key]) for key in keys), shown,
                     "✓" if row["selected"] else ""))
    title = (f"tuning at seed {int(tuning['seed'].iloc[0])}: {metric} at the final "
             "measurement")
    columns = (Column("method", "left"), *(Column(c) for c in (*keys, metric, "chosen")))
    return TextTable(title, columns, tuple(rows))


def tuned_summary_table(result: TuneResult, seeds: Sequence[int]) -> TextTable:
    """Each method of ``compare --tune`` at its chosen setting (``summary.csv``): its lr and
    other chosen hyperparameters, then the final measurement's :data:`TUNED_COLUMNS` as
    mean ± sd over the seeds; the title counts the diverged runs left out."""
    summary = result.summary
    shown = [spec for spec in TUNED_COLUMNS if f"{spec[0]}_mean" in summary
             and summary[f"{spec[0]}_mean"].notna().any()]
    keys = list(dict.fromkeys(k for c in result.choices for k in c.setting if k != "lr"))
    rows = tuple(
        (str(row["method"]), f"{row['lr']:g}", *(_grid_value(row[key]) for key in keys),
         *(_estimate(row[f"{key}_mean"], row[f"{key}_sd"], fmt) for key, _, fmt in shown))
        for _, row in summary.iterrows())
    left_out = int(summary["diverged"].sum())
    title = (f"chosen settings (by {result.metric}): final measurement, mean ± sd over seeds "
             f"{_seeds(seeds)}" + (f" ({left_out} diverged runs left out)" if left_out else ""))
    columns = (Column("method", "left"),
               *(Column(c) for c in ("lr", *keys, *(header for _, header, _ in shown))))
    return TextTable(title, columns, rows)


def _grid_value(value: Any) -> str:
    """A hyperparameter's value in a grid: floats as ``:g``, "–" where a method does not
    take the key (NaN), anything else as it is."""
    if isinstance(value, float):
        return MISSING if value != value else f"{value:g}"
    return str(value)


def _seeds(seeds: Sequence[int]) -> str:
    return ",".join(map(str, seeds))
