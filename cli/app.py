"""The `sgn-lab` command: thin commands over the library.

Commands import the library's heavy modules (torch, pandas, ...) in their bodies: the options
and their help come from light registries (the config's schema, the task and method names), so
that ``sgn-lab --help`` loads no torch (tests/cli/test_light_help.py).
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sgn_lab.data.catalog import DataWarning, task_help
from sgn_lab.figures import FIGURES, MEASURED
from sgn_lab.run.config import FIELDS, SECTIONS, help_text
from sgn_lab.run.tables import (
    TextTable,
    measure_table,
    seeds_table,
    tuned_summary_table,
    tuning_table,
)
from sgn_lab.sweeps.config import SWEEP_HELP

app = typer.Typer(
    help="Measure stochastic gradient noise (SGN) in PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: "[task]" is a TOML table, not markup
)
console = Console()
# soft_wrap: an error stays one line however long, so scripts can grep it.
err_console = Console(stderr=True, soft_wrap=True)

Opt = typer.Option


@app.callback()
def _root() -> None:
    """Measure stochastic gradient noise (SGN) in PyTorch models."""


def run_options(*, skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """One option per config key (:data:`sgn_lab.run.config.FIELDS`), added to a command.

    The options are defined once, with their types and help texts, by the config's schema;
    ``measure`` and ``compare`` share them. Their values reach the command's ``**flags``
    (None: not given).
    """

    def add(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
        for flat, (section, key) in FIELDS.items():
            if flat in skip:
                continue
            annotation = _option_type(SECTIONS[section].model_fields[key].annotation)
            declared = (f"--{flat.replace('_', '-')}/--no-{flat.replace('_', '-')}"
                        if annotation is bool else f"--{flat.replace('_', '-')}")
            params.append(inspect.Parameter(
                flat, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=Annotated[annotation | None, Opt(declared, help=_help(flat))]))
        command.__signature__ = signature.replace(parameters=params)
        return command

    return add


def _help(flat: str) -> str:
    """An option's help: the config schema's, but --task's from the data registry, so that
    every file task (jsonl:PATH, hfdata:DIR, ...) is listed with its options."""
    return task_help() if flat == "task" else help_text(flat)


def _option_type(annotation: Any) -> type:
    """The CLI type of a config field: its type without None; Literal, tuples and dicts as
    str (``a,b`` and ``k=v,k=v``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _option_type(args[0])
    if typing.get_origin(annotation) in (typing.Literal, tuple, dict):
        return str
    return annotation


def _config(config_file: Path | None, flags: dict[str, Any], *,
            defaults: dict[str, Any] | None = None):
    """Defaults ← ``defaults`` of the command ← a TOML config file ← the flags given (None:
    not given), validated once."""
    from sgn_lab.checks import parse_options
    from sgn_lab.run.config import parse, read_file

    data = read_file(config_file) if config_file is not None else {}
    given = {k: v for k, v in flags.items() if v is not None}
    for flat, value in given.items():
        annotation = SECTIONS[FIELDS[flat][0]].model_fields[FIELDS[flat][1]].annotation
        kind = typing.get_origin(annotation)
        if kind is tuple and isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
            if typing.get_args(annotation)[0] is int:
                items = _parse_ints(flat.replace("_", "-"), value)
            given[flat] = items
        elif kind is dict and isinstance(value, str):
            given[flat] = (parse_options(value, where=f"--{flat.replace('_', '-')}")
                           if value else {})
    return parse({**(defaults or {}), **data, **given})


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    )


def _advance(progress: Progress, name: str) -> Callable[[int, int], None]:
    task = progress.add_task(name, total=None)

    def advance(step: int, total: int) -> None:
        progress.update(task, completed=step, total=total)

    return advance


def _notify(progress: Progress) -> Callable[[str], None]:
    def notify(text: str) -> None:
        progress.console.print(text, markup=False, highlight=False)

    return notify


