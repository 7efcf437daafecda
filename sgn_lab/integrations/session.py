"""What the trainer callbacks share: their options, the probe over a fixed probe set, the run
directory, the schedule of measurements, and the isolation of a measurement from training.

When a measurement happens
    At the first step a training run starts from (0, or the step a checkpoint resumes from),
    then at the first optimizer-step count at or past each multiple of ``every`` (the
    trainer's count of optimizer steps: under gradient accumulation one step is several
    micro-batches, and it is measured once), and at the step training ends with, if not
    measured already. Each step is measured at most once.

What a measurement leaves as it was
    The random state of the training (torch's CPU generator, every initialised CUDA device's,
    Python's ``random`` and numpy's global generator: saved before and restored after; the
    probe's own draws come from generators seeded with (seed, step, purpose), see
    :mod:`sgn_lab.seeds`), the ``.grad`` of every parameter (the probe differentiates its own
    loss functionally and never reads ``.grad``; the references are put back regardless), the
    train/eval flag of every submodule (restored one by one), the modules' ``forward``
    attributes, and the weights.

Precision
    The probe runs with autocast disabled and gradients enabled, and computes per-sample
    gradients of its own loss, in float32: with automatic mixed precision (float32 weights,
    an autocast forward, a GradScaler scaling the loss) it measures the float32 noise at the
    float32 weights, and the loss scale never enters. A forward that accelerate wrapped in
    autocast (the HF Trainer's ``bf16``/``fp16``) is called unwrapped for the measurement.
    Weights held in float16 or bfloat16 are measured on a float32 copy of the model, made for
    each measurement.

The loss
    Each probe sample's loss is ``loss_fn`` on a batch of that one sample, and the measured
    mean gradient is the mean of the per-sample gradients. With the built-in losses (cross
    entropy, :func:`sgn_lab.models.losses.token_cross_entropy`) a sample's loss is its mean
    over its real tokens, and the eval instrument's ``train_loss``/``test_loss`` the mean over
    samples of those per-sample losses; a trainer's own loss may average otherwise (over all
    tokens of a batch). ``config.json`` states it as ``probe.loss_average``.

The run directory is the one ``sgn-lab measure`` writes (:class:`~sgn_lab.run.recorder.
RunRecorder`), held under its lock from the start of training to its end.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sgn_lab import checks
from sgn_lab.models.losses import loss_average
from sgn_lab.models.modes import restored_modes
from sgn_lab.run.choices import GRADS_PATHS, LOGS
from sgn_lab.run.instruments import INSTRUMENTS, Instrument
from sgn_lab.run.probe import LossFn, NoiseProbe, ProbeResult
from sgn_lab.run.recorder import RunRecorder
from sgn_lab.run.rundir import CONFIG_FILE, locked, read_config
from sgn_lab.stats.noise import minibatch_factor

DEFAULT_INSTRUMENTS = ("sgn", "tails")
"""Instruments run by default; ``eval`` joins them when an evaluation set is given."""

# The updates instrument steps copies of an sgn_lab optimizer by its registry name; a trainer's
# optimizer is not one.
REFUSED = ("updates",)
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ProbeSettings:
    """The options both callbacks take, checked once: a bad value is a one-line ValueError."""

    probe_x: Tensor
    probe_y: Tensor
    out: Path
    every: int
    instruments: tuple[str | Instrument, ...]
    eval_x: Tensor | None
    eval_y: Tensor | None
    samples: int
    grads: str
    chunk_size: int | None
    seed: int | None
    name: str | None
    task: str | None
    log: tuple[str, ...]

    @classmethod
    def checked(cls, *, probe_x: Any, probe_y: Any, out: Any, every: Any,
                instruments: Sequence[str | Instrument] | None, eval_x: Any, eval_y: Any,
                samples: Any, grads: Any, chunk_size: Any, seed: Any, name: Any, task: Any,
                log: Any) -> ProbeSettings:
        n = _pair("probe_x", probe_x, "probe_y", probe_y, minimum=2)
        if (eval_x is None) != (eval_y is None):
            raise ValueError("give both eval_x and eval_y, or neither")
        if eval_x is not None:
            _pair("eval_x", eval_x, "eval_y", eval_y, minimum=1)
        if samples is None:
            samples = n
        elif checks.integer("samples", samples, 2) > n:
            raise ValueError(f"samples must be at most the {n} probe samples, got {samples}")
        if isinstance(log, str):  # log="tensorboard" means the one view
            log = (log,)
        if not isinstance(log, list | tuple):
            raise ValueError(f"log must be a tuple of names such as ('tensorboard',), got {log!r}")
        chosen = _instruments(instruments, with_eval=eval_x is not None)
        return cls(
            probe_x=probe_x, probe_y=probe_y, out=_path("out", out),
            every=checks.integer("every", every, 1),
            instruments=chosen,
            eval_x=eval_x, eval_y=eval_y, samples=int(samples),
            grads=_grads(grads, chosen),
            chunk_size=None if chunk_size is None else checks.integer("chunk_size",
                                                                       chunk_size, 1),
            seed=None if seed is None else checks.integer("seed", seed, 0),
            name=_text("name", name), task=_text("task", task),
            log=tuple(checks.choice("log", item, LOGS) for item in log),
        )

    @property
    def instrument_names(self) -> list[str]:
        return [i if isinstance(i, str) else i.name for i in self.instruments]


def _pair(x_name: str, x: Any, y_name: str, y: Any, *, minimum: int) -> int:
    for name, value in ((x_name, x), (y_name, y)):
        if not isinstance(value, Tensor) or value.dim() == 0:
            what = "a 0-d tensor" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor with a sample axis, got {what}")
    if len(x) != len(y):
        raise ValueError(f"{x_name} has {len(x)} samples but {y_name} has {len(y)}")
    if len(x) < minimum:
        raise ValueError(f"{x_name} must hold at least {minimum} samples, got {len(x)}")
    return len(x)


def _grads(grads: Any, instruments: Sequence[str | Instrument]) -> str:
    checks.choice("grads", grads, GRADS_PATHS)
    needs = any(INSTRUMENTS[i].needs_grads if isinstance(i, str) else i.needs_grads
                for i in instruments)
    if grads == "gram" and needs:
        raise ValueError("grads='gram' cannot serve the curvature instrument (it needs "
                         "per-sample gradients): use grads='vmap' or 'auto'")
    return grads


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError(f"{name} must be a folder path, got {value!r}")
    return Path(value)


def _text(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _instruments(instruments: Sequence[str | Instrument] | None, *, with_eval: bool
                 ) -> tuple[str | Instrument, ...]:
    if instruments is None:
        return (*DEFAULT_INSTRUMENTS, *(("eval",) if with_eval else ()))
    if isinstance(instruments, str):
        instruments = (instruments,)
    names = [item if isinstance(item, str) else getattr(item, "name", None)
             for item in instruments]
    for item in instruments:
        if isinstance(item, str):
            if item in REFUSED:
                raise ValueError(f"instrument {item!r} steps copies of an sgn_lab optimizer and "
                                 "is not available in a trainer callback")
            checks.choice("instruments", item, [i for i in INSTRUMENTS if i not in REFUSED])
        elif not (hasattr(item, "name") and hasattr(item, "needs_grads") and callable(item)):
            raise ValueError(f"instruments must be names or instrument objects, got {item!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"instrument {twice[0]!r} given twice")
    return tuple(instruments)


@dataclass(frozen=True)
class TrainingFacts:
    """What a callback reads from its trainer when training starts."""

    trainer: str  # "lightning" or "transformers"
    task: str
    model: str
    method: str  # the optimizer's class name, lowercased
    lr: float
    seed: int
    batch_size: int | None  # effective: per step x accumulation x processes
    dataset_size: int | None
    training: Mapping[str, Any]  # trainer-specific settings for config.json


def describe(settings: ProbeSettings, facts: TrainingFacts, *, loss_fn: LossFn | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The identity columns and config.json of a run, with ``sgn-lab measure``'s names:
    the label is the method and its learning rate, the run the label and the seed unless
    ``name`` is given. ``config["probe"]["loss_average"]`` says in words what the probe's loss
    averages (:func:`sgn_lab.models.losses.loss_average`)."""
    from sgn_lab.version import __version__

    label = f"{facts.method}-lr={facts.lr:g}"
    run = settings.name or f"{label}-s{facts.seed}"
    identity = {"run": run, "label": label, "task": facts.task, "model": facts.model,
                "method": facts.method, "seed": facts.seed, "lr": facts.lr,
                "batch_size": facts.batch_size}
    config = {
        "trainer": facts.trainer,
        "task": {"name": facts.task, "n_train": facts.dataset_size},
        "model": {"name": facts.model},
        "optimizer": {"method": facts.method, "lr": facts.lr},
        "training": {"batch_size": facts.batch_size, "seed": facts.seed, **facts.training},
        "probe": {"measure_every": settings.every, "probe_samples": settings.samples,
                  "instruments": settings.instrument_names, "grads": settings.grads,
                  "chunk_size": settings.chunk_size,
                  "eval_samples": None if settings.eval_x is None else len(settings.eval_x),
                  **({} if loss_fn is None else {"loss_average": loss_average(loss_fn)})},
        "output": {"name": settings.name, "log": list(settings.log)},
        "run": run,
        "sgn_lab_version": __version__,
    }
    return identity, config


