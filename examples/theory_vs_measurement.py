"""Theory against measurement: the per-sample gradient covariance of Gaussian linear
regression in closed form, Σ(w) = (σ² + δᵀHδ)·H + Hδ δᵀH with δ = w − w*, against the S that
sgn-lab measures from per-sample gradients, and the minibatch noise tr Cov[g_B] = tr S/B
against its Monte Carlo estimate (docs/guides/theory.md).

    python examples/theory_vs_measurement.py --out runs/theory-example
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import sgn_lab
from sgn_lab.data import load_task
from sgn_lab.theory import linreg_gradient_covariance


def half_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - y.squeeze(-1)) ** 2).mean()   # the closed form's loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    task = load_task(f"linreg:dim=8,n={args.samples}", seed=0)
    H, w_star, sigma = (task.info[k] for k in ("H", "w_star", "noise_std"))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1, bias=False).double()
    x, y = task.x_train.double(), task.y_train.double()

    delta = model.weight.detach().numpy()[0] - np.asarray(w_star)
    theory = np.trace(linreg_gradient_covariance(H, delta, sigma))
    stats = sgn_lab.noise_stats(sgn_lab.per_sample_grads(model, half_squared_error, x, y))
    # The trace's standard error from the per-sample squared deviations (n samples).
    G = sgn_lab.flatten_grads(sgn_lab.per_sample_grads(model, half_squared_error, x, y))
    squared = ((G - G.mean(0)) ** 2).sum(1)
    error = float(squared.std() / len(G) ** 0.5)
    print(f"tr Σ: closed form {theory:.4f}, measured {stats.trace:.4f} ± {error:.4f} "
          f"({(stats.trace - theory) / error:+.1f} standard errors)")

    batch = 16  # minibatch noise: tr Cov[g_B] = tr S / B, with replacement
    draws = torch.randint(0, len(G), (2000, batch), generator=torch.Generator().manual_seed(1))
    g_B = G[draws].mean(1)
    monte_carlo = float(((g_B - G.mean(0)) ** 2).sum(1).mean())
    print(f"tr Cov[g_B] at B = {batch}: tr S/B = {stats.trace / batch:.4f}, "
          f"Monte Carlo over 2000 minibatches {monte_carlo:.4f}")
    (args.out / "theory.json").write_text(json.dumps(
        {"closed_form_trace": theory, "measured_trace": stats.trace, "trace_se": error,
         "minibatch_trace": stats.trace / batch, "monte_carlo": monte_carlo}, indent=1))


if __name__ == "__main__":
    main()
