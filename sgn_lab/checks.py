"""Argument checks, one home: each raises a ValueError naming the argument and the value.

Every function takes the argument's name first, then its value, and returns the checked value
(as a plain Python number or a float64 numpy array). Messages read
``"<name> must be <what>, got <value>"``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np


class NonFiniteError(ValueError):
    """A NaN or inf in a computed per-sample loss, gradient or Gram: the model's numbers, not
    an argument, are at fault. Still a ValueError; a run's loop counts it, at a measurement,
    as divergence (:class:`sgn_lab.run.loop.Diverged`)."""


SYMMETRY_TOLERANCE = 1e-10
"""Relative asymmetry (and negative eigenvalue, per dimension) tolerated by :func:`symmetric`."""


def integer(name: str, value: Any, minimum: int) -> int:
    """An integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def number(name: str, value: Any, minimum: float | None = None, *, inclusive: bool = False
           ) -> float:
    """A finite real number (not a bool) > ``minimum`` (>= with ``inclusive``; any when None)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (minimum is None or (value >= minimum if inclusive else value > minimum))
    )
    if not ok:
        bound = "" if minimum is None else f" {'>=' if inclusive else '>'} {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def coefficient(name: str, value: Any) -> float:
    """A number in [0, 1): a momentum or averaging coefficient."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """A number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def seed_value(name: str, value: Any) -> int:
    """A seed numpy's legacy seeding takes (mnist1d uses it): an integer in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            0 <= value < 2**32):
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    return int(value)


def samples(name: str, value: int, minimum: int = 2) -> int:
    """A number of samples; a covariance needs at least two."""
    if value < minimum:
        raise ValueError(f"need at least {minimum} samples for a covariance, got {name}={value}")
    return value


def array(name: str, value: Any) -> np.ndarray:
    """A finite float64 copy of an array-like or a torch tensor (detached, on the CPU)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be an array of numbers, got a {type(value).__name__}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got non-finite values")
    return arr


def symmetric(name: str, value: Any, dim: int | None = None, *, psd: bool = False) -> np.ndarray:
    """A square symmetric (with ``psd``, positive semi-definite) float64 matrix, symmetrised
    exactly; ``dim`` fixes its size."""
    A = array(name, value)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {A.shape}")
    if dim is not None and A.shape[0] != dim:
        raise ValueError(f"{name} must have shape ({dim}, {dim}), got {A.shape}")
    scale = max(float(np.abs(A).max()), 1e-300) if A.size else 1.0
    if A.size and np.abs(A - A.T).max() > SYMMETRY_TOLERANCE * scale:
        raise ValueError(f"{name} must be symmetric, got an asymmetry of "
                         f"{float(np.abs(A - A.T).max()):.3g}")
    A = 0.5 * (A + A.T)
    if psd and A.size:
        low = float(np.linalg.eigvalsh(A)[0])
        if low < -SYMMETRY_TOLERANCE * scale * A.shape[0]:
            raise ValueError(
                f"{name} must be positive semi-definite, got a smallest eigenvalue of {low:.6g}"
            )
    return A


def parse_options(text: str, *, where: str) -> dict[str, Any]:
    """``"dim=50,condition=1e3"`` -> ``{"dim": 50, "condition": 1000.0}`` (:func:`parse_value`
    for each value); ``where`` names the text in messages (``"task 'linreg:dim=5'"``)."""
    options: dict[str, Any] = {}
    for item in text.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"bad option {item!r} in {where}; write key=value,key=value")
        if key in options:
            raise ValueError(f"option {key!r} given twice in {where}")
        options[key] = parse_value(value)
    return options


def log_spaced(spec: str, *, shown: str, forms: str) -> tuple[float, ...]:
    """``"1e-3:1:7"`` -> 7 log-spaced points from 1e-3 to 1, both exactly, 12 significant
    digits (so 1e-3:1:7 gives 0.01 rather than 0.009999999999999998).

    ``shown`` names the text in messages (``"--tune 'lr=1e-3:1:7'"``), ``forms`` the ways to
    write it (for a spec without two colons).
    """
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"{shown}: write {forms}")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"{shown}: LOW and HIGH must be numbers, got {parts[0]!r} and "
                         f"{parts[1]!r}") from None
    try:
        count = int(parts[2])
    except ValueError:
        raise ValueError(f"{shown}: COUNT must be an integer, got {parts[2]!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low > 0):
        raise ValueError(f"{shown}: a log-spaced grid needs finite LOW > 0, got {low}")
    if low >= high:
        raise ValueError(f"{shown}: LOW must be below HIGH, got {low} >= {high}")
    if count < 2:
        raise ValueError(f"{shown}: COUNT must be at least 2, got {count}")
    values = [float(f"{low * (high / low) ** (i / (count - 1)):.12g}") for i in range(count)]
    values[0], values[-1] = low, high
    return tuple(values)


def parse_value(text: str) -> Any:
    """A value written as text: ``true``/``false``, an int, a float, or else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