def _render(table: TextTable) -> Group:
    """A library table (sgn_lab.run.tables) as rich draws it, in blocks of columns that fit
    the console's width (each block repeats the first column, which names the row), so that
    no number is cut short and no column dropped, on a narrow terminal or in a log file."""
    blocks: list[list[int]] = [[]]
    for index in range(1, len(table.columns)):
        if blocks[-1] and _width(table, [0, *blocks[-1], index]) > console.width:
            blocks.append([])
        blocks[-1].append(index)
    return Group(*(_rich_table(table, [0, *block], first=i == 0)
                   for i, block in enumerate(blocks)))


def _rich_table(table: TextTable, columns: list[int], *, first: bool = True) -> Table:
    shown = Table(title=table.title if first else "(continued)",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    for index in columns:
        column = table.columns[index]
        # A block that cannot fit even two columns wraps them rather than cut them short.
        wrap = column.wrap or len(columns) <= 2
        shown.add_column(column.header, justify=column.align, no_wrap=not wrap,
                         overflow="fold")  # a long run name folds onto a second line
    for row in table.rows:
        shown.add_row(*(row[index] for index in columns))
    return shown


def _width(table: TextTable, columns: list[int]) -> int:
    """The width rich needs for these columns with nothing wrapped."""
    wide = console.options.update(width=10**4)
    return Measurement.get(console, wide, _rich_table(table, columns)).maximum


ConfigOpt = Annotated[Path | None, Opt(help="TOML config file (flat keys, or [task], [model], "
                                       "[optimizer], [training], [probe], [output] tables); "
                                       "flags given override it.")]
ResumeOpt = Annotated[bool, Opt(help="Continue the interrupted run in --out (a complete run is "
                                "left as it is). Alone, it resumes the saved run as it is; with "
                                "settings that differ from it, it stops and lists them.")]


def _processes(config) -> str:
    """The header's account of the processes: how many, and what FSDP gathers."""
    training = config.training
    if training.nproc == 1:
        return ""
    if training.parallel == "fsdp":
        return (f", {training.nproc} processes, FSDP (the parameters are gathered whole on "
                "each process for each measurement)")
    return f", {training.nproc} processes"

@app.command()
@run_options()
def measure(
    out: Annotated[Path | None, Opt(help="Run directory. (default: runs/<run name>)")] = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    **flags: Any,
) -> None:
    """Train a model on a task with one method and measure its SGN as training goes.

    With --nproc N, or under torchrun, the training is data-parallel (DDP, or FSDP2 with
    --parallel fsdp) and the probe set is split over the processes; every number is the
    one-process number (docs/guides/distributed.md).
    """
    from sgn_lab.distributed.launch import init_from_env, launch, world_size_from_env
    from sgn_lab.run.loop import plan, resolve_device
    from sgn_lab.run.rundir import load_run, writable_dir

    world = world_size_from_env()  # > 1: this is one of torchrun's processes
    if world > 1:
        if flags.get("nproc") not in (None, world):
            raise ValueError(f"--nproc {flags['nproc']} under torchrun, which started {world} "
                             "processes: drop --nproc")
        flags["nproc"] = world
    plain = resume and config is None and all(v is None for k, v in flags.items()
                                              if k != "nproc")
    asked = None if plain else _config(config, flags)
    if out is None:
        if asked is None:
            raise ValueError("--resume alone continues the run in --out: give --out")
        out = Path("runs") / asked.run_name
    ranks = init_from_env() if world > 1 else None

    def prepare():  # on rank 0 alone under torchrun
        planned = plan(asked, out, resume=resume)  # before any folder is made
        writable_dir(out)
        return planned

    run_config = ranks.decided(prepare) if ranks else prepare()
    nproc = run_config.training.nproc
    if flags.get("nproc") not in (None, nproc):  # plan() compares it only with other flags
        raise ValueError(f"{out} holds a run of {nproc} process{'es' if nproc > 1 else ''}; "
                         f"{flags['nproc']} would split its batches and probe set otherwise: "
                         f"resume it with --nproc {nproc}, or without --nproc")
    console.print(
        f"[bold]sgn-lab measure[/bold] {escape(run_config.run_name)}: {run_config.model.name} "
        f"on {escape(run_config.task.name)}, {run_config.label} lr={run_config.optimizer.lr} "
        f"B={run_config.training.batch_size}, n={run_config.probe.probe_samples} per "
        f"measurement, instruments {','.join(run_config.probe.instruments)}"
        f"{_processes(run_config)} -> {escape(str(out))}"
    )
    if ranks is not None or nproc == 1:
        measure_rank(ranks, run_config, out)
    else:
        launch(nproc, measure_rank, run_config, out,
               device_type=resolve_device(run_config.training.device).type)
    if ranks is not None and not ranks.is_root:
        return  # on another machine the run directory may not even exist
    run = load_run(out)
    console.print(_render(measure_table(run.metrics, "SGN over training (B_simple ± "
                                                     "jackknife standard error)")))
    written = ", ".join(f.name for f in sorted(out.iterdir()) if not f.name.startswith("."))
    console.print(f"wrote {escape(str(out))}/ ({written})")


def measure_rank(ranks: Any, run_config: Any, out: Path) -> None:
    """One process's part of ``measure`` (all of it without ``ranks``): rank 0 shows the
    progress and writes."""
    from sgn_lab.run.loop import run_measurement

    if ranks is not None and not ranks.is_root:
        run_measurement(run_config, out, resume=True, ranks=ranks)
        return
    with _progress() as progress:
        run_measurement(run_config, out, resume=True, progress=_advance(
            progress, run_config.run_name), notify=_notify(progress), ranks=ranks)


TuneOpt = Annotated[list[str] | None, Opt(
    "--tune", help="Tune each method before comparing (the protocol of optimizer benchmarks): "
    "KEY=LOW:HIGH:COUNT (COUNT log-spaced values from LOW to HIGH, both included, e.g. "
    "lr=1e-3:1:7) or KEY=v1,v2,... (e.g. beta0=0.5,1,2), KEY any hyperparameter of a method "
    "(a method that does not take it skips it; lr applies to all); METHOD.KEY=... for one "
    "method only (e.g. adam.lr=1e-5:1e-2:7), replacing the grid of KEY for all. Repeat for "
    "more keys: the grid is their Cartesian product. Every grid point runs at the first seed "
    "with a validation split of the training set (--validation-fraction; 0.2 unless given); "
    "each method's best point by --select then runs at every seed. Writes tuning.csv, "
    "tuned.json and summary.csv into --out; --resume continues a killed sweep to the same "
    "choice.")]
SelectOpt = Annotated[str, Opt(
    help="With --tune, what chooses each method's point at the final measurement: auto "
    "(val_accuracy on a classification task, else val_loss), val_loss (lowest) or "
    "val_accuracy (highest); a tie in accuracy goes to the lower val_loss, then to the "
    "first point in grid order; diverged runs are never chosen, and test metrics are never "
    "read.")]
MatchStepOpt = Annotated[float | None, Opt(
    help="Matched effective step: set each method's lr so that its mean step equals that of "
    "SGD at this learning rate, for its own hyperparameters (sgn_lab.optim.matched_lr). A "
    "method that cannot be matched (adam, adapnm, adaptive-hb) is an error: leave it out. Not "
    "with --lr, an lr in --methods, or --tune of lr.")]


@app.command()
@run_options(skip=("method", "seed", "name"))
def compare(
    methods: Annotated[str, Opt(help="Comma-separated methods, each with hyperparameters of its "
                                "own after colons: sgd,momentum,pnm:beta0=2,pnm:beta0=0.5:lr=0.05."
                                )] = "sgd,momentum,pnm",
    seeds: Annotated[str, Opt(help="Comma-separated seeds, e.g. 0,1,2.")] = "0",
    out: Annotated[Path, Opt(help="Directory; one run directory per method and seed, named by "
                             "the method, the hyperparameters that tell it apart and the "
                             "seed.")] = Path("runs/compare"),
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    tune: TuneOpt = None,
    select: SelectOpt = "auto",
    match_step: MatchStepOpt = None,
    **flags: Any,
) -> None:
    """Run several methods (and seeds) on one task into one directory; print a summary.

    With --tune, each method first runs on a grid of its hyperparameters and is compared at
    its best point on a validation split; with --match-step, at a matched effective step.
    With --nproc N each run is data-parallel over N processes (--parallel ddp or fsdp), as
    in measure.
    """
    from sgn_lab.distributed.launch import world_size_from_env
    from sgn_lab.run.config import parse_method_spec
    from sgn_lab.run.loop import run_series
    from sgn_lab.run.rundir import load_runs, writable_dir
    from sgn_lab.run.tuning import SELECT, check_lr_sources, parse_grids

    if world_size_from_env() > 1:
        raise ValueError("compare starts the processes of each run itself: run it with "
                         "--nproc N, not under torchrun")
    specs = [parse_method_spec(item) for item in methods.split(",") if item.strip()]
    if not specs:
        raise ValueError("--methods is empty")
    seed_list = _parse_ints("seeds", seeds)
    grids = parse_grids(tune or [], where="--tune")
    if select not in SELECT:
        raise ValueError(f"--select must be one of {', '.join(SELECT)}, got {select!r}")
    check_lr_sources(specs, flags, grids, match_step)
    if grids:
        # A validation split is what tuning chooses on: 0.2 unless the user set one.
        base = [_config(config, {**flags, **spec, "seed": seed_list[0]},
                        defaults={"validation_fraction": 0.2}) for spec in specs]
        _matched(base, match_step)  # an unmatched method stops before any run
        _compare_tuned(base, grids, seed_list, out, select=select, match_step=match_step,
                       resume=resume)
        return
    configs = _matched([_config(config, {**flags, **spec, "seed": seed})
                        for spec in specs for seed in seed_list], match_step)
    writable_dir(out)
    with _progress() as progress:
        run_series(configs, out, resume=resume,
                   progress=lambda c: _advance(progress, c.resolved().run_name),
                   notify=_notify(progress))
    metrics, _ = load_runs(*(out / c.resolved().run_name for c in configs))
    console.print(_render(seeds_table(metrics, seed_list)))
    console.print(f"wrote {len(configs)} runs under {escape(str(out))}/")


def _matched(configs: list[Any], match_step: float | None) -> list[Any]:
    """The configs at the matched effective step (unchanged without one)."""
    from sgn_lab.run.tuning import matched_config

    if match_step is None:
        return configs
    try:
        return [matched_config(c, match_step) for c in configs]
    except ValueError as exc:
        raise ValueError(f"--match-step {match_step}: {exc}") from None


def _compare_tuned(base: list[Any], grids: Any, seeds: list[int], out: Path, *, select: str,
                   match_step: float | None, resume: bool) -> None:
    """``compare --tune``: the sweep, the tuning table, grid-edge warnings, the summary."""
    from sgn_lab.run.tuning import TUNED_FILE, TUNING_FILE, tune

    with _progress() as progress:
        result = tune(base, grids, seeds=seeds, root=out, select=select,
                      match_step=match_step, resume=resume,
                      progress=lambda c: _advance(progress, c.resolved().run_name),
                      notify=_once(_notify(progress)))
    console.print(_render(tuning_table(result)))
    for choice in result.choices:
        for key, edge in choice.at_edge.items():
            err_console.print(
                f"[yellow]warning:[/yellow] {escape(choice.label)}: the chosen {key}="
                f"{choice.setting[key]:g} is the {'lowest' if edge == 'low' else 'highest'} "
                f"point of its grid; extend the grid {'below' if edge == 'low' else 'above'} it")
    console.print(_render(tuned_summary_table(result, seeds)))
    console.print(f"wrote {len(result.tuning)} tuning runs and the chosen settings at "
                  f"{len(seeds)} seeds under {escape(str(out))}/ ({TUNING_FILE}, {TUNED_FILE}, "
                  "summary.csv)")


def _once(notify: Callable[[str], None]) -> Callable[[str], None]:
    """``notify`` for each distinct text once: the runs of a sweep share one model, so one
    report of its Gram routes, not one per run."""
    seen: set[str] = set()

    def once(text: str) -> None:
        if text not in seen:
            seen.add(text)
            notify(text)

    return once


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (or folders of runs).")],
    out: Annotated[Path | None, Opt(help="Folder for the figures. "
                                    "(default: first RUN/figures)")] = None,
    steps: Annotated[str | None, Opt(help="Comma-separated steps for the spectra.")] = None,
) -> None:
    """Figures of runs: trace, noise scale, effective rank, accuracy; spectra (PNG and PDF)."""
    from sgn_lab.plots import plot_run
    from sgn_lab.run.rundir import load_runs, writable_dir

    metrics, spectra = load_runs(*runs)
    if metrics.empty:
        raise ValueError(f"no measurements in {', '.join(map(str, runs))}")
    out = writable_dir(out or runs[0] / "figures")
    step_list = _parse_ints("steps", steps) if steps else None
    for path in plot_run(metrics, spectra, out, steps=step_list):
        console.print(f"wrote {escape(str(path))}")


