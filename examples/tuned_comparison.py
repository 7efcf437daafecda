"""Tuned comparisons: SGD, momentum and PNM, each at the learning rate chosen on a validation
split from a small grid, rerun over two seeds and compared (docs/guides/comparisons.md).

    python examples/tuned_comparison.py --out runs/tuned-example

The shell's version, at full size: ``sgn-lab compare --methods sgd,momentum,pnm --seeds 0,1,2
--tune lr=1e-3:1:7 --out runs/tuned``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sgn_lab
from sgn_lab.run import parse, run_series

SMALL = {"task": "digits", "width": 32, "steps": 60, "measure_every": 30,
         "probe_samples": 64, "instruments": ["sgn", "eval"], "device": "cpu",
         "validation_fraction": 0.2}
METHODS = ("sgd", "momentum", "pnm")
GRID = (0.01, 0.1, 1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    # 1. Each method over the grid, seed 0, judged by the final validation accuracy.
    grid = [parse({**SMALL, "method": m, "lr": lr, "seed": 0}) for m in METHODS for lr in GRID]
    run_series(grid, args.out / "grid", on_divergence="record")
    metrics, _ = sgn_lab.load_runs(args.out / "grid")
    final = metrics.sort_values("step").groupby("run").tail(1)
    best = {m: float(final[final.method == m].sort_values("val_accuracy").iloc[-1]["lr"])
            for m in METHODS}
    print("chosen lr:", best)

    # 2. Each at its chosen lr over two seeds; the final measurements, mean over seeds.
    chosen = [parse({**SMALL, "method": m, "lr": best[m], "seed": s}) for m in METHODS
              for s in (1, 2)]
    run_series(chosen, args.out / "chosen")
    metrics, _ = sgn_lab.load_runs(args.out / "chosen")
    final = metrics.sort_values("step").groupby("run").tail(1)
    summary = final.groupby("method")[["test_accuracy", "trace", "noise_scale"]].mean()
    summary.to_csv(args.out / "summary.csv")
    print(summary.to_string())


if __name__ == "__main__":
    main()
