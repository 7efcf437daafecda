"""The DDP noise-scale hook against single-process gradients and exact per-sample statistics.

The DDP runs use gloo on the CPU, processes on localhost only, one spawn of 3 ranks shared by
the module (``ddp_runs``; ranks 0 and 1 repeat everything as a 2-rank group): each rank writes
its results to a file, the tests compare them with references computed here in one process from
the same model and samples.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import rejects
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

from sgn_lab import flatten_grads, noise_stats, per_sample_grads, seeds
from sgn_lab.distributed import GradientNoiseScale, NoiseScaleTracker, destroy_group, gns_hook
from sgn_lab.distributed.fsdp import ShardedNoiseScale, shard_blocks
from sgn_lab.distributed.gns import HISTORY_COLUMNS, ema_effective_samples, two_batch_estimates

BATCH = 4  # samples per rank per micro-batch
MODEL_SEED, DATA_SEED, DRAW_SEED = 11, 12, 13
POOL = 24  # the finite data set of the unbiasedness run
JOIN_STEPS = 3  # steps of the Join run; rank 1 has data for one fewer
DRAWS = 300  # minibatches in the unbiasedness run
WORLD = 3  # processes spawned; ranks 0 and 1 also form a 2-rank group
JOIN_TIMEOUT_S = 150.0
GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # init and every collective


@dataclass(frozen=True)
class Scenario:
    """One DDP configuration run for a few steps on consecutive shards of fixed data."""

    steps: int = 2
    micro: int = 1  # micro-batches per step; all but the last under no_sync
    lr: float = 0.5  # SGD between steps: the second step sees other weights (and rebuilt buckets)
    unused: bool = False  # a layer that takes no part in the forward pass
    scaler: bool = False  # a GradScaler whose scale doubles after every step
    uneven: bool = False  # rank r has BATCH + r samples per micro-batch
    ddp: dict[str, Any] = field(default_factory=dict)

    def batches(self, world: int) -> list[int]:
        """Each rank's samples per step."""
        return [self.micro * (BATCH + (r if self.uneven else 0)) for r in range(world)]


FSDP = ("plain", "scaler", "uneven")  # the scenarios run on an FSDP2-sharded model too
SCENARIOS = {
    "plain": Scenario(),
    "bucket_view": Scenario(ddp={"gradient_as_bucket_view": True, "bucket_cap_mb": 1e-4}),
    "unused": Scenario(steps=1, unused=True, ddp={"find_unused_parameters": True}),
    "accumulate": Scenario(micro=2),
    "scaler": Scenario(scaler=True),
    "uneven": Scenario(uneven=True),
}


class Branchy(nn.Module):
    """An MLP with a head that the forward pass never uses."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.spare = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def make_model(unused: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    gen = torch.Generator().manual_seed(MODEL_SEED)
    body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    model = Branchy(body) if unused else body
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return model.to(dtype)


def make_data(n: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable, with label noise below
    flip = torch.rand(n, generator=gen) < 0.2
    y[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=gen)
    return x.to(dtype), y


def shard(step: int, rank: int, world: int, micro: int, spec: Scenario | None = None) -> slice:
    """Rank's samples of a step: consecutive global batches, rank after rank."""
    sizes = (spec or Scenario(micro=micro)).batches(world)
    start = step * sum(sizes) + sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


# ---------------------------------------------------------------- spawned ranks (top level)


