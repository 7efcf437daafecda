"""The typed configuration of a measurement run: one nested schema, validated once.

A run is ``task``, ``model``, ``optimizer`` (the method and its hyperparameters), ``training``,
``probe`` and ``output``. Every key has one name, the same as a TOML key (flat, or nested in its
section's table), a CLI flag (``--batch-size``), a ``config.json`` key and a ``metrics.csv``
column; :data:`FIELDS` lists them with their help text, and the CLI builds its options from it.

Validation is pydantic's, strict: ``batch_size = true`` or ``steps = "20"`` is an error that
names the key, the value and the type expected (:func:`parse`), never a silent conversion.
:meth:`RunConfig.resolved` fills in the method's own defaults for every hyperparameter it takes,
so ``config.json`` and ``metrics.csv`` hold every value the run used.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sgn_lab.checks import parse_value
from sgn_lab.data.catalog import TASKS
from sgn_lab.models.names import MODELS, TRANSFORMERS
from sgn_lab.optim.registry import COVARIANCE_VARIANTS, METHODS, SETTINGS
from sgn_lab.run.choices import (
    DEFAULT_INSTRUMENTS,
    DEVICES,
    GRADS_PATHS,
    INSTRUMENT_NAMES,
    LOGS,
    PARALLEL,
    STATUS_KEYS,
    model_kind,
)


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class TaskSection(_Section):
    name: str = Field("mnist1d", description=f"Task: {', '.join(TASKS)} (options as "
                      "linreg:dim=50), npz:FILE, text:FILE, jsonl:FILE, hfdata:DIR, "
                      "cifar10:DIR, or your own pkg.module:callable.")
    n_train: int | None = Field(None, ge=2, description="Subsample the training set to this "
                                "many samples.")
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of the training samples held out as a validation "
        "set (seeded by the run's seed; never trained on or probed), measured as val_loss, "
        "val_accuracy; 0: none.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword options of the task (its callable's, or a "
        "built-in's such as context for text:FILE); on the command line k=v,k=v.")


class ModelSection(_Section):
    name: str = Field("mlp", description=f"Model: {', '.join(MODELS + TRANSFORMERS)} (with "
                      "random weights), hf:DIR (saved with save_pretrained), or your own "
                      "pkg.module:callable.")
    width: int = Field(128, ge=1, description="Hidden width (channels for CNNs, hidden size "
                       "of transformers).")
    depth: int = Field(2, ge=1, description="Hidden layers / blocks / transformer layers.")
    heads: int = Field(4, ge=1, description="Attention heads of gpt2, bert, vit.")
    context: int | None = Field(None, ge=1, description="Positions of gpt2, bert (default: "
                                "the task's sequence length).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword options of the model (its callable's, or "
        "e.g. activation, dropout, patch_size); on the command line k=v,k=v.")

    @model_validator(mode="after")
    def _known(self) -> ModelSection:
        model_kind(self.name)
        return self


class OptimizerSection(_Section):
    """The method and its hyperparameters; those the method does not take stay None."""

    method: str = Field("pnm", description=f"Method: {', '.join(METHODS)}.")
    lr: float = Field(0.1, gt=0, description="Learning rate η.")
    momentum: float | None = Field(None, ge=0, lt=1, description="Heavy-ball momentum.")
    beta0: float | None = Field(None, ge=0, description="PNM/AdaPNM β0 (positive-negative "
                                "weight).")
    beta1: float | None = Field(None, ge=0, lt=1, description="β1 of PNM/AdaPNM/Adam.")
    beta2: float | None = Field(None, ge=0, lt=1, description="β2 of AdaPNM/Adam.")
    sigma: float | None = Field(None, ge=0, description="Gaussian injection σ.")
    sigma_trace_factor: float | None = Field(
        None, gt=0, description="Gaussian injection matched to the SGN: σ² = c·tr(S)/d, re-set "
        "at every measurement (default: off).")
    small_batch: int | None = Field(None, ge=1, description="Covariance noise: emulated small "
                                    "batch B_S (the training batch is B_L; default B/8).")
    variant: Literal[COVARIANCE_VARIANTS] | None = Field(None, description="Covariance noise: "
                                                         "full or diagonal.")
    noise: float | None = Field(None, gt=0, description="S-SGD weight-noise scale.")
    beta_max: float | None = Field(None, ge=0, lt=1, description="Adaptive heavy ball: largest "
                                   "β.")
    weight_decay: float | None = Field(None, ge=0, description="Weight decay.")

    @model_validator(mode="after")
    def _applies(self) -> OptimizerSection:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        for name in HYPERPARAMETERS:
            value = getattr(self, name)
            if value is not None and name not in METHODS[self.method].settings:
                takes = [m for m in METHODS if name in METHODS[m].settings]
                raise ValueError(f"{name} does not apply to method {self.method!r} (only to "
                                 f"{', '.join(takes)})")
        return self

    def settings(self) -> dict[str, Any]:
        """The method's hyperparameters (besides lr) with their values, None left unresolved."""
        return {name: getattr(self, name) for name in METHODS[self.method].settings}


