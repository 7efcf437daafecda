"""Measuring a run: train an MLP with PNM on scikit-learn's digits, measure its SGN every 20
steps, and read the run directory back (docs/guides/measuring.md).

    python examples/measure_run.py --out runs/measure-example

The same run from the shell: ``sgn-lab measure --task digits --width 32 --method pnm
--steps 60 --measure-every 20 --probe-samples 128 --out runs/measure-example``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sgn_lab
from sgn_lab.plots import plot_run
from sgn_lab.run import parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)

    config = parse({"task": "digits", "width": 32, "method": "pnm", "steps": args.steps,
                    "measure_every": 20, "probe_samples": 128,
                    "instruments": ["sgn", "tails", "eval"], "device": "cpu"})
    folder = sgn_lab.run_measurement(config, args.out)       # resumable, checkpointed
    run = sgn_lab.load_run(folder)
    print(run.metrics[["step", "test_accuracy", "trace", "noise_scale", "noise_scale_se",
                       "effective_rank", "tail_index"]].to_string(index=False))
    sgn_spectrum = run.spectra[(run.spectra.kind == "sgn") & (run.spectra.step == args.steps)]
    print(f"top eigenvalues at step {args.steps}:", sgn_spectrum.eigenvalue.head(3).tolist())
    for path in plot_run(run.metrics, run.spectra, args.out / "figures"):
        print("wrote", path)


if __name__ == "__main__":
    main()
