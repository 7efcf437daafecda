"""Per-rank memory and time of training and of one SGN measurement: GPT-2 medium, 1 process
against FSDP2 over 2.

The model is Hugging Face's default ``GPT2Config`` at GPT-2-medium size (355M parameters:
vocabulary 50257, 24 layers, width 1024, 16 heads, LM head tied to the token embedding),
random weights (seeded), dropout 0, float32, on the CPU; SGD with momentum 0.9 (so the
training state is parameters + gradients + one buffer); sequences of T + 1 tokens (seeded),
next-token loss ``sgn_lab.models.token_cross_entropy``.

    1 process   the plain model
    fsdp        ``sgn_lab.distributed.fsdp.shard_blocks`` (each GPT2Block, then the root) over
                N = 2 processes (gloo, this machine), the minibatch and the probe set split

Per rank, each phase's peak RSS (VmHWM, reset before the phase) and its time:

    build       the model, sharded where FSDP is used, and the optimizer
    train       --steps optimizer steps on minibatches of --batch sequences (the global batch)
    measure     ``NoiseProbe(instruments=["sgn"], grads="gram").measure``: the Gram path on
                --probe-samples sequences (split over the ranks), the spectrum, tr S and
                B_simple; under FSDP the parameters are gathered for it (one copy of the model
                on each rank), as the library's report says

Check: the measurement's tr S and |ḡ|² agree between 1 and 2 processes (relative 1e-4; the
two runs trained the same minibatches from the same weights, float32).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_fsdp_memory.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_fsdp_memory.py --quick    # 2 layers, width 256

Writes benchmarks/results_fsdp_memory.csv (one row per rank and phase); returns 1 when the
check fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from harness import machine, proc_status_kib, reset_peak_rss  # noqa: E402

HERE = Path(__file__).parent
GIB = 2**30


def build(quick: bool) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = (GPT2Config(n_embd=256, n_layer=2, n_head=4) if quick
              else GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.config.use_cache = False
    return model


class LogitsOnly(torch.nn.Module):
    """The logits of an HF language model, so that a loss takes (logits, targets)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def peak_gib() -> float:
    return proc_status_kib("VmHWM") / 2**20


def phase(rows: list[dict], rank: int, world: int, name: str, fn) -> object:
    reset_peak_rss()
    if world > 1:
        dist.barrier()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    rows.append({"processes": world, "rank": rank, "phase": name, "seconds": seconds,
                 "peak_rss_gib": peak_gib(), "rss_gib": proc_status_kib("VmRSS") / 2**20})
    return result


def run(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from sgn_lab import NoiseProbe
    from sgn_lab.distributed import Ranks
    from sgn_lab.distributed.fsdp import shard_blocks
    from sgn_lab.models import token_cross_entropy

    if world > 1:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    ranks = Ranks.of() if world > 1 else Ranks()
    gen = torch.Generator().manual_seed(1)
    vocab = 50257
    ids = torch.randint(0, vocab, (args.batch * args.steps + args.probe_samples, args.context + 1),
                        generator=gen)
    x, y = ids[:, :-1], ids[:, 1:]
    rows: list[dict] = []

    def built():
        model = LogitsOnly(build(args.quick))
        if world > 1:
            shard_blocks(model)
        return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    model, optimizer = phase(rows, rank, world, "build", built)

    def trained():
        for step in range(args.steps):
            mine = torch.arange(args.batch)[ranks.shard(args.batch)] + step * args.batch
            optimizer.zero_grad()
            token_cross_entropy(model(x[mine]), y[mine]).backward()
            optimizer.step()

    phase(rows, rank, world, "train", trained)
    probe_x = x[-args.probe_samples:]
    probe_y = y[-args.probe_samples:]
    probe = NoiseProbe(model, token_cross_entropy, probe_x, probe_y,
                       samples=args.probe_samples, instruments=["sgn"], grads="gram",
                       verify=0, ranks=ranks)
    result = phase(rows, rank, world, "measure", lambda: probe.measure(args.steps))
    for row in rows:
        row.update(trace=result.row["trace"], mean_sq_norm=result.row["mean_sq_norm"])
    pd.DataFrame(rows).to_csv(Path(out) / f"rank{world}-{rank}.csv", index=False)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--probe-samples", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results_fsdp_memory.csv")
    args = parser.parse_args()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"fsdp-memory-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    for world in (1, 2):  # each run in fresh processes: their peak RSS is their own
        mp.start_processes(run, args=(world, free_port(), args, str(scratch)), nprocs=world,
                           start_method="spawn", join=True)
    frame = pd.concat([pd.read_csv(p) for p in sorted(scratch.glob("rank*.csv"))],
                      ignore_index=True)
    frame["machine"] = machine()
    frame["model"] = "gpt2-2x256" if args.quick else "gpt2-medium"
    frame.to_csv(args.out, index=False)
    print(frame[["processes", "rank", "phase", "seconds", "peak_rss_gib", "rss_gib"]]
          .to_string(index=False))
    one = frame[frame.processes == 1].iloc[-1]
    two = frame[frame.processes == 2].iloc[-1]
    ok = all(abs(two[k] - one[k]) <= 1e-4 * abs(one[k]) for k in ("trace", "mean_sq_norm"))
    print(f"check (tr S, |ḡ|² of 1 and 2 processes within 1e-4): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
