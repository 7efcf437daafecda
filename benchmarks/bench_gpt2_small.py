"""The SGN spectrum of a GPT-2-small-shaped model at real size, timed against the floor.

One measurement as a user would make it: the default Hugging Face ``GPT2Config`` (124M
parameters: vocabulary 50257, 12 layers, width 768, 1024 positions, LM head tied to the token
embedding), dropout set to 0 so that the measurement is deterministic, random weights
(seeded), float32, on the CPU; n = 64 random sequences of T + 1 = 129 tokens (seeded), inputs
x = ids[:, :-1], next-token targets y = ids[:, 1:], loss ``sgn_lab.models.token_cross_entropy``.

    floor             one forward + backward of the mean loss over the n sequences
    floor-accum       the same gradient accumulated over micro-batches of 2c sequences (the
                      samples of one Gram pass): the floor within the spectrum's memory
    spectrum          sgn_lab.gram_result(with_mean=True, chunk_size=c): the Gram K and the
                      exact mean gradient ḡ, then sgn_lab.noise_stats(gram=K, dim=d, mean=ḡ):
                      tr S, the noise scale, the eigenvalues, the effective rank
    spectrum-onepass  the same with sgn_lab's default chunk_size=None (one pass over all n)

Each method runs in a fresh subprocess, so that its peak RSS is its own: ``ru_maxrss`` (and
VmHWM) read right after the measurement, before the correctness checks; the RSS right after
building the model is reported too (the model's own memory). The model build is timed apart
from the measurement. A guard thread ends a child whose RSS passes ``--guard-gb`` or that
leaves the machine under 1 GiB of available memory (the machine is shared): that row then says
how far it got instead of giving a number.

Checks, inside the run (after the peak is read): K_ii = |g_i|² for 2 samples against
single-sample backward passes, and K_01 = g_0·g_1 (relative 1e-4); the spectrum's mean
gradient ḡ against the floor's gradient (relative 1e-4).

GB here is 2^30 bytes (the MB of benchmarks/README.md is 2^20). The CSV's time breakdown of
the spectrum (record_s, gram_head_s, gram_blocks_s, stats_s) is the last run's; seconds is
the median of the runs, min_s and max_s their range, peak_rss_gb the largest peak.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_gpt2_small.py            # full run, ~15-25 min
    .venv/bin/python benchmarks/bench_gpt2_small.py --quick    # smoke test, 2-layer model
    .venv/bin/python benchmarks/bench_gpt2_small.py --methods floor,spectrum --repeats 3

The README's run added ``--methods floor,floor-accum,spectrum,spectrum-onepass --repeats 2``;
``spectrum-onepass`` is not in the default methods, as it needs about 18.3 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: nothing may reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from harness import (  # noqa: E402
    last_json,
    last_line,
    load_average,
    machine,
    max_rss_kib,
    mean_and_max,
    meminfo_kib,
    missing,
    print_json,
    proc_status_kib,
    spread,
    write_rows,
)
from torch import Tensor, nn  # noqa: E402

METHODS = ("floor", "floor-accum", "spectrum", "spectrum-onepass")
DEFAULT_METHODS = ("floor", "floor-accum", "spectrum")
RTOL = 1e-4  # the checks' relative tolerance (float32 model)
TARGET_GB = 8.0
GB = 2.0**30
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results_gpt2_small.csv")


@dataclass(frozen=True)
class Setting:
    """A model shape, a batch and the spectrum's default chunk size."""

    name: str
    n: int
    T: int
    config: dict = field(default_factory=dict)  # GPT2Config arguments beyond dropout 0
    chunk_size: int | None = None  # the spectrum's chunk_size (None: one pass)


