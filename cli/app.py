"""The `sgn-lab` command: thin commands over the library."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Measure stochastic gradient noise (SGN) in PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

DEVICES = ("auto", "cpu", "cuda")

# Columns of the printed report: (row key, header, format). rank/iso: effective rank of the
# SGN and of isotropic noise of equal trace; s: power-law exponent; α: tail index; λmax: top
# Hessian eigenvalue; align: Zhu et al.'s d·tr(HS)/(tr H·tr S).
REPORT_COLUMNS = (
    ("step", "step", "{:d}"),
    ("test_accuracy", "acc", "{:.3f}"),
    ("trace", "tr S", "{:.3g}"),
    ("noise_scale", "B_simple", "{:.3g}"),
    ("effective_rank", "rank", "{:.1f}"),
    ("isotropic_effective_rank", "iso", "{:.0f}"),
    ("powerlaw_exponent", "s", "{:.2f}"),
    ("tail_index", "α", "{:.2f}"),
    ("hessian_top_eigenvalue", "λmax", "{:.3g}"),
    ("curvature_alignment", "align", "{:.0f}"),
)


@app.callback()
def _root() -> None:
    """Measure stochastic gradient noise (SGN) in PyTorch models."""


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when present; an unavailable 'cuda' is an error."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return device


@app.command()
def measure(
    task: Annotated[str, typer.Option(help="Built-in task: digits, gaussian-mixture, linreg.")] = (
        "digits"
    ),
    model: Annotated[str, typer.Option(help="Built-in model: linear, mlp.")] = "mlp",
    width: Annotated[int, typer.Option(help="Hidden width of the MLP.")] = 128,
    depth: Annotated[int, typer.Option(help="Hidden layers of the MLP.")] = 2,
    steps: Annotated[int, typer.Option(help="SGD steps.")] = 300,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Minibatch size B.")] = 32,
    measure_every: Annotated[int, typer.Option(help="Measure every k steps.")] = 100,
    samples: Annotated[int, typer.Option(help="Per-sample gradients per measurement (n).")] = 512,
    curvature: Annotated[bool, typer.Option(help="Also measure Hessian figures.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for data, model and measurements.")] = 0,
) -> None:
    """Train a built-in model with SGD and report its SGN as training goes."""
    import torch

    from sgn_lab.data import load_task
    from sgn_lab.models import build_model, loss_for
    from sgn_lab.train import train_and_measure

    dev = resolve_device(device)
    data = load_task(task, seed=seed)
    torch.manual_seed(seed)
    net = build_model(model, data.input_shape, data.num_classes or 1, width=width, depth=depth)
    net = net.to(dev)
    d = sum(p.numel() for p in net.parameters())
    console.print(
        f"[bold]sgn-lab measure[/bold]: {model} ({d:,} parameters) on {task} "
        f"({len(data.x_train)} train / {len(data.x_test)} test), SGD lr={lr} B={batch_size}, "
        f"n={min(samples, len(data.x_train))} per-sample gradients per measurement, device={dev}"
    )
    table = Table(title="SGN over training", box=box.SIMPLE_HEAD, padding=(0, 1))
    for _, header, _ in REPORT_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)

    def add_row(m) -> None:
        row = m.to_dict()
        cells = []
        for key, _, fmt in REPORT_COLUMNS:
            value = row.get(key, float("nan"))
            cells.append(fmt.format(value) if value == value else "–")
        table.add_row(*cells)
        console.print(
            f"  step {m.step}: tr S = {m.noise.trace:.4g}, test acc = {m.test_accuracy:.3f}"
        )

    train_and_measure(
        net, loss_for(data.num_classes), data, steps=steps, lr=lr, batch_size=batch_size,
        measure_every=measure_every, samples=samples, curvature=curvature, seed=seed,
        on_measurement=add_row,
    )
    console.print(table)


def main() -> None:
    """Entry point: bad input ends with a one-line message and a non-zero exit, no traceback."""
    try:
        result = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: unknown option, bad type, ...
        exc.show()
        sys.exit(exc.exit_code)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