class TrainingSection(_Section):
    batch_size: int = Field(64, ge=1, description="Minibatch size B.")
    steps: int = Field(1000, ge=0, description="Training steps.")
    epochs: float | None = Field(None, gt=0, description="Training epochs (overrides --steps).")
    seed: int = Field(0, ge=0, description="Seed of data split, model, order and draws.")
    device: Literal[DEVICES] = Field("auto", description="auto, cpu or cuda.")
    nproc: int = Field(1, ge=1, description="Processes on this machine: data-parallel training "
                       "(the minibatch split evenly) with the probe set split over them; "
                       "gloo on CPUs, NCCL on GPUs (one per process). Under torchrun: its "
                       "world size.")
    parallel: Literal[PARALLEL] = Field(
        "ddp", description="With nproc > 1: ddp (every process holds the whole model) or fsdp "
        "(fully_shard per block: each process holds 1/N of the parameters, gradients and "
        "optimizer state; the parameters are gathered for each measurement).")
    fsdp_blocks: tuple[str, ...] = Field(
        (), description="With parallel fsdp: the class names of the blocks sharded one by "
        "one, comma-separated (default: a Hugging Face model's transformer blocks, else the "
        "layers of the model's largest Sequential or ModuleList).")


class ProbeSection(_Section):
    measure_every: int = Field(100, ge=1, description="Measure every k steps.")
    probe_samples: int = Field(512, ge=2, description="Per-sample gradients per measurement, "
                               "n.")
    fresh_probe: bool = Field(False, description="New probe samples at each measurement "
                              "(default: one fixed probe set).")
    instruments: tuple[str, ...] = Field(
        DEFAULT_INSTRUMENTS, description="Instruments to run, comma-separated: "
        f"{', '.join(INSTRUMENT_NAMES)}.")
    update_repeats: int = Field(32, ge=2, description="Minibatch draws R of the updates "
                                "instrument (per-step update noise).")
    grads: Literal[GRADS_PATHS] = Field(
        "auto", description="Per-sample gradients: auto (the Gram path, checked against vmap "
        "at the first measurement; vmap with the curvature instrument), vmap (materialised) "
        "or gram (unchecked).")
    shape_batch_sizes: tuple[int, ...] = Field(
        (1, 4, 16, 64), description="Minibatch sizes B of the minibatch-tails instrument "
        "(tail index and Gaussianity of g_B − ḡ), comma-separated.")
    shape_draws: int = Field(256, ge=8, description="Minibatches drawn per size B by the "
                             "minibatch-tails instrument.")
    chunk_size: int | None = Field(None, ge=1, description="Samples per pass: vmap chunks; the "
                                   "Gram path builds its Gram from pairs of such chunks.")

    @model_validator(mode="after")
    def _known(self) -> ProbeSection:
        unknown = [i for i in self.instruments if i not in INSTRUMENT_NAMES]
        if unknown:
            raise ValueError(f"unknown instrument {unknown[0]!r}; choose from "
                             f"{', '.join(INSTRUMENT_NAMES)}")
        if self.grads == "gram" and "curvature" in self.instruments:
            raise ValueError("the curvature instrument needs per-sample gradients: grads "
                             "'vmap' or 'auto'")
        return self


class OutputSection(_Section):
    name: str | None = Field(None, description="Run name (default: the method, the "
                             "hyperparameters that differ from its defaults, and the seed).")
    log: tuple[Literal[LOGS], ...] = Field((), description="Live views besides the tables, "
                                           f"comma-separated: {', '.join(LOGS)} (event files "
                                           "in RUN/tensorboard; a Weights & Biases run kept in "
                                           "RUN/wandb, WANDB_MODE=offline without network).")