# chunk_size 8: 28 passes over pairs of chunks, 16 sequences each: peak 7.93 GB. One pass over
# all 64 (sgn_lab's default chunk_size=None) peaks at 18.3 GB, the plain floor at 14.5 GB;
# at about 0.17 GB more per sequence of a pass, chunk_size 10 (passes of 20) would reach about
# 8.6 GB (benchmarks/README.md).
FULL = Setting("gpt2-small", n=64, T=128, chunk_size=8)
QUICK = Setting("quick", n=8, T=16, chunk_size=4,
                config=dict(n_layer=2, n_embd=128, n_head=2, vocab_size=1024,
                            bos_token_id=1023, eos_token_id=1023))


# --------------------------------------------------------------------------------------------
# Model, data and the measurements (importable: tests/test_bench_gpt2_small.py runs them)
# --------------------------------------------------------------------------------------------


def build(setting: Setting, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The model (``Logits`` around ``GPT2LMHeadModel``, train mode, dropout 0, float32) and
    the batch: x (n, T) and y (n, T) from n random sequences of T + 1 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sgn_lab.models.hf import Logits

    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **setting.config)
    torch.manual_seed(seed)
    model = Logits(GPT2LMHeadModel(config)).float().train()
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, config.vocab_size, (setting.n, setting.T + 1), generator=generator)
    return model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    from sgn_lab.models.losses import token_cross_entropy

    return token_cross_entropy(logits, targets)


def params_of(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters in ``named_parameters()`` order (the order of ḡ; the tied LM head
    is the token embedding, listed once)."""
    return [p for _, p in model.named_parameters() if p.requires_grad]


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params_of(model)])


def floor(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """One forward + backward of the mean loss: (seconds, the gradient, flattened)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    start = time.perf_counter()
    loss_fn(model(x), y).backward()
    seconds = time.perf_counter() - start
    return seconds, flat_grad(model)


def floor_accum(model: nn.Module, x: Tensor, y: Tensor, micro: int) -> tuple[float, Tensor]:
    """The same gradient from micro-batches of ``micro`` sequences: (seconds, gradient)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    n = x.shape[0]
    start = time.perf_counter()
    for lo in range(0, n, micro):
        hi = min(lo + micro, n)
        (loss_fn(model(x[lo:hi]), y[lo:hi]) * ((hi - lo) / n)).backward()
    seconds = time.perf_counter() - start
    return seconds, flat_grad(model)


class PassTimer:
    """Splits the Gram path's time: recording passes (forward + backward to the kept edges)
    and the Gram products, those of the vocabulary-sized tied head + token embedding apart.

    Wraps ``record`` and ``parameter_gram`` as ``sgn_lab.grads.gram`` calls them, for the
    duration of a ``with`` block; the rest of the Gram path's time (the mean gradient's sums,
    assembling K from the chunk pairs) is what remains.
    """

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.passes = 0
        self.record_s = 0.0
        self.head_s = 0.0
        self.other_s = 0.0

    def _is_head(self, terms: list) -> bool:
        from sgn_lab.grads.terms import Outer, Rows

        for t in terms:
            if isinstance(t, Outer) and self.vocab in (t.left.shape[2], t.right.shape[2]):
                return True
            if isinstance(t, Rows) and t.rows == self.vocab:
                return True
        return False

    @contextlib.contextmanager
    def installed(self) -> Iterator[PassTimer]:
        from sgn_lab.grads import gram as module

        record, parameter_gram = module.record, module.parameter_gram

        def timed_record(*args, **kwargs):
            start = time.perf_counter()
            try:
                return record(*args, **kwargs)
            finally:
                self.passes += 1
                self.record_s += time.perf_counter() - start

        def timed_gram(terms, *args, **kwargs):
            start = time.perf_counter()
            try:
                return parameter_gram(terms, *args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                if self._is_head(terms):
                    self.head_s += spent
                else:
                    self.other_s += spent

        module.record, module.parameter_gram = timed_record, timed_gram
        try:
            yield self
        finally:
            module.record, module.parameter_gram = record, parameter_gram


@dataclass
class Spectrum:
    seconds: float  # Gram + mean gradient + noise_stats
    gram_s: float
    stats_s: float
    result: object  # sgn_lab.grads.GramResult
    stats: object  # sgn_lab.NoiseStats
    timer: PassTimer
    d: int


def spectrum(model: nn.Module, x: Tensor, y: Tensor, chunk_size: int | None,
             vocab: int) -> Spectrum:
    """The full SGN spectrum path: Gram + exact mean gradient in one pass per chunk pair, then
    noise_stats from the Gram."""
    from sgn_lab.grads import gram_result, trainable_dim
    from sgn_lab.stats.noise import noise_stats

    d = trainable_dim(model)
    timer = PassTimer(vocab)
    gc.collect()
    start = time.perf_counter()
    with timer.installed():
        result = gram_result(model, loss_fn, x, y, with_mean=True, chunk_size=chunk_size)
    mid = time.perf_counter()
    stats = noise_stats(gram=result.gram, dim=d, mean=result.mean)
    end = time.perf_counter()
    return Spectrum(end - start, mid - start, end - mid, result, stats, timer, d)


def check_diagonal(model: nn.Module, x: Tensor, y: Tensor, K: Tensor,
                   samples: int = 2) -> dict[str, float]:
    """K_ii = |g_i|² and K_01 = g_0·g_1 against single-sample backward passes.

    Returns the largest relative error of the diagonal entries, the error of K_01 relative to
    sqrt(K_00 K_11), tr(K)/n (the mean squared per-sample gradient norm over all n) and the
    same mean over the looped samples.
    """
    params = params_of(model)
    grads = []
    for i in range(samples):
        g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
        grads.append(torch.cat([t.reshape(-1) for t in g]).double())
    norms = [float(g @ g) for g in grads]
    diag = max(abs(float(K[i, i]) - norms[i]) / norms[i] for i in range(samples))
    cross = float(grads[0] @ grads[1]) if samples > 1 else math.nan
    off = abs(float(K[0, 1]) - cross) / math.sqrt(norms[0] * norms[1]) if samples > 1 else 0.0
    return {"diag_rel_err": diag, "offdiag_rel_err": off,
            "trace_over_n": float(torch.trace(K)) / K.shape[0],
            "looped_mean_sq_norm": statistics.fmean(norms)}


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def route_groups(coverage) -> list[dict]:
    """The coverage report grouped over the layers: one row per (parameter of a block, route),
    with the number of parameters, the operations and one parameter's cost-model figures."""
    rows: dict[tuple[str, str], dict] = {}
    for p in coverage.parameters:
        pattern = re.sub(r"\.h\.\d+\.", ".h.*.", p.name).removeprefix("model.")
        row = rows.setdefault((pattern, p.route), {
            "parameter": pattern, "route": p.route, "count": 0, "operations": p.operations,
            "reason": p.reason})
        row["count"] += 1
    return list(rows.values())