class Session:
    """One training run under measurement: the probe, the run directory (locked until
    :meth:`finish` or :meth:`close`) and the schedule.

    ``start`` is the optimizer step training starts from. A directory that already holds a
    run is an error, unless training resumes (``start`` > 0) the run of the same name: rows
    after ``start`` are then dropped, and ``start`` is not measured again if it was.
    ``train_mode``: put the model in this mode for each measurement (None: as it is).
    """

    def __init__(self, settings: ProbeSettings, model: nn.Module, loss_fn: LossFn, *,
                 start: int, facts: TrainingFacts, train_mode: bool | None = None) -> None:
        self.settings, self.model, self.train_mode = settings, model, train_mode
        self.facts = facts
        self.probe = NoiseProbe(
            model, loss_fn, settings.probe_x, settings.probe_y, x_test=settings.eval_x,
            y_test=settings.eval_y, every=settings.every, samples=settings.samples,
            instruments=list(settings.instruments), grads=settings.grads,
            chunk_size=settings.chunk_size, seed=facts.seed)
        identity, config = describe(settings, facts, loss_fn=loss_fn)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(locked(settings.out))
        try:
            resume_from = _continued(settings.out, identity["run"], start)
            self.recorder = RunRecorder(settings.out, config=config, identity=identity,
                                        resume_from=resume_from, log=settings.log)
        except BaseException:
            self._lock.close()
            raise
        measured = self.recorder.metrics
        self.last = (start if resume_from is not None and not measured.empty
                     and bool((measured["step"] == start).any()) else None)
        self.seen = start
        self.steps: list[int] = []  # measured by this session
        self.latest: ProbeResult | None = None  # only the last: results hold (d,) tensors

    def start(self, step: int, epoch: float) -> None:
        """The measurement before the first step (unless a resumed run has it)."""
        if step != self.last:
            self.measure(step, epoch)

    def step(self, step: int, epoch: float) -> None:
        """After an optimizer step (or a micro-batch): measure if a multiple of ``every`` was
        reached since the last call."""
        due = step // self.settings.every > self.seen // self.settings.every
        self.seen = max(self.seen, step)
        if due and step != self.last:
            self.measure(step, epoch)

    def finish(self, step: int, epoch: float) -> None:
        """The measurement at the end (if not taken already); the run is marked complete."""
        try:
            if step != self.last:
                self.measure(step, epoch)
            self.recorder.finish()
        finally:
            self.close()

    def close(self) -> None:
        """Close the live views and release the lock (an unfinished run stays incomplete)."""
        try:
            self.recorder.close()
        finally:
            self._lock.close()

    def measure(self, step: int, epoch: float) -> ProbeResult:
        with isolated(self.model, train_mode=self.train_mode) as measured:
            self.probe.model = measured
            try:
                result = self.probe.measure(step, epoch=epoch)
            finally:
                self.probe.model = self.model
        row = {**result.row, **minibatch_columns(result.row, self.facts.batch_size,
                                                  self.facts.dataset_size)}
        result = replace(result, row=row)
        coverage = self.probe.coverage
        self.recorder.record(result, coverage=None if coverage is None else coverage.to_frame(),
                             coverage_summary=None if coverage is None else coverage.summary())
        self.last, self.latest = step, result
        self.steps.append(step)
        return result


