"""Shared by the recipes: measurement runs from a figure's config, reused when complete."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sgn_lab.results import Run, load_run
from sgn_lab.train import RunConfig, run_measurement


def figure_run(
    out: Path,
    name: str,
    settings: dict[str, Any],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Run:
    """Run (or resume, or reuse) the measurement run ``out/runs/<name>`` and load it.

    ``settings`` are :class:`RunConfig` fields. A complete run with the same settings is
    reused as it is, so re-making a figure (or another figure sharing the run) costs nothing,
    and an interrupted one continues where it stopped.
    """
    path = out / "runs" / name
    config = RunConfig.from_dict({"device": "cpu", **settings})
    if (path / "config.json").is_file():
        saved = load_run(path).config
        if any(saved.get(k) != v for k, v in config.to_dict().items()):
            raise ValueError(
                f"{path} holds a run with other settings; remove it or choose another --out"
            )
    run_measurement(config, path, resume=True, progress=progress)
    return load_run(path)


def figure_runs(
    out: Path,
    name: str,
    settings: dict[str, dict[str, Any]],
    *,
    progress: Callable[[int, int], None] | None = None,
):
    """Every run of ``settings`` (label -> RunConfig fields): metrics and spectra, labelled.

    Returns (metrics, spectra, final) where ``final`` holds the last measurement of each run;
    each table has a ``setting`` column with the label.
    """
    import pandas as pd

    metrics, spectra = [], []
    for index, (label, fields) in enumerate(settings.items()):
        run = figure_run(out, f"{name}-{label}", fields)
        metrics.append(run.metrics.assign(setting=label))
        spectra.append(run.spectra.assign(setting=label))
        if progress is not None:
            progress(index + 1, len(settings))
    metrics = pd.concat(metrics, ignore_index=True)
    spectra = pd.concat(spectra, ignore_index=True)
    final = metrics.sort_values("step", kind="stable").groupby("setting", sort=False).tail(1)
    return metrics, spectra, final.reset_index(drop=True)


def expand(config: dict[str, Any], key: str = "grid") -> dict[str, dict[str, Any]]:
    """Settings from a config: ``base`` fields, overridden per label by ``config[key]``."""
    base = config.get("base", {})
    return {label: {**base, **fields} for label, fields in config[key].items()}
