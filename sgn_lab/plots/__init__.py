"""Seaborn figures: one style, one colour per method.

``style``         colours, axis labels, the rcParams context, atomic PNG/PDF saving
``measurements``  metrics over training, spectra, the figures of a run (``sgn-lab plot``)
``layers``        per-layer noise scales
``sweeps``        theory against measurement (``sgn-lab scaling``)

Computation modules never import this package.
"""

from sgn_lab.plots.measurements import plot_metrics, plot_run, plot_spectra
from sgn_lab.plots.style import (
    DEFAULT_COLUMNS,
    LOG_METRICS,
    METHOD_COLORS,
    METHODS,
    METRIC_LABELS,
    REFERENCE_COLOR,
    method_color,
    metric_label,
    plot_style,
    save_figure,
)
from sgn_lab.plots.sweeps import plot_scaling

__all__ = [
    "DEFAULT_COLUMNS",
    "LOG_METRICS",
    "METHODS",
    "METHOD_COLORS",
    "METRIC_LABELS",
    "REFERENCE_COLOR",
    "metric_label",
    "method_color",
    "plot_metrics",
    "plot_run",
    "plot_scaling",
    "plot_spectra",
    "plot_style",
    "save_figure",
]
