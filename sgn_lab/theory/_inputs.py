"""Inputs of the closed forms, checked: arrays, scalars, symmetric and PSD matrices."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

NoiseModel = Callable[[np.ndarray], np.ndarray]
"""State-dependent gradient-noise covariance: P = E[θθᵀ] (d×d) ↦ C(P) (d×d), affine in P."""

_SYM_TOL = 1e-10  # relative asymmetry / negativity tolerated in symmetric (PSD) inputs


def _as_array(x: Any, name: str) -> np.ndarray:
    """float64 copy of an array-like or torch tensor (detached, on the CPU); must be finite."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid {name}: cannot convert {type(x).__name__} to an array") from err
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"invalid {name}: contains non-finite values")
    return arr


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"invalid {name}: {value!r} (must be a real number)")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"invalid {name}: {value!r} (must be finite)")
    return value


def _positive(value: Any, name: str) -> float:
    v = _scalar(value, name)
    if v <= 0:
        raise ValueError(f"invalid {name}: {value!r} (must be > 0)")
    return v


def _nonnegative(value: Any, name: str) -> float:
    v = _scalar(value, name)
    if v < 0:
        raise ValueError(f"invalid {name}: {value!r} (must be >= 0)")
    return v


def _unit_interval(value: Any, name: str) -> float:
    v = _scalar(value, name)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"invalid {name}: {value!r} (must lie in [0, 1))")
    return v


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"invalid {name}: {value!r} (must be a positive integer)")
    return int(value)


def _symmetric(M: Any, name: str, dim: int | None = None, *, psd: bool = False) -> np.ndarray:
    """A d×d symmetric (optionally positive semi-definite) float64 matrix, symmetrised exactly."""
    A = _as_array(M, name)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"invalid {name}: shape {A.shape} (must be a square matrix)")
    if dim is not None and A.shape[0] != dim:
        raise ValueError(f"invalid {name}: shape {A.shape} (must be ({dim}, {dim}))")
    scale = max(float(np.abs(A).max()), 1e-300)
    if np.abs(A - A.T).max() > _SYM_TOL * scale:
        raise ValueError(f"invalid {name}: not symmetric")
    A = 0.5 * (A + A.T)
    if psd and A.size:
        low = float(np.linalg.eigvalsh(A)[0])
        if low < -_SYM_TOL * scale * A.shape[0]:
            raise ValueError(
                f"invalid {name}: not positive semi-definite (smallest eigenvalue {low:.6g})"
            )
    return A


def _curvature(H: Any) -> np.ndarray:
    """H symmetric positive definite: a stationary distribution needs every direction curved."""
    H = _symmetric(H, "H")
    if H.shape[0] == 0:
        raise ValueError("invalid H: empty matrix")
    low = float(np.linalg.eigvalsh(H)[0])
    if low <= 0:
        raise ValueError(
            f"invalid H: not positive definite (smallest eigenvalue {low:.6g}); along flat or "
            "negative directions the fluctuation has no stationary distribution"
        )
    return H


def _noise(C: Any, dim: int) -> np.ndarray | NoiseModel:
    """A fixed noise covariance (checked now) or a state-dependent model (checked when solved)."""
    if callable(C) and not hasattr(C, "shape"):
        return C
    return _symmetric(C, "C", dim, psd=True)


def _spectral_radius(A: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(A)).max()) if A.size else 0.0
