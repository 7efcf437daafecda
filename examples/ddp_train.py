"""Your own DDP training with sgn-lab attached: the probe set split over the ranks, and the
noise scale from DDP's all-reduce at every step.

    torchrun --standalone --nproc-per-node 2 examples/ddp_train.py --out runs/ddp-example
    python examples/ddp_train.py --out runs/one-process      # the same, in one process

Every rank builds the same model and data (same seeds), draws the same minibatch and trains
on its equal share of it; the probe measures at the same steps on every rank and returns the
same numbers there. Rank 0 writes ``probe.csv`` (one row per measurement) and, with more than
one process, ``gns.csv`` (one row per step).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import sgn_lab
from sgn_lab.distributed import GradientNoiseScale, Ranks, destroy_group, gns_hook, init_from_env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probe-samples", type=int, default=64)
    args = parser.parse_args(argv)

    ranks = init_from_env() if "WORLD_SIZE" in os.environ else Ranks()  # torchrun, or alone
    data = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 20, generator=data)
    y = (x[:, :5].sum(dim=1) > 0).long() + (x[:, 5] > 1).long()  # three classes
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3))

    trained, gns = model, None
    if ranks.distributed:
        trained = DistributedDataParallel(model)
        gns = GradientNoiseScale(batch_size=args.batch_size // ranks.size)
        trained.register_comm_hook(gns, gns_hook)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    probe = sgn_lab.NoiseProbe(model, F.cross_entropy, x, y, samples=args.probe_samples,
                               every=20, instruments=["eval", "sgn"], ranks=ranks)

    order = torch.Generator().manual_seed(1)  # the same minibatches on every rank
    rows = []
    for step in range(args.steps + 1):
        result = probe(step)  # every rank, at the same steps
        if result is not None:
            rows.append(result.row)
        if step == args.steps:
            break
        batch = torch.randperm(len(x), generator=order)[: args.batch_size]
        mine = batch[ranks.shard(args.batch_size)]  # this rank's equal share
        optimizer.zero_grad()
        F.cross_entropy(trained(x[mine]), y[mine]).backward()
        optimizer.step()
        if gns is not None:
            gns.step()  # one all-reduce of 3 numbers

    if ranks.is_root:
        args.out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out / "probe.csv", index=False)
        if gns is not None:
            gns.frame().to_csv(args.out / "gns.csv", index=False)
            print(f"B_simple during training: {gns.noise_scale:.3g} ± {gns.noise_scale_se:.2g}")
        print(f"probe at step {rows[-1]['step']}: B_simple {rows[-1]['noise_scale']:.3g}, "
              f"tr S {rows[-1]['trace']:.4g}")
    destroy_group()  # after the garbage that still holds the group's work


if __name__ == "__main__":
    main()
