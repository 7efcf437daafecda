"""The measurement run behind ``sgn-lab measure``: train with one method, measure the SGN.

A run is described by a :class:`RunConfig`; :func:`run_measurement` trains the model on the
task with the method and writes a run directory (see :mod:`sgn_lab.results`) as it goes:
after each measurement the tables and a checkpoint are rewritten atomically, so a run killed
at any point resumes from its last measurement (``resume=True``) and ends with the same
numbers as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from sgn_lab import __version__
from sgn_lab.data import load_task
from sgn_lab.models import MODELS, build_model, loss_for
from sgn_lab.optim import METHODS, build_optimizer, train_step
from sgn_lab.probe import GRADS_PATHS, NoiseProbe, derived_seed
from sgn_lab.results import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    COVERAGE_FILE,
    METRICS_FILE,
    SPECTRA_FILE,
    load_checkpoint,
    load_run,
    read_config,
    save_checkpoint,
    write_json,
    write_table,
)

DEVICES = ("auto", "cpu", "cuda")

# Method hyperparameters a config may set (None: the method's own default), and the methods
# each applies to.
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "momentum": ("momentum", "gaussian", "covariance", "symmetric"),
    "beta0": ("pnm", "adapnm"),
    "beta1": ("pnm", "adapnm", "adam"),
    "beta2": ("adapnm", "adam"),
    "sigma": ("gaussian",),
    "sigma_trace_factor": ("gaussian",),
    "small_batch": ("covariance",),
    "variant": ("covariance",),
    "noise": ("symmetric",),
    "beta_max": ("adaptive-hb",),
    "weight_decay": tuple(METHODS),
}


@dataclass
class RunConfig:
    """Everything that defines a measurement run (saved as ``config.json`` in the run)."""

    task: str = "mnist1d"
    n_train: int | None = None
    model: str = "mlp"
    width: int = 128
    depth: int = 2
    method: str = "pnm"
    lr: float = 0.1
    batch_size: int = 64
    steps: int = 1000
    epochs: float | None = None
    measure_every: int = 100
    probe_samples: int = 512
    fresh_probe: bool = False
    update_repeats: int = 32
    curvature: bool = False
    grads: str = "auto"
    chunk_size: int | None = None
    device: str = "auto"
    seed: int = 0
    name: str | None = None
    momentum: float | None = None
    beta0: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    sigma: float | None = None
    sigma_trace_factor: float | None = None
    small_batch: int | None = None
    variant: str | None = None
    noise: float | None = None
    beta_max: float | None = None
    weight_decay: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.method}-s{self.seed}"

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.grads not in GRADS_PATHS:
            raise ValueError(
                f"unknown grads {self.grads!r}; choose one of {', '.join(GRADS_PATHS)}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        for name in ("batch_size", "measure_every", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.probe_samples < 2:
            raise ValueError(f"probe_samples must be at least 2, got {self.probe_samples}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.n_train is not None and self.n_train < 2:
            raise ValueError(f"n_train must be at least 2, got {self.n_train}")
        for name, methods in HYPERPARAMETERS.items():
            if getattr(self, name) is not None and self.method not in methods:
                raise ValueError(
                    f"{name} does not apply to method {self.method!r} (only to "
                    f"{', '.join(methods)})"
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A config from a dict (TOML/JSON); unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (JSON also accepted, e.g. a run's own config.json)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse config file {path}: {exc}") from exc
    return without_status(data)


# Keys a run's config.json records besides the configuration: its status.
STATUS_KEYS = ("complete", "run", "sgn_lab_version")


def without_status(data: dict[str, Any]) -> dict[str, Any]:
    """The configuration part of a run's config.json (or of any config dict)."""
    return {k: v for k, v in data.items() if k not in STATUS_KEYS}