@app.command()
def scaling(
    sweep: Annotated[str, Opt(help=", ".join(f"{name} ({what})"
                                             for name, what in SWEEP_HELP.items()) + ".")],
    out: Annotated[Path, Opt(help="Folder for the table (CSV) and figure (PNG, PDF).")] = Path(
        "runs/scaling"
    ),
    quick: Annotated[bool, Opt(help="Fewer points and draws (a smoke test, not a result).")] = (
        False
    ),
    seed: Annotated[int, Opt(help="Seed of every draw.")] = 0,
    options: Annotated[str, Opt(help="Options of the sweep as key=value,key=value, a list as "
                                "v1/v2/... or LOW:HIGH:COUNT (log-spaced), e.g. "
                                "problem=mlp,lr_grid=0.01:1:7 for critical-batch (its options: "
                                "sgn_lab.sweeps.sweep_config).")] = "",
) -> None:
    """Theory against measurement: a sweep with confidence intervals, as a table and figure."""
    from sgn_lab.plots import plot_scaling, save_figure
    from sgn_lab.run.rundir import writable_dir, write_table
    from sgn_lab.sweeps import SWEEPS, parse_sweep_options, run_sweep, sweep_config
    from sgn_lab.sweeps.tables import lr_edge_advice, scaling_table

    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")
    given = parse_sweep_options(options) if options else {}
    # Bad options fail before any work.
    config = sweep_config(sweep, quick=quick, seed=seed, **given)
    writable_dir(out)
    # critical-batch keeps its finished batch sizes here: a rerun of an interrupted sweep
    # with the same options resumes after them.
    state = out / f"scaling_{sweep}.state"
    with _progress() as progress:
        table = run_sweep(sweep, quick=quick, seed=seed, state_file=state,
                          progress=_advance(progress, f"sweep {sweep}"), **given)
    figure = plot_scaling(table)  # built before anything is written
    write_table(out / f"scaling_{sweep}.csv", table)
    save_figure(figure, out / f"scaling_{sweep}")
    state.unlink(missing_ok=True)
    console.print(_render(scaling_table(sweep, table)))
    if sweep == "critical-batch":
        for line in lr_edge_advice(table, config.lr_grid, given):
            err_console.print(line, markup=False, highlight=False)
    console.print(f"wrote {escape(str(out))}/scaling_{sweep}.csv, .png and .pdf")


