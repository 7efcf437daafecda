"""Argument checks, one home: each raises a ValueError naming the argument and the value.

Every function takes the argument's name first, then its value, and returns the checked value
(as a plain Python number).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def integer(name: str, value: Any, minimum: int, *, maximum: int | None = None) -> int:
    """An integer (not a bool) >= ``minimum`` and, when given, <= ``maximum`` samples."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r} exceeds the {maximum} samples available")
    return int(value)


def number(name: str, value: Any, minimum: float, *, inclusive: bool = False) -> float:
    """A finite number (not a bool) > ``minimum`` (>= with ``inclusive``)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
        and (value >= minimum if inclusive else value > minimum)
    )
    if not ok:
        bound = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {bound} {minimum}, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def fraction(name: str, value: Any) -> float:
    """A number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return float(value)


def seed_value(name: str, value: Any) -> int:
    """A seed numpy's legacy seeding takes (mnist1d uses it): an integer in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
            0 <= value < 2**32):
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    return int(value)
