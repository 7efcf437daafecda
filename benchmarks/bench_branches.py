"""Benchmark the critical-batch sweep's vmapped SGD branches against K runs one after another.

``sgn_lab.sweeps.critical.run_branches`` trains K = (learning rates) × (seeds) plain-SGD runs
from the same parameters together: each step is one ``torch.func.vmap`` of the gradient over
the runs' stacked parameters, then each run's held-out loss is evaluated (one run at a time)
and compared with a target. This script times it against the obvious baseline on the same
work:

    branches    run_branches(model, loss_fn, params, train, held_out, lrs=..., batch_size=B,
                generators=[one per seed], target=..., max_steps=steps)
    sequential  K runs in turn, each on its own copy of the model with torch.optim.SGD
                (zero_grad, loss.backward, step); run (lr, seed) draws its minibatch of every
                step with torch.randint(n, (B,), generator=g) from a fresh generator seeded as
                run_branches' seed-r generator (so all lrs of a seed see the same minibatches,
                as in run_branches), and evaluates its held-out loss after every step, stopping
                on reaching the target (or on divergence, as run_branches does)

Problems: the ``mlp`` (teacher-student regression, inputs of 20, MLP of width 64, depth 2,
tanh; d = 5,569) and ``transformer`` (the ``markov`` language, vocabulary 16, context 16;
GPT-2 of width 64, depth 2, 2 heads; d = 102,144) of the critical-batch sweep's full config
(4000 samples, 3000 for training), built as ``_branch_network`` builds them (the same task
seed, initial-weight seed and 256 held-out samples), from their *initial* weights: the
sweep's branch-point training (300 steps) is left out; it changes the losses, not what a step
costs. Learning rates: the full config's grid up to the largest lr at which no run diverges
from there (STABLE_LR: mlp 1/16…1/(2√2), 6 lrs; transformer 1/256…1/4, 7 lrs); ``--all-lrs``
takes the whole grid (mlp up to 2, transformer up to 1), where some runs blow up and stop
early. Seeds: the sweep's (mlp 8, transformer 4; ``--seeds``); K = lrs × seeds (48 and 28).
Batch sizes 4, 32 and 256.

Timed work: the target is -inf (never reached) and max_steps = ``--steps`` (50), so each
method does exactly K × steps SGD steps and K × steps held-out evaluations (a run whose loss
turns non-finite stops in both; the ``diverged`` column counts runs above 10x the initial
loss, 0 unless --all-lrs). One untimed warm-up step per method (one seed), then
``--repeats`` (3) timed runs of each, alternating; the median is reported. float32 on the
CPU, torch's thread count (``--threads`` to set it).

Check (the ``check`` column: ok, or FAILED and what disagreed; any FAILED makes the script
return 1). The baseline records every run's held-out loss after every step; so does
run_branches, through the loss function it is given (:class:`Recorder`, in the timed runs):

- held-out losses: every run at every step agrees within LOSS_RTOL (1e-4) relative, i.e. both
  methods take the same path to the same final parameters (they round differently, ~1e-6;
  a 1e-4 relative change of the baseline's lrs fails it); runs that diverge amplify rounding
  without bound, so of those only that both methods diverged is required;
- steps to a reachable target: a target is chosen from the baseline's losses, near the
  median over the runs of the loss at step steps/2, in the middle of the widest gap between
  recorded losses around it (so that rounding cannot move a crossing); run_branches is run
  again (untimed) with it, and its steps (lrs × seeds) must equal exactly what the baseline
  gives: each run's first step at or below the target, ∞ where never, and ∞ for the runs
  run_branches stops once their lr cannot have the fewest mean steps (``beyond_best``,
  replayed on the baseline's steps).

Quick (``--quick``): batches 4 and 32, 2 seeds, 6 steps, one repeat; no CSV unless ``--out``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_branches.py            # full run -> results_branches.csv
    .venv/bin/python benchmarks/bench_branches.py --quick    # smoke test, < 1 minute
    .venv/bin/python benchmarks/bench_branches.py --problems mlp --batches 4,256 --out r.csv
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config only: nothing may reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import load_average, machine, spread, timed, write_rows  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from sgn_lab.data import load_task  # noqa: E402
from sgn_lab.seeds import SweepPurpose, derive  # noqa: E402
from sgn_lab.sweeps.config import sweep_config  # noqa: E402

# The sweep's own keys and held-out size, so that the problems are _branch_network's.
from sgn_lab.sweeps.critical import (  # noqa: E402
    DIVERGENCE_FACTOR,
    EVAL_SAMPLES,  # noqa: E402
    INIT_KEY,  # noqa: E402
    SWEEP_KEY,  # noqa: E402
    beyond_best,  # noqa: E402
    run_branches,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results_branches.csv")
PROBLEMS = ("mlp", "transformer")
WARMUP_STEPS = 1
# Held-out losses, run_branches against the baseline, every run and step: the two round
# differently (a vmapped gradient, lr·g subtracted against SGD's fused add), ~1e-6 here.
LOSS_RTOL = 1e-4
GAP_WINDOW = 20  # the check's target: widest gap among this many losses either side
# The largest lrs of the full config's grid at which no run diverges from the initial weights
# (measured with this script over 50 steps: mlp at B = 4, 32, 256 with 4 seeds, held-out loss
# at most 1.6x the initial one; transformer at B = 4 and 256 with one seed, at most 1.1x).
# Above them runs blow up: mlp from 0.5 (B = 4; non-finite at 0.5-2), transformer at 1 (B = 4:
# non-finite; 0.5 rises to 1.8x).
STABLE_LR = {"mlp": 0.36, "transformer": 0.26}
DIVERGED = 10.0  # a run whose held-out loss exceeds this times the initial one diverged

# Wide enough for the table when the output is a file or a pipe (rich assumes 80 columns).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


@dataclass(frozen=True)
class Setting:
    batches: tuple[int, ...]
    seeds: int | None  # None: the sweep's full config's repeats (mlp 8, transformer 4)
    steps: int
    repeats: int


FULL = Setting(batches=(4, 32, 256), seeds=None, steps=50, repeats=3)
QUICK = Setting(batches=(4, 32), seeds=2, steps=6, repeats=1)


# --------------------------------------------------------------------------------------------
# The problems, as _branch_network builds them
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    name: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    params: dict[str, Tensor]  # the initial weights (named_parameters, detached)
    train: tuple[Tensor, Tensor]
    held_out: tuple[Tensor, Tensor]
    lrs: tuple[float, ...]
    seed: int  # the sweep's seed (the generators derive from it)
    repeats: int  # the sweep's seeds per lr
    initial_loss: float  # held out, at the initial weights
    d: int = field(init=False)

    def __post_init__(self) -> None:
        self.d = sum(p.numel() for p in self.params.values())


def build_problem(name: str, all_lrs: bool = False) -> Problem:
    """The sweep's ``name`` problem at the full config's sizes, with its initial weights; its
    full lr grid (``all_lrs``) or the part of it up to STABLE_LR."""
    c = sweep_config("critical-batch", problem=name)  # the full config
    task_seed = derive(c.seed, SWEEP_KEY, SweepPurpose.PROBLEM) % 2**32
    if name == "mlp":
        task = load_task("teacher-student", seed=task_seed, n=c.dataset_size, dim=c.dim)
    else:
        task = load_task("markov", seed=task_seed, n=c.dataset_size, context=c.dim)
    torch.manual_seed(derive(c.seed, SWEEP_KEY, INIT_KEY))  # the initial weights
    if name == "mlp":
        from sgn_lab.models import build_model

        model = build_model("mlp", task.input_shape, 1, width=c.width, depth=c.depth,
                            activation="tanh")
    else:
        from sgn_lab.models import build_transformer

        model = build_transformer("gpt2", task, width=c.width, depth=c.depth, heads=2)
    model.train(False)  # as in _branch_network: no dropout
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    x_eval, y_eval = task.x_test[:EVAL_SAMPLES], task.y_test[:EVAL_SAMPLES]  # as _branch_network
    with torch.no_grad():
        initial = float(task.loss_fn(model(x_eval), y_eval))
    lrs = c.lr_grid if all_lrs else tuple(lr for lr in c.lr_grid if lr <= STABLE_LR[name])
    return Problem(name=name, model=model, loss_fn=task.loss_fn, params=params,
                   train=(task.x_train, task.y_train), held_out=(x_eval, y_eval), lrs=lrs,
                   seed=c.seed, repeats=c.repeats, initial_loss=initial)


def generators(problem: Problem, batch: int, seeds: int) -> list[torch.Generator]:
    """Fresh minibatch generators, one per seed, the same for both methods (keyed by B where
    _branch_network keys by the index of B in its grid: other draws, the same kind)."""
    return [torch.Generator().manual_seed(derive(problem.seed, SWEEP_KEY, batch, r,
                                                 SweepPurpose.DRAWS))
            for r in range(seeds)]


# --------------------------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------------------------


class Recorder:
    """The problem's loss function, keeping every held-out loss that run_branches computes.

    run_branches passes the held-out targets tensor itself to ``loss_fn`` when it evaluates a
    run (in its order: step by step, the runs still going, lr-major); inside its vmap(grad)
    the targets are a batched minibatch, another object, and are only passed through. Costs
    one list append per evaluation (an evaluation is a forward pass over 256 samples).
    """

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor], y_eval: Tensor) -> None:
        self.loss_fn, self.y_eval, self.values = loss_fn, y_eval, []

    def __call__(self, output: Tensor, y: Tensor) -> Tensor:
        value = self.loss_fn(output, y)
        if y is self.y_eval:
            self.values.append(value)
        return value

    def trajectories(self, lrs: int, seeds: int, steps: int) -> np.ndarray:
        """The held-out losses (lrs, seeds, steps) of a run with a target never reached (NaN
        after a run stopped): the first value is the loss at the start, then at each step
        those of the runs that have not diverged (:func:`stops`)."""
        values = np.array([float(v) for v in self.values])
        start, values = values[0], values[1:]
        out = np.full((lrs * seeds, steps), np.nan)
        live, pos = np.arange(lrs * seeds), 0
        for t in range(steps):
            if live.size == 0:
                break
            chunk = values[pos:pos + live.size]
            if chunk.size < live.size:
                raise RuntimeError(f"run_branches evaluated {values.size} held-out losses, "
                                   f"fewer than its live runs need at step {t + 1}")
            out[live, t] = chunk
            pos += live.size
            live = live[~stops(chunk, start)]
        if pos != values.size:
            raise RuntimeError(f"run_branches evaluated {values.size} held-out losses, "
                               f"expected {pos}")
        return out.reshape(lrs, seeds, steps)


def stops(losses: np.ndarray, initial: float) -> np.ndarray:
    """Where run_branches counts a run as diverged: a non-finite held-out loss or one above
    DIVERGENCE_FACTOR (10⁶) times the loss at the start."""
    limit = DIVERGENCE_FACTOR * initial if initial > 0 else math.inf
    return ~np.isfinite(losses) | (losses > limit)


def branches(problem: Problem, batch: int, seeds: int, steps: int, target: float,
             recorder: Recorder | None = None) -> np.ndarray:
    """run_branches' steps to ``target`` (lrs, seeds); with ``recorder``, its held-out losses
    are kept there."""
    return run_branches(problem.model, recorder or problem.loss_fn, problem.params,
                        problem.train, problem.held_out, lrs=problem.lrs, batch_size=batch,
                        generators=generators(problem, batch, seeds), target=target,
                        max_steps=steps)


def sequential(problem: Problem, batch: int, seeds: int, steps: int,
               target: float) -> tuple[np.ndarray, np.ndarray]:
    """The K runs one after another: steps to ``target`` (lrs, seeds), ∞ if not reached, and
    the held-out loss after every step (lrs, seeds, steps), NaN after a run stopped."""
    x_train, y_train = problem.train
    x_eval, y_eval = problem.held_out
    loss_fn = problem.loss_fn
    n = len(x_train)
    done = np.full((len(problem.lrs), seeds), np.inf)
    losses = np.full((len(problem.lrs), seeds, steps), np.nan)
    for i, lr in enumerate(problem.lrs):
        for r, gen in enumerate(generators(problem, batch, seeds)):  # fresh: seed r's draws
            model = copy.deepcopy(problem.model)
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(problem.params[k])
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            for t in range(1, steps + 1):
                idx = torch.randint(n, (batch,), generator=gen)
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
                with torch.no_grad():
                    current = float(loss_fn(model(x_eval), y_eval))
                losses[i, r, t - 1] = current
                if current <= target:
                    done[i, r] = t
                    break
                if stops(np.array(current), problem.initial_loss):
                    break
    return done, losses


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def pick_target(losses: np.ndarray) -> tuple[float, float]:
    """A reachable target from the baseline's losses (lrs, seeds, steps): the middle of the
    widest gap between recorded losses near the runs' median loss at step steps/2. Returns
    (target, half the gap relative to the target: the float error a crossing can absorb)."""
    at_half = losses[:, :, losses.shape[2] // 2 - 1].ravel()
    at_half = at_half[np.isfinite(at_half)]
    if at_half.size == 0:
        raise RuntimeError("every run diverged before step steps/2: choose smaller lrs")
    reference = float(np.median(at_half))
    values = np.unique(losses[np.isfinite(losses)])
    i = int(np.searchsorted(values, reference))
    lo, hi = max(i - GAP_WINDOW, 0), min(i + GAP_WINDOW, values.size - 1)
    gaps = np.diff(values[lo:hi + 1])
    k = int(np.argmax(gaps))
    target = float(0.5 * (values[lo + k] + values[lo + k + 1]))
    return target, float(0.5 * gaps[k] / abs(target))


def expected_steps(losses: np.ndarray, target: float, initial: float) -> np.ndarray:
    """What run_branches must return for ``target``, from the baseline's held-out losses
    (lrs, seeds, steps) recorded with a target never reached: each run's first step at or
    below the target (∞ if none; a run that first :func:`stops` is dead, ∞), with
    run_branches' early stop replayed step by step (all runs finished, or beyond_best)."""
    steps = losses.shape[2]
    below, bad = losses <= target, stops(losses, initial)
    reach = np.where(below.any(axis=2), below.argmax(axis=2) + 1, np.inf)
    dies = np.where(bad.any(axis=2), bad.argmax(axis=2) + 1, np.inf)
    reach[dies < reach] = np.inf
    done = reach
    for t in range(1, steps + 1):
        done = np.where(reach <= t, reach, np.inf)
        dead = dies <= t
        if (np.isfinite(done) | dead).all() or beyond_best(done, dead, t):
            break
    return done