def _continued(out: Path, run: str, start: int) -> int | None:
    """The step a run in ``out`` continues from; None for a new run."""
    if not (out / CONFIG_FILE).is_file():
        return None
    held = read_config(out).get("run")
    if start > 0 and held == run:
        return start
    raise ValueError(f"{out} already holds the run {held!r}; choose another out (only a trainer "
                     "resumed from a checkpoint continues the run in its out)")


def minibatch_columns(row: Mapping[str, Any], batch_size: int | None,
                      dataset_size: int | None) -> dict[str, Any]:
    """The minibatch columns of the sgn instrument for the trainer's effective batch B and
    training set of N samples (the probe set is not the training set): tr(S)·(1/B - 1/N), or
    tr(S)/B when N is unknown or below B."""
    if "trace" not in row:
        return {}
    if batch_size is None:
        return {"batch_size": math.nan, "dataset_size": math.nan, "minibatch_trace": math.nan,
                "noise_to_signal": math.nan}
    n = dataset_size if dataset_size is not None and dataset_size >= batch_size else None
    minibatch = row["trace"] * minibatch_factor(batch_size, dataset_size=n)
    signal = row["grad_sq_norm"]
    return {"batch_size": batch_size, "dataset_size": math.nan if n is None else n,
            "minibatch_trace": minibatch,
            "noise_to_signal": minibatch / signal if signal > 0 else math.nan}


