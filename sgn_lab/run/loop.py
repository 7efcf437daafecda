"""The one training loop behind ``sgn-lab measure``, ``compare`` and ``figures``.

:func:`run_measurement` trains the model on the task with the method and writes a run
directory (:mod:`sgn_lab.run.rundir`) as it goes: after each measurement the tables and a
checkpoint are rewritten atomically, so a run killed at any point resumes from its last
measurement (``resume=True``) and ends with the same numbers as one that never stopped. What
the checkpoint restores is one object, :class:`TrainState` (model, optimizer, data order and
position, step, DDP noise scale); a step and a measurement are each a function of it.
:func:`run_series` runs several configs into one folder with the same rule for each: a
complete run with the same config is kept, an interrupted one resumed, and a run with another
config is never overwritten or mixed in.

A run whose loss (or a measurement's per-sample loss, gradient or Gram) turns NaN or inf has
diverged (:class:`Diverged`). ``on_divergence="raise"`` stops with the error and leaves the run
incomplete; ``"record"`` ends the run there, keeps what it measured, and marks it complete
with the message under the status key ``diverged`` (:attr:`sgn_lab.run.rundir.Run.diverged`),
so that a series goes on and a re-run keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sgn_lab import checks
from sgn_lab.checks import NonFiniteError
from sgn_lab.data import Task
from sgn_lab.distributed.gns import GradientNoiseScale, gns_hook
from sgn_lab.distributed.ranks import Ranks
from sgn_lab.models.wrapped import is_sharded
from sgn_lab.optim import METHODS, build_optimizer, optimizer_kwargs, train_step
from sgn_lab.run.build import build_run_model, build_task
from sgn_lab.run.config import RunConfig, differences, parse
from sgn_lab.run.probe import NoiseProbe
from sgn_lab.run.recorder import RunRecorder
from sgn_lab.run.rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    check_measured,
    load_checkpoint,
    locked,
    read_config,
    save_checkpoint,
    without_status,
    write_table,
)
from sgn_lab.seeds import Purpose, seed_for
from sgn_lab.version import __version__

GNS_FILE = "gns.csv"  # the DDP noise scale, one row per training step (nproc > 1)
ON_DIVERGENCE = ("raise", "record")
Progress = Callable[[int, int], None]
Notify = Callable[[str], None]


class Diverged(FloatingPointError):
    """Training diverged: the minibatch loss is NaN or inf. The message is one line naming
    the step, the method and the learning rate."""


class DivergedMeasurement(Diverged, ValueError):
    """Training diverged, found by a per-sample check: a per-sample loss, gradient or Gram is
    NaN or inf (:class:`~sgn_lab.checks.NonFiniteError`), of the probe set at a measurement or
    of the minibatch of a method that steps on per-sample gradients (covariance noise). Both a
    :class:`Diverged` and the ValueError that check has always raised."""


def saved_config(out: str | Path) -> RunConfig | None:
    """The config of the run in ``out``, or None when there is none."""
    out = Path(out)
    if not (out / CONFIG_FILE).is_file():
        return None
    return parse(without_status(read_config(out)))


def plan(config: RunConfig | None, out: str | Path, *, resume: bool) -> RunConfig:
    """The config a run in ``out`` will use, checked against what is there before any work.

    A new directory runs ``config`` (the defaults when None; with ``resume`` and no config,
    "continue the run there", it is an error). With a run there already:
    without ``resume`` that is an error; with it, the saved config is used, and a ``config``
    that differs from it is an error listing the differing keys.
    """
    saved = saved_config(out)
    if saved is None:
        if resume and config is None:  # "continue the run in out": there is none
            raise ValueError(f"no run in {out} to resume: check the folder, or start a run "
                             "there without --resume")
        return (config or RunConfig()).resolved()
    if not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose "
                         "another --out")
    if config is not None:
        changed = differences(saved, config)
        if changed:
            raise ValueError(f"{out} holds a run with other settings ({'; '.join(changed)}); "
                             "resume it as it is (only --out and --resume), or choose another "
                             "--out")
    return saved.resolved()


def run_measurement(
    config: RunConfig | None,
    out: str | Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    notify: Notify | None = None,
    ranks: Ranks | None = None,
    on_divergence: str = "raise",
) -> Path:
    """Train and measure as ``config`` says (see :func:`plan`), writing the run directory.

    ``progress(step, total)`` is called after every step; ``notify(text)`` once with the Gram
    path's coverage report (each parameter's route), which also goes to ``coverage.csv``.
    A complete run is left as it is. Returns the run directory.

    ``on_divergence``: when training diverges (:class:`Diverged`), ``"raise"`` the error and
    leave the run incomplete, or ``"record"`` it: the run stops there, keeps the rows it
    measured, and its ``config.json`` status gets ``complete: true`` and ``diverged`` (the
    error's one-line message), so that it is never run again.

    ``ranks``: every process of a torch.distributed group calls this with its
    :class:`~sgn_lab.distributed.Ranks` (``config.training.nproc`` must be the group's size):
    rank 0 holds the lock, plans and writes; the others train and measure with it.
    """
    checks.choice("on_divergence", on_divergence, ON_DIVERGENCE)
    out = Path(out)
    ranks = ranks or Ranks()
    with ExitStack() as stack:
        planned = ranks.decided(lambda: _planned(stack, config, out, resume))
        if planned is None:
            return out  # complete: plan() made sure it is the run asked for
        if planned.training.nproc != ranks.size:
            raise ValueError(f"the run is set for nproc={planned.training.nproc} processes but "
                             f"runs in {ranks.size}")
        _train(planned, out, resume=resume, progress=progress, notify=notify, ranks=ranks,
               on_divergence=on_divergence)
    return out


def _planned(stack: ExitStack, config: RunConfig | None, out: Path, resume: bool
             ) -> RunConfig | None:
    """Under the lock: the config to run, or None when the run is complete."""
    stack.enter_context(locked(out))
    config = plan(config, out, resume=resume)
    if (out / CONFIG_FILE).is_file() and read_config(out).get("complete"):
        return None
    return config


def run_series(
    configs: Sequence[RunConfig],
    root: str | Path,
    *,
    resume: bool = True,
    progress: Callable[[RunConfig], Progress | None] | None = None,
    done: Progress | None = None,
    notify: Notify | None = None,
    on_divergence: str = "raise",
) -> list[Path]:
    """Run each config into ``root/<its run name>`` (compare, figures): complete runs with the
    same config are kept, interrupted ones resumed, other settings are an error. The names are
    checked to be distinct, and every directory against its config, before the first run.

    ``progress(config)`` gives a run's step callback; ``done(runs done, runs)`` follows the
    series. ``on_divergence`` as in :func:`run_measurement`: with ``"record"`` a diverged run
    is marked so (complete) and the series goes on to the next.

    A config with ``training.nproc`` N > 1 runs in N processes on this machine, started for
    it (:func:`sgn_lab.distributed.launch`) and gone when it ends, as ``sgn-lab measure
    --nproc N`` runs it; its step callback is then called once, when it is done, and
    ``notify`` is not.
    """
    checks.choice("on_divergence", on_divergence, ON_DIVERGENCE)
    root = Path(root)
    names = [c.resolved().run_name for c in configs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"two runs would share the name {clash[0]!r}: give them different "
                         "hyperparameters or seeds")
    for config in configs:  # every directory checked before the first run starts
        plan(config, root / config.resolved().run_name, resume=resume)
    paths = []
    for index, config in enumerate(configs):
        path = root / config.resolved().run_name
        steps = progress(config) if progress else None
        if config.training.nproc > 1:
            _launched(config, path, on_divergence)
            if steps is not None:
                steps(config.training.steps, config.training.steps)
            paths.append(path)
        else:
            paths.append(run_measurement(config, path, resume=resume, progress=steps,
                                         notify=notify, on_divergence=on_divergence))
        if done is not None:
            done(index + 1, len(configs))
    return paths


def _launched(config: RunConfig, path: Path, on_divergence: str) -> None:
    """One run of a series in its ``training.nproc`` processes (already planned)."""
    from sgn_lab.distributed.launch import launch

    launch(config.training.nproc, series_rank, config, path, on_divergence,
           device_type=resolve_device(config.training.device).type)


def series_rank(ranks: Ranks, config: RunConfig, path: Path, on_divergence: str) -> None:
    """One process's part of a run of :func:`run_series` (module-level, for the launcher)."""
    run_measurement(config, path, resume=True, ranks=ranks, on_divergence=on_divergence)


def resolve_device(device: str, ranks: Ranks | None = None) -> torch.device:
    """'auto' picks CUDA when present; an unavailable 'cuda' is an error. Over several
    processes each takes the GPU of its local rank (the current CUDA device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    if device == "cuda" and ranks is not None and ranks.distributed:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def identity_columns(config: RunConfig) -> dict[str, Any]:
    """The identifying columns of every metrics row: the run, its label, task, model, method,
    seed, and every optimizer hyperparameter the method takes (defaults resolved)."""
    opt = config.optimizer
    return {
        "run": config.run_name, "label": config.label, "task": config.task.name,
        "model": config.model.name, "method": opt.method, "seed": config.training.seed,
        "lr": opt.lr, "batch_size": config.training.batch_size, **opt.settings(),
    }


@dataclass
class TrainState:
    """What a run resumes from: the model and optimizer, the data order and where the loop
    stands in it, and the DDP noise scale; a checkpoint is :meth:`state_dict` plus torch's
    random state (:func:`save_state`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    order: Tensor
    position: int
    step: int
    device: torch.device
    gns: GradientNoiseScale | None = None

    def next_batch(self, batch_size: int) -> Tensor:
        """The indices of the next minibatch, without replacement within an epoch: a new
        order of the training samples when this one has fewer than ``batch_size`` left."""
        if self.position + batch_size > len(self.order):
            self.order, self.position = torch.randperm(len(self.order), generator=self.data_gen), 0
        idx = self.order[self.position : self.position + batch_size]
        self.position += batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint; collective for a sharded model, whose whole state only rank 0
        receives (the other ranks' dicts hold empty model and optimizer states)."""
        model_state, optimizer_state = _model_state(self.model, self.optimizer)
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "data_generator": self.data_gen.get_state(),
            "order": self.order,
            "position": self.position,
            "step": self.step,
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.gns is not None:
            state["gns"] = self.gns.tracker.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if is_sharded(self.model):  # each rank keeps its shards of the whole state
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.data_gen.set_state(state["data_generator"])
        self.order, self.position, self.step = state["order"], state["position"], state["step"]
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self.gns is not None and "gns" in state:
            self.gns.tracker.load_state_dict(state["gns"])


def _model_state(model: nn.Module, optimizer: torch.optim.Optimizer
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's state dicts; a sharded model's gathered whole, to rank 0's
    CPU memory (collective)."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@dataclass(frozen=True)
class _Training:
    """One run's fixed parts: what it trains on, through what, for how long, and its probe."""

    config: RunConfig
    task: Task
    stepped: nn.Module  # the module the optimizer steps through (DDP, or the model)
    probe: NoiseProbe
    total: int  # steps
    steps_per_epoch: int
    share: slice  # this rank's part of every minibatch
    ranks: Ranks

    def measures(self, step: int) -> bool:
        """Whether the run measures at ``step``: every k steps, and at its last."""
        return self.probe.due(step) or step == self.total

    def failed(self, what: str) -> str:
        opt = self.config.optimizer
        return (f"training diverged: {what} (method {opt.method}, lr {opt.lr}); lower the "
                "learning rate")


def _train(config: RunConfig, out: Path, *, resume: bool, progress: Progress | None,
           notify: Notify | None, ranks: Ranks, on_divergence: str) -> None:
    run, state = _set_up(config, ranks)
    checkpoint = out / CHECKPOINT_FILE
    resumed_at = None
    if resume:
        def restored() -> dict[str, Any] | None:
            if not checkpoint.is_file():
                return None
            saved = load_checkpoint(checkpoint)
            check_measured(out, [s for s in range(saved["step"] + 1) if run.measures(s)])
            return saved

        saved = ranks.decided(restored)
        if saved is not None:
            state.load_state_dict(saved)
            resumed_at = state.step
    recorder = None
    if ranks.is_root:
        status = {**config.to_dict(), "run": config.run_name, "sgn_lab_version": __version__}
        if run.probe.samples != config.probe.probe_samples:  # clamped to the data, and said
            status["probe_samples_used"] = run.probe.samples
        recorder = RunRecorder(out, config=status, identity=identity_columns(config),
                               resume_from=resumed_at, log=config.output.log, notify=notify)
    diverged: str | None = None
    try:
        for step in range(state.step, run.total + 1):
            state.step = step
            if run.measures(step) and step != resumed_at:
                _measure(run, state, recorder, out)
            if step == run.total:
                break
            _step(run, state)
            if progress is not None:
                progress(step + 1, run.total)
    except BaseException as exc:
        if not (isinstance(exc, Diverged) and on_divergence == "record"):
            if recorder is not None:
                recorder.close()
            raise
        # Recorded: the run ends here, complete, with the rows (and the checkpoint) of its
        # last measurement. The minibatch loss is summed over the ranks, so all stop at once;
        # a measurement's check runs on each rank's share of the probe set (nproc > 1: one
        # rank's NaN can stop that rank alone, as with "raise").
        diverged = str(exc)
    if recorder is not None:
        recorder.finish(diverged=diverged)
    ranks.barrier()  # nobody leaves before rank 0 has written the end


def _set_up(config: RunConfig, ranks: Ranks) -> tuple[_Training, TrainState]:
    """The task, the model (seeded by the run's seed), the optimizer, the probe and the data
    order of a new run, in the order that fixes their random draws."""
    training, opt = config.training, config.optimizer
    device = resolve_device(training.device, ranks)
    task = build_task(config)
    n_train = len(task.x_train)
    if training.batch_size > n_train:
        raise ValueError(f"batch_size={training.batch_size} exceeds the {n_train} training "
                         "samples")
    steps_per_epoch = n_train // training.batch_size
    total = (training.steps if training.epochs is None
             else round(training.epochs * steps_per_epoch))
    torch.manual_seed(training.seed)
    model = build_run_model(config, task).to(device)
    stepped, gns = _data_parallel(model, config, ranks)
    kwargs = optimizer_kwargs(opt.method, opt.lr, opt.settings(),
                              batch_size=training.batch_size,
                              seed=seed_for(training.seed, 0, Purpose.OPTIMIZER))
    optimizer = build_optimizer(opt.method, model.named_parameters(), **kwargs)
    probe = _probe(config, task, model, optimizer, ranks)
    data_gen = torch.Generator().manual_seed(seed_for(training.seed, 0, Purpose.DATA_ORDER))
    state = TrainState(model, optimizer, data_gen, torch.randperm(n_train, generator=data_gen),
                       position=0, step=0, device=device, gns=gns)
    # Every rank draws the same minibatch and takes its equal share of it.
    run = _Training(config, task, stepped, probe, total, steps_per_epoch,
                    share=ranks.shard(training.batch_size), ranks=ranks)
    return run, state


def _probe(config: RunConfig, task: Task, model: nn.Module,
           optimizer: torch.optim.Optimizer, ranks: Ranks) -> NoiseProbe:
    """The run's probe, as its config's probe section says."""
    probe, training = config.probe, config.training
    instruments = list(probe.instruments)
    return NoiseProbe(
        model, task.loss_fn, task.x_train, task.y_train, x_test=task.x_test,
        y_test=task.y_test, x_val=task.x_val, y_val=task.y_val, every=probe.measure_every,
        samples=probe.probe_samples, fresh=probe.fresh_probe,
        batch_size=training.batch_size, instruments=instruments,
        update_repeats=probe.update_repeats if "updates" in instruments else 0,
        optimizer=optimizer, method=config.optimizer.method, grads=probe.grads,
        chunk_size=probe.chunk_size, seed=training.seed, ranks=ranks,
        shape_batch_sizes=probe.shape_batch_sizes, shape_draws=probe.shape_draws,
    )


def _measure(run: _Training, state: TrainState, recorder: RunRecorder | None,
             out: Path) -> None:
    """Measure at ``state.step``; on rank 0, record the row and save the checkpoint."""
    step, opt = state.step, run.config.optimizer
    try:
        result = run.probe.measure(step, epoch=step / run.steps_per_epoch)
    except NonFiniteError as exc:
        raise DivergedMeasurement(run.failed(f"{exc} at the measurement of step {step}")
                                  ) from exc
    if opt.sigma_trace_factor is not None and result.noise is not None:
        # Isotropic noise of the SGN's magnitude: σ² = c·tr(S)/d, re-matched at every
        # measurement (σ lives in the optimizer state: a resume keeps it).
        state.optimizer.set_sigma_from_trace(opt.sigma_trace_factor * result.noise.trace)
    checkpoint = (state.state_dict() if recorder is not None or is_sharded(state.model)
                  else None)  # collective for a sharded model
    if recorder is None:
        return
    if state.gns is not None:
        result.row.update(gns_columns(state.gns))
        write_table(out / GNS_FILE, state.gns.frame())
    coverage = run.probe.coverage
    recorder.record(result, coverage=None if coverage is None else coverage.to_frame(),
                    coverage_summary=None if coverage is None else coverage.summary())
    save_checkpoint(out / CHECKPOINT_FILE, checkpoint)


def _step(run: _Training, state: TrainState) -> None:
    """One training step on the next minibatch (this rank's share of it)."""
    task, step, method = run.task, state.step, run.config.optimizer.method
    idx = state.next_batch(run.config.training.batch_size)[run.share]
    try:
        loss = train_step(method, state.optimizer, run.stepped, task.loss_fn,
                          task.x_train[idx].to(state.device), task.y_train[idx].to(state.device))
    except NonFiniteError as exc:  # a method that steps on per-sample gradients
        raise DivergedMeasurement(run.failed(f"{exc} in the minibatch of step {step}")) from exc
    if run.ranks.distributed:  # the minibatch loss: the mean of the equal shares' losses
        loss = float(run.ranks.sum(torch.tensor([loss], dtype=torch.float64))) / run.ranks.size
    if state.gns is not None:
        state.gns.step()
    if not math.isfinite(loss):
        raise Diverged(run.failed(f"loss {loss} at step {step}"))


def _data_parallel(model: torch.nn.Module, config: RunConfig, ranks: Ranks
                   ) -> tuple[torch.nn.Module, GradientNoiseScale | None]:
    """The module the optimizer steps through (DDP over the ranks, or the model itself, which
    FSDP shards in place), and the noise scale recorded around the gradients' reduction (DDP's
    communication hook, or FSDP's gathered gradients) for methods that step on one plain
    backward pass (a closure's extra passes would mix gradients at other weights)."""
    if not ranks.distributed:
        return model, None
    gradient_step = METHODS[config.optimizer.method].step_input == "gradient"
    if config.training.parallel == "fsdp":
        from sgn_lab.distributed.fsdp import ShardedNoiseScale, shard_blocks

        shard_blocks(model, blocks=config.training.fsdp_blocks, group=ranks.group)
        return model, (ShardedNoiseScale(model, config.training.batch_size // ranks.size,
                                         process_group=ranks.group) if gradient_step else None)
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                  process_group=ranks.group)
    if not gradient_step:
        return ddp, None
    gns = GradientNoiseScale(config.training.batch_size // ranks.size,
                             process_group=ranks.group)
    ddp.register_comm_hook(gns, gns_hook)
    return ddp, gns


def gns_columns(gns: GradientNoiseScale) -> dict[str, float]:
    """The smoothed noise scale of the DDP hook at a measurement, for the metrics row."""
    last = gns.history[-1] if gns.history else {}
    return {f"gns_{key}": last.get(key, math.nan)
            for key in ("noise_scale", "noise_scale_se", "sq_norm_smoothed", "trace_smoothed")}
