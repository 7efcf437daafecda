"""sgn_lab.checks: each check accepts what it says, returns it as a plain value, and rejects
everything else with one message naming the argument and the value."""

import math

import numpy as np
import pytest
import torch
from helpers import rejects

from sgn_lab import checks


def test_integer_accepts_numpy_integers_and_rejects_bools_floats_and_small_values():
    assert checks.integer("n", np.int64(3), 1) == 3 and type(checks.integer("n", 3, 1)) is int
    for bad in (True, 2.0, "2", 0, None):
        with pytest.raises(ValueError, match=rejects("n", repr(bad))):
            checks.integer("n", bad, 1)


def test_number_bounds_and_finiteness():
    assert checks.number("lr", np.float32(0.5), 0) == 0.5
    assert checks.number("x", -3) == -3.0  # no bound
    assert checks.number("wd", 0, 0, inclusive=True) == 0.0
    for bad, minimum, inclusive in ((0, 0, False), (-1e-9, 0, True), (math.inf, None, False),
                                    (math.nan, 0, True), (False, None, False), ("1", 0, False)):
        with pytest.raises(ValueError, match=rejects("lr", repr(bad))):
            checks.number("lr", bad, minimum, inclusive=inclusive)


def test_coefficient_fraction_boolean_choice_seed():
    assert checks.coefficient("momentum", 0) == 0.0
    with pytest.raises(ValueError, match=rejects("momentum", repr(1.0))):
        checks.coefficient("momentum", 1.0)
    with pytest.raises(ValueError, match=rejects("f", repr(0.0))):
        checks.fraction("f", 0.0)
    with pytest.raises(ValueError, match=rejects("flag", repr("yes"))):
        checks.boolean("flag", "yes")
    assert checks.choice("form", "sgd", ("sgd", "adam")) == "sgd"
    with pytest.raises(ValueError, match=r"form must be one of sgd, adam, got 'SGD'$"):
        checks.choice("form", "SGD", ("sgd", "adam"))
    with pytest.raises(ValueError, match=rejects("seed", repr(2**32))):
        checks.seed_value("seed", 2**32)
    with pytest.raises(ValueError, match="at least 2 samples .* n=1"):
        checks.samples("n", 1)


def test_array_converts_tensors_and_rejects_non_finite_values():
    out = checks.array("x", torch.tensor([1.0, 2.0], requires_grad=True))
    assert out.dtype == np.float64 and out.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="x must be finite"):
        checks.array("x", [1.0, math.nan])
    with pytest.raises(ValueError, match="x must be an array of numbers, got a dict"):
        checks.array("x", {"a": 1})


def test_symmetric_symmetrises_within_tolerance_and_checks_psd():
    A = np.array([[2.0, 1.0], [1.0 + 1e-13, 1.0]])
    S = checks.symmetric("H", A)
    assert np.array_equal(S, S.T)
    with pytest.raises(ValueError, match="H must be symmetric"):
        checks.symmetric("H", [[1.0, 0.0], [0.1, 1.0]])
    with pytest.raises(ValueError, match=r"H must be a square matrix, got shape \(2, 3\)"):
        checks.symmetric("H", np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"H must have shape \(3, 3\)"):
        checks.symmetric("H", np.eye(2), 3)
    with pytest.raises(ValueError, match="H must be positive semi-definite.*-1"):
        checks.symmetric("H", np.diag([1.0, -1.0]), psd=True)
    # Rounding below the tolerance is not a negative eigenvalue.
    assert checks.symmetric("H", np.diag([1.0, -1e-14]), psd=True).shape == (2, 2)
