"""Shared by the recipes: a figure's measurement runs, through the one loop of sgn_lab.run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from sgn_lab.run.config import RunConfig, parse
from sgn_lab.run.loop import run_series
from sgn_lab.run.rundir import Run, load_run, write_json, write_table
from sgn_lab.sweeps import run_config, sweep_config
from sgn_lab.version import __version__


def figure_configs(name: str, settings: dict[str, dict[str, Any]], *, nproc: int = 1,
                   parallel: str = "ddp") -> dict[str, RunConfig]:
    """Label -> the config of run ``<name>-<label>`` from its flat fields (on the CPU), each
    data-parallel over ``nproc`` processes (``parallel``: "ddp" or "fsdp")."""
    return {label: parse({"device": "cpu", **fields, **_processes(nproc, parallel),
                          "name": f"{name}-{label}"})
            for label, fields in settings.items()}


def _processes(nproc: int, parallel: str) -> dict[str, Any]:
    """The config fields of the processes: none for one (a run's config names its own)."""
    return {"nproc": nproc, **({"parallel": parallel} if nproc > 1 else {})}


def figure_run(out: Path, name: str, settings: dict[str, Any], *,
               progress: Callable[[int, int], None] | None = None, nproc: int = 1,
               parallel: str = "ddp") -> Run:
    """The run ``out/runs/<name>`` with ``settings`` (flat config fields) over ``nproc``
    processes (``parallel``: "ddp" or "fsdp"), loaded."""
    config = parse({"device": "cpu", **settings, **_processes(nproc, parallel), "name": name})
    path, = run_series([config], out / "runs",
                       progress=(lambda c: progress) if progress else None)
    return load_run(path)


def figure_runs(out: Path, name: str, settings: dict[str, dict[str, Any]], *,
                progress: Callable[[int, int], None] | None = None, nproc: int = 1,
                parallel: str = "ddp"):
    """Every run of ``settings`` (label -> flat config fields): metrics and spectra, labelled.

    Runs live in ``out/runs/<name>-<label>``: a complete run with the same config is reused, an
    interrupted one resumed, one with other settings an error (:func:`run_series`). Returns
    (metrics, spectra, final) where ``final`` holds the last measurement of each run; each table
    has a ``setting`` column with the label.
    """
    configs = figure_configs(name, settings, nproc=nproc, parallel=parallel)
    paths = run_series(list(configs.values()), out / "runs",
                       done=progress if progress else None)
    runs = [load_run(p) for p in paths]
    metrics = pd.concat([r.metrics.assign(setting=label) for label, r in zip(configs, runs,
                                                                              strict=True)],
                        ignore_index=True)
    spectra = pd.concat([r.spectra.assign(setting=label) for label, r in zip(configs, runs,
                                                                              strict=True)],
                        ignore_index=True)
    final = metrics.sort_values("step", kind="stable").groupby("setting", sort=False).tail(1)
    return metrics, spectra, final.reset_index(drop=True)


def figure_sweep(out: Path, label: str, sweep: str, *, quick: bool, seed: int,
                 options: dict[str, Any], progress: Callable[[int, int], None] | None = None
                 ) -> pd.DataFrame:
    """The table of sweep ``sweep`` with these settings, kept as ``out/sweeps/<label>.csv``.

    The table is written when the sweep finishes, then its config (``<label>.json``, the
    :class:`sgn_lab.sweeps.SweepConfig` and the sgn-lab version): a later call with the same
    config reads it back instead of running the sweep again, so an interrupted ``sgn-lab
    figures`` keeps every sweep it finished. Within a sweep, ``critical-batch`` keeps each
    batch size as it finishes (``<label>.state``, see :func:`sgn_lab.sweeps.run_sweep`). Other
    settings run the sweep and replace all of them.
    """
    config = sweep_config(sweep, quick=quick, seed=seed, **options)
    record = {"sgn_lab": __version__, **config.to_dict()}
    folder = out / "sweeps"
    csv, meta, state = (folder / f"{label}{suffix}" for suffix in (".csv", ".json", ".state"))
    if csv.is_file() and meta.is_file() and json.loads(meta.read_text()) == record:
        return pd.read_csv(csv)
    table = run_config(config, progress=progress, state_file=state)
    write_table(csv, table)
    write_json(meta, record)  # last: a config file means its table is complete
    state.unlink(missing_ok=True)
    return table


def expand(config: dict[str, Any], key: str = "grid") -> dict[str, dict[str, Any]]:
    """Settings from a config: ``base`` fields, overridden per label by ``config[key]``."""
    base = config.get("base", {})
    return {label: {**base, **fields} for label, fields in config[key].items()}
