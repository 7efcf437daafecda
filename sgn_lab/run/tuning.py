"""A fair comparison of methods: each at its best setting of a grid, chosen on a validation split.

The protocol of optimizer benchmarks (DeepOBS, Schneider et al. 2019; AlgoPerf), in three steps:

1. *Tuning.* Every method runs at every point of its grid (the Cartesian product of its grids'
   values, e.g. a log-spaced learning-rate grid) with the first seed, for the same budget, with
   a validation split carved from the training set (``validation_fraction`` > 0).
2. *Selection.* Per method, the point with the best validation metric at the final measurement
   is chosen: lowest ``val_loss`` or highest ``val_accuracy`` (a tie in accuracy goes to the
   lower ``val_loss``); on an exact tie the first point in grid order. Runs that diverged and
   points whose metric is not finite are never chosen. Test metrics are never read.
3. *Evaluation.* The chosen setting runs at every seed (the first seed's run is the tuning run
   itself) and its final test metrics are summarised over the seeds.

Every run is an ordinary run directory under ``root`` (:func:`sgn_lab.run.loop.run_series`),
so a killed sweep resumes: complete runs are kept, an interrupted one continues. The records
``tuning.csv``, ``tuned.json`` and ``summary.csv`` are rebuilt from the run directories every
time, and a run is deterministic under its seed, so a resumed sweep makes the same choice.
"""

from __future__ import annotations

import itertools
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sgn_lab.checks import log_spaced, parse_value
from sgn_lab.optim import METHODS, matched_lr
from sgn_lab.run.config import (
    FIELDS,
    HYPERPARAMETERS,
    OptimizerSection,
    RunConfig,
    method_spec_text,
    parse,
)
from sgn_lab.run.loop import Notify, Progress, run_series
from sgn_lab.run.rundir import load_run, writable_dir, write_json, write_table

TUNING_FILE = "tuning.csv"
TUNED_FILE = "tuned.json"
SUMMARY_FILE = "summary.csv"
SELECT = ("auto", "val_loss", "val_accuracy")
TUNABLE = ("lr", *HYPERPARAMETERS)
# Final-measurement columns summarised over seeds (those a run has), after the setting.
SUMMARY_METRICS = ("test_loss", "test_accuracy", "train_accuracy", "generalization_gap",
                   "trace", "effective_rank", "hessian_top_eigenvalue")
GRID_FORMS = "KEY=LOW:HIGH:COUNT or KEY=v1,v2,... (e.g. lr=1e-3:1:7)"


