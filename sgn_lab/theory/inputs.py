"""Inputs of the closed forms that only the theory has: curvature and noise models.

Generic arguments (numbers, arrays, symmetric matrices) are checked by :mod:`sgn_lab.checks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sgn_lab import checks

NoiseModel = Callable[[np.ndarray], np.ndarray]
"""State-dependent gradient-noise covariance: P = E[θθᵀ] (d×d) ↦ C(P) (d×d), affine in P."""


def checked_curvature(H: Any) -> np.ndarray:
    """H symmetric positive definite: a stationary distribution needs every direction curved."""
    H = checks.symmetric("H", H)
    if H.shape[0] == 0:
        raise ValueError("H must be a non-empty matrix, got shape (0, 0)")
    low = float(np.linalg.eigvalsh(H)[0])
    if low <= 0:
        raise ValueError(
            f"H must be positive definite, got a smallest eigenvalue of {low:.6g}: along flat or "
            "negative directions the fluctuation has no stationary distribution"
        )
    return H


def checked_noise(C: Any, dim: int) -> np.ndarray | NoiseModel:
    """A fixed noise covariance (checked now) or a state-dependent model (checked when solved)."""
    if callable(C) and not hasattr(C, "shape"):
        return C
    return checks.symmetric("C", C, dim, psd=True)


def spectral_radius(A: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(A)).max()) if A.size else 0.0
