"""Scaling of a distributed SGN measurement: communication volume, weak scaling, projection.

The probe set of n samples is split over N processes (torch.distributed, gloo, processes on
this machine only): each rank computes its diagonal block of the per-sample Gram, broadcasts
its *payload* (each parameter as factors or per-sample gradients), receives every other rank's,
computes its share of the off-diagonal blocks (``Ranks.cross_tasks``), and the n×n Gram and the
d-long mean meet in all-reduces (``sgn_lab.distributed.split_gram``; ``NoiseProbe(...,
ranks=...)`` for a whole measurement). Parts:

volume      bytes each rank RECEIVES in one ``split_gram`` call (``Ranks.traffic``: payload,
            sum, objects) for MLPs of several widths (d ~10^4 to ~10^6), two MLPs over
            T = 16 and T = 4 positions and a 2-layer GPT-2 (T = 32); n in {32, 64, 128}; 2 and
            3 processes; grads="gram" and grads="vmap"; against this script's own formula from
            the shapes (not the library's accounting):

              payload_r = Σ_{s≠r} n_s · Σ_params b_p(n_s), bytes per sample (float32):
                vmap: every parameter                      4·numel
                gram: bias, norm weight and bias           4·numel
                      Linear/Conv1D weight p×q, T positions  4·T·(p+q) if that is <= 4·p·q AND
                        ghost(n_s, T, p, q), else 4·p·q
                      embedding (rows × q, int64 index)    min(T·(8 + 4q), 4·rows·q)
                      tied embedding + LM head (V × q)     4·T·(V+q) + T·(8+4q) if that is
                                                           <= 4·V·q AND ghost(n_s, T, V, q),
                                                           else 4·V·q
              ghost(n, T, p, q): n·p·q·4 > 2 GiB, or n²(p+q)·(T² if T > 1 else 1)
                                 <= n·T·p·q + n²·p·q  (the Gram path's cost model)
              sum_r = 8·n² (the Gram, float64) + 8·d (the mean) [+ 8·d on vmap: diag(S)]

            Checks: measured == formula to the byte on every rank, each parameter's choice ==
            the formula's, the split Gram and mean == the single-process ones.
weak        ``NoiseProbe(instruments=["sgn"], grads="gram").measure`` with n = n0·N for
            N = 1, 2, 3, one torch thread a process; median of --repeats after a warm-up;
            each rank's time split into local Gram pass, compact (forming the payload), cross
            blocks, comm (transfers and waiting in them), statistics (eigendecomposition
            apart) and the rest. The machine has 2 cores: 3 processes oversubscribe it.
projection  N in {8, 16, 32, 64}, n = n0·N, per interconnect (stated bandwidths and
            latencies), from the per-rank costs measured here (:func:`project`), at CPU speed
            and at a stated GPU speed-up; ``validation``: the same model at N = 2, 3 with the
            measured gloo link against the measured times.

Also: ``eig`` (noise_stats on n×n Grams, one thread, for the n³ fit) and ``link`` (gloo
broadcast bandwidth and latency between local processes). One CSV, a ``section`` column.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_distributed.py            # full run, ~2 min
    .venv/bin/python benchmarks/bench_distributed.py --quick    # smoke test, 2 processes

The script returns 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: nothing may reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import load_average, machine, mean_and_max, spread, write_rows  # noqa: E402
from torch import Tensor, nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results_distributed.csv")
RTOL = 1e-4  # split Gram and mean against the single-process ones (float32 products)
F32, I64, F64 = 4, 8, 8  # bytes per element
MATERIALISE_BYTES = 2 * 2**30  # per-sample gradients of one term above this: ghost route
PROJECTION_N = (8, 16, 32, 64)


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """``mlp``: in → width → width → 10 (ReLU), samples (n, in); ``mlp-seq``: (n, T, in) →
    Linear(in, width) → ReLU → Linear(width, width) → ReLU → mean over T → Linear(width, 10);
    ``gpt2``: GPT2LMHeadModel (tied head, eager attention, dropout 0, n_positions = T), ids
    (n, T), next-token loss."""

    name: str
    kind: str
    width: int
    inputs: int = 0  # mlp, mlp-seq
    T: int = 1  # positions per sample
    layers: int = 2  # gpt2
    heads: int = 4  # gpt2
    vocab: int = 0  # gpt2


FULL_MODELS = (
    ModelSpec("mlp-32", "mlp", 32, inputs=256),
    ModelSpec("mlp-256", "mlp", 256, inputs=256),
    ModelSpec("mlp-1024", "mlp", 1024, inputs=256),
    ModelSpec("mlp-seq", "mlp-seq", 64, inputs=12, T=16),
    ModelSpec("mlp-seq4", "mlp-seq", 28, inputs=28, T=4),  # ghost iff n_r <= 28
    ModelSpec("gpt2", "gpt2", 128, T=32, layers=2, heads=4, vocab=1024),
)
QUICK_MODELS = (
    ModelSpec("mlp-16", "mlp", 16, inputs=32),
    ModelSpec("mlp-seq", "mlp-seq", 16, inputs=3, T=4),  # mixer: ghost iff n_r <= 4
    ModelSpec("gpt2", "gpt2", 32, T=8, layers=1, heads=2, vocab=64),
)


@dataclass(frozen=True)
class Setting:
    models: tuple[ModelSpec, ...]
    samples: tuple[int, ...]  # n of the volume part
    nprocs: tuple[int, ...]  # N of the volume part (and of the weak part, with 1)
    weak_model: str
    n0: int  # weak scaling: n = n0·N
    repeats: int  # weak scaling: timed measurements per N (after one warm-up)
    eig_sizes: tuple[int, ...]
    link_bytes: int  # the bandwidth probe's buffer


FULL = Setting(FULL_MODELS, (32, 64, 128), (2, 3), "gpt2", n0=64, repeats=5,
               eig_sizes=(128, 256, 512, 1024), link_bytes=32 * 2**20)
QUICK = Setting(QUICK_MODELS, (6, 9), (2,), "gpt2", n0=4, repeats=2,
                eig_sizes=(16, 32, 64), link_bytes=2**20)


class SeqMLP(nn.Module):
    """Two Linear layers at each of T positions, a mean over positions, a linear head."""

    def __init__(self, inputs: int, width: int, classes: int = 10) -> None:
        super().__init__()
        self.inner = nn.Linear(inputs, width)
        self.mixer = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.mixer(torch.relu(self.inner(x)))).mean(dim=1))


def build(spec: ModelSpec, n: int, seed: int = 0
          ) -> tuple[nn.Module, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """The model (seeded, float32, train mode), n samples (x, y) and the loss; the same on
    every rank for the same arguments."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if spec.kind in ("mlp", "mlp-seq"):
        if spec.kind == "mlp":
            model = nn.Sequential(nn.Linear(spec.inputs, spec.width), nn.ReLU(),
                                  nn.Linear(spec.width, spec.width), nn.ReLU(),
                                  nn.Linear(spec.width, 10))
            x = torch.randn(n, spec.inputs, generator=gen)
        else:
            model = SeqMLP(spec.inputs, spec.width)
            x = torch.randn(n, spec.T, spec.inputs, generator=gen)
        return model, x, torch.randint(0, 10, (n,), generator=gen), nn.functional.cross_entropy
    if spec.kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        from sgn_lab.models.hf import Logits
        from sgn_lab.models.losses import token_cross_entropy

        config = GPT2Config(vocab_size=spec.vocab, n_positions=spec.T, n_embd=spec.width,
                            n_layer=spec.layers, n_head=spec.heads, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=spec.vocab - 1,
                            eos_token_id=spec.vocab - 1, attn_implementation="eager")
        model = Logits(GPT2LMHeadModel(config)).float().train()
        ids = torch.randint(0, spec.vocab, (n, spec.T + 1), generator=gen)
        return model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), token_cross_entropy
    raise ValueError(f"unknown model kind {spec.kind!r}")