def route_counts(coverage) -> str:
    """'per-sample 147, ghost 1 (transformer.wte.weight)': how many parameters take which
    route, naming those of a route taken by at most 3."""
    counts = Counter(p.route for p in coverage.parameters)
    parts = []
    for r, c in counts.most_common():
        names = [p.name.removeprefix("model.") for p in coverage.parameters if p.route == r]
        parts.append(f"{r} {c}" + (f" ({', '.join(names)})" if c <= 3 else ""))
    return ", ".join(parts)


def passes_of(n: int, chunk: int | None) -> int:
    """Recording passes of gram_result: 1 without chunks, else one per pair of chunks."""
    k = 1 if chunk is None or chunk >= n else math.ceil(n / chunk)
    return 1 if k == 1 else k * (k - 1) // 2


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def proc_status_gb(key: str) -> float:
    """VmRSS or VmHWM of this process, in GB; NaN off Linux."""
    try:
        return proc_status_kib(key) * 1024 / GB
    except (OSError, KeyError):
        return math.nan


def max_rss_gb() -> float:
    """ru_maxrss of this process (KiB on Linux), in GB."""
    return max_rss_kib() * 1024 / GB


def available_gb() -> float:
    try:
        return meminfo_kib("MemAvailable") * 1024 / GB
    except (OSError, KeyError):
        return math.inf