def diverged(losses: np.ndarray, initial: float) -> np.ndarray:
    """The runs (lrs, seeds) whose held-out loss (lrs, seeds, steps) went non-finite (NaN
    after a stop follows one) or above DIVERGED times the initial loss."""
    return (~np.isfinite(losses) | (losses > DIVERGED * initial)).any(axis=2)


def compare_losses(got: np.ndarray, want: np.ndarray, initial: float) -> tuple[str, float]:
    """("" or what disagrees, the largest relative difference of the held-out losses over the
    runs that diverged in neither method). Diverging runs amplify rounding without bound, so
    of them only that both methods diverged is required."""
    failures = []
    bad_got, bad_want = diverged(got, initial), diverged(want, initial)
    if (bad_got != bad_want).any():
        failures.append(f"{int((bad_got != bad_want).sum())} runs diverged in one method only")
    keep = ~(bad_got | bad_want)
    worst = (float((np.abs(got - want)[keep] / np.abs(want[keep])).max()) if keep.any()
             else 0.0)
    if not worst <= LOSS_RTOL:
        failures.append(f"held-out losses differ by {worst:.1e} > {LOSS_RTOL:g}")
    return "; ".join(failures), worst


def compare(got: np.ndarray, want: np.ndarray) -> tuple[str, float]:
    """("" or what disagrees, the largest disagreement in steps; ∞ where one side is ∞)."""
    same = (got == want)  # ∞ == ∞
    if same.all():
        return "", 0.0
    worst = float(np.abs(got - want)[~same].max())  # ∞ where only one side reached
    return f"steps differ in {int((~same).sum())} of {got.size} runs, max Δ {worst:g}", worst


