"""Test helpers shared by the test modules: seeding and the independent per-sample reference.

The reference for every per-sample quantity is a plain Python loop: for each sample i, the
gradient of ``loss_fn(model(x[i:i+1]), y[i:i+1])`` by an ordinary ``backward()`` on a copy of
the model. Nothing of sgn_lab is used to compute it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block and restore the previous state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def as_tuple(inputs: Tensor | tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def trainable_names(model: nn.Module) -> list[str]:
    return [k for k, p in model.named_parameters() if p.requires_grad]


def loop_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    targets: Tensor,
) -> dict[str, Tensor]:
    """Reference: one ordinary backward pass per sample on a copy of the model.

    Every sample starts from the model's buffers as they were (a module that updates a buffer
    in its forward pass would otherwise give each sample another model).
    """
    model = copy.deepcopy(model)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    xs = as_tuple(inputs)
    device = next(model.parameters()).device
    xs = tuple(x.to(device) for x in xs)
    targets = targets.to(device)
    names = trainable_names(model)
    params = dict(model.named_parameters())
    out: dict[str, list[Tensor]] = {k: [] for k in names}
    for i in range(targets.shape[0]):
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(*(x[i : i + 1] for x in xs)), targets[i : i + 1])
        loss.backward()
        for k in names:
            g = params[k].grad
            out[k].append(torch.zeros_like(params[k]) if g is None else g.detach().clone())
    return {k: torch.stack(v) for k, v in out.items()}


def loop_matrix(model, loss_fn, inputs, targets) -> Tensor:
    """The (n, d) float64 matrix of the loop's per-sample gradients, named_parameters order."""
    grads = loop_grads(model, loss_fn, inputs, targets)
    return torch.cat([g.reshape(g.shape[0], -1).double() for g in grads.values()], dim=1)


def relative_error(got: Tensor, want: Tensor) -> float:
    """‖got − want‖_F / ‖want‖_F in float64."""
    got, want = got.double().cpu(), want.double().cpu()
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def interrupt_at(step: int):
    """A ``progress`` callback that interrupts a run (as Ctrl-C does) when it reaches ``step``."""

    def progress(at: int, total: int) -> None:
        if at == step:
            raise KeyboardInterrupt

    return progress


def rejects(name: str, shown: str) -> str:
    """The pattern of :mod:`sgn_lab.checks`'s message for argument ``name``, whose value the
    message shows as ``shown`` (its repr)."""
    return rf"{re.escape(name)} must .*, got {re.escape(shown)}$"


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the ``sgn-lab`` entry point with ``args``: (exit code, stdout, stderr)."""
    import sys

    from sgn_lab.cli.app import main

    monkeypatch.setattr(sys, "argv", ["sgn-lab", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


CPU_AND_CUDA = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ]),
]
"""Device parameters: CUDA runs where a GPU is present and is skipped, with a reason, elsewhere."""


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[types.ModuleType]:
    """``benchmarks/<name>.py`` imported as the module ``name`` for the block (its dataclasses
    look their module up in ``sys.modules``), with ``benchmarks/`` on the path as when the
    script runs (it imports ``harness``); torch's thread count, which a benchmark's
    ``main()`` sets, is restored afterwards."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    spec = importlib.util.spec_from_file_location(name, f"{folder}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(folder)
        del sys.modules[name]