def start_guard(limit_gb: float, stage: list[str], reserve_gb: float = 1.0) -> None:
    """Ends this process (exit 3, with a JSON line saying why) when its RSS passes
    ``limit_gb`` or the machine has less than ``reserve_gb`` available: the machine is
    shared, and an out-of-memory kill could hit someone else's process."""
    start = time.perf_counter()

    def watch() -> None:
        while True:
            rss, avail = proc_status_gb("VmRSS"), available_gb()
            if rss > limit_gb or avail < reserve_gb:
                why = (f"stopped by the guard during {stage[0]} after "
                       f"{time.perf_counter() - start:.0f} s: RSS {rss:.2f} GB, "
                       f"{avail:.2f} GB available on the machine (limit {limit_gb:g} GB, "
                       f"reserve {reserve_gb:g} GB)")
                print_json({"aborted": why, "peak_rss_gb": max_rss_gb()})
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


# --------------------------------------------------------------------------------------------
# One method in one process
# --------------------------------------------------------------------------------------------


def run_method(method: str, setting: Setting, chunk: int | None, grad_file: str | None,
               seed: int = 0, stage: list[str] | None = None) -> dict:
    """Build, measure, read the peak, then check; a JSON-able dict of the figures."""
    stage = stage if stage is not None else [""]
    import transformers  # noqa: F401  (imported before the clock starts: build_s is the build)

    import sgn_lab  # noqa: F401

    stage[0] = "the model build"
    start = time.perf_counter()
    model, x, y = build(setting, seed)
    build_s = time.perf_counter() - start
    gc.collect()
    out: dict = {"method": method, "n": setting.n, "T": setting.T, "build_s": build_s,
                 "model_rss_gb": proc_status_gb("VmRSS"),
                 "d": sum(p.numel() for p in params_of(model)),
                 "vocab": model.model.config.vocab_size,
                 "attention": model.model.config._attn_implementation,
                 "activation": model.model.config.activation_function}
    stage[0] = method
    if method in ("floor", "floor-accum"):
        micro = setting.n if method == "floor" else 2 * (chunk or setting.n)
        if method == "floor":
            seconds, grad = floor(model, x, y)
        else:
            seconds, grad = floor_accum(model, x, y, micro)
        out.update(seconds=seconds, peak_rss_gb=max_rss_gb(), hwm_gb=proc_status_gb("VmHWM"),
                   micro_batch=micro)
        stage[0] = "the checks"
        if method == "floor" and grad_file:
            torch.save(grad, grad_file)
        elif grad_file and os.path.exists(grad_file):
            out["grad_rel_err_vs_floor"] = rel_err(grad, torch.load(grad_file))
        return out

    chunk_used = None if method == "spectrum-onepass" else chunk
    s = spectrum(model, x, y, chunk_used, out["vocab"])
    out.update(seconds=s.seconds, peak_rss_gb=max_rss_gb(), hwm_gb=proc_status_gb("VmHWM"),
               chunk_size=chunk_used, pass_samples=min(setting.n, 2 * (chunk_used or setting.n)),
               gram_s=s.gram_s, stats_s=s.stats_s,
               passes=s.timer.passes, record_s=s.timer.record_s, gram_head_s=s.timer.head_s,
               gram_blocks_s=s.timer.other_s)
    st = s.stats
    out.update(trace_S=st.trace, mean_sq_norm=st.mean_sq_norm, grad_sq_norm=st.grad_sq_norm,
               noise_scale=st.noise_scale, effective_rank=st.effective_rank,
               isotropic_effective_rank=st.isotropic_effective_rank,
               stable_rank=st.stable_rank, top1_energy=st.top1_energy,
               eigenvalues=[float(v) for v in st.eigenvalues[:8]],
               n_eigenvalues=int(st.eigenvalues.numel()))
    coverage = s.result.coverage
    out.update(routes=route_counts(coverage), route_groups=route_groups(coverage))
    stage[0] = "the checks"
    out.update(check_diagonal(model, x, y, s.result.gram))
    if grad_file and os.path.exists(grad_file):
        reference, against = torch.load(grad_file), "floor"
    else:  # no floor in this run: the same gradient by accumulation
        _, reference = floor_accum(model, x, y, 2 * (chunk or setting.n))
        against = "floor-accum (no floor gradient file)"
    out["mean_rel_err"] = rel_err(s.result.mean, reference)
    out["mean_checked_against"] = against
    return out