# --------------------------------------------------------------------------------------------
# One (problem, batch size)
# --------------------------------------------------------------------------------------------


def bench_one(problem: Problem, batch: int, setting: Setting) -> dict:
    seeds, steps, repeats = setting.seeds or problem.repeats, setting.steps, setting.repeats
    K = len(problem.lrs) * seeds
    never = -math.inf
    branches(problem, batch, 1, WARMUP_STEPS, never)  # warm-up, untimed: one seed
    sequential(problem, batch, 1, WARMUP_STEPS, never)
    times: dict[str, list[float]] = {"branches": [], "sequential": []}
    losses = np.empty(0)
    for _ in range(repeats):
        recorder = Recorder(problem.loss_fn, problem.held_out[1])
        seconds, _out = timed(branches, problem, batch, seeds, steps, never, recorder)
        times["branches"].append(seconds)
        seconds, (_done, losses) = timed(sequential, problem, batch, seeds, steps, never)
        times["sequential"].append(seconds)
    losses_failure, loss_diff = compare_losses(
        recorder.trajectories(len(problem.lrs), seeds, steps), losses, problem.initial_loss)
    target, margin = pick_target(losses)
    want = expected_steps(losses, target, problem.initial_loss)
    got = branches(problem, batch, seeds, steps, target)
    steps_failure, worst = compare(got, want)
    failures = [f for f in (steps_failure, losses_failure) if f]
    check = f"FAILED ({'; '.join(failures)})" if failures else "ok"
    b, b_min, b_max = spread(times["branches"])
    s, s_min, s_max = spread(times["sequential"])
    return {
        "problem": problem.name, "batch": batch, "K": K, "lrs": len(problem.lrs),
        "seeds": seeds, "steps": steps, "d": problem.d, "branches_s": b, "sequential_s": s,
        "ratio": s / b, "branches_min_s": b_min, "branches_max_s": b_max,
        "sequential_min_s": s_min, "sequential_max_s": s_max, "repeats": repeats,
        "threads": torch.get_num_threads(),
        "diverged": int(diverged(losses, problem.initial_loss).sum()), "check": check,
        "check_max_diff": worst, "loss_rel_diff": loss_diff, "check_target": target,
        "check_margin": margin,
        "check_reached": int(np.isfinite(want).sum()),
        "check_stopped": int((~np.isfinite(want) & (losses <= target).any(axis=2)).sum()),
        "lr_low": min(problem.lrs), "lr_high": max(problem.lrs),
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


CSV_COLUMNS = [
    "problem", "batch", "K", "steps", "branches_s", "sequential_s", "ratio", "threads",
    "check", "lrs", "seeds", "d", "branches_min_s", "branches_max_s", "sequential_min_s",
    "sequential_max_s", "repeats", "diverged", "check_max_diff", "loss_rel_diff", "check_target",
    "check_margin", "check_reached", "check_stopped", "lr_low", "lr_high", "machine", "torch",
    "date",
]


def write_csv(path: str, rows: list[dict]) -> None:
    write_rows(path, CSV_COLUMNS, rows, keep_nan=True)


def seconds(row: dict, method: str) -> str:
    """The median, and (min–max) over the repeats when there are several."""
    text = f"{row[method + '_s']:.2f}"
    if row["repeats"] > 1:
        text += f" ({row[method + '_min_s']:.2f}–{row[method + '_max_s']:.2f})"
    return text


def print_table(rows: list[dict]) -> None:
    table = Table(title="run_branches (vmap) against K sequential torch.optim.SGD runs",
                  title_justify="left")
    for col in ("problem", "B", "K", "steps", "branches s", "sequential s", "seq ÷ branches",
                "threads", "diverged", "check (runs at target)"):
        table.add_column(col, justify="left" if col in ("problem", "check (runs at target)")
                         else "right", overflow="fold")
    for r in rows:
        check = (f"[green]ok[/green] ({r['check_reached']}/{r['K']})" if r["check"] == "ok"
                 else f"[red]{r['check']}[/red]")
        table.add_row(r["problem"], str(r["batch"]), str(r["K"]), str(r["steps"]),
                      seconds(r, "branches"), seconds(r, "sequential"), f"{r['ratio']:.2f}",
                      str(r["threads"]), str(r["diverged"]), check)
    console.print(table)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: batches {QUICK.batches}, {QUICK.seeds} seeds, "
                        f"{QUICK.steps} steps, {QUICK.repeats} repeat (< 1 minute)")
    p.add_argument("--problems", default=",".join(PROBLEMS),
                   help=f"comma list from {', '.join(PROBLEMS)}")
    p.add_argument("--batches", default=None,
                   help=f"comma list of batch sizes (default {FULL.batches}, --quick "
                        f"{QUICK.batches})")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per lr (default: the sweep's, mlp 8 and transformer 4; "
                        f"--quick {QUICK.seeds})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"SGD steps per run (default {FULL.steps}, --quick {QUICK.steps})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed runs per method, median reported (default {FULL.repeats}, "
                        f"--quick {QUICK.repeats})")
    p.add_argument("--all-lrs", action="store_true",
                   help="the sweep's whole lr grid, with the lrs at which runs diverge "
                        f"(default: the lrs up to {STABLE_LR})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--out", default=None,
                   help=f"CSV file (default {os.path.relpath(DEFAULT_OUT)}; --quick: none)")
    args = p.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FULL
    setting = Setting(
        batches=(base.batches if args.batches is None
                 else tuple(int(b) for b in args.batches.split(",") if b.strip())),
        seeds=args.seeds or base.seeds, steps=args.steps or base.steps,
        repeats=args.repeats or base.repeats)
    if setting.steps < 2:
        raise SystemExit("--steps must be at least 2 (the check's target is set at steps/2)")
    names = tuple(m.strip() for m in args.problems.split(",") if m.strip())
    for name in names:
        if name not in PROBLEMS:
            raise SystemExit(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    info = {"machine": machine(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    console.print(f"[bold]machine[/bold]: {info['machine']}; Python "
                  f"{platform.python_version()}, torch {info['torch']}, torch threads "
                  f"{torch.get_num_threads()}; load average now {load_average():.1f}")
    console.print(f"timing: median of {setting.repeats} run(s) per method after a "
                  f"{WARMUP_STEPS}-step warm-up; {setting.steps} steps, target -inf (never "
                  f"reached); held-out loss after every step on {EVAL_SAMPLES} samples")
    started = time.perf_counter()
    rows: list[dict] = []
    for name in names:
        problem = build_problem(name, args.all_lrs)
        console.print(f"\n[bold]{name}[/bold]: d = {problem.d:,} parameters, "
                      f"{len(problem.lrs)} lrs {min(problem.lrs):g}…{max(problem.lrs):g} × "
                      f"{setting.seeds or problem.repeats} seeds, "
                      f"{len(problem.train[0])} training samples, {len(problem.held_out[0])} "
                      "held out")
        for batch in setting.batches:
            t0 = time.perf_counter()
            row = bench_one(problem, batch, setting)
            rows.append({**row, **info})
            console.print(f"  B = {batch}: branches {row['branches_s']:.2f} s, sequential "
                          f"{row['sequential_s']:.2f} s, check {row['check']} "
                          f"(target {row['check_target']:.6g}, margin "
                          f"{row['check_margin']:.1e}, {row['check_reached']}/{row['K']} at "
                          f"target, {row['check_stopped']} stopped by beyond_best); "
                          f"held-out losses within {row['loss_rel_diff']:.1e}; "
                          f"{time.perf_counter() - t0:.1f} s")
    console.print()
    print_table(rows)
    if args.out:
        write_csv(args.out, rows)
        console.print(f"results written to {args.out}")
    console.print(f"total {time.perf_counter() - started:.0f} s; load average now "
                  f"{load_average():.1f}")
    failed = [r for r in rows if r["check"] != "ok"]
    for r in failed:
        console.print(f"[red]CHECK FAILED[/red]: {r['problem']} B={r['batch']}: {r['check']}")
    if not failed:
        console.print("all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
