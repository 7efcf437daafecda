"""The configuration of a sweep of theory against measurement: names, options, defaults."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgn_lab import checks

SWEEP_HELP: dict[str, str] = {
    "batch": "noise trace vs B",
    "beta0": "PNM",
    "sigma": "Gaussian injection",
    "large-batch": "covariance noise",
    "critical-batch": "McCandlish's critical batch against the noise scale",
}
"""Each sweep with what it measures (the CLI's help reads it)."""

SWEEPS: tuple[str, ...] = tuple(SWEEP_HELP)
"""Names of the sweeps, as ``sgn-lab scaling --sweep NAME`` takes them."""

COLUMNS: tuple[str, ...] = (
    "sweep", "x", "quantity", "measured", "ci_low", "ci_high", "theory", "rel_error",
)
"""Columns of every sweep table, in this order."""

Z95 = 1.959963984540054
"""Two-sided 95% normal quantile: the CI is measured ± Z95·(standard error)."""

Progress = Callable[[int, int], Any]





# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SweepConfig:
    """Everything one sweep needs; build it with :func:`sweep_config` (per-sweep defaults).

    Fields a sweep does not use are ``None``. Linear regression: ``dim`` d, ``condition``
    (λ_max/λ_min of H, eigenvalues log-spaced from 1), ``noise_std`` σ (label noise),
    ``distance`` |δ| of the fixed state w = w* + δ (δ in a random direction), ``rotate``
    (rotate H, w* by a random orthogonal matrix). Sampling: ``dataset_size`` N, ``batch_size``
    B, ``small_batch`` B_S, ``repeats`` R (data sets, chains or draws), ``draws`` (minibatches
    per data set), ``groups`` (jackknife groups). Optimizers: ``lr``, ``beta1``, ``burn_in``,
    ``steps``. ``grid``: the x values.

    ``critical-batch`` (:mod:`sgn_lab.sweeps.critical`): ``problem`` (linreg, mlp or
    transformer), the branch point (``branch_steps`` SGD steps at ``branch_batch`` and
    ``branch_lr`` from the initial state; linreg starts at |δ| = ``distance``), ``lr_grid``
    (the learning rates tried at every B), ``target_fraction`` φ (target loss
    L* + φ·(L_branch − L*)), ``max_steps`` (per branch run), ``probe_samples`` (per-sample
    gradients for B_simple), ``bootstrap`` (replicates of the CI), ``width``/``depth`` (the
    MLP's or transformer's size), ``dataset_size`` (training samples or windows of mlp and
    transformer); ``grid`` holds the batch sizes and ``repeats`` the seeds per (B, lr).
    """

    sweep: str
    grid: tuple[float, ...]
    repeats: int
    seed: int = 0
    quick: bool = False
    dim: int = 20
    condition: float = 100.0
    noise_std: float = 0.5
    distance: float | None = None
    rotate: bool = False
    dataset_size: int | None = None
    batch_size: int | None = None
    small_batch: int | None = None
    draws: int | None = None
    groups: int | None = None
    lr: float | None = None
    beta1: float | None = None
    burn_in: int | None = None
    steps: int | None = None
    problem: str | None = None
    lr_grid: tuple[float, ...] | None = None
    target_fraction: float | None = None
    branch_steps: int | None = None
    branch_batch: int | None = None
    branch_lr: float | None = None
    max_steps: int | None = None
    probe_samples: int | None = None
    bootstrap: int | None = None
    width: int | None = None
    depth: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields a sweep uses, as plain values (for a config file or a log)."""
        used = ("sweep", "seed", "quick", *_OPTIONS.get(self.sweep, ()))
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in used}
        out["grid"] = list(self.grid)
        if self.lr_grid is not None and "lr_grid" in out:
            out["lr_grid"] = list(self.lr_grid)
        return out


def _batch_grid(n: int, dense: int) -> tuple[int, ...]:
    """Powers of 2 below N/2 (dense: every one; else every other), then N − N/4, N − N/8, ..."""
    powers = [2**k for k in range(int(math.log2(n // 2)) + 1)]
    near = sorted({n - n // 2**k for k in range(2, 9) if n // 2**k >= 4})
    return tuple(sorted(set(powers[::dense] + near)))


# Per sweep: the options it takes, and its defaults (full run, and quick = a smoke test that
# still resolves the theory: the tests run it).
_COMMON = ("grid", "repeats", "dim", "condition", "noise_std")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "batch": (*_COMMON, "distance", "dataset_size", "draws"),
    "beta0": (*_COMMON, "batch_size", "lr", "beta1", "burn_in", "steps"),
    "sigma": (*_COMMON, "distance", "batch_size", "lr"),
    "large-batch": (*_COMMON, "distance", "rotate", "dataset_size", "small_batch", "groups", "lr"),
    "critical-batch": (*_COMMON, "problem", "distance", "dataset_size", "lr_grid",
                       "target_fraction", "branch_steps", "branch_batch", "branch_lr",
                       "max_steps", "probe_samples", "bootstrap", "width", "depth"),
}

CRITICAL_PROBLEMS: tuple[str, ...] = ("linreg", "mlp", "transformer")
"""Problems of the ``critical-batch`` sweep (its ``problem`` option)."""


def _halves(low: float, high: float) -> tuple[float, ...]:
    """Learning rates low·2^(k/2) up to high: a grid of factor √2."""
    count = int(round(2 * math.log2(high / low))) + 1
    return tuple(float(low * 2 ** (k / 2)) for k in range(count))


# critical-batch: per problem (full, quick). See sgn_lab.sweeps.critical for the choices.
_CRITICAL: dict[str, dict[bool, dict[str, Any]]] = {
    "linreg": {
        False: dict(grid=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), repeats=32, dim=32,
                    condition=100.0, noise_std=0.0, distance=4.0, lr_grid=_halves(1 / 32, 2.0),
                    target_fraction=0.5, branch_steps=100, branch_batch=8, branch_lr=0.5,
                    max_steps=20000, probe_samples=4096, bootstrap=2000),
        True: dict(grid=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), repeats=12, dim=32,
                   condition=100.0, noise_std=0.0, distance=4.0, lr_grid=_halves(1 / 32, 2.0),
                   target_fraction=0.5, branch_steps=100, branch_batch=8, branch_lr=0.5,
                   max_steps=20000, probe_samples=2048, bootstrap=1000),
    },
    "mlp": {
        False: dict(grid=(4, 8, 16, 32, 64, 128, 256, 512), repeats=8, dim=20,
                    condition=1.0, noise_std=0.0, dataset_size=4000, width=64, depth=2,
                    lr_grid=_halves(1 / 16, 2.0), target_fraction=0.5, branch_steps=300,
                    branch_batch=16, branch_lr=0.1, max_steps=4000, probe_samples=3000,
                    bootstrap=2000),
        True: dict(grid=(8, 16, 32, 64, 128), repeats=3, dim=10, condition=1.0,
                   noise_std=0.0, dataset_size=2000, width=32, depth=1,
                   lr_grid=(0.2, 0.4, 0.8, 1.6), target_fraction=0.5, branch_steps=100,
                   branch_batch=16, branch_lr=0.1, max_steps=800, probe_samples=1500,
                   bootstrap=1000),
    },
    "transformer": {
        False: dict(grid=(4, 8, 16, 32, 64, 128, 256), repeats=4, dim=16, condition=1.0,
                    noise_std=0.0, dataset_size=4000, width=64, depth=2,
                    lr_grid=_halves(1 / 256, 1.0)[::2], target_fraction=0.5, branch_steps=300,
                    branch_batch=16, branch_lr=0.1, max_steps=3000, probe_samples=2048,
                    bootstrap=2000),
        True: dict(grid=(4, 16, 64, 256), repeats=3, dim=16, condition=1.0, noise_std=0.0,
                   dataset_size=2000, width=32, depth=1, lr_grid=_halves(1 / 16, 1.0)[::2],
                   target_fraction=0.5, branch_steps=100, branch_batch=16, branch_lr=0.1,
                   max_steps=1000, probe_samples=512, bootstrap=1000),
    },
}
_DEFAULTS: dict[str, dict[bool, dict[str, Any]]] = {
    "batch": {
        False: dict(grid=_batch_grid(2048, 1), repeats=400, draws=128, dataset_size=2048,
                    dim=20, condition=100.0, noise_std=0.5, distance=1.0),
        True: dict(grid=_batch_grid(512, 2), repeats=200, draws=256, dataset_size=512,
                   dim=10, condition=100.0, noise_std=0.5, distance=1.0),
    },
    "beta0": {
        False: dict(grid=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0), repeats=256, dim=10, condition=10.0,
                    noise_std=0.5, batch_size=4, lr=0.3, beta1=0.9, burn_in=1000, steps=4000),
        True: dict(grid=(0.0, 1.0, 3.0), repeats=128, dim=6, condition=10.0, noise_std=0.5,
                   batch_size=4, lr=0.3, beta1=0.9, burn_in=800, steps=1000),
    },
    "sigma": {
        False: dict(grid=(0.0, 0.025, 0.05, 0.1, 0.2, 0.4), repeats=8000, dim=20,
                    condition=100.0, noise_std=0.5, distance=1.0, batch_size=32, lr=0.1),
        True: dict(grid=(0.0, 0.05, 0.2), repeats=4000, dim=10, condition=100.0, noise_std=0.5,
                   distance=1.0, batch_size=32, lr=0.1),
    },
    "large-batch": {
        False: dict(grid=(32, 64, 128, 256, 512, 1024), repeats=4000, groups=50, dim=20,
                    condition=100.0, noise_std=0.5, distance=1.0, rotate=True,
                    dataset_size=2048, small_batch=16, lr=0.1),
        True: dict(grid=(64, 256), repeats=1500, groups=30, dim=8, condition=100.0,
                   noise_std=0.5, distance=1.0, rotate=True, dataset_size=512, small_batch=16,
                   lr=0.1),
    },
}


def sweep_config(name: str, *, quick: bool = False, seed: int = 0, **options: Any) -> SweepConfig:
    """The configuration of sweep ``name``: its defaults (``quick``: the small variant for
    tests and smoke runs), overridden by ``options``.

    Raises ValueError for an unknown sweep, an option the sweep does not take, or an invalid
    value (each message names it).
    """
    check_sweep(name)
    if name == "critical-batch":
        return _critical_config(quick=quick, seed=seed, **options)
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"sweep {name!r} takes no option {unknown[0]!r}; its options are {', '.join(allowed)}"
        )
    checks.integer("seed", seed, 0)
    values = {**_DEFAULTS[name][bool(quick)], **options}
    values["grid"] = _check_grid(name, values["grid"], values)
    config = SweepConfig(sweep=name, seed=seed, quick=bool(quick), **values)
    _check_config(config)
    return config


LIST_OPTIONS: tuple[str, ...] = ("grid", "lr_grid")
"""Options whose value is a list: written ``a/b/c`` (these values) or ``LOW:HIGH:COUNT``
(COUNT log-spaced points, both ends included) in :func:`parse_sweep_options`."""

LIST_FORMS = "KEY=v1/v2/... or KEY=LOW:HIGH:COUNT (e.g. lr_grid=1e-3:1:7)"


def parse_sweep_options(text: str, *, where: str = "--options") -> dict[str, Any]:
    """``"problem=mlp,lr_grid=0.01:1:5,grid=4/16/64"`` -> options of :func:`sweep_config`.

    Values are read as :func:`sgn_lab.checks.parse_value` does; a list option
    (:data:`LIST_OPTIONS`) becomes a tuple: ``v1/v2/...`` these values (one value alone is a
    one-value list), ``LOW:HIGH:COUNT`` COUNT log-spaced points (batch sizes rounded to
    integers). The values themselves are checked by :func:`sweep_config`.
    """
    options = checks.parse_options(text, where=where)
    for key in LIST_OPTIONS:
        value = options.get(key)
        if value is None:
            continue
        shown = f"{where} {key}={value}"
        if isinstance(value, str) and ":" in value:
            points = checks.log_spaced(value, shown=shown, forms=LIST_FORMS)
            options[key] = tuple(round(v) for v in points) if key == "grid" else points
        elif isinstance(value, str):
            options[key] = tuple(checks.parse_value(v.strip()) for v in value.split("/"))
        else:
            options[key] = (value,)
    return options


def format_sweep_options(options: dict[str, Any]) -> str:
    """The inverse of :func:`parse_sweep_options`, lists as ``v1/v2/...``: text for
    ``--options``."""
    def shown(value: Any) -> str:
        if isinstance(value, Sequence) and not isinstance(value, str):
            return "/".join(map(str, value))
        return str(value)

    return ",".join(f"{key}={shown(value)}" for key, value in options.items())


def check_sweep(name: Any) -> None:
    """ValueError unless ``name`` is one of :data:`SWEEPS`."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; choose one of {', '.join(SWEEPS)}")