HYPERPARAMETERS = tuple(name for name in OptimizerSection.model_fields
                        if name not in ("method", "lr"))


class RunConfig(_Section):
    """Everything that defines a measurement run (``config.json`` of the run holds it)."""

    task: TaskSection = TaskSection()
    model: ModelSection = ModelSection()
    optimizer: OptimizerSection = OptimizerSection()
    training: TrainingSection = TrainingSection()
    probe: ProbeSection = ProbeSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _splits(self) -> RunConfig:
        """What a run over several processes needs (see :mod:`sgn_lab.distributed`)."""
        nproc, batch = self.training.nproc, self.training.batch_size
        self._sharding()
        if nproc == 1:
            return self
        if batch % nproc:
            raise ValueError(f"batch_size={batch} does not split evenly over nproc={nproc} "
                             "processes: give a multiple of nproc")
        if self.probe.probe_samples < nproc:
            raise ValueError(f"nproc={nproc} exceeds the probe set of probe_samples="
                             f"{self.probe.probe_samples}: every process needs a sample")
        if METHODS[self.optimizer.method].step_input == "per_sample":
            raise ValueError(f"method {self.optimizer.method!r} draws its noise from the "
                             "per-sample gradients of the whole minibatch; with nproc > 1 "
                             "that is not supported yet")
        vmap = self.probe.grads == "vmap" or (self.probe.grads == "auto"
                                              and "curvature" in self.probe.instruments)
        if self.probe.chunk_size is not None and not vmap:
            raise ValueError("chunk_size with nproc > 1 is not supported on the Gram path (the "
                             "split already bounds each process's memory): drop chunk_size or "
                             "use grads='vmap'")
        return self

    def _sharding(self) -> None:
        """What ``parallel="fsdp"`` needs: several processes, and methods and instruments
        that work on shards."""
        training, method = self.training, self.optimizer.method
        if training.parallel != "fsdp":
            if training.fsdp_blocks:
                raise ValueError("fsdp_blocks applies to parallel 'fsdp' only")
            return
        if training.nproc == 1:
            raise ValueError("parallel 'fsdp' shards the model over processes: give nproc >= 2")
        if (METHODS[method].step_input != "gradient"
                or "seed" in METHODS[method].hyperparameters()):
            raise ValueError(f"method {method!r} draws noise over whole parameters or steps on "
                             "extra gradients, which parallel 'fsdp' does not support: use "
                             "parallel 'ddp'")
        if "updates" in self.probe.instruments:
            kept = ",".join(i for i in self.probe.instruments if i != "updates")
            raise ValueError("the updates instrument steps copies of the optimizer, whose "
                             "state parallel 'fsdp' shards: leave it out (e.g. --instruments "
                             f"{kept or 'sgn'})")

    def resolved(self) -> RunConfig:
        """Every hyperparameter the method takes, its default where not given."""
        settings = self.optimizer.settings()
        defaults = method_defaults(self.optimizer.method, self.training.batch_size)
        filled = {k: defaults[k] if v is None else v for k, v in settings.items()}
        return self.model_copy(update={"optimizer": self.optimizer.model_copy(update=filled)})

    @property
    def label(self) -> str:
        """The method and every optimizer value that differs from its default (lr included):
        what tells two runs of one method apart, e.g. ``pnm-beta0=2``."""
        opt = self.resolved().optimizer
        defaults = {"lr": OptimizerSection.model_fields["lr"].default,
                    **method_defaults(opt.method, self.training.batch_size)}
        parts = [f"{k}={_short(getattr(opt, k))}" for k in ("lr", *opt.settings())
                 if getattr(opt, k) != defaults[k]]
        return "-".join([opt.method, *parts])

    @property
    def run_name(self) -> str:
        return self.output.name or f"{self.label}-s{self.training.seed}"

    def flat(self) -> dict[str, Any]:
        """Every key by its flat name (a TOML file or the CLI flags, without sections)."""
        return {flat: getattr(getattr(self, section), key)
                for flat, (section, key) in FIELDS.items()}

    def to_dict(self) -> dict[str, Any]:
        """Nested, as ``config.json`` holds it: the optimizer with the hyperparameters its
        method takes only."""
        data = self.model_dump(mode="json")
        takes = ("method", "lr", *METHODS[self.optimizer.method].settings)
        data["optimizer"] = {k: v for k, v in data["optimizer"].items() if k in takes}
        return data


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def method_defaults(method: str, batch_size: int) -> dict[str, Any]:
    """The defaults of ``method``'s hyperparameters for training batch ``batch_size``."""
    defaults = dict(SETTINGS[method])
    if "small_batch" in defaults and defaults["small_batch"] is None:
        defaults["small_batch"] = max(1, batch_size // 8)  # the covariance noise's B_S
    return defaults


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation for name, field in RunConfig.model_fields.items()
}
# Flat name -> (section, key): a section's key by its own name, but a section's "name" by the
# section's (task, model), its "options" as task_options, model_options, the optimizer's
# method as "method", and the output's name as "name".
FIELDS: dict[str, tuple[str, str]] = {}
for _section, _model in SECTIONS.items():
    for _key in _model.model_fields:
        _flat = {"name": _section, "options": f"{_section}_options"}.get(_key, _key)
        FIELDS[_flat if _section in ("task", "model") else _key] = (_section, _key)


