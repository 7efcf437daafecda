"""The `sgn-lab` command: thin commands over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Measure stochastic gradient noise (SGN) in PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
# soft_wrap: an error stays one line however long, so scripts can grep it.
err_console = Console(stderr=True, soft_wrap=True)

# Summary columns: (metrics column, header, format). rank/iso: effective rank of the SGN and
# of isotropic noise of equal trace; s: power-law exponent; α: tail index; update tr:
# tr Cov[Δθ], the per-step update noise of the optimizer.
SUMMARY_COLUMNS = (
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

Opt = typer.Option


@app.callback()
def _root() -> None:
    """Measure stochastic gradient noise (SGN) in PyTorch models."""


def _config_from(config_file: Path | None, flags: dict[str, Any]):
    """Defaults ← TOML config file ← flags given on the command line (None: not given)."""
    from sgn_lab.train import RunConfig, read_config_file

    data = read_config_file(config_file) if config_file is not None else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    config = RunConfig.from_dict(data)
    config.validate()
    return config


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    )


def _run_with_progress(config, out: Path, resume: bool, progress: Progress) -> Path:
    from sgn_lab.train import run_measurement

    task = progress.add_task(config.run_name, total=None)

    def advance(step: int, total: int) -> None:
        progress.update(task, completed=step, total=total)

    def notify(text: str) -> None:
        progress.console.print(text, markup=False, highlight=False)

    path = run_measurement(config, out, resume=resume, progress=advance, notify=notify)
    progress.update(task, completed=progress.tasks[task].total or 0)
    return path


def _summary_table(metrics, title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    present = [c for c in SUMMARY_COLUMNS if c[0] in metrics.columns]
    if "run" in metrics.columns:
        table.add_column("run", no_wrap=True)
    for _, header, _ in present:
        table.add_column(header, justify="right", no_wrap=True)
    for _, row in metrics.iterrows():
        cells = [str(row["run"])] if "run" in metrics.columns else []
        for key, _, fmt in present:
            value = row[key]
            cells.append(fmt.format(value) if value == value else "–")
        table.add_row(*cells)
    return table


# Options shared by `measure` and `compare` (every default is RunConfig's).
TaskOpt = Annotated[str | None, Opt(help="Task: mnist1d, digits, gaussian-mixture, linreg, "
                                    "teacher-student, npz:FILE, cifar10:DIR. (default: mnist1d)")]
NTrainOpt = Annotated[int | None, Opt(help="Subsample the training set to this many points.")]
ModelOpt = Annotated[str | None, Opt(help="Model: linear, mlp, cnn, resnet. (default: mlp)")]
WidthOpt = Annotated[int | None, Opt(help="Hidden width (channels for CNNs). (default: 128)")]
DepthOpt = Annotated[int | None, Opt(help="Hidden layers / blocks. (default: 2)")]
LrOpt = Annotated[float | None, Opt(help="Learning rate η. (default: 0.1)")]
BatchOpt = Annotated[int | None, Opt(help="Minibatch size B. (default: 64)")]
StepsOpt = Annotated[int | None, Opt(help="Training steps. (default: 1000)")]
EpochsOpt = Annotated[float | None, Opt(help="Training epochs (overrides --steps).")]
EveryOpt = Annotated[int | None, Opt(help="Measure every k steps. (default: 100)")]
SamplesOpt = Annotated[int | None, Opt(help="Per-sample gradients per measurement, n. "
                                       "(default: 512)")]
FreshOpt = Annotated[bool | None, Opt("--fresh-probe/--fixed-probe",
                                      help="New probe samples at each measurement. "
                                      "(default: fixed)")]
RepeatsOpt = Annotated[int | None, Opt(help="Per-step update noise over R minibatch draws "
                                       "(0: off). (default: 32)")]
CurvOpt = Annotated[bool | None, Opt("--curvature/--no-curvature",
                                     help="Measure λ_max(H), tr H, tr(HS). (default: off)")]
ChunkOpt = Annotated[int | None, Opt(help="Samples per pass: vmap chunks; the Gram path builds "
                                     "its Gram from pairs of such chunks.")]
GradsOpt = Annotated[str | None, Opt(help="Per-sample gradients: auto (the Gram path, checked "
                                     "against vmap at the first measurement; vmap with "
                                     "--curvature), vmap (materialised) or gram (unchecked). "
                                     "(default: auto)")]
DeviceOpt = Annotated[str | None, Opt(help="auto, cpu or cuda. (default: auto)")]
MomentumOpt = Annotated[float | None, Opt(help="Heavy-ball momentum (momentum, gaussian, "
                                          "covariance, symmetric).")]
Beta0Opt = Annotated[float | None, Opt(help="PNM/AdaPNM β0 >= 0 (positive-negative "
                                       "weight). (default: 1.0)")]
Beta1Opt = Annotated[float | None, Opt(help="β1 of PNM/AdaPNM/Adam. (default: 0.9)")]
Beta2Opt = Annotated[float | None, Opt(help="β2 of AdaPNM/Adam. (default: 0.999)")]
SigmaOpt = Annotated[float | None, Opt(help="Gaussian injection σ.")]
SigmaTraceOpt = Annotated[float | None, Opt(help="Gaussian injection matched to the SGN: "
                                            "σ² = c·tr(S)/d, re-set at every measurement.")]
SmallBatchOpt = Annotated[int | None, Opt(help="Covariance noise: emulated small batch B_S "
                                          "(the training batch is B_L). (default: B/8)")]
VariantOpt = Annotated[str | None, Opt(help="Covariance noise: full or diagonal. (default: full)")]
NoiseOpt = Annotated[float | None, Opt(help="S-SGD weight-noise scale. (default: 0.01)")]
BetaMaxOpt = Annotated[float | None, Opt(help="Adaptive heavy ball: largest β. (default: 0.99)")]
WdOpt = Annotated[float | None, Opt(help="Weight decay.")]
ConfigOpt = Annotated[Path | None, Opt(help="TOML config file; flags given override it.")]
ResumeOpt = Annotated[bool, Opt(help="Continue an interrupted run in --out (a complete run "
                                "is left as it is).")]


@app.command()
def measure(
    out: Annotated[Path | None, Opt(help="Run directory. (default: runs/METHOD-sSEED)")] = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    task: TaskOpt = None,
    n_train: NTrainOpt = None,
    model: ModelOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    method: Annotated[str | None, Opt(help="Method: sgd, momentum, adam, gaussian, covariance, "
                                      "symmetric, pnm, adapnm, adaptive-hb. "
                                      "(default: pnm)")] = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    measure_every: EveryOpt = None,
    probe_samples: SamplesOpt = None,
    fresh_probe: FreshOpt = None,
    update_repeats: RepeatsOpt = None,
    curvature: CurvOpt = None,
    grads: GradsOpt = None,
    chunk_size: ChunkOpt = None,
    device: DeviceOpt = None,
    seed: Annotated[int | None, Opt(help="Seed of data split, model, order and draws. "
                                    "(default: 0)")] = None,
    momentum: MomentumOpt = None,
    beta0: Beta0Opt = None,
    beta1: Beta1Opt = None,
    beta2: Beta2Opt = None,
    sigma: SigmaOpt = None,
    sigma_trace_factor: SigmaTraceOpt = None,
    small_batch: SmallBatchOpt = None,
    variant: VariantOpt = None,
    noise: NoiseOpt = None,
    beta_max: BetaMaxOpt = None,
    weight_decay: WdOpt = None,
) -> None:
    """Train a model on a task with one method and measure its SGN as training goes."""
    # First statement: locals() holds exactly the command's parameters here.
    flags = {k: v for k, v in locals().items() if k not in ("out", "config", "resume")}
    from sgn_lab.results import load_run

    run_config = _config_from(config, flags)
    out = out or Path("runs") / run_config.run_name
    console.print(
        f"[bold]sgn-lab measure[/bold] {run_config.run_name}: {run_config.model} on "
        f"{run_config.task}, {run_config.method} lr={run_config.lr} B={run_config.batch_size}, "
        f"n={run_config.probe_samples} per measurement -> {out}"
    )
    with _progress() as progress:
        _run_with_progress(run_config, out, resume, progress)
    run = load_run(out)
    console.print(_summary_table(run.metrics.drop(columns="run"), "SGN over training"))
    written = ", ".join(f.name for f in sorted(out.iterdir()) if not f.name.startswith("."))
    console.print(f"wrote {out}/ ({written})")


@app.command()
def compare(
    methods: Annotated[str, Opt(help="Comma-separated methods, e.g. sgd,momentum,pnm.")] = (
        "sgd,momentum,pnm"
    ),
    seeds: Annotated[str, Opt(help="Comma-separated seeds, e.g. 0,1,2.")] = "0",
    out: Annotated[Path, Opt(help="Directory; one run directory per method and seed.")] = Path(
        "runs/compare"
    ),
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    task: TaskOpt = None,
    n_train: NTrainOpt = None,
    model: ModelOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    measure_every: EveryOpt = None,
    probe_samples: SamplesOpt = None,
    fresh_probe: FreshOpt = None,
    update_repeats: RepeatsOpt = None,
    curvature: CurvOpt = None,
    grads: GradsOpt = None,
    chunk_size: ChunkOpt = None,
    device: DeviceOpt = None,
    weight_decay: WdOpt = None,
) -> None:
    """Run several methods (and seeds) on one task into one directory; print a summary."""
    # First statement: locals() holds exactly the command's parameters here.
    flags = {k: v for k, v in locals().items()
             if k not in ("methods", "seeds", "out", "config", "resume")}
    from sgn_lab.results import load_runs

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    seed_list = _parse_ints("seeds", seeds)
    configs = [
        _config_from(config, {**flags, "method": m, "seed": s})
        for m in method_list
        for s in seed_list
    ]
    with _progress() as progress:
        for run_config in configs:
            _run_with_progress(run_config, out / run_config.run_name, resume, progress)
    metrics, _ = load_runs(out)
    final = metrics.sort_values("step").groupby("run").tail(1)
    summary = (
        final.groupby("method", sort=False)[[c for c, _, _ in SUMMARY_COLUMNS if c in final]]
        .agg(["mean", "std"])
    )
    table = Table(title=f"final measurement, mean ± sd over seeds {seeds}", box=box.SIMPLE_HEAD)
    table.add_column("method")
    shown = [c for c in SUMMARY_COLUMNS if c[0] in final and c[0] != "step"]
    for _, header, _ in shown:
        table.add_column(header, justify="right", no_wrap=True)
    for method_name, row in summary.iterrows():
        cells = [str(method_name)]
        for key, _, fmt in shown:
            mean, sd = row[(key, "mean")], row[(key, "std")]
            text = fmt.format(mean) if mean == mean else "–"
            cells.append(text + (f" ± {fmt.format(sd)}" if sd == sd else ""))
        table.add_row(*cells)
    console.print(table)
    console.print(f"wrote {len(configs)} runs under {out}/")


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (or folders of runs).")],
    out: Annotated[Path | None, Opt(help="Folder for the figures. "
                                    "(default: first RUN/figures)")] = None,
    steps: Annotated[str | None, Opt(help="Comma-separated steps for the spectra.")] = None,
) -> None:
    """Figures of runs: trace, noise scale, effective rank, accuracy; spectra (PNG and PDF)."""
    from sgn_lab.plots import plot_run
    from sgn_lab.results import load_runs

    metrics, spectra = load_runs(*runs)
    if metrics.empty:
        raise ValueError(f"no measurements in {', '.join(map(str, runs))}")
    out = out or runs[0] / "figures"
    step_list = _parse_ints("steps", steps) if steps else None
    for path in plot_run(metrics, spectra, out, steps=step_list):
        console.print(f"wrote {path}")


@app.command()
def scaling(
    sweep: Annotated[str, Opt(help="batch (noise trace vs B), beta0 (PNM), sigma (Gaussian "
                              "injection) or large-batch (covariance noise).")],
    out: Annotated[Path, Opt(help="Folder for the table (CSV) and figure (PNG, PDF).")] = Path(
        "runs/scaling"
    ),
    quick: Annotated[bool, Opt(help="Fewer points and draws (a smoke test, not a result).")] = (
        False
    ),
    seed: Annotated[int, Opt(help="Seed of every draw.")] = 0,
) -> None:
    """Theory against measurement: a sweep with confidence intervals, as a table and figure."""
    from sgn_lab.scaling import SWEEPS, run_sweep

    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")
    with _progress() as progress:
        task = progress.add_task(f"sweep {sweep}", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        table = run_sweep(sweep, out=out, quick=quick, seed=seed, progress=advance)
    shown = Table(title=f"{sweep} sweep: measured ± 95% CI half-width against theory",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    for column in ("quantity", "x", "measured", "theory", "rel. error"):
        shown.add_column(column, justify="left" if column == "quantity" else "right",
                         no_wrap=True)
    for _, row in table.iterrows():
        half_width = (row["ci_high"] - row["ci_low"]) / 2
        rel = row["rel_error"]
        shown.add_row(
            str(row["quantity"]), f"{row['x']:.4g}", f"{row['measured']:.4g} ± {half_width:.2g}",
            f"{row['theory']:.4g}", f"{rel:+.1%}" if rel == rel else "–",
        )
    console.print(shown)
    console.print(f"wrote {out}/scaling_{sweep}.csv, .png and .pdf")


@app.command()
def figures(
    out: Annotated[Path, Opt(help="Folder for the figures (PDF, PNG) and their tables (CSV).")] = (
        Path("runs/figures")
    ),
    quick: Annotated[bool, Opt(help="Smaller models and fewer steps, same code.")] = False,
    only: Annotated[str | None, Opt(help="Comma-separated figure names (default: all).")] = None,
    experiments: Annotated[Path, Opt(help="Folder of the figure configs.")] = Path("experiments"),
) -> None:
    """Regenerate the paper figures from the configs in experiments/."""
    from sgn_lab.figures import FIGURES, make_figure

    names = [n.strip() for n in only.split(",") if n.strip()] if only else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}")
    with _progress() as progress:
        for name in names:
            task = progress.add_task(f"figure {name}", total=None)

            def advance(done: int, total: int, task=task) -> None:
                progress.update(task, completed=done, total=total)

            csv = make_figure(name, out, experiments=experiments, quick=quick, progress=advance)
            progress.update(task, description=f"figure {name}: {csv.with_suffix('.pdf')}")


def _parse_ints(name: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def main() -> None:
    """Entry point: bad input ends with a one-line message and a non-zero exit, no traceback."""
    try:
        result = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: unknown option, bad type, ...
        exc.show()
        sys.exit(exc.exit_code)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted: finished measurements are saved; rerun with --resume")
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