def _check_grid(name: str, grid: Any, values: dict[str, Any]) -> tuple[float, ...]:
    if isinstance(grid, str | bytes) or not isinstance(grid, Sequence | np.ndarray):
        raise ValueError(f"grid must be a sequence of numbers, got {grid!r}")
    points = list(grid)
    if not points:
        raise ValueError("grid must hold at least one value, got an empty grid")
    if len(set(points)) != len(points):
        raise ValueError(f"grid must not repeat a value, got {points!r}")
    if name in ("batch", "large-batch"):
        n = values["dataset_size"]
        checks.integer("dataset_size", n, 2)
        low = 1 if name == "batch" else values["small_batch"] + 1
        high = n - 1 if name == "batch" else n
        for b in points:
            integral = isinstance(b, int | np.integer) or (
                isinstance(b, float) and b.is_integer()
            )
            if isinstance(b, bool) or not integral or not low <= b <= high:
                what, given = (
                    ("batch size", f"dataset_size={n}") if name == "batch" else
                    ("large batch B_L", f"small_batch={low - 1}, dataset_size={n}")
                )
                raise ValueError(
                    f"invalid grid value {b!r}: a {what} must be an integer in [{low}, {high}] "
                    f"({given})"
                )
        return tuple(int(b) for b in sorted(points))
    for v in points:
        checks.number(f"grid value ({'beta0' if name == 'beta0' else 'sigma'})", v, 0.0,
                      inclusive=True)
    return tuple(float(v) for v in sorted(points))