@dataclass(frozen=True)
class Grid:
    """The values of one hyperparameter to try, for every method (``method`` None) or one.

    ``log``: the values are a log-spaced range (``LOW:HIGH:COUNT``), whose ends one may extend
    when the best point lies on one of them.
    """

    key: str
    values: tuple[Any, ...]
    method: str | None = None
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """One method's chosen setting.

    ``setting`` holds the chosen value of each of its grid keys; ``value`` the validation
    ``metric`` there; ``at_edge`` maps each log-spaced key whose choice is an end of its grid
    to ``"low"`` or ``"high"`` (empty: inside every grid); ``config`` is the chosen run's
    config at the first seed.
    """

    label: str
    method: str
    setting: dict[str, Any]
    metric: str
    value: float
    at_edge: dict[str, str]
    grid: dict[str, tuple[Any, ...]]
    config: RunConfig


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` wrote: the validation ``metric`` it chose by, one :class:`Choice` per
    method, the tuning table (``tuning.csv``), the summary over seeds (``summary.csv``), and
    the chosen runs, every method at every seed (method by method, seeds in order)."""

    metric: str
    choices: tuple[Choice, ...]
    tuning: pd.DataFrame
    summary: pd.DataFrame
    runs: tuple[Path, ...]


def parse_grid(text: str, *, where: str = "grid") -> Grid:
    """``lr=1e-3:1:7`` (7 log-spaced points from 1e-3 to 1, both included), ``beta0=0.5,1,2``
    (these values), ``adam.lr=1e-5:1e-2:7`` (for adam only) -> :class:`Grid`.

    ``where`` names the text in messages (``"--tune"``). Every error is one ValueError line.
    """
    shown = f"{where} {text!r}"
    name, eq, spec = (part.strip() for part in text.partition("="))
    if not eq or not name or not spec:
        raise ValueError(f"{shown}: write {GRID_FORMS}")
    method, dot, key = name.rpartition(".")
    if dot and method not in METHODS:
        raise ValueError(f"{shown}: unknown method {method!r}; choose one of "
                         f"{', '.join(METHODS)}")
    if key not in TUNABLE:
        raise ValueError(f"{shown}: {key!r} is no hyperparameter of a method; choose one of "
                         f"{', '.join(TUNABLE)}")
    if dot and key != "lr" and key not in METHODS[method].settings:
        raise ValueError(f"{shown}: method {method!r} takes no {key}")
    log = ":" in spec
    values = _log_values(key, spec, shown) if log else tuple(
        _value(key, item.strip(), shown) for item in spec.split(","))
    if len(set(values)) < len(values):
        raise ValueError(f"{shown}: a value repeats"
                         f"{' (rounded to integers)' if log else ''}")
    if key == "lr" and min(values) <= 0:
        raise ValueError(f"{shown}: a learning rate must be positive, got {min(values)}")
    return Grid(key, values, method if dot else None, log)


def parse_grids(texts: Sequence[str], *, where: str = "grid") -> tuple[Grid, ...]:
    """Several grids (:func:`parse_grid`); one key given twice for the same methods is an
    error."""
    grids = tuple(parse_grid(text, where=where) for text in texts)
    seen = set()
    for grid in grids:
        if (grid.method, grid.key) in seen:
            name = f"{grid.method}.{grid.key}" if grid.method else grid.key
            raise ValueError(f"{where}: {name} is given twice")
        seen.add((grid.method, grid.key))
    return grids


def _kind(key: str) -> type:
    """float, int or str (a Literal): the type of an optimizer key."""
    annotation = OptimizerSection.model_fields[key].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return next((k for k in (float, int) if k in args), str)


def _value(key: str, text: str, shown: str) -> Any:
    """One explicit grid value, as the key's type."""
    value, kind = parse_value(text), _kind(key)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float and number and math.isfinite(value):
        return float(value)
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is str and text:
        return text
    what = {float: "a finite number", int: "an integer", str: "a value"}[kind]
    raise ValueError(f"{shown}: {key} takes {what}, got {text!r}")


def _log_values(key: str, spec: str, shown: str) -> tuple[Any, ...]:
    """COUNT log-spaced points from LOW to HIGH (:func:`sgn_lab.checks.log_spaced`), rounded
    for an integer key."""
    if _kind(key) is str:
        raise ValueError(f"{shown}: {key} takes names; list them as {key}=a,b")
    values = log_spaced(spec, shown=shown, forms=GRID_FORMS)
    return tuple(round(v) for v in values) if _kind(key) is int else values


def method_grids(grids: Sequence[Grid], method: str) -> dict[str, Grid]:
    """The grids that apply to ``method``, by key, in the order given: a grid of its own
    (``METHOD.KEY``) replaces the all-methods grid of that key; keys the method does not take
    are skipped (lr applies to every method)."""
    takes = ("lr", *METHODS[method].settings)
    chosen: dict[str, Grid] = {}
    for grid in grids:
        if grid.key not in takes or grid.method not in (None, method):
            continue
        if grid.method is None and grid.key in chosen:
            continue  # the method's own grid came first
        chosen[grid.key] = grid
    return chosen


def check_lr_sources(specs: Sequence[dict[str, Any]], flags: dict[str, Any],
                     grids: Sequence[Grid], match_step: float | None) -> None:
    """Refuse a hyperparameter set twice in ``compare``: each has one source, a method spec
    (:func:`~sgn_lab.run.config.parse_method_spec`), a flag (``flags``: None where not given),
    a grid of ``--tune`` or, for lr, ``--match-step``."""
    if match_step is not None:
        if not (match_step > 0 and match_step < float("inf")):
            raise ValueError(f"--match-step must be a positive learning rate, got {match_step}")
        if flags.get("lr") is not None:
            raise ValueError("--match-step sets every lr: drop --lr")
        if any(g.key == "lr" for g in grids):
            raise ValueError("--match-step and --tune of lr both set the lr: choose one")
    for grid in grids:
        if grid.method is None and flags.get(grid.key) is not None:
            raise ValueError(f"--tune {grid.key} and --{grid.key.replace('_', '-')} both set "
                             f"{grid.key}: choose one")
    for spec in specs:
        if match_step is not None and "lr" in spec:
            raise ValueError(f"--match-step sets every lr: drop lr from "
                             f"{method_spec_text(spec)!r}")
        if spec["method"] not in METHODS:
            continue  # named by the config's own check
        tuned = [k for k in method_grids(grids, spec["method"]) if k in spec]
        if tuned:
            raise ValueError(f"--tune sets {tuned[0]} of {spec['method']}: drop it from "
                             f"{method_spec_text(spec)!r}")


def with_values(config: RunConfig, **values: Any) -> RunConfig:
    """``config`` with some flat keys set (``lr=0.01``, ``seed=1``), validated again."""
    data = config.model_dump()
    for flat, value in values.items():
        section, key = FIELDS[flat]
        data[section][key] = value
    return parse(data)


def matched_config(config: RunConfig, eta: float) -> RunConfig:
    """``config`` with the lr at which its method takes the mean step of SGD at lr ``eta``
    (:func:`sgn_lab.optim.matched_lr`, with the method's resolved hyperparameters)."""
    opt = config.resolved().optimizer
    return with_values(config, lr=matched_lr(opt.method, eta, opt.settings()))


@dataclass(frozen=True)
class _Plan:
    """One method spec's grid and the configs of its points, in grid order (first seed)."""

    label: str
    grids: dict[str, Grid]
    points: tuple[dict[str, Any], ...]
    configs: tuple[RunConfig, ...]


def _plans(configs: Sequence[RunConfig], grids: Sequence[Grid], *, seed: int,
           match_step: float | None) -> list[_Plan]:
    """Every method's grid points as configs, all validated before any run starts."""
    methods = [c.optimizer.method for c in configs]
    for grid in grids:
        name = f"{grid.method}.{grid.key}" if grid.method else grid.key
        if grid.method is not None and grid.method not in methods:
            raise ValueError(f"grid {name}: method {grid.method!r} is not among those compared "
                             f"({', '.join(dict.fromkeys(methods))})")
        if not any(method_grids([grid], m) for m in methods):
            raise ValueError(f"grid {name}: no method compared takes {grid.key}")
        if match_step is not None and grid.key == "lr":
            raise ValueError(f"grid {name}: the learning rates are set by the matched step "
                             f"{match_step}; tune other keys, or drop the matched step")
    plans = []
    for config in configs:
        if config.task.validation_fraction == 0:
            raise ValueError("tuning chooses on a validation split: set validation_fraction "
                             "> 0 (e.g. 0.2)")
        own = method_grids(grids, config.optimizer.method)
        reset = {key: OptimizerSection.model_fields[key].default for key in own}
        if match_step is not None:
            reset["lr"] = OptimizerSection.model_fields["lr"].default
        label = with_values(config, **reset).label  # the spec, without what is tuned
        points = tuple(dict(zip(own, values, strict=True))
                       for values in itertools.product(*(g.values for g in own.values())))
        point_configs = []
        for point in points:
            point_config = with_values(config, **point, seed=seed)
            if match_step is not None:
                point_config = matched_config(point_config, match_step)
            point_configs.append(point_config)
        plans.append(_Plan(label, own, points, tuple(point_configs)))
    labels = [p.label for p in plans]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"two method specs are the same once tuned: {twice[0]!r}; drop one")
    return plans


def tune(
    configs: Sequence[RunConfig],
    grids: Sequence[Grid],
    *,
    seeds: Sequence[int],
    root: str | Path,
    select: str = "auto",
    match_step: float | None = None,
    resume: bool = True,
    progress: Callable[[RunConfig], Progress | None] | None = None,
    done: Progress | None = None,
    notify: Notify | None = None,
) -> TuneResult:
    """Tune each method on its grid, choose on the validation split, run the choice at every
    seed; write ``tuning.csv``, ``tuned.json`` and ``summary.csv`` into ``root``.

    ``configs``: one per method spec (their seeds are replaced by ``seeds``), each with
    ``validation_fraction`` > 0. ``grids`` (:func:`parse_grids`): what to tune; a method takes
    the grids of the keys it has. ``select``: ``val_loss`` (lowest wins), ``val_accuracy``
    (highest wins) or ``auto`` (``val_accuracy`` when the task has one, else ``val_loss``).
    ``match_step``: each point's lr is :func:`matched_config`'s for this SGD lr (then lr is not
    tuned). ``resume``, ``progress``, ``notify`` as for :func:`run_series`;
    ``done(runs done, runs)`` counts the tuning runs and then the other seeds' runs.
    A method none of whose points is usable (all diverged, or no finite metric) is an error
    naming it, raised after ``tuning.csv`` is written.
    """
    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {select!r}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if not configs:
        raise ValueError("no method to tune")
    plans = _plans(configs, grids, seed=seeds[0], match_step=match_step)
    root = writable_dir(root)
    tuning_configs = [c for plan in plans for c in plan.configs]
    total = len(tuning_configs) + len(plans) * (len(seeds) - 1)

    def counted(offset: int) -> Progress | None:
        return None if done is None else lambda i, _: done(offset + i, total)

    run_series(tuning_configs, root, resume=resume, progress=progress, done=counted(0),
               notify=notify, on_divergence="record")
    table = tuning_table(plans, root)
    metric = choose_metric(table, select)
    choices, missing = _choose(plans, table, metric)
    write_table(root / TUNING_FILE, table)
    if missing:
        raise ValueError(f"no usable grid point for {missing[0]!r}: every run diverged or "
                         f"has no finite {metric} (see {root / TUNING_FILE}); change its grid")
    write_json(root / TUNED_FILE, tuned_record(choices, select=select, metric=metric,
                                               seeds=seeds))
    finals = [with_values(c.config, seed=s) for c in choices for s in seeds[1:]]
    # The first seed's runs are the tuning runs themselves: already complete.
    run_series(finals, root, resume=resume, progress=progress,
               done=counted(len(tuning_configs)), notify=notify, on_divergence="record")
    runs = tuple(root / with_values(c.config, seed=s).run_name for c in choices for s in seeds)
    summary = summarize(choices, seeds, root)
    write_table(root / SUMMARY_FILE, summary)
    return TuneResult(metric, tuple(choices), table, summary, runs)


def _final(path: Path) -> tuple[dict[str, Any], str | None]:
    """The final measurement of a run (empty without one) and its divergence message."""
    run = load_run(path)
    metrics = run.metrics
    row = {} if metrics.empty else metrics.sort_values("step").iloc[-1].to_dict()
    return row, run.diverged


def tuning_table(plans: Sequence[_Plan], root: Path) -> pd.DataFrame:
    """One row per method and grid point, in grid order, from the run directories: the
    method (spec label), the grid keys, seed, run, the final measurement's step, val_loss,
    val_accuracy and train_loss, the divergence message ("" when none), selected (False)."""
    rows = []
    keys = _keys(plan.grids for plan in plans)
    for plan in plans:
        for point, config in zip(plan.points, plan.configs, strict=True):
            final, diverged = _final(root / config.run_name)
            rows.append({
                "method": plan.label, **point, "lr": config.optimizer.lr,
                "seed": config.training.seed, "run": config.run_name,
                **{k: final.get(k, math.nan)
                   for k in ("step", "val_loss", "val_accuracy", "train_loss")},
                "diverged": diverged or "", "selected": False,
            })
    return pd.DataFrame(rows, columns=["method", *keys, "seed", "run", "step", "val_loss",
                                       "val_accuracy", "train_loss", "diverged", "selected"])


def _keys(grids: Any) -> list[str]:
    """The grid keys of all methods, in the order first met, and lr (always a column)."""
    keys = [key for own in grids for key in own]
    return list(dict.fromkeys([*keys, "lr"]))


def choose_metric(table: pd.DataFrame, select: str) -> str:
    """The validation column to choose by: ``select`` itself, or for ``auto`` val_accuracy
    when any tuning run has a finite one (a classification task), else val_loss."""
    accuracy = pd.to_numeric(table["val_accuracy"], errors="coerce").notna().any()
    if select == "auto":
        return "val_accuracy" if accuracy else "val_loss"
    if select == "val_accuracy" and not accuracy:
        raise ValueError("select val_accuracy: no tuning run has a validation accuracy (a "
                         "regression task?); select val_loss")
    return select


def select_point(rows: pd.DataFrame, metric: str) -> int | None:
    """The position (in ``rows``) of the best usable row by ``metric``, or None.

    Lowest val_loss or highest val_accuracy wins. Accuracies on a validation set of n samples
    move in steps of 1/n, so they tie often: a tie in accuracy goes to the lower val_loss, and
    an exact tie after that to the first row (grid order). A row with a divergence message or
    a non-finite metric is never chosen. Only validation columns are read: test metrics cannot
    influence the choice.
    """
    best, best_key = None, (math.inf, math.inf)
    for position, (_, row) in enumerate(rows.iterrows()):
        diverged, value = row["diverged"], float(row[metric])
        if (isinstance(diverged, str) and diverged) or not math.isfinite(value):
            continue
        if metric == "val_accuracy":
            loss = float(row["val_loss"])
            key = (-value, loss if math.isfinite(loss) else math.inf)
        else:
            key = (value, 0.0)
        if key < best_key:
            best, best_key = position, key
    return best


def _choose(plans: Sequence[_Plan], table: pd.DataFrame, metric: str
            ) -> tuple[list[Choice], list[str]]:
    """Each method's choice (:func:`select_point`), marked ``selected`` in ``table``, and the
    methods without a usable point."""
    choices, missing = [], []
    for plan in plans:
        rows = table[table["method"] == plan.label]
        best = select_point(rows, metric)
        if best is None:
            missing.append(plan.label)
            continue
        table.loc[rows.index[best], "selected"] = True
        choices.append(_choice(plan, best, metric, float(rows[metric].iloc[best])))
    return choices, missing


def _choice(plan: _Plan, best: int, metric: str, value: float) -> Choice:
    point = plan.points[best]
    at_edge = {key: "low" if point[key] == grid.values[0] else "high"
               for key, grid in plan.grids.items()
               if grid.log and point[key] in (grid.values[0], grid.values[-1])}
    config = plan.configs[best]
    return Choice(plan.label, config.optimizer.method, dict(point), metric, value, at_edge,
                  {k: g.values for k, g in plan.grids.items()}, config)


def tuned_record(choices: Sequence[Choice], *, select: str, metric: str,
                 seeds: Sequence[int]) -> dict[str, Any]:
    """``tuned.json``: per method its chosen setting, lr, validation metric and value, the
    keys at an edge of their grid, the grid, and the chosen run (names relative to the root)."""
    return {
        "select": select, "metric": metric, "seeds": list(seeds),
        "methods": {c.label: {
            "method": c.method, "chosen": c.setting, "lr": c.config.optimizer.lr,
            "metric": c.metric, "value": c.value, "at_edge": c.at_edge,
            "grid": {k: list(v) for k, v in c.grid.items()}, "run": c.config.run_name,
        } for c in choices},
    }


def summarize(choices: Sequence[Choice], seeds: Sequence[int], root: str | Path
              ) -> pd.DataFrame:
    """Per method: its chosen setting and lr, the number of seeds summarised and of those left
    out because they diverged, then the mean and sd over seeds of each final-measurement
    column of :data:`SUMMARY_METRICS` the runs have (``generalization_gap``: train − test
    accuracy)."""
    rows = []
    for choice in choices:
        finals = [_final(Path(root) / with_values(choice.config, seed=s).run_name)
                  for s in seeds]
        kept = pd.DataFrame([row for row, diverged in finals if diverged is None])
        if {"train_accuracy", "test_accuracy"} <= set(kept.columns):
            kept["generalization_gap"] = kept["train_accuracy"] - kept["test_accuracy"]
        row: dict[str, Any] = {"method": choice.label, **choice.setting,
                               "lr": choice.config.optimizer.lr, "seeds": len(kept),
                               "diverged": len(finals) - len(kept)}
        for column in SUMMARY_METRICS:
            if column in kept.columns:
                values = pd.to_numeric(kept[column], errors="coerce")
                row[f"{column}_mean"], row[f"{column}_sd"] = values.mean(), values.std()
        rows.append(row)
    frame = pd.DataFrame(rows)
    head = ["method", *_keys(c.grid for c in choices), "seeds", "diverged"]
    return frame[head + [c for c in frame.columns if c not in head]]