# --------------------------------------------------------------------------------------------
# The formula: payload bytes from the shapes (this script's own accounting)
# --------------------------------------------------------------------------------------------


def ghost(n: int, T: int, p: int, q: int, itemsize: int = F32) -> bool:
    """Whether the Gram path takes the ghost route for a p×q weight over T positions and n
    samples (never per-sample gradients above 2 GiB)."""
    if n * p * q * itemsize > MATERIALISE_BYTES:
        return True
    return n * n * (p + q) * (T * T if T > 1 else 1) <= n * T * p * q + n * n * p * q


@dataclass(frozen=True)
class Piece:
    """One trainable parameter: numel, its bytes per sample as factors, and the shape (T, p, q)
    of its outer-product term where it has one."""

    name: str
    numel: int
    factors: int
    outer: tuple[int, int, int] | None = None
    dense: bool = False  # its term is its per-sample gradients already

    @property
    def gradients(self) -> int:
        return F32 * self.numel

    def chosen(self, n: int) -> str:
        """What a rank of n samples sends: a dense term as it is (its gradients); else factors
        where no more bytes and, for an outer product, the ghost route, and always factors
        where the n per-sample gradients would exceed 2 GiB."""
        if self.dense:
            return "gradients"
        if n * self.gradients > MATERIALISE_BYTES:
            return "factors"
        if self.outer is not None and not ghost(n, *self.outer):
            return "gradients"
        return "factors" if self.factors <= self.gradients else "gradients"

    def bytes(self, n: int) -> int:
        return self.factors if self.chosen(n) == "factors" else self.gradients


def _layer(name: str, inputs: int, outputs: int, T: int) -> list[Piece]:
    """A Linear or Conv1D layer at T positions, g_i = Σ_t δ_t ⊗ a_t, and its bias."""
    return [Piece(f"{name}.weight", inputs * outputs, F32 * T * (inputs + outputs),
                  (T, outputs, inputs)), _dense(f"{name}.bias", outputs)]


def _dense(name: str, numel: int) -> Piece:
    return Piece(name, numel, F32 * numel, dense=True)


def architecture(spec: ModelSpec) -> list[Piece]:
    """Every trainable parameter, in ``named_parameters()`` order."""
    w, T = spec.width, spec.T
    if spec.kind == "mlp":
        return _layer("0", spec.inputs, w, 1) + _layer("2", w, w, 1) + _layer("4", w, 10, 1)
    if spec.kind == "mlp-seq":
        return (_layer("inner", spec.inputs, w, T) + _layer("mixer", w, w, T)
                + _layer("head", w, 10, 1))
    if spec.kind == "gpt2":
        V = spec.vocab
        rows = T * (I64 + F32 * w)  # an embedding's Rows term: int64 index + values
        pieces = [Piece("wte", V * w, F32 * T * (V + w) + rows, (T, V, w)),  # tied head
                  Piece("wpe", T * w, rows)]
        for i in range(spec.layers):
            pieces += [_dense(f"h.{i}.ln_1.weight", w), _dense(f"h.{i}.ln_1.bias", w)]
            pieces += _layer(f"h.{i}.attn.c_attn", w, 3 * w, T)
            pieces += _layer(f"h.{i}.attn.c_proj", w, w, T)
            pieces += [_dense(f"h.{i}.ln_2.weight", w), _dense(f"h.{i}.ln_2.bias", w)]
            pieces += _layer(f"h.{i}.mlp.c_fc", w, 4 * w, T)
            pieces += _layer(f"h.{i}.mlp.c_proj", 4 * w, w, T)
        return pieces + [_dense("ln_f.weight", w), _dense("ln_f.bias", w)]
    raise ValueError(spec.kind)


def shard_sizes(n: int, N: int) -> list[int]:
    """Samples per rank: contiguous blocks, the first n mod N ranks one more (Ranks.shard)."""
    base, extra = divmod(n, N)
    return [base + (1 if r < extra else 0) for r in range(N)]