@app.command()
def figures(
    out: Annotated[Path, Opt(help="Folder for the figures (PDF, PNG) and their tables (CSV).")] = (
        Path("runs/figures")
    ),
    quick: Annotated[bool, Opt(help="Smaller models and fewer steps, same code.")] = False,
    only: Annotated[str | None, Opt(help="Comma-separated figure names, of "
                                    f"{', '.join(FIGURES)} (default: all).")] = None,
    experiments: Annotated[Path | None, Opt(help="Folder of figure configs of one's own "
                                            "(default: the configs shipped with "
                                            "sgn-lab).")] = None,
    nproc: Annotated[int, Opt(help="Processes of each measurement run (data-parallel, as in "
                              f"measure), in the figures {', '.join(MEASURED)}; the sweeps "
                              "of the others run in one process.")] = 1,
    parallel: Annotated[str, Opt(help="With --nproc N: ddp or fsdp, as in measure.")] = "ddp",
) -> None:
    """Regenerate the paper figures from their configs (from any working directory)."""
    from sgn_lab.distributed.launch import world_size_from_env
    from sgn_lab.figures import CONFIGS, make_figure, read_figure_config
    from sgn_lab.run.rundir import writable_dir

    if world_size_from_env() > 1:
        raise ValueError("figures starts the processes of each run itself: run it with "
                         "--nproc N, not under torchrun")

    names = [n.strip() for n in only.split(",") if n.strip()] if only else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}")
    folder = experiments or CONFIGS
    for name in names:  # every config readable before the first figure starts
        read_figure_config(folder, name, quick=quick, nproc=nproc, parallel=parallel)
    writable_dir(out)
    with _progress() as progress:
        for name in names:
            advance = _advance(progress, f"figure {name}")
            csv = make_figure(name, out, experiments=folder, quick=quick, progress=advance,
                              nproc=nproc, parallel=parallel)
            console.print(f"figure {name}: {escape(str(csv.with_suffix('.pdf')))}")