def rank_main(rank: int, port: int, out_dir: str) -> None:
    """One of WORLD ranks: everything on all of them, then again on the subgroup of ranks 0
    and 1 (a 2-rank DDP without a second spawn; it also exercises ``process_group``)."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # localhost only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=GROUP_TIMEOUT)
    try:
        pair = dist.new_group([0, 1])
        result = {WORLD: run_all(rank, WORLD, None)}
        if rank < 2:
            result[2] = run_all(rank, 2, pair)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # rank 2 leaves only once the pair is done
    finally:
        destroy_group()


def run_all(rank: int, world: int, group: dist.ProcessGroup | None) -> dict[str, Any]:
    """Every scenario, the special step endings and the unbiasedness draws on ``group``."""
    result = {name: run_scenario(rank, world, group, spec) for name, spec in SCENARIOS.items()}
    result["endings"] = step_endings(rank, world, group)
    result["join"] = joined_run(rank, world, group)
    result["draws"] = unbiased_draws(rank, world, group)
    result["fsdp"] = {name: run_sharded(rank, world, group, SCENARIOS[name]) for name in FSDP}
    return result


def run_scenario(rank: int, world: int, group: dist.ProcessGroup | None, spec: Scenario
                 ) -> dict[str, Any]:
    x, y = make_data(64)
    ddp = DDP(make_model(spec.unused), process_group=group, **spec.ddp)
    buckets: list[int] = []

    def counting_hook(state, bucket):  # no annotations: DDP rejects string ones
        buckets.append(bucket.index())
        return gns_hook(state, bucket)

    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
              if spec.scaler else None)
    gns = GradientNoiseScale(batch_size=spec.batches(world)[rank], smoothing=0.9,
                             process_group=group, scaler=scaler)
    ddp.register_comm_hook(gns, counting_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=spec.lr)
    grads, scales = [], []
    for step in range(spec.steps):
        optimizer.zero_grad()
        part = shard(step, rank, world, spec.micro, spec)
        xs, ys = x[part].chunk(spec.micro), y[part].chunk(spec.micro)
        for k in range(spec.micro):
            last = k == spec.micro - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss = loss_fn(ddp(xs[k]), ys[k]) / spec.micro
                (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scales.append(scaler.get_scale())
            scaler.unscale_(optimizer)
        grads.append(flat_grad(ddp.module))
        if scaler:
            scaler.step(optimizer)
            scaler.update()  # doubles the scale: the next step's norms see another one
        else:
            optimizer.step()
        gns.step()
    return {"rows": gns.history, "grads": grads, "buckets": max(buckets) + 1, "scales": scales}


def run_sharded(rank: int, world: int, group: dist.ProcessGroup | None, spec: Scenario
                ) -> dict[str, Any]:
    """A scenario on the model sharded by FSDP2 (each Linear and the root), with the noise
    scale of its reduce-scatter; a measurement on the gathered model between the steps, whose
    backward passes must not count."""
    x, y = make_data(64)
    model = make_model()
    shard_blocks(model, group=group)
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
              if spec.scaler else None)
    gns = ShardedNoiseScale(model, spec.batches(world)[rank], smoothing=0.9,
                            process_group=group, scaler=scaler)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    grads, probes = [], []
    for step in range(spec.steps):
        optimizer.zero_grad()
        part = shard(step, rank, world, 1, spec)
        loss = loss_fn(model(x[part]), y[part])
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        grads.append(torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
                     .double())
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        gns.step()
        probes.append(per_sample_grads(model, loss_fn, x[:3], y[:3], verify=3))
    return {"rows": gns.history, "grads": grads, "probes": probes}


def flat_grad(model: nn.Module) -> Tensor:
    """The parameters' .grad, flattened in float64; a parameter without one counts 0 (DDP
    leaves .grad None where no rank used the parameter)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()]).double()


