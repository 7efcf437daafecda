"""Hyperparameter checks shared by the optimizers: each error names the parameter and value."""

from __future__ import annotations

import math


def check_nonnegative(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0."""
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {name}: {value!r} (must be a finite number >= 0)")


def check_positive(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0."""
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid {name}: {value!r} (must be a finite number > 0)")


def check_unit_interval(name: str, value: float) -> None:
    """Raise ValueError unless 0 <= ``value`` < 1 (momentum-like coefficients)."""
    if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"invalid {name}: {value!r} (must lie in [0, 1))")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"invalid {name}: {value!r} (choose one of {', '.join(choices)})")
