"""Your own FSDP2 training with sgn-lab attached: a model sharded with ``fully_shard``, the
probe set split over the ranks, and the noise scale from the gradients' reduce-scatter.

    torchrun --standalone --nproc-per-node 2 examples/fsdp_train.py --out runs/fsdp-example
    python examples/fsdp_train.py --out runs/one-process      # the same, unsharded

Every rank builds the same model and data (same seeds) and shards the model: each holds half
of every parameter, gradient and momentum buffer. Each step every rank draws the same
minibatch and trains on its equal share. At a measurement, every rank calls the probe and the
per-sample functions: they gather the parameters for the call (a collective) and return the
same numbers on every rank, the one-process numbers. Rank 0 writes ``probe.csv`` (one row per
measurement, with the Gram's trace from ``gram_and_mean_gradient``) and, with more than one
process, ``gns.csv`` (one row per step).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

import sgn_lab
from sgn_lab.distributed import Ranks, destroy_group, init_from_env
from sgn_lab.distributed.fsdp import ShardedNoiseScale, shard_blocks


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
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 3))

    gns = None
    if ranks.distributed:
        shard_blocks(model)  # fully_shard each Linear, then the whole model
        gns = ShardedNoiseScale(model, batch_size=args.batch_size // ranks.size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # after sharding
    probe = sgn_lab.NoiseProbe(model, F.cross_entropy, x, y, samples=args.probe_samples,
                               every=20, instruments=["eval", "sgn"], ranks=ranks)

    order = torch.Generator().manual_seed(1)  # the same minibatches on every rank
    rows = []
    for step in range(args.steps + 1):
        result = probe(step)  # every rank, at the same steps
        if result is not None:
            # Any per-sample function works on the sharded model too, on every rank.
            probe_x, probe_y = x[:16], y[:16]
            gram, mean = sgn_lab.gram_and_mean_gradient(model, F.cross_entropy, probe_x,
                                                        probe_y)
            rows.append({**result.row, "gram_trace": float(gram.trace()),
                         "gram_mean_sq_norm": float(mean @ mean)})
        if step == args.steps:
            break
        batch = torch.randperm(len(x), generator=order)[: args.batch_size]
        mine = batch[ranks.shard(args.batch_size)]  # this rank's equal share
        optimizer.zero_grad()
        F.cross_entropy(model(x[mine]), y[mine]).backward()
        optimizer.step()
        if gns is not None:
            gns.step()  # one all-reduce of 7 numbers

    if ranks.is_root:
        args.out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out / "probe.csv", index=False)
        if gns is not None:
            gns.frame().to_csv(args.out / "gns.csv", index=False)
            print(f"B_simple during training: {gns.noise_scale:.3g} ± {gns.noise_scale_se:.2g}")
        print(f"probe at step {rows[-1]['step']}: B_simple {rows[-1]['noise_scale']:.3g}, "
              f"tr S {rows[-1]['trace']:.4g}")
    destroy_group()


if __name__ == "__main__":
    main()