def checks_pass(row: dict) -> bool | None:
    """Whether the row's correctness checks pass (None: the method has none)."""
    errors = [row[k] for k in ("diag_rel_err", "offdiag_rel_err", "mean_rel_err",
                               "grad_rel_err_vs_floor") if k in row]
    return None if not errors else all(e <= RTOL for e in errors)


# --------------------------------------------------------------------------------------------
# The driver: one subprocess per method and repeat
# --------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """The machine (with its RAM) and the versions that the CSV and the log name."""
    import transformers

    return {"machine": machine(ram=True),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def child_command(method: str, args: argparse.Namespace, grad_file: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method,
           "--threads", str(args.threads), "--seed", str(args.seed),
           "--chunk-size", str(args.chunk_size), "--guard-gb", str(args.guard_gb),
           "--grad-file", grad_file]
    if args.quick:
        cmd.append("--quick")
    if args.materialise_gb is not None:
        cmd += ["--materialise-gb", str(args.materialise_gb)]
    return cmd


def run_child(cmd: list[str], log: Callable[[str], None]) -> tuple[dict, list[float]]:
    """Run one child; its JSON result and the 1-minute load averages sampled meanwhile."""
    loads = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        while proc.poll() is None:
            loads.append(load_average())
            time.sleep(2.0)
        reader.join()
        err.seek(0)
        stderr = err.read()
    result = last_json(lines)
    if result is not None:
        return result, loads
    tail = last_line(stderr, "no output")
    log(stderr[-3000:])
    return {"aborted": f"child failed (exit {proc.returncode}): {tail}"}, loads


def load_columns(loads: list[float]) -> dict[str, float]:
    mean, most = mean_and_max(loads)
    return {"load_avg_mean": mean, "load_avg_max": most}


def summarise(method: str, runs: list[dict], loads: list[float]) -> dict:
    """One row from the repeats of a method: median time, largest peak."""
    ok = [r for r in runs if "aborted" not in r]
    if not ok:
        return {"method": method, "status": runs[-1]["aborted"],
                "peak_rss_gb": max((r.get("peak_rss_gb", math.nan) for r in runs),
                                   default=math.nan),
                **load_columns(loads)}
    row = dict(ok[-1])
    median, fastest, slowest = spread(r["seconds"] for r in ok)
    row.update(seconds=median, min_s=fastest, max_s=slowest,
               repeats=len(ok), peak_rss_gb=max(r["peak_rss_gb"] for r in ok),
               hwm_gb=max(r["hwm_gb"] for r in ok),
               model_rss_gb=max(r["model_rss_gb"] for r in ok),
               build_s=statistics.median(r["build_s"] for r in ok), **load_columns(loads))
    verdict = checks_pass(row)
    row["status"] = "ok" if verdict in (None, True) else "CHECK FAILED"
    return row


CSV_COLUMNS = [
    "method", "n", "T", "d", "seconds", "ratio_to_floor", "peak_rss_gb", "model_rss_gb",
    "chunk_size", "machine", "threads", "torch", "load_avg_mean", "load_avg_max", "status",
    "repeats", "min_s", "max_s", "build_s", "hwm_gb", "micro_batch", "passes", "record_s",
    "gram_head_s", "gram_blocks_s", "stats_s", "materialise_gb", "diag_rel_err",
    "offdiag_rel_err", "mean_rel_err", "grad_rel_err_vs_floor", "trace_S", "noise_scale",
    "effective_rank", "isotropic_effective_rank", "pass_samples", "routes", "transformers", "date",
]


def write_csv(path: str, rows: list[dict]) -> None:
    write_rows(path, CSV_COLUMNS, rows)


def fmt(v: object, spec: str = ".1f") -> str:
    if missing(v):
        return "—"
    return format(v, spec) if isinstance(v, int | float) else str(v)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | chunk_size (micro-batch) | passes | time s | × floor | peak RSS GB | "
             "vs 8 GB | model RSS GB | build s | load avg (mean/max) | checks |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['method']} | {fmt(r.get('chunk_size'))} | — | — | — | "
                         f"> {fmt(r.get('peak_rss_gb'), '.2f')} | ✗ | — | — | "
                         f"{fmt(r.get('load_avg_mean'))}/{fmt(r.get('load_avg_max'))} | "
                         f"{r['status']} |")
            continue
        chunk = r.get("chunk_size", r.get("micro_batch"))
        if r["method"] == "spectrum-onepass":
            chunk = "None"
        elif r["method"].startswith("floor"):
            chunk = f"({r.get('micro_batch')})"
        verdict = checks_pass(r)
        checks = "—" if verdict is None else ("✓" if verdict else "✗")
        seconds = fmt(r["seconds"], ",.1f")
        if r.get("repeats", 1) > 1:
            seconds += f" ({r['min_s']:,.1f}–{r['max_s']:,.1f})"
        lines.append(
            f"| {r['method']} | {chunk} | {fmt(r.get('passes'), 'd')} | {seconds} | "
            f"{fmt(r.get('ratio_to_floor'), '.2f')} | {r['peak_rss_gb']:.2f} | "
            f"{'✓' if r['peak_rss_gb'] <= TARGET_GB else '✗'} | {r['model_rss_gb']:.2f} | "
            f"{r['build_s']:.1f} | {r['load_avg_mean']:.1f}/{r['load_avg_max']:.1f} | {checks} |")
    return "\n".join(lines)