def _check_config(c: SweepConfig) -> None:
    checks.integer("repeats", c.repeats, 2)
    checks.integer("dim", c.dim, 1)
    checks.number("condition", c.condition, 1.0, inclusive=True)
    checks.number("noise_std", c.noise_std, 0.0, inclusive=True)
    for name in ("distance",):
        if getattr(c, name) is not None:
            checks.number(name, getattr(c, name), 0.0, inclusive=True)
    for name, minimum in (("dataset_size", 2), ("batch_size", 1), ("small_batch", 1),
                          ("draws", 1), ("burn_in", 0), ("steps", 2)):
        if getattr(c, name) is not None:
            checks.integer(name, getattr(c, name), minimum)
    if c.lr is not None:
        checks.number("lr", c.lr, 0)
    if c.beta1 is not None:
        checks.coefficient("beta1", c.beta1)
    if c.groups is not None:
        checks.integer("groups", c.groups, 2)
        if c.groups > c.repeats:
            raise ValueError(f"groups must be <= repeats={c.repeats}, got {c.groups!r}")
    checks.boolean("rotate", c.rotate)
    if c.steps is not None and c.steps % 2:
        raise ValueError(f"steps must be even (PNM alternates buffers), got {c.steps!r}")




def _critical_config(*, quick: bool, seed: int, **options: Any) -> SweepConfig:
    """The critical-batch sweep's config: the defaults of its ``problem`` (default linreg)."""
    allowed = _OPTIONS["critical-batch"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"sweep 'critical-batch' takes no option {unknown[0]!r}; its options are "
            f"{', '.join(allowed)}"
        )
    checks.integer("seed", seed, 0)
    problem = checks.choice("problem", options.pop("problem", "linreg"), CRITICAL_PROBLEMS)
    values = {**_CRITICAL[problem][bool(quick)], **options}
    grid = values["grid"]
    if isinstance(grid, str | bytes) or not isinstance(grid, Sequence | np.ndarray):
        raise ValueError(f"grid must be a sequence of batch sizes, got {grid!r}")
    points = list(grid)
    for b in points:
        integral = isinstance(b, int | np.integer) or (isinstance(b, float) and b.is_integer())
        if isinstance(b, bool) or not integral or b < 1:
            raise ValueError(f"invalid grid value {b!r}: a batch size must be an integer >= 1")
    if len(set(points)) != len(points) or len(points) < 3:
        raise ValueError(f"grid must hold at least 3 distinct batch sizes (a 2-parameter fit "
                         f"needs a residual), got {points!r}")
    values["grid"] = tuple(int(b) for b in sorted(points))
    rates = values["lr_grid"]
    if isinstance(rates, str | bytes) or not isinstance(rates, Sequence | np.ndarray) or not (
        len(rates)
    ):
        raise ValueError(f"lr_grid must be a non-empty sequence of learning rates, got {rates!r}")
    for v in rates:
        checks.number("lr_grid value", v, 0)
    if len(set(rates)) != len(rates):
        raise ValueError(f"lr_grid must not repeat a value, got {list(rates)!r}")
    values["lr_grid"] = tuple(float(v) for v in sorted(rates))
    config = SweepConfig(sweep="critical-batch", seed=seed, quick=bool(quick), problem=problem,
                         **values)
    _check_config(config)
    checks.fraction("target_fraction", config.target_fraction)
    for name, minimum in (("branch_steps", 0), ("branch_batch", 1), ("max_steps", 1),
                          ("probe_samples", 2), ("bootstrap", 100), ("width", 1),
                          ("depth", 1 if problem == "transformer" else 0)):
        if getattr(config, name) is not None:
            checks.integer(name, getattr(config, name), minimum)
    checks.number("branch_lr", config.branch_lr, 0)
    if problem == "transformer" and config.width % 2:
        raise ValueError(f"width must be even (2 attention heads), got {config.width!r}")
    return config