def formula(spec: ModelSpec, n: int, N: int, rank: int, route: str) -> dict:
    """Bytes rank ``rank`` of N receives in one split_gram call (payload, sum), d, the
    per-sample gradients' bytes, and the choice of each parameter of this rank's payload."""
    pieces = architecture(spec)
    d = sum(p.numel for p in pieces)
    sizes = shard_sizes(n, N)
    if route == "gram":
        payload = sum(sizes[s] * sum(p.bytes(sizes[s]) for p in pieces)
                      for s in range(N) if s != rank)
        choice = [p.chosen(sizes[rank]) for p in pieces]
    else:
        payload, choice = (n - sizes[rank]) * F32 * d, ["gradients"] * len(pieces)
    return {"payload": payload, "sum": F64 * n * n + F64 * d * (2 if route == "vmap" else 1),
            "d": d, "gradients_only": (n - sizes[rank]) * F32 * d, "choice": choice}


# --------------------------------------------------------------------------------------------
# Timing the phases of a measurement (inside each process)
# --------------------------------------------------------------------------------------------


class Phases:
    """Wall time per phase of split_gram / NoiseProbe.measure, by wrapping what they call:
    local (gram_factors, or gram_result in one process), compact (forming the payload), cross
    (cross_gram), comm (Ranks.broadcast_object, broadcast_tensors, sum: transfers and waiting
    in them) of which bcast (broadcast_tensors: the payloads), stats (noise_stats) of which eig
    (eigvalsh). Also counts the collectives, the local samples and the cross-block entries."""

    NAMES = ("local", "compact", "cross", "comm", "bcast", "stats", "eig")
    PARTS = ("bcast", "eig")  # parts of another phase

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self.counts: Counter = Counter()
        self._depth: Counter = Counter()

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def _timed(self, fn: Callable, phase: str, count: Callable | None = None) -> Callable:
        def wrapped(*args, **kwargs):
            self._depth[phase] += 1
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self._depth[phase] -= 1
                if self._depth[phase] == 0:
                    self.seconds[phase] += time.perf_counter() - start
            if count is not None:
                count(args, out)
            return out
        return wrapped

    def _counted(self, fn: Callable, key: str) -> Callable:
        def wrapped(*args, **kwargs):
            self.counts[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    @contextlib.contextmanager
    def installed(self) -> Iterator[Phases]:
        import torch.distributed as dist

        import sgn_lab.distributed.gram_over_ranks as split_module
        import sgn_lab.run.instruments as instruments
        from sgn_lab.distributed.ranks import Ranks

        def samples(args, out) -> None:
            self.counts["local_samples"] += len(args[3])

        def entries(args, out) -> None:
            self.counts["cross_entries"] += out.numel()

        patches = [
            (split_module, "gram_factors", self._timed(split_module.gram_factors, "local",
                                                       samples)),
            (instruments, "gram_result", self._timed(instruments.gram_result, "local",
                                                     samples)),
            (split_module, "compact", self._timed(split_module.compact, "compact")),
            (split_module, "cross_gram", self._timed(split_module.cross_gram, "cross",
                                                     entries)),
            (instruments, "noise_stats", self._timed(instruments.noise_stats, "stats")),
            (torch.linalg, "eigvalsh", self._timed(torch.linalg.eigvalsh, "eig")),
            (Ranks, "broadcast_tensors",
             self._timed(self._timed(Ranks.broadcast_tensors, "bcast"), "comm")),
            *((Ranks, name, self._timed(getattr(Ranks, name), "comm"))
              for name in ("broadcast_object", "sum")),
            *((dist, name, self._counted(getattr(dist, name), name))
              for name in ("broadcast", "all_reduce", "broadcast_object_list")),
        ]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, new in patches:
            setattr(owner, name, new)
        try:
            yield self
        finally:
            for owner, name, old in saved:
                setattr(owner, name, old)


# --------------------------------------------------------------------------------------------
# What each process runs
# --------------------------------------------------------------------------------------------


def volume_job(ranks, spec: ModelSpec, n: int, route: str) -> dict:
    """One split_gram call: this rank's received bytes by kind, its choices, Gram and mean."""
    from sgn_lab.distributed.gram_over_ranks import split_gram

    model, x, y, loss_fn = build(spec, n)
    ranks.barrier()
    before = Counter(ranks.traffic)
    split = split_gram(model, loss_fn, x, y, ranks, grads=route)
    traffic = Counter(ranks.traffic)
    traffic.subtract(before)
    return {"part": "volume", "model": spec.name, "n": n, "nproc": ranks.size, "route": route,
            "rank": ranks.rank, "traffic": dict(traffic), "choice": list(split.payload.values()),
            "gram": split.gram.numpy(),
            # the mean is all-reduced, the same bits on every rank: rank 0's is checked
            "mean": split.mean.numpy() if ranks.rank == 0 else None}


def weak_job(ranks, spec: ModelSpec, n0: int, repeats: int) -> dict:
    """NoiseProbe.measure with n = n0·N, instruments ["sgn"], grads="gram": one warm-up, then
    ``repeats`` timed measurements, each started together after a barrier."""
    from sgn_lab import NoiseProbe

    n = n0 * ranks.size
    model, x, y, loss_fn = build(spec, n)
    probe = NoiseProbe(model, loss_fn, x, y, samples=n, instruments=["sgn"], grads="gram",
                       ranks=ranks if ranks.distributed else None, seed=0)
    phases = Phases()
    runs = []
    with phases.installed():
        for step in range(repeats + 1):
            phases.reset()
            ranks.barrier()
            before = Counter(ranks.traffic)
            start = time.perf_counter()
            result = probe.measure(step)
            seconds = time.perf_counter() - start
            traffic = Counter(ranks.traffic)
            traffic.subtract(before)
            if step > 0:  # step 0: the warm-up
                runs.append({"seconds": seconds, "phases": dict(phases.seconds),
                             "counts": dict(phases.counts), "traffic": dict(traffic),
                             "trace": float(result.row["trace"])})
    return {"part": "weak", "model": spec.name, "nproc": ranks.size, "n": n, "n0": n0,
            "rank": ranks.rank, "runs": runs}


def link_job(ranks, nbytes: int, repeats: int = 5) -> dict:
    """gloo broadcast from rank 0: a large buffer's time (median of ``repeats``) and a 4-byte
    broadcast's (median of 100)."""
    import torch.distributed as dist

    big, small = torch.zeros(nbytes // 4), torch.zeros(1)
    times, lat = [], []
    for _ in range(repeats + 1):
        ranks.barrier()
        start = time.perf_counter()
        dist.broadcast(big, src=0)
        ranks.barrier()
        times.append(time.perf_counter() - start)
    for _ in range(101):
        ranks.barrier()
        start = time.perf_counter()
        dist.broadcast(small, src=0)
        lat.append(time.perf_counter() - start)
    return {"part": "link", "nproc": ranks.size, "rank": ranks.rank, "bytes": nbytes,
            "seconds": statistics.median(times[1:]), "latency_s": statistics.median(lat[1:])}


def worker(ranks, jobs: list[dict], threads: int) -> list[dict]:
    """Every job of one launch, in order, on this rank (module-level: launch imports it)."""
    torch.set_num_threads(threads)
    out = []
    for job in jobs:
        spec = ModelSpec(**job["spec"]) if "spec" in job else None
        if job["part"] == "volume":
            out.append(volume_job(ranks, spec, job["n"], job["route"]))
        elif job["part"] == "weak":
            out.append(weak_job(ranks, spec, job["n0"], job["repeats"]))
        else:
            out.append(link_job(ranks, job["bytes"]))
    return out


GROUP_TIMEOUT_S = 300  # a collective that waits longer fails the run


def run_jobs(nproc: int, jobs: list[dict], threads: int, launcher: str = "fork",
             tick: Callable[[], None] | None = None, timeout_s: float = 1800
             ) -> list[list[dict]]:
    """The jobs on nproc processes (1: in this process); every rank's results.

    ``fork``: forks of this process join a gloo group on a free localhost port (they inherit
    the imported modules: ~1 s a launch). ``launch``: ``sgn_lab.distributed.launch`` (torchrun's
    agent, spawned processes that import everything afresh: 15-35 s a launch on 2 cores).
    ``tick`` is called every 2 s while forks run."""
    import torch.distributed as dist

    if nproc == 1:
        from sgn_lab.distributed.ranks import Ranks

        before = torch.get_num_threads()
        try:
            return [worker(Ranks(), jobs, threads)]
        finally:
            torch.set_num_threads(before)
    if launcher == "launch" or (dist.is_available() and dist.is_initialized()):
        # (forks would inherit an initialised group's sockets)
        from sgn_lab.distributed.launch import launch

        if HERE not in sys.path:  # the worker must be importable by name in the spawned ones
            sys.path.insert(0, HERE)
        results = launch(nproc, importlib.import_module("bench_distributed").worker, jobs,
                         threads)
        return [results[r] for r in range(nproc)]
    ctx = multiprocessing.get_context("fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pipes = [ctx.Pipe(duplex=False) for _ in range(nproc)]
    procs = [ctx.Process(target=_fork_child, args=(r, nproc, port, jobs, threads, pipes[r][1]),
                         daemon=True) for r in range(nproc)]
    for p in procs:
        p.start()
    for _, sender in pipes:
        sender.close()  # the children hold their ends: EOF here when a child dies
    results: dict[int, list[dict]] = {}
    readers = {pipes[r][0]: r for r in range(nproc)}
    deadline = time.monotonic() + timeout_s
    try:
        while readers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the {nproc} processes did not finish within {timeout_s} s")
            ready = multiprocessing.connection.wait(list(readers), timeout=min(2.0, left))
            if tick is not None:
                tick()
            for conn in ready:
                rank = readers.pop(conn)
                try:
                    status, payload = conn.recv()
                except EOFError:
                    raise RuntimeError(f"the process of rank {rank} of {nproc} died") from None
                if status != "ok":
                    raise RuntimeError(f"rank {rank} of {nproc} failed:\n{payload}")
                results[rank] = payload
    finally:
        for p in procs:
            if p.is_alive() and len(results) < nproc:
                p.kill()
            p.join(30)
    return [results[r] for r in range(nproc)]


def _fork_child(rank: int, nproc: int, port: int, jobs: list[dict], threads: int,
                conn) -> None:
    import datetime

    import torch.distributed as dist

    from sgn_lab.distributed.launch import destroy_group
    from sgn_lab.distributed.ranks import Ranks

    try:
        torch.set_num_threads(threads)  # first: the parent's thread pool is not the child's
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=nproc,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        try:
            conn.send(("ok", worker(Ranks.of(), jobs, threads)))
        finally:
            destroy_group()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# In this process: the reference Grams and the cost of the statistics
# --------------------------------------------------------------------------------------------


def reference(spec: ModelSpec, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Gram, mean and d from one process (sgn_lab.gram_result on all n samples)."""
    from sgn_lab.grads import gram_result

    model, x, y, loss_fn = build(spec, n)
    result = gram_result(model, loss_fn, x, y, with_mean=True)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result.gram.numpy(), result.mean.numpy(), d


def eig_costs(sizes: tuple[int, ...], d: int, repeats: int = 3) -> list[dict]:
    """noise_stats(gram=K, dim=d, mean=ḡ) on random n×n Grams, one thread: median seconds and
    the eigvalsh part."""
    import sgn_lab.run.instruments as instruments

    rows = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in sizes:
            gen = torch.Generator().manual_seed(n)
            A = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
            K, mean = A @ A.T / (2 * n), torch.randn(d, generator=gen, dtype=torch.float64) / 1e3
            phases, totals, eig = Phases(), [], []
            with phases.installed():
                for _ in range(repeats):
                    phases.reset()
                    start = time.perf_counter()
                    instruments.noise_stats(gram=K, dim=d, mean=mean)
                    totals.append(time.perf_counter() - start)
                    eig.append(phases.seconds["eig"])
            rows.append({"section": "eig", "n": n, "d": d, "seconds": statistics.median(totals),
                         "eig_s": statistics.median(eig), "repeats": repeats})
    finally:
        torch.set_num_threads(before)
    return rows


def fit_cubic(rows: list[dict]) -> tuple[float, float]:
    """t(n) = b + a·n³ by least squares over the eig rows: (a, b), b clipped at 0."""
    n3 = np.array([float(r["n"]) ** 3 for r in rows])
    t = np.array([r["seconds"] for r in rows])
    (a, b), *_ = np.linalg.lstsq(np.stack([n3, np.ones_like(n3)], axis=1), t, rcond=None)
    if a <= 0:  # too small to resolve: through the largest point
        a, b = t[-1] / n3[-1], 0.0
    return float(a), max(0.0, float(b))


# --------------------------------------------------------------------------------------------
# Tables: volume rows and their checks, weak scaling, projection
# --------------------------------------------------------------------------------------------


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / scale if scale > 0 else float(np.linalg.norm(a))


def volume_rows(results: list[dict], specs: dict[str, ModelSpec],
                refs: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, int]]) -> list[dict]:
    """One row per (model, n, N, route, rank): measured bytes, the formula, the checks."""
    rows = []
    root = {(r["model"], r["n"], r["nproc"], r["route"]): r for r in results if r["rank"] == 0}
    order = list(specs)
    for r in sorted(results, key=lambda r: (r["nproc"], order.index(r["model"]), r["n"],
                                            r["route"], r["rank"])):
        spec, key = specs[r["model"]], (r["model"], r["n"], r["nproc"], r["route"])
        gram_ref, mean_ref, d = refs[(r["model"], r["n"])]
        f = formula(spec, r["n"], r["nproc"], r["rank"], r["route"])
        t = r["traffic"]
        row = {"section": "volume", "model": spec.name, "kind": spec.kind, "T": spec.T, "d": d,
               "n": r["n"], "nproc": r["nproc"], "route": r["route"], "rank": r["rank"],
               "n_rank": shard_sizes(r["n"], r["nproc"])[r["rank"]],
               "payload_bytes": t.get("payload", 0), "payload_formula": f["payload"],
               "sum_bytes": t.get("sum", 0), "sum_formula": f["sum"],
               "objects_bytes": t.get("objects", 0),
               "other_bytes": sum(v for k, v in t.items()
                                  if k not in ("payload", "sum", "objects")),
               "gradients_only_bytes": f["gradients_only"],
               "params_factors": r["choice"].count("factors"),
               "params_gradients": r["choice"].count("gradients"),
               "choice_formula": "same" if r["choice"] == f["choice"] else "DIFFERENT",
               "d_formula": f["d"], "gram_rel_err": rel_err(r["gram"], gram_ref),
               "mean_rel_err": rel_err(root[key]["mean"], mean_ref),
               "same_as_rank0": bool(np.array_equal(r["gram"], root[key]["gram"]))}
        row["failed"] = volume_failures(row)
        row["status"] = "CHECK FAILED" if row["failed"] else "ok"
        rows.append(row)
    return rows


def volume_failures(row: dict) -> str:
    """The checks of a volume row that fail ('' when all pass)."""
    failed = []
    for kind in ("payload", "sum"):
        if row[f"{kind}_bytes"] != row[f"{kind}_formula"]:
            failed.append(f"{kind} {row[f'{kind}_bytes']} != formula {row[f'{kind}_formula']}")
    if row["other_bytes"]:
        failed.append(f"{row['other_bytes']} bytes of other kinds")
    if row["d"] != row["d_formula"]:
        failed.append(f"d {row['d']} != the formula's {row['d_formula']}")
    if row["choice_formula"] != "same":
        failed.append("the choice of some parameter differs from the formula's")
    if row["payload_bytes"] > row["gradients_only_bytes"]:
        failed.append("more bytes than the per-sample gradients")
    for what in ("gram", "mean"):
        if not row[f"{what}_rel_err"] <= RTOL:
            failed.append(f"{what} vs one process {row[f'{what}_rel_err']:.1e}")
    if not row["same_as_rank0"]:
        failed.append("Gram differs from rank 0's")
    return "; ".join(failed)


def weak_rows(results: list[dict]) -> list[dict]:
    """One row per (N, rank): the rank's phases (medians over the repeats), and for its N the
    median over the repeats of the slowest rank's time and the efficiency t(1)/t(N)."""
    rows = []
    for N in sorted({r["nproc"] for r in results}):
        ranks_out = sorted((r for r in results if r["nproc"] == N), key=lambda r: r["rank"])
        slowest = [max(r["runs"][i]["seconds"] for r in ranks_out)
                   for i in range(len(ranks_out[0]["runs"]))]
        median, fastest, slowest_s = spread(slowest)
        for r in ranks_out:
            runs = r["runs"]
            row = {"section": "weak", "model": r["model"], "nproc": N, "rank": r["rank"],
                   "n": r["n"], "n0": r["n0"], "repeats": len(runs), "seconds": median,
                   "min_s": fastest, "max_s": slowest_s,
                   "rank_s": statistics.median(run["seconds"] for run in runs)}
            for phase in Phases.NAMES:
                row[f"{phase}_s"] = statistics.median(run["phases"].get(phase, 0.0)
                                                      for run in runs)
            row["other_s"] = statistics.median(
                run["seconds"] - sum(v for p, v in run["phases"].items() if p not in Phases.PARTS)
                for run in runs)
            last = runs[-1]
            for key in ("payload", "sum", "objects"):
                row[f"{key}_bytes"] = last["traffic"].get(key, 0)
            for key in ("local_samples", "cross_entries", "broadcast", "broadcast_object_list",
                        "all_reduce"):
                row[key] = last["counts"].get(key, 0)
            row["trace_S"] = last["trace"]
            if N > 1:  # payload bytes through this rank (sent and received) per second
                row["bcast_GBps"] = (N / (N - 1) * row["payload_bytes"] / row["bcast_s"] / 1e9)
            rows.append(row)
    base = next((r["seconds"] for r in rows if r["nproc"] == 1), math.nan)
    for r in rows:
        r["efficiency"] = base / r["seconds"]
    return rows


def link_rows(results: list[dict]) -> list[dict]:
    rows = []
    for N in sorted({r["nproc"] for r in results}):
        receivers = [r for r in results if r["nproc"] == N and r["rank"] != 0]
        seconds = statistics.median(r["seconds"] for r in receivers)
        rows.append({"section": "link", "nproc": N, "bytes": receivers[0]["bytes"],
                     "seconds": seconds, "bandwidth_GBps": receivers[0]["bytes"] / seconds / 1e9,
                     "latency_us": statistics.median(r["latency_s"] for r in receivers) * 1e6})
    return rows


@dataclass(frozen=True)
class Link:
    """An interconnect: bandwidth per direction (bytes/s) and latency per collective (s)."""

    name: str
    bandwidth: float
    latency: float


LINKS = (  # stated, not measured
    Link("NVLink 4 (450 GB/s)", 450e9, 10e-6),
    Link("InfiniBand NDR (50 GB/s)", 50e9, 20e-6),
    Link("100 GbE (12.5 GB/s)", 12.5e9, 50e-6),
)
GPU_SPEEDUP = 100.0  # stated: per-rank compute on a GPU against one CPU core here


@dataclass(frozen=True)
class Costs:
    """Per-rank costs measured here (one CPU thread), the inputs of the projection."""

    local_per_sample: float  # s per sample of the local Gram pass (1 process)
    compact_per_sample: float  # s per sample of forming the payload (2 processes)
    cross_per_entry: float  # s per entry of a cross block (2 processes)
    eig_a: float  # noise_stats: b + a·n³ seconds
    eig_b: float
    payload_per_sample: float  # bytes of one sample's payload (2 processes)
    collectives_per_source: float  # broadcasts per source rank, an object counting 2
    d: int
    n0: int


def measured_costs(weak: list[dict], eig: list[dict], d: int) -> Costs:
    """From the 1-process row (local pass) and the 2-process rows (the rest)."""
    one = next(r for r in weak if r["nproc"] == 1)
    two = [r for r in weak if r["nproc"] == 2]
    n0 = one["n0"]
    a, b = fit_cubic(eig)
    return Costs(one["local_s"] / n0,
                 statistics.fmean(r["compact_s"] for r in two) / n0,
                 sum(r["cross_s"] for r in two) / sum(r["cross_entries"] for r in two),
                 a, b, statistics.fmean(r["payload_bytes"] for r in two) / n0,
                 (two[0]["broadcast"] + 2 * two[0]["broadcast_object_list"]) / 2, d, n0)


def busiest(N: int) -> tuple[float, int]:
    """From Ranks.cross_tasks: the most n0 × n0 cross blocks one rank computes ((N−1)/2), and
    the most other ranks' payloads one rank holds at once (those its blocks need: ⌊N/2⌋)."""
    from sgn_lab.distributed.ranks import Ranks

    tasks = [Ranks(me, N).cross_tasks() for me in range(N)]
    return (max(sum(hi - lo for _, _, lo, hi in t) for t in tasks),
            max(len({s if r == me else r for r, s, _, _ in t}) for me, t in enumerate(tasks)))


def project(costs: Costs, N: int, link: Link, speedup: float = 1.0) -> dict:
    """One measurement with N ranks, n = n0·N, every rank holding n0 samples; nothing
    overlapped:

    local    n0 · (local pass + compact, per sample)                      / speed-up
    cross    (N−1)/2 blocks of n0² entries (:func:`busiest`) · per entry  / speed-up
    payload  N·n0 · payload bytes per sample / bandwidth: the N broadcasts follow each other
             and in each every rank's link carries the source's payload once (pipelined; a
             rank receives (N−1)/N of it and sends the rest)
    reduce   2(N−1)/N · (8n² + 8d) / bandwidth (ring all-reduce of the Gram and the mean)
    latency  (N · collectives per source + 2 all-reduces) · latency
    eig      b + a·n³ (noise_stats, on every rank)                        / speed-up
    """
    n0, n = costs.n0, costs.n0 * N
    local = n0 * (costs.local_per_sample + costs.compact_per_sample) / speedup
    blocks, kept = busiest(N)
    cross = blocks * n0 * n0 * costs.cross_per_entry / speedup
    payload_bytes = (N - 1) * n0 * costs.payload_per_sample
    payload = N * n0 * costs.payload_per_sample / link.bandwidth
    reduce = 2 * (N - 1) / N * (F64 * n * n + F64 * costs.d) / link.bandwidth
    latency = (N * costs.collectives_per_source + 2) * link.latency
    eig = (costs.eig_b + costs.eig_a * n**3) / speedup
    comm = payload + reduce + latency
    total = local + cross + comm + eig
    return {"section": "projection", "nproc": N, "n": n, "n0": n0, "interconnect": link.name,
            "bandwidth_GBps": link.bandwidth / 1e9, "latency_us": link.latency * 1e6,
            "speedup": speedup, "payload_bytes": payload_bytes,
            "kept_bytes": kept * n0 * costs.payload_per_sample, "local_s": local,
            "cross_s": cross, "payload_s": payload, "reduce_s": reduce, "latency_s": latency,
            "comm_s": comm, "eig_s": eig, "total_s": total, "comm_share": comm / total}


def validation_rows(costs: Costs, weak: list[dict], links: list[dict]) -> list[dict]:
    """The cost model at the measured N > 1 with the measured gloo link, against the measured
    time (at N = 3 it assumes a core per rank; the machine has 2)."""
    rows = []
    for link in links:
        N = link["nproc"]
        measured = next((r["seconds"] for r in weak if r["nproc"] == N), None)
        if measured is None:
            continue
        gloo = Link(f"gloo localhost ({N} processes, measured)", link["bandwidth_GBps"] * 1e9,
                    link["latency_us"] * 1e-6)
        p = project(costs, N, gloo)
        p.update(section="validation", measured_s=measured,
                 model_over_measured=p["total_s"] / measured)
        rows.append(p)
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


CSV_COLUMNS = [
    "section", "model", "kind", "T", "d", "n", "nproc", "route", "rank", "n_rank",
    "payload_bytes", "payload_formula", "sum_bytes", "sum_formula", "objects_bytes",
    "other_bytes", "gradients_only_bytes", "params_factors", "params_gradients",
    "choice_formula", "gram_rel_err", "mean_rel_err", "same_as_rank0", "status", "failed",
    "n0", "repeats", "seconds", "min_s", "max_s", "efficiency", "rank_s", "local_s",
    "compact_s", "cross_s", "comm_s", "bcast_s", "bcast_GBps", "stats_s", "eig_s", "other_s",
    "local_samples", "cross_entries", "broadcast", "broadcast_object_list", "all_reduce",
    "trace_S", "bytes", "bandwidth_GBps", "latency_us", "interconnect", "speedup", "payload_s",
    "kept_bytes", "reduce_s", "latency_s", "total_s", "comm_share", "measured_s",
    "model_over_measured", "load_avg_mean", "load_avg_max", "threads", "launcher", "machine",
    "torch", "date",
]


def write_csv(path: str, rows: list[dict]) -> None:
    write_rows(path, CSV_COLUMNS, rows)


def mb(v: float) -> str:
    return f"{v / 1e6:,.3f}" if v < 1e7 else f"{v / 1e6:,.1f}"


def _span(values: list, fmt: Callable = str) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def markdown_volume(rows: list[dict]) -> str:
    """One line per (model, n, N): each route's payload per rank (range over ranks), the Gram
    path's choices, the all-reduces, whether every rank matched the formula."""
    lines = ["| model | T | d | n | N | n_r | gram: payload MB/rank | factors/gradients | "
             "vmap: payload MB/rank | gram ÷ vmap | all-reduce MB gram / vmap | = formula | "
             "Gram err |", "|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["n"], r["nproc"]), []).append(r)
    for (name, n, N), rs in groups.items():
        g = [r for r in rs if r["route"] == "gram"]
        v = [r for r in rs if r["route"] == "vmap"]
        choices = _span([f"{r['params_factors']}/{r['params_gradients']}" for r in g])
        ratio = statistics.fmean(r["payload_bytes"] / r["gradients_only_bytes"] for r in g)
        lines.append(
            f"| {name} | {g[0]['T']} | {g[0]['d']:,} | {n} | {N} | "
            f"{_span([r['n_rank'] for r in g])} | {_span([r['payload_bytes'] for r in g], mb)} | "
            f"{choices} | {_span([r['payload_bytes'] for r in v], mb)} | {ratio:.3f} | "
            f"{mb(g[0]['sum_bytes'])} / {mb(v[0]['sum_bytes'])} | "
            f"{'✗' if any(r['failed'] for r in rs) else '✓'} | "
            f"{max(r['gram_rel_err'] for r in rs):.0e} |")
    return "\n".join(lines)


def markdown_weak(rows: list[dict]) -> str:
    lines = ["| N | n | time s, median (min–max) | efficiency | rank | rank s | local | "
             "compact | cross | comm + wait (payload broadcasts, GB/s) | statistics (eig) | "
             "rest | payload MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = (f"| {r['nproc']} | {r['n']} | {r['seconds']:.3f} ({r['min_s']:.3f}–"
                f"{r['max_s']:.3f}) | {r['efficiency']:.2f} |" if r["rank"] == 0
                else "| | | | |")
        bcast = f" ({r['bcast_s']:.3f}, {r['bcast_GBps']:.3g})" if r["nproc"] > 1 else ""
        lines.append(
            f"{head} {r['rank']} | {r['rank_s']:.3f} | {r['local_s']:.3f} | "
            f"{r['compact_s']:.3f} | {r['cross_s']:.3f} | {r['comm_s']:.3f}{bcast} | "
            f"{r['stats_s'] - r['eig_s']:.3f} ({r['eig_s']:.3f}) | {r['other_s']:.3f} | "
            f"{mb(r['payload_bytes'])} |")
    return "\n".join(lines)


def markdown_projection(rows: list[dict]) -> str:
    cpu = [r for r in rows if r["speedup"] == 1.0]
    gpu = {(r["nproc"], r["interconnect"]): r for r in rows if r["speedup"] != 1.0}
    lines = ["| N | n | interconnect | payload MB/rank (kept at once) | local s | cross s | "
             "comm s (payload + all-reduce + latency) | eig s | total s | comm share | compute "
             f"÷{GPU_SPEEDUP:g}: total s (comm share) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in cpu:
        g = gpu[(r["nproc"], r["interconnect"])]
        lines.append(
            f"| {r['nproc']} | {r['n']:,} | {r['interconnect']} | {mb(r['payload_bytes'])} "
            f"({mb(r['kept_bytes'])}) | "
            f"{r['local_s']:.3g} | {r['cross_s']:.3g} | {r['comm_s']:.3g} ({r['payload_s']:.2g}"
            f" + {r['reduce_s']:.2g} + {r['latency_s']:.2g}) | {r['eig_s']:.3g} | "
            f"{r['total_s']:.3g} | {100 * r['comm_share']:.1f} % | "
            f"{g['total_s']:.3g} ({100 * g['comm_share']:.0f} %) |")
    return "\n".join(lines)


class LoadSampler:
    """The 1-minute load average (including the benchmark's own processes), sampled on entry,
    exit and every ``sample`` call (every 2 s while forks run)."""

    def __enter__(self) -> LoadSampler:
        self.samples = [load_average()]
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()

    def sample(self) -> None:
        self.samples.append(load_average())


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny models, 2 processes")
    p.add_argument("--parts", default="volume,weak,projection",
                   help="comma list from volume, weak, projection (projection needs weak)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--launcher", choices=("fork", "launch"), default="fork",
                   help="fork (default, ~1 s a launch) or sgn_lab.distributed.launch "
                        "(torchrun's agent, 15-35 s a launch on 2 cores)")
    p.add_argument("--repeats", type=int, default=None, help="weak scaling: timed repeats")
    p.add_argument("--out", default=None,
                   help=f"CSV file (default {os.path.relpath(DEFAULT_OUT)}; --quick: none)")
    args = p.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setting = QUICK if args.quick else FULL
    repeats = args.repeats or setting.repeats
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if parts - {"volume", "weak", "projection"}:
        raise SystemExit(f"unknown parts {sorted(parts - {'volume', 'weak', 'projection'})}")
    if "projection" in parts:
        parts.add("weak")
    specs = {s.name: s for s in setting.models}
    weak_spec = specs[setting.weak_model]

    def log(text: str) -> None:
        print(text, flush=True)

    info = {"machine": machine(), "torch": torch.__version__, "threads": args.threads,
            "launcher": args.launcher, "date": time.strftime("%Y-%m-%d %H:%M")}
    log(f"machine: {info['machine']}; Python {platform.python_version()}, torch "
        f"{info['torch']}, {args.threads} torch thread(s) per process; load average now "
        f"{load_average():.1f}")
    started = time.perf_counter()

    jobs: dict[int, list[dict]] = {N: [] for N in (1, *setting.nprocs)}  # one launch per N
    if "volume" in parts:
        for N in setting.nprocs:
            jobs[N] += [{"part": "volume", "spec": asdict(spec), "n": n, "route": route}
                        for spec in setting.models for n in setting.samples
                        for route in ("gram", "vmap")]
    if "weak" in parts:
        for N in jobs:
            if N > 1:
                jobs[N].append({"part": "link", "bytes": setting.link_bytes})
            jobs[N].append({"part": "weak", "spec": asdict(weak_spec), "n0": setting.n0,
                            "repeats": repeats})
    for spec in {s.kind: s for s in setting.models}.values():
        build(spec, 2)  # imports (transformers) once here, before the forks
    results: list[dict] = []
    loads: dict[int, LoadSampler] = {}
    for N, job_list in jobs.items():
        if job_list:
            log(f"[{time.strftime('%H:%M:%S')}] {N} process(es): {len(job_list)} jobs ...")
            t0 = time.perf_counter()
            with LoadSampler() as loads[N]:
                per_rank = run_jobs(N, job_list, args.threads, args.launcher,
                                    tick=loads[N].sample)
            mean, most = mean_and_max(loads[N].samples)
            log(f"    {time.perf_counter() - t0:.1f} s; load average {mean:.1f} mean, "
                f"{most:.1f} max")
            results += [r for out in per_rank for r in out]

    def part(name: str) -> list[dict]:
        return [r for r in results if r["part"] == name]

    rows: list[dict] = []
    if "volume" in parts:
        log(f"[{time.strftime('%H:%M:%S')}] single-process reference Grams ...")
        refs = {(spec.name, n): reference(spec, n) for spec in setting.models
                for n in setting.samples}
        vol = volume_rows(part("volume"), specs, refs)
        rows += vol
        log("\nCommunication volume per split_gram call (bytes received per rank; "
            "MB = 10^6 B):\n")
        log(markdown_volume(vol))
    links = link_rows(part("link"))
    rows += links
    if "weak" in parts:
        weak = weak_rows(part("weak"))
        for r in weak:
            r["load_avg_mean"], r["load_avg_max"] = mean_and_max(loads[r["nproc"]].samples)
        rows += weak
        log(f"\nWeak scaling, {weak_spec.name}, n = {setting.n0}·N, NoiseProbe(instruments="
            f"['sgn'], grads='gram').measure, {args.threads} thread(s) per process; seconds, "
            "each rank's median over the repeats:\n")
        log(markdown_weak(weak))
        for r in links:
            log(f"gloo broadcast, {r['nproc']} processes: {r['bandwidth_GBps']:.2f} GB/s "
                f"({r['bytes'] / 2**20:.0f} MiB), latency {r['latency_us']:.0f} µs")
    if "projection" in parts:
        d = sum(p.numel for p in architecture(weak_spec))
        log(f"\n[{time.strftime('%H:%M:%S')}] statistics (eigendecomposition) cost ...")
        eig = eig_costs(setting.eig_sizes, d)
        rows += eig
        costs = measured_costs(weak, eig, d)
        log("noise_stats(gram=K) on one thread: " + ", ".join(
            f"n = {r['n']}: {r['seconds']:.3f} s (eigvalsh {r['eig_s']:.3f})" for r in eig)
            + f"; fit {costs.eig_b:.3g} + {costs.eig_a:.3g}·n³ s")
        log(f"per-rank costs: local pass {1e3 * costs.local_per_sample:.2f} ms/sample, compact "
            f"{1e3 * costs.compact_per_sample:.2f} ms/sample, cross block "
            f"{1e6 * costs.cross_per_entry:.2f} µs/entry, payload "
            f"{costs.payload_per_sample / 1e3:.1f} kB/sample, "
            f"{costs.collectives_per_source:g} collectives per source rank")
        proj = [project(costs, N, link, s) for s in (1.0, GPU_SPEEDUP) for N in PROJECTION_N
                for link in LINKS]
        rows += proj
        log(f"\nProjection, n = {costs.n0}·N, per measurement (CPU-measured compute; last "
            f"column: compute ÷ {GPU_SPEEDUP:g}, a stated GPU speed-up):\n")
        log(markdown_projection(proj))
        val = validation_rows(costs, weak, links)
        rows += val
        for v in val:
            log(f"N = {v['nproc']}: measured {v['measured_s']:.3f} s; the cost model with the "
                f"measured gloo link {v['total_s']:.3f} s (local {v['local_s']:.3f}, cross "
                f"{v['cross_s']:.3f}, comm {v['comm_s']:.3f}, eig {v['eig_s']:.3f})")
    for r in rows:
        r.update({k: v for k, v in info.items() if k not in r})
    if args.out:
        write_csv(args.out, rows)
        log(f"\nresults written to {args.out}")
    log(f"total {time.perf_counter() - started:.0f} s")
    failed = [r for r in rows if r.get("failed")]
    for r in failed:
        log(f"CHECK FAILED: {r['section']} {r.get('model')} n={r.get('n')} N={r.get('nproc')} "
            f"{r.get('route')} rank {r.get('rank')}: {r['failed']}")
    if not failed:
        log("all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
