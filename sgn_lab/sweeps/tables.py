"""What ``sgn-lab scaling`` prints of a sweep's table, as plain text: the table itself
(:func:`scaling_table`) and, for critical-batch, the advice when a best lr lies at an end of
the lr grid (:func:`lr_edge_advice`)."""

from __future__ import annotations

from typing import Any

from sgn_lab.run.tables import MISSING, Column, TextTable
from sgn_lab.sweeps.config import format_sweep_options
from sgn_lab.sweeps.critical import lr_at_edge


def scaling_table(sweep: str, table: Any) -> TextTable:
    """A sweep's table (:data:`sgn_lab.sweeps.COLUMNS`, as :func:`sgn_lab.sweeps.run_sweep`
    gives it): per row the quantity, its x, the measured value with its 95% CI, the theory
    and the relative error. The CI shows as "± half-width" where it is symmetric, as
    "[low, high]" where it is not (a bootstrap CI), not at all where there is none."""
    rows = tuple(
        (str(row["quantity"]), _number(row["x"]),
         _measured(row["measured"], row["ci_low"], row["ci_high"]), _number(row["theory"]),
         f"{row['rel_error']:+.1%}" if row["rel_error"] == row["rel_error"] else MISSING)
        for _, row in table.iterrows())
    columns = (Column("quantity", "left"),
               *(Column(c) for c in ("x", "measured", "theory", "rel. error")))
    return TextTable(f"{sweep} sweep: measured ± 95% CI half-width against theory", columns,
                     rows)


def _number(value: float) -> str:
    return f"{value:.4g}" if value == value else MISSING


def _measured(centre: float, low: float, high: float) -> str:
    text = f"{centre:.4g}"
    if low != low:  # NaN: a value without a CI
        return text
    # Relative tolerance: a normal CI is centre ± half-width up to rounding.
    symmetric = abs((high - centre) - (centre - low)) <= 1e-9 * abs(high - low)
    return text + (f" ± {(high - low) / 2:.2g}" if symmetric else f" [{low:.3g}, {high:.3g}]")


def lr_edge_advice(table: Any, lr_grid: tuple[float, ...], given: dict[str, Any]) -> list[str]:
    """The warnings on a critical-batch table: one per end of ``lr_grid`` that was some batch
    size's best lr (S there is only an upper bound), then the ``--options`` (``given``, the
    options the sweep ran with) of a grid two of its steps wider at each such end. Empty
    when every best lr is inside the grid."""
    edges = lr_at_edge(table)
    lines = []
    for end in ("low", "high"):
        at = [f"{b:g}" for b, side in edges if side == end]
        if at:
            lines.append(
                f"warning: at B = {', '.join(at)} the best lr is the {end}est of lr_grid: S "
                f"there is an upper bound and B_noise_fit biased; extend lr_grid "
                f"{'below' if end == 'low' else 'above'} it")
    if edges:
        low, high, count = min(lr_grid), max(lr_grid), len(lr_grid)
        ratio = (high / low) ** (1 / (count - 1)) if count > 1 else 2.0
        sides = {side for _, side in edges}
        low = low / ratio**2 if "low" in sides else low
        high = high * ratio**2 if "high" in sides else high
        wider = {**given, "lr_grid": f"{low:.4g}:{high:.4g}:{count + 2 * len(sides)}"}
        lines.append(f"rerun with --options {format_sweep_options(wider)} (or a figure "
                     "config's problem options)")
    return lines
