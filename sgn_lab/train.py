"""A short training run with SGN measured along the way (the job behind `sgn-lab measure`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sgn_lab.curvature import CurvatureStats, curvature_stats
from sgn_lab.data import Task
from sgn_lab.grads import flatten_grads, per_sample_grads
from sgn_lab.noise import NoiseStats, noise_stats

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Measurement:
    """SGN and curvature of the model at one training step, with its losses."""

    step: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    noise: NoiseStats
    curvature: CurvatureStats | None

    def to_dict(self) -> dict[str, float]:
        row = {
            "step": self.step,
            "train_loss": self.train_loss,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
        }
        row.update(self.noise.to_dict())
        if self.curvature is not None:
            row.update(self.curvature.to_dict())
        return row


def measure(
    model: nn.Module,
    loss_fn: LossFn,
    task: Task,
    *,
    step: int,
    samples: int,
    batch_size: int,
    chunk_size: int | None = None,
    curvature: bool = True,
    seed: int = 0,
) -> Measurement:
    """Measure the SGN of ``model`` on the first ``samples`` training points."""
    device = next(model.parameters()).device
    x, y = task.x_train[:samples].to(device), task.y_train[:samples].to(device)
    grads = per_sample_grads(model, loss_fn, x, y, chunk_size=chunk_size, seed=seed)
    stats = noise_stats(
        grads, batch_size=batch_size, dataset_size=len(task.x_train), seed=seed
    )
    curv = None
    if curvature:
        curv = curvature_stats(model, loss_fn, x, y, flatten_grads(grads), seed=seed,
                               chunk_size=chunk_size)
    train_loss = evaluate(model, loss_fn, task.x_train, task.y_train)[0]
    test_loss, test_accuracy = evaluate(model, loss_fn, task.x_test, task.y_test)
    return Measurement(step, train_loss, test_loss, test_accuracy, stats, curv)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean loss and accuracy (NaN for regression) of ``model`` on (x, y)."""
    device = next(model.parameters()).device
    out = model(x.to(device))
    y = y.to(device)
    loss = float(loss_fn(out, y))
    if y.dtype in (torch.long, torch.int):
        return loss, float((out.argmax(dim=-1) == y).float().mean())
    return loss, float("nan")


def train_and_measure(
    model: nn.Module,
    loss_fn: LossFn,
    task: Task,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    measure_every: int,
    samples: int,
    curvature: bool = True,
    seed: int = 0,
    on_measurement: Callable[[Measurement], None] | None = None,
) -> list[Measurement]:
    """Train with minibatch SGD (without replacement, reshuffled each epoch) and measure the
    SGN at step 0, every ``measure_every`` steps, and at the last step."""
    for name, value in (("steps", steps), ("batch_size", batch_size),
                        ("measure_every", measure_every), ("samples", samples)):
        if value < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be positive, got {value}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    n_train = len(task.x_train)
    if batch_size > n_train:
        raise ValueError(f"batch_size={batch_size} exceeds the {n_train} training samples")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order, position = torch.randperm(n_train, generator=gen), 0
    results = []
    for step in range(steps + 1):
        if step % measure_every == 0 or step == steps:
            m = measure(model, loss_fn, task, step=step, samples=samples, batch_size=batch_size,
                        curvature=curvature, seed=seed)
            results.append(m)
            if on_measurement is not None:
                on_measurement(m)
        if step == steps:
            break
        if position + batch_size > n_train:
            order, position = torch.randperm(n_train, generator=gen), 0
        idx = order[position : position + batch_size]
        position += batch_size
        optimizer.zero_grad()
        loss_fn(model(task.x_train[idx].to(device)), task.y_train[idx].to(device)).backward()
        optimizer.step()
    return results