@contextlib.contextmanager
def isolated(model: nn.Module, *, train_mode: bool | None = None) -> Iterator[nn.Module]:
    """The model as the probe measures it (float32, autocast off, grad on, ``train_mode``),
    with the random state, ``.grad`` references and train/eval flags restored afterwards."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    device = params[0].device if params else torch.device("cpu")
    try:
        with restored_modes(model), preserved_rng(), contextlib.ExitStack() as stack:
            for kind in {"cpu", device.type}:  # the trainer's autocast region must not leak in
                stack.enter_context(torch.autocast(kind, enabled=False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(original_forwards(model))
            if train_mode is not None:
                model.train(train_mode)
            yield float32(model)
    finally:
        for p, g in zip(params, grads, strict=True):
            if p.grad is not g:
                p.grad = g


@contextlib.contextmanager
def original_forwards(model: nn.Module) -> Iterator[None]:
    """Modules' own forwards instead of accelerate's autocast wrappers, for the block.

    With mixed precision, accelerate (the HF Trainer's ``bf16``/``fp16``) replaces
    ``module.forward`` by a wrapper that enters autocast at every call, inside any region that
    disabled it, and keeps the original as ``module._original_forward``.
    """
    wrapped = [(m, m.__dict__["forward"]) for m in model.modules()
               if "forward" in m.__dict__ and "_original_forward" in m.__dict__]
    try:
        for module, _ in wrapped:
            module.forward = module._original_forward
        yield
    finally:
        for module, forward in wrapped:
            module.forward = forward


def float32(model: nn.Module) -> nn.Module:
    """``model`` itself, or a float32 copy when any weight is float16 or bfloat16."""
    if any(p.dtype in HALF_DTYPES for p in model.parameters()):
        return copy.deepcopy(model).float()
    return model


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch's CPU and CUDA generators, Python's and numpy's global ones on exit."""
    # numpy's legacy global generator is what a training script may seed and draw from
    # (Lightning's seed_everything and HF's set_seed seed it): it is the state kept here.
    np_state = np.random.get_state()  # noqa: NPY002
    py_state, cpu_state = random.getstate(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def optimizer_name(optimizer: Any) -> str:
    """The class name of the optimizer inside trainer wrappers, lowercased (e.g. ``adamw``)."""
    for attribute in ("optimizer", "_optimizer"):  # accelerate's and Lightning's wrappers
        inner = getattr(optimizer, attribute, None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
    return type(optimizer).__name__.lower() if optimizer is not None else "unknown"


def dataset_size(dataset: Any) -> int | None:
    """``len(dataset)``, or None for a dataset without a length (an iterable one)."""
    try:
        return len(dataset)
    except TypeError:
        return None