def help_text(flat: str) -> str:
    section, key = FIELDS[flat]
    field = SECTIONS[section].model_fields[key]
    default = field.default
    if field.default_factory is not None or default in (None, ()):
        return str(field.description)
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{field.description} (default: {shown})"


def parse_method_spec(item: str, *, where: str = "--methods") -> dict[str, Any]:
    """A method with hyperparameters of its own, as ``compare --methods`` writes it:
    ``'pnm:beta0=2:lr=0.05'`` -> ``{'method': 'pnm', 'beta0': 2.0, 'lr': 0.05}``.

    Keys are those of the optimizer section (lr and the methods' settings); whether the method
    takes them is the config's own check. ``where`` names the input in error messages.
    """
    method, *pairs = [part.strip() for part in item.strip().split(":")]
    spec: dict[str, Any] = {"method": method}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{where}: {pair!r} in {item!r} is not key=value")
        if key not in FIELDS or FIELDS[key][0] != "optimizer" or key == "method":
            raise ValueError(f"{where}: {key!r} in {item!r} is no hyperparameter of a method")
        spec[key] = parse_value(value)
    return spec


def method_spec_text(spec: dict[str, Any]) -> str:
    """The text of a method spec, the inverse of :func:`parse_method_spec`."""
    return ":".join([spec["method"], *(f"{k}={v}" for k, v in spec.items() if k != "method")])


def parse(data: dict[str, Any]) -> RunConfig:
    """A config from flat and/or nested keys (TOML, JSON, ``config.json``, CLI flags).

    Raises ValueError naming the key, the value and the expected type or range.
    """
    nested: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, v in value.items():
                nested.setdefault(key, {})[inner] = v
        elif key in FIELDS:
            section, inner = FIELDS[key]
            nested.setdefault(section, {})[inner] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(sorted(unknown))}")
    for section, values in nested.items():  # TOML and JSON give lists where tuples are kept
        for key, value in values.items():
            field = SECTIONS[section].model_fields.get(key)  # unknown: pydantic names it
            if (field is not None and isinstance(value, list)
                    and typing.get_origin(field.annotation) is tuple):
                values[key] = tuple(value)
    try:
        return RunConfig(**nested)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """One line for the first error of a pydantic validation: key, value, expectation."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
    key = loc[-1] if loc else ""
    section = loc[0] if loc else ""
    flat = next((f for f, (s, k) in FIELDS.items() if (s, k) == (section, key)), key)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error") or not flat:
        return message
    value = error.get("input")
    shown = repr(value) if not (isinstance(value, float) and math.isnan(value)) else "nan"
    return f"config key {flat!r}: {message[0].lower()}{message[1:]}, got {shown}"


def differences(saved: RunConfig, asked: RunConfig) -> list[str]:
    """The flat keys whose values differ between two configs, as 'key: saved -> asked'."""
    a, b = saved.resolved().flat(), asked.resolved().flat()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in FIELDS if a[k] != b[k]]


def read_file(path: str | Path) -> dict[str, Any]:
    """The keys of a TOML config file (JSON too: a run's own ``config.json`` re-runs it)."""
    import json

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read config file {path}: it is not UTF-8 text (byte "
                         f"{exc.start})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse config file {path}: {exc}") from None
    return {k: v for k, v in data.items() if k not in STATUS_KEYS}