def method_kwargs(config: RunConfig) -> dict[str, Any]:
    """The optimizer's keyword arguments from the config's flat hyperparameters."""
    kwargs: dict[str, Any] = {"lr": config.lr}
    method = config.method
    beta1 = 0.9 if config.beta1 is None else config.beta1
    beta2 = 0.999 if config.beta2 is None else config.beta2
    beta0 = 1.0 if config.beta0 is None else config.beta0
    if method == "pnm" and (config.beta0 is not None or config.beta1 is not None):
        kwargs["betas"] = (beta1, beta0)
    if method == "adapnm" and (config.beta0, config.beta1, config.beta2) != (None, None, None):
        kwargs["betas"] = (beta1, beta2, beta0)
    if method == "adam" and (config.beta1 is not None or config.beta2 is not None):
        kwargs["betas"] = (beta1, beta2)
    for name in ("momentum", "sigma", "small_batch", "variant", "noise", "beta_max",
                 "weight_decay"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    if method == "covariance":
        # The training minibatch is the large batch whose per-sample gradients feed the noise.
        kwargs["large_batch"] = config.batch_size
        kwargs.setdefault("small_batch", max(1, config.batch_size // 8))
    if "seed" in METHODS[method].hyperparameters():
        kwargs["seed"] = derived_seed(config.seed, 0, 7)
    kwargs.update(config.extra)
    return kwargs


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable 'cuda' is an error."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def hyperparameter_columns(config: RunConfig) -> dict[str, Any]:
    """The identifying columns of every metrics row: run, method, seed and hyperparameters."""
    columns: dict[str, Any] = {
        "run": config.run_name, "task": config.task, "model": config.model,
        "method": config.method, "seed": config.seed, "lr": config.lr,
    }
    for name in HYPERPARAMETERS:
        if getattr(config, name) is not None:
            columns[name] = getattr(config, name)
    return columns


def run_measurement(
    config: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Train and measure as ``config`` says, writing the run directory ``out``.

    With ``resume=True`` an existing run directory continues from its last checkpoint (its
    saved config is used); a complete run is left as it is. ``progress(step, total)`` is
    called after every step; ``notify(text)`` once with the Gram path's coverage report (each
    parameter's route), which also goes to ``coverage.csv``. Returns the run directory.
    """
    out = Path(out)
    if resume and (out / CONFIG_FILE).is_file():
        saved = read_config(out)
        if saved.get("complete"):
            return out
        config = RunConfig.from_dict(without_status(saved))
    elif (out / CONFIG_FILE).is_file():
        raise ValueError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    config.validate()
    device = resolve_device(config.device)
    task = load_task(config.task, seed=config.seed, n_train=config.n_train)
    n_train = len(task.x_train)
    if config.batch_size > n_train:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {n_train} training samples")
    steps_per_epoch = n_train // config.batch_size
    total = config.steps if config.epochs is None else round(config.epochs * steps_per_epoch)

    torch.manual_seed(config.seed)
    model = build_model(
        config.model, task.input_shape, task.num_classes or 1, width=config.width,
        depth=config.depth,
    ).to(device)
    loss_fn = loss_for(task.num_classes)
    optimizer = build_optimizer(config.method, model.named_parameters(), **method_kwargs(config))
    probe = NoiseProbe(
        model, loss_fn, task.x_train, task.y_train, x_test=task.x_test, y_test=task.y_test,
        every=config.measure_every, samples=config.probe_samples, fresh=config.fresh_probe,
        batch_size=config.batch_size, curvature=config.curvature,
        update_repeats=config.update_repeats, optimizer=optimizer, method=config.method,
        grads=config.grads, chunk_size=config.chunk_size, seed=config.seed,
    )
    data_gen = torch.Generator().manual_seed(derived_seed(config.seed, 0, 8))
    order, position, start = torch.randperm(n_train, generator=data_gen), 0, 0
    metrics, spectra = pd.DataFrame(), pd.DataFrame()

    checkpoint_path = out / CHECKPOINT_FILE
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_generator"])
        order, position, start = state["order"], state["position"], state["step"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        # Rows after the checkpoint (written before a kill) are measured again.
        run = load_run(out)
        if not run.metrics.empty:
            metrics = run.metrics[run.metrics["step"] <= start].reset_index(drop=True)
        if not run.spectra.empty:
            spectra = run.spectra[run.spectra["step"] <= start].reset_index(drop=True)
    status = {**config.to_dict(), "run": config.run_name, "sgn_lab_version": __version__}
    write_json(out / CONFIG_FILE, {**status, "complete": False})

    identity = hyperparameter_columns(config)
    resumed_at = start if resume and checkpoint_path.is_file() else None
    for step in range(start, total + 1):
        if (probe.due(step) or step == total) and step != resumed_at:
            result = probe.measure(step, epoch=step / steps_per_epoch)
            if probe.coverage is not None and not (out / COVERAGE_FILE).is_file():
                write_table(out / COVERAGE_FILE, probe.coverage.to_frame())
                if notify is not None:
                    notify(probe.coverage.summary())
            if config.sigma_trace_factor is not None:
                # Isotropic noise of the SGN's magnitude: σ² = c·tr(S)/d, re-matched at every
                # measurement (σ lives in the optimizer state, so a resume keeps it).
                optimizer.set_sigma_from_trace(config.sigma_trace_factor * result.noise.trace)
            row = pd.DataFrame([{**identity, **result.row}])
            metrics = row if metrics.empty else pd.concat([metrics, row], ignore_index=True)
            tidy = result.spectra.assign(**{k: identity[k] for k in ("run", "method", "seed")})
            spectra = tidy if spectra.empty else pd.concat([spectra, tidy], ignore_index=True)
            write_table(out / METRICS_FILE, metrics)
            write_table(out / SPECTRA_FILE, spectra)
            _save(checkpoint_path, model, optimizer, data_gen, order, position, step, device)
        if step == total:
            break
        if position + config.batch_size > n_train:
            order, position = torch.randperm(n_train, generator=data_gen), 0
        idx = order[position : position + config.batch_size]
        position += config.batch_size
        loss = train_step(
            config.method, optimizer, model, loss_fn, task.x_train[idx].to(device),
            task.y_train[idx].to(device),
        )
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training diverged: loss {loss} at step {step} (method {config.method}, "
                f"lr {config.lr}); lower the learning rate"
            )
        if progress is not None:
            progress(step + 1, total)
    write_json(out / CONFIG_FILE, {**status, "complete": True})
    return out


def _save(path, model, optimizer, data_gen, order, position, step, device) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data_generator": data_gen.get_state(),
        "order": order,
        "position": position,
        "step": step,
        "torch_rng": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    save_checkpoint(path, state)
