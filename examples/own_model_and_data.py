"""Your model and your data: arrays saved to an .npz file, a model of your own, its SGN
measured by the probe in a training loop of your own (docs/guides/your-model.md).

    python examples/own_model_and_data.py --out runs/own-example

From the shell the same file and model are ``--task npz:FILE --model pkg.module:function``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

import sgn_lab
from sgn_lab.data import load_task


class TwoTower(nn.Module):
    """A model of one's own: two branches over the features, summed, and a read-out."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Linear(features, 32), nn.GELU())
        self.right = nn.Sequential(nn.Linear(features, 32), nn.Tanh())
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.left(x) + self.right(x))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    # Your data on disk: arrays x and y (integer y: classification).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    y = (x[:, :3].sum(axis=1) > 0).astype(np.int64) + (x[:, 3] > 1)
    np.savez(args.out / "data.npz", x=x, y=y)
    task = load_task(f"npz:{args.out / 'data.npz'}", seed=0)   # split and checked as a run does

    torch.manual_seed(0)
    model = TwoTower(task.input_shape[0], task.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = sgn_lab.NoiseProbe(model, F.cross_entropy, task.x_train, task.y_train,
                               x_test=task.x_test, y_test=task.y_test, every=20, samples=128,
                               instruments=["sgn", "eval"])
    rows = []
    for step in range(args.steps + 1):
        if (result := probe(step)) is not None:
            rows.append(result.row)
            if step == 0 and probe.coverage is not None:  # the Gram path's routes, and why
                print(probe.coverage.summary())
        if step == args.steps:
            break
        idx = torch.randint(0, len(task.x_train), (32,))
        optimizer.zero_grad()
        F.cross_entropy(model(task.x_train[idx]), task.y_train[idx]).backward()
        optimizer.step()
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "probe.csv", index=False)
    print(table[["step", "test_accuracy", "trace", "noise_scale", "effective_rank"]]
          .to_string(index=False))


if __name__ == "__main__":
    main()