def step_endings(rank: int, world: int, group: dist.ProcessGroup | None) -> dict[str, Any]:
    """A step of only no_sync passes records nothing; two synced passes keep the last."""
    x, y = make_data(64)
    ddp = DDP(make_model(), process_group=group)
    gns = GradientNoiseScale(batch_size=BATCH, process_group=group)
    ddp.register_comm_hook(gns, gns_hook)
    with ddp.no_sync():
        loss_fn(ddp(x[:BATCH]), y[:BATCH]).backward()
    nothing = gns.step()
    for step in (0, 1):  # the first pass is overwritten: the row must be step 1's
        ddp.zero_grad()
        part = shard(step, rank, world, 1)
        loss_fn(ddp(x[part]), y[part]).backward()
    try:  # checked before the collective: every rank raises, none hangs
        gns.step(batch_size=0)
        refused = ""
    except ValueError as error:
        refused = str(error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = gns.step()
    return {"nothing": nothing, "row": row, "refused": refused,
            "warnings": [str(w.message) for w in caught]}


def joined_run(rank: int, world: int, group: dist.ProcessGroup | None) -> dict[str, Any]:
    """JOIN_STEPS steps under Join([ddp, gns]); rank 1 runs out of data one step early."""
    x, y = make_data(64)
    ddp = DDP(make_model(), process_group=group)
    gns = GradientNoiseScale(batch_size=BATCH, process_group=group)
    ddp.register_comm_hook(gns, gns_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    grads = []
    with Join([ddp, gns]):
        for step in range(JOIN_STEPS - (rank == 1)):
            optimizer.zero_grad()
            part = shard(step, rank, world, 1)
            loss_fn(ddp(x[part]), y[part]).backward()
            grads.append(flat_grad(ddp.module))
            optimizer.step()
            gns.step()
    refused = ""
    try:
        with Join([gns, ddp]):  # the wrong order is refused before any collective
            gns.step()
    except ValueError as error:
        refused = str(error)
    return {"rows": gns.history, "grads": grads, "refused": refused}


def unbiased_draws(rank: int, world: int, group: dist.ProcessGroup | None
                   ) -> dict[str, list[float]]:
    """DRAWS steps at fixed weights, each on N·b samples drawn without replacement."""
    x, y = make_data(POOL, torch.float64)
    ddp = DDP(make_model(dtype=torch.float64), process_group=group)
    gns = GradientNoiseScale(batch_size=BATCH, process_group=group)
    ddp.register_comm_hook(gns, gns_hook)
    for step in range(DRAWS):
        ddp.zero_grad()
        order = torch.randperm(POOL, generator=seeds.generator(DRAW_SEED, step))
        mine = order[rank * BATCH : (rank + 1) * BATCH]  # disjoint shards of one draw
        loss_fn(ddp(x[mine]), y[mine]).backward()
        gns.step()
    frame = gns.frame()
    return {k: frame[k].tolist() for k in ("sq_norm_estimate", "trace_estimate", "noise_scale")}


# ---------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path) -> list[dict[int, Any]]:
    """Run :func:`rank_main` on WORLD spawned processes, bounded in time; their results."""
    context = mp.start_processes(rank_main, args=(free_port(), str(out_dir)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{WORLD} DDP ranks did not finish within {JOIN_TIMEOUT_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[dict[int, Any]]:
    """One spawn for the module: each rank's results by world size."""
    return launch(tmp_path_factory.mktemp("gns"))


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def ddp_results(request, ddp_runs) -> tuple[int, list[dict[str, Any]]]:
    """(N, the results of the N ranks of the N-rank runs)."""
    world = request.param
    return world, [run[world] for run in ddp_runs[:world]]


# ---------------------------------------------------------------- references in one process


def mean_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean gradient of the loss over (x, y), flattened; a parameter without one counts 0."""
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    return flat_grad(model)


def reference_steps(world: int, spec: Scenario) -> list[dict[str, Any]]:
    """Per step: mean over ranks of |g_r|², |mean_r g_r|², and the global gradient."""
    x, y = make_data(64)
    model = make_model(spec.unused)
    out = []
    for step in range(spec.steps):
        local = [mean_grad(model, x[p], y[p])
                 for p in (shard(step, r, world, spec.micro, spec) for r in range(world))]
        g = torch.stack(local).mean(dim=0)
        out.append({"local": float(torch.stack([v @ v for v in local]).mean()),
                    "global": float(g @ g), "grad": g})
        with torch.no_grad():  # SGD on the global gradient, as the ranks did
            offset = 0
            for p in model.parameters():
                p -= spec.lr * g[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
    return out


# ---------------------------------------------------------------- tests: DDP


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_one_step_matches_single_process(ddp_results, name):
    world, results = ddp_results
    spec = SCENARIOS[name]
    # B_small: the harmonic mean of the ranks' batches (b when they are equal).
    b = 1 / float(np.mean([1 / size for size in spec.batches(world)]))
    rows = results[0][name]["rows"]
    assert [r["step"] for r in rows] == list(range(spec.steps))
    for row, ref, grad in zip(rows, reference_steps(world, spec), results[0][name]["grads"],
                              strict=True):
        assert row["local_sq_norm"] == pytest.approx(ref["local"], rel=2e-6)
        assert row["global_sq_norm"] == pytest.approx(ref["global"], rel=2e-6)
        # DDP's .grad is the global mean gradient, as without the hook.
        torch.testing.assert_close(grad.double(), ref["grad"], rtol=1e-5, atol=1e-7)
        # The closed formulas with B_small = b, B_big = N·b, from the reference norms.
        big = world * b
        sq_norm = (big * ref["global"] - b * ref["local"]) / (big - b)
        trace = (ref["local"] - ref["global"]) / (1 / b - 1 / big)
        assert row["sq_norm_estimate"] == pytest.approx(sq_norm, rel=1e-4)
        assert row["trace_estimate"] == pytest.approx(trace, rel=1e-4)
    if name == "bucket_view":
        assert results[0][name]["buckets"] > 1  # the per-step totals sum several buckets
    if name == "scaler":  # the norms above are unscaled, though each step had another scale
        assert results[0][name]["scales"] == [2.0**8, 2.0**9]


@pytest.mark.parametrize("name", FSDP)
def test_sharded_noise_scale_matches_single_process(ddp_results, name):
    """FSDP2: the local norms read from the gathered gradients, the global one from the
    shards, as DDP's; the measurements between the steps (per-sample gradients of the
    gathered model, whose check runs backward passes) leave the rows alone."""
    world, results = ddp_results
    spec = SCENARIOS[name]
    b = 1 / float(np.mean([1 / size for size in spec.batches(world)]))
    run = results[0]["fsdp"][name]
    assert [r["step"] for r in run["rows"]] == list(range(spec.steps))
    model = make_model()
    x, y = make_data(64)
    for row, ref, grad, probe in zip(run["rows"], reference_steps(world, spec), run["grads"],
                                     run["probes"], strict=True):
        assert row["local_sq_norm"] == pytest.approx(ref["local"], rel=2e-6)
        assert row["global_sq_norm"] == pytest.approx(ref["global"], rel=2e-6)
        torch.testing.assert_close(grad, ref["grad"], rtol=1e-5, atol=1e-7)
        big = world * b
        trace = (ref["local"] - ref["global"]) / (1 / b - 1 / big)
        assert row["trace_estimate"] == pytest.approx(trace, rel=1e-4)
        with torch.no_grad():  # the reference model after this step
            offset = 0
            for p in model.parameters():
                p -= spec.lr * ref["grad"][offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
        want = per_sample_grads(model, loss_fn, x[:3], y[:3])
        assert list(probe) == list(want)
        for key in want:
            torch.testing.assert_close(probe[key], want[key], rtol=1e-5, atol=1e-6)
    for other in results[1:]:
        assert pd.DataFrame(other["fsdp"][name]["rows"]).equals(pd.DataFrame(run["rows"]))


def test_every_rank_logs_the_same_history(ddp_results):
    world, results = ddp_results
    for name in SCENARIOS:
        frames = [pd.DataFrame(r[name]["rows"]) for r in results]
        assert list(frames[0].columns) == list(HISTORY_COLUMNS)
        assert all(f.equals(frames[0]) for f in frames[1:]), name


def test_step_endings_without_and_with_extra_synced_passes(ddp_results):
    world, results = ddp_results
    endings = results[0]["endings"]
    assert endings["nothing"] is None
    ref = reference_steps(world, Scenario(lr=0.0))[1]  # step 1's shards, initial weights
    assert endings["row"]["step"] == 0
    assert endings["row"]["local_sq_norm"] == pytest.approx(ref["local"], rel=2e-6)
    assert endings["row"]["global_sq_norm"] == pytest.approx(ref["global"], rel=2e-6)
    assert any("2 synchronised backward passes" in w for w in endings["warnings"])
    assert endings["refused"] == "batch_size must be an integer >= 1, got 0"


def test_a_rank_that_joins_early_shadows_the_step(ddp_results):
    """Under Join the last step has the other N − 1 ranks: their mean norms and the norm of
    their mean gradient (the buckets hold it times (N−1)/N, as DDP's .grad does); with N = 2
    one rank is left, and no row is recorded. Every rank, the joined one too, logs it."""
    world, results = ddp_results
    x, y = make_data(64)
    model = make_model()
    want = []
    for step in range(JOIN_STEPS):
        ranks = [r for r in range(world) if step < JOIN_STEPS - 1 or r != 1]
        local = [mean_grad(model, x[p], y[p]) for p in (shard(step, r, world, 1) for r in ranks)]
        g = torch.stack(local).mean(dim=0)
        want.append({"local": float(torch.stack([v @ v for v in local]).mean()),
                     "global": float(g @ g), "ranks": len(ranks)})
        with torch.no_grad():  # the ranks' SGD step on DDP's .grad = Σ_active g_r / N
            offset = 0
            for p in model.parameters():
                step_grad = g[offset:offset + p.numel()] * len(ranks) / world
                p -= 0.5 * step_grad.view_as(p).to(p.dtype)
                offset += p.numel()
    expected = [w for w in want if w["ranks"] >= 2]
    rows = results[0]["join"]["rows"]
    assert len(rows) == len(expected) == (JOIN_STEPS if world == 3 else JOIN_STEPS - 1)
    for row, w in zip(rows, expected, strict=True):
        assert row["local_sq_norm"] == pytest.approx(w["local"], rel=2e-6)
        assert row["global_sq_norm"] == pytest.approx(w["global"], rel=2e-6)
        big = w["ranks"] * BATCH
        trace = (w["local"] - w["global"]) / (1 / BATCH - 1 / big)
        assert row["trace_estimate"] == pytest.approx(trace, rel=1e-4)
    for other in results[1:]:
        assert pd.DataFrame(other["join"]["rows"]).equals(pd.DataFrame(rows))
    assert all("must come after the DDP model" in r["join"]["refused"] for r in results)


def exact_population() -> tuple[float, float, float]:
    """noise.py's tr S (1/(n−1)), unbiased |G|² = |ḡ|² − tr S/n and |ḡ|² of the POOL samples."""
    x, y = make_data(POOL, torch.float64)
    stats = noise_stats(flatten_grads(per_sample_grads(make_model(dtype=torch.float64), loss_fn,
                                                       x, y)), shape=False)
    return stats.trace, stats.grad_sq_norm, stats.mean_sq_norm


def test_estimates_are_unbiased_against_per_sample_statistics(ddp_results):
    """Drawn without replacement from POOL samples, E|g_B|² = |ḡ|² + tr S·(1/B − 1/n), so
    E trΣ_est = tr S and E |G|²_est = |ḡ|² − tr S/n exactly (module docstring of gns)."""
    world, results = ddp_results
    draws = results[0]["draws"]
    trace, sq_norm, mean_sq_norm = exact_population()
    for key, want in (("trace_estimate", trace), ("sq_norm_estimate", sq_norm)):
        values = np.array(draws[key])
        se = values.std(ddof=1) / math.sqrt(values.size)
        assert abs(values.mean() - want) < 4 * se, (key, values.mean(), want, se)
    # Power: the uncorrected target |ḡ|² (no finite-population term) is rejected.
    values = np.array(draws["sq_norm_estimate"])
    assert abs(values.mean() - mean_sq_norm) > 4 * values.std(ddof=1) / math.sqrt(values.size)


def test_ratio_of_mean_estimates_gives_the_noise_scale(ddp_results):
    """mean(trΣ_est)/mean(|G|²_est) against noise_stats' B_simple, within 4 delta-method SEs."""
    world, results = ddp_results
    draws = results[0]["draws"]
    trace, sq_norm, _ = exact_population()
    x, t = np.array(draws["sq_norm_estimate"]), np.array(draws["trace_estimate"])
    ratio = t.mean() / x.mean()
    se = (t - ratio * x).std(ddof=1) / math.sqrt(x.size) / x.mean()
    assert abs(ratio - trace / sq_norm) < 4 * se
    assert math.isfinite(draws["noise_scale"][-1])


# ---------------------------------------------------------------- tests: no processes


@pytest.mark.parametrize("kwargs,name,shown", [
    ({"batch_size": 0}, "batch_size", "0"),
    ({"batch_size": 2.5}, "batch_size", "2.5"),
    ({"batch_size": 4, "smoothing": 1.0}, "smoothing", "1.0"),
    ({"batch_size": 4, "smoothing": -0.1}, "smoothing", "-0.1"),
    ({"batch_size": 4, "window": 1}, "window", "1"),
])
def test_hyperparameters_are_checked(kwargs, name, shown):
    with pytest.raises(ValueError, match=rejects(name, shown)):
        GradientNoiseScale(**kwargs)


def test_a_scaler_must_be_a_grad_scaler():
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler, got float"):
        GradientNoiseScale(batch_size=4, scaler=2.0**16)


def test_needs_an_initialised_group_of_two_ranks(monkeypatch):
    if dist.is_initialized():
        pytest.skip("this process already belongs to a process group")
    with pytest.raises(RuntimeError, match="not initialised"):
        GradientNoiseScale(batch_size=4)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=GROUP_TIMEOUT)
    try:
        with pytest.raises(ValueError, match=rejects("world size", "1")):
            GradientNoiseScale(batch_size=4)
    finally:
        destroy_group()


def test_nonpositive_smoothed_sq_norm_gives_nan_and_flag():
    tracker = NoiseScaleTracker(smoothing=0.0)
    row = tracker.update(5.0, 1.0, 4, 8)  # |G|²_est = (8·1 − 4·5)/4 = −3
    assert row["sq_norm_estimate"] == -3.0 and row["trace_estimate"] == 32.0
    assert row["sq_norm_nonpositive"] is True
    assert math.isnan(row["noise_scale"]) and math.isnan(row["noise_scale_se"])
    row = tracker.update(3.0, 2.0, 4, 8)  # |G|²_est = 1, trΣ_est = 8
    assert row["sq_norm_nonpositive"] is False and row["noise_scale"] == 8.0


def test_smoothing_and_error_bar_follow_their_formulas():
    rng = np.random.default_rng(0)
    beta, window = 0.9, 5
    tracker = NoiseScaleTracker(smoothing=beta, window=window)
    xs, ys = rng.normal(10, 2, 12), rng.normal(60, 9, 12)
    for x, y in zip(xs, ys, strict=True):  # small=1, big=2: local = x + y, global = x + y/2
        row = tracker.update(x + y, x + y / 2, 1, 2)
    assert row["sq_norm_estimate"] == pytest.approx(xs[-1]) and row["step"] == 11
    w = beta ** np.arange(11, -1, -1)
    w /= w.sum()  # the bias-corrected EMA's weights
    sx, sy = w @ xs, w @ ys
    assert row["sq_norm_smoothed"] == pytest.approx(sx, rel=1e-12)
    assert row["trace_smoothed"] == pytest.approx(sy, rel=1e-12)
    assert row["noise_scale"] == pytest.approx(sy / sx, rel=1e-12)
    assert ema_effective_samples(beta, 12) == pytest.approx(1 / (w @ w), rel=1e-12)
    r, cov = sy / sx, np.cov(xs[-window:], ys[-window:])  # delta method, written out
    var = (cov[1, 1] - 2 * r * cov[0, 1] + r**2 * cov[0, 0]) * (w @ w) / sx**2
    assert row["noise_scale_se"] == pytest.approx(math.sqrt(var), rel=1e-10)


def test_non_finite_step_is_logged_but_not_averaged():
    tracker = NoiseScaleTracker(smoothing=0.5)
    before = tracker.update(3.0, 2.0, 4, 8)
    row = tracker.update(math.inf, 2.0, 4, 8)
    assert math.isinf(row["trace_estimate"])
    assert row["noise_scale"] == before["noise_scale"]
    assert tracker.frame().shape == (2, len(HISTORY_COLUMNS))


def test_error_bar_matches_the_spread_of_the_noise_scale():
    """Over replicate runs of iid per-step estimates, the reported SE of the final smoothed
    B_simple matches the spread of that B_simple."""
    rng = np.random.default_rng(1)
    finals, ses = [], []
    for _ in range(150):
        tracker = NoiseScaleTracker(smoothing=0.9, window=60)
        xs = rng.normal(10, 3, 120)
        ys = 5 * xs + rng.normal(50, 20, 120)  # correlated, as real estimates are
        for x, y in zip(xs, ys, strict=True):
            row = tracker.update(x + y, x + y / 2, 1, 2)
        finals.append(row["noise_scale"])
        ses.append(row["noise_scale_se"])
    assert np.mean(ses) == pytest.approx(np.std(finals, ddof=1), rel=0.2)


def test_two_batch_estimates_need_two_batch_sizes():
    with pytest.raises(ValueError, match="small_batch=8, big_batch=8"):
        two_batch_estimates(1.0, 1.0, 8, 8)