def report(rows: list[dict], log: Callable[[str], None]) -> None:
    log("\n" + markdown(rows))
    for r in rows:
        if "trace_S" in r:
            eig = ", ".join(f"{v:.4g}" for v in r["eigenvalues"][:5])
            rest = r["gram_s"] - r["record_s"] - r["gram_head_s"] - r["gram_blocks_s"]
            log(f"\n{r['method']}: d = {r['d']:,}, n = {r['n']}, T = {r['T']}; "
                f"{r['passes']} recording passes of {r['pass_samples']} samples: "
                f"{r['record_s']:.1f} s recording, {r['gram_head_s']:.1f} s Gram of the tied "
                f"head + token embedding, {r['gram_blocks_s']:.1f} s Gram of the other "
                f"parameters, {rest:.1f} s the rest (mean-gradient sums, "
                f"assembly); noise_stats {r['stats_s']:.2f} s")
            log(f"  tr S = {r['trace_S']:.5g}, |ḡ|² = {r['mean_sq_norm']:.5g}, noise scale "
                f"= {r['noise_scale']:.4g}, effective rank = {r['effective_rank']:.2f} of "
                f"{r['n_eigenvalues']} (isotropic {r['isotropic_effective_rank']:.2f}), "
                f"top eigenvalues of S: {eig}")
            log(f"  checks: K_ii vs single-sample backward {r['diag_rel_err']:.1e}, K_01 "
                f"{r['offdiag_rel_err']:.1e}, ḡ vs {r['mean_checked_against']} "
                f"{r['mean_rel_err']:.1e} (tolerance {RTOL:g}); tr(K)/n = "
                f"{r['trace_over_n']:.5g}, looped mean |g_i|² = {r['looped_mean_sq_norm']:.5g}")
            log(f"  routes: {r['routes']}")
            for g in r["route_groups"]:
                log(f"    {g['count']:>3} × {g['parameter']:<32} {g['route']:<10} "
                    f"{g['operations']}: {g['reason']}")
        elif "grad_rel_err_vs_floor" in r:
            log(f"\n{r['method']}: gradient vs the floor's {r['grad_rel_err_vs_floor']:.1e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 layers, width 128, vocabulary 1024, n = 8, T = 16, in "
                        "one process (peak RSS then shared by the methods)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs of each method (median)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help=f"the spectrum's chunk_size, 0 for None (default {FULL.chunk_size}, "
                        f"--quick {QUICK.chunk_size})")
    p.add_argument("--materialise-gb", type=float, default=None,
                   help="the cost model's memory cap: per-sample gradients of one use larger "
                        "than this are never formed (sgn_lab.grads.terms.MATERIALISE_BYTES; "
                        "default: sgn_lab's 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guard-gb", type=float, default=20.0,
                   help="end a child whose RSS passes this (the machine is shared)")
    p.add_argument("--subprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="one fresh process per method and repeat (default: on, off in --quick)")
    p.add_argument("--out", default=None,
                   help=f"CSV file (default {os.path.relpath(DEFAULT_OUT)}; --quick: none)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--grad-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.chunk_size is None:
        args.chunk_size = (QUICK if args.quick else FULL).chunk_size
    if args.subprocess is None:
        args.subprocess = not args.quick
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def configure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.materialise_gb is not None:
        from sgn_lab.grads import terms

        terms.MATERIALISE_BYTES = int(args.materialise_gb * GB)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure(args)
    setting = QUICK if args.quick else FULL
    chunk = args.chunk_size or None
    if args.child:
        stage = [""]
        start_guard(args.guard_gb, stage)
        print_json(run_method(args.child, setting, chunk, args.grad_file, args.seed, stage))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    def log(text: str) -> None:
        print(text, flush=True)

    info = versions()
    log(f"machine: {info['machine']}; Python {info['python']}, torch {info['torch']} "
        f"({args.threads} threads), transformers {info['transformers']}")
    log(f"{setting.name}: n = {setting.n}, T = {setting.T}, spectrum chunk_size = {chunk} "
        f"({passes_of(setting.n, chunk)} passes of {min(setting.n, 2 * (chunk or setting.n))}"
        f" samples); load average now {load_average():.1f}")
    date = time.strftime("%Y-%m-%d %H:%M")

    def rows_so_far() -> list[dict]:
        """One row per method run so far, with the ratio to the floor and the run's facts."""
        rows = [summarise(m, runs[m], loads[m]) for m in methods if runs[m]]
        floor_s = next((r["seconds"] for r in rows if r["method"] == "floor"
                        and "seconds" in r), math.nan)
        for r in rows:
            r.update(threads=args.threads, machine=info["machine"], torch=info["torch"],
                     transformers=info["transformers"], date=date,
                     materialise_gb=args.materialise_gb, n=setting.n, T=setting.T)
            if "seconds" in r:
                r["ratio_to_floor"] = r["seconds"] / floor_s
            if r["method"] == "spectrum-onepass":
                r["chunk_size"] = "None"
        return rows

    runs: dict[str, list[dict]] = {m: [] for m in methods}
    loads: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="bench_gpt2_") as tmp:
        grad_file = os.path.join(tmp, "floor_grad.pt")
        for repeat in range(args.repeats):
            for m in methods:
                log(f"[{time.strftime('%H:%M:%S')}] {m}, run {repeat + 1}/{args.repeats} ...")
                if args.subprocess:
                    result, load = run_child(child_command(m, args, grad_file), log)
                else:
                    load0 = load_average()
                    result = run_method(m, setting, chunk, grad_file, args.seed)
                    load = [load0, load_average()]
                runs[m].append(result)
                loads[m] += load
                if "aborted" in result:
                    log(f"    {result['aborted']}")
                else:
                    log(f"    {result['seconds']:.1f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
                if args.out:  # written after every run: a long run that dies keeps its rows
                    write_csv(args.out, rows_so_far())
    rows = rows_so_far()
    report(rows, log)
    if args.out:
        write_csv(args.out, rows)
        log(f"\nresults written to {args.out}")
    failed = [r["method"] for r in rows if r.get("status") == "CHECK FAILED"]
    if failed:
        log(f"CHECKS FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