def _parse_ints(name: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: temporary files are removed on the way out


def _show_warning(shown: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` that prints a :class:`DataWarning` (examples truncated on
    loading) as one line, ``warning: ...``, and leaves every other warning to ``shown``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DataWarning):
            err_console.print(f"warning: {message}", markup=False, highlight=False)
        else:
            shown(message, category, filename, lineno, file, line)

    return show


# The exceptions that end a command in one `error:` line with exit code 2: bad input, a file,
# a diverged run (the troubleshooting page's index of messages is built from this too).
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError, OSError)


def main() -> None:
    """Entry point: bad input ends with a one-line message and exit code 2, no traceback."""
    signal.signal(signal.SIGTERM, _interrupt)
    warnings.showwarning = _show_warning(warnings.showwarning)
    if os.environ.get("RANK", "0") != "0":  # one of torchrun's processes: rank 0 speaks
        console.quiet = err_console.quiet = True
    try:
        result = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: unknown option, bad type, ...
        exc.show()
        sys.exit(exc.exit_code)
    except INPUT_ERRORS as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):  # before RuntimeError, which click's Abort is
        result = _INTERRUPTED
    except RuntimeError as exc:
        from sgn_lab.distributed.launch import WorkerError  # loaded already by --nproc runs

        if not isinstance(exc, WorkerError):
            raise
        # --nproc: a process failed (its own message) or died
        err_console.print(f"[red]error:[/red] {escape(str(exc))}" + (
            "" if exc.input_error else f"; {_resume_hint(sys.argv[1:])}"))
        sys.exit(2 if exc.input_error else 1)
    if result == _INTERRUPTED:  # click turns Ctrl-C into this exit code without a word
        err_console.print(f"interrupted: {_resume_hint(sys.argv[1:])}")
    sys.exit(result if isinstance(result, int) else 0)


_INTERRUPTED = 130  # 128 + SIGINT
_RESUME_HINTS = {
    "measure": "finished measurements are saved; rerun with --resume",
    "compare": "finished runs are saved; rerun the same command with --resume",
    "figures": "finished runs are saved; rerun the same command: it continues them",
    "scaling": "rerun the same command: critical-batch keeps its finished batch sizes, the "
               "other sweeps start again",
}


def _resume_hint(argv: list[str]) -> str:
    """What to do after an interrupt, for the command that was running."""
    command = next((a for a in argv if not a.startswith("-")), "")
    return _RESUME_HINTS.get(command, "nothing half-written is left; rerun the command")
