"""A task's tensors: the seeded train/test split, subsampling, the validation hold-out, and
the Task they make."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgn_lab.checks import integer
from sgn_lab.models.losses import LossFn, loss_for

DEFAULT_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Task:
    """A supervised data set, split into train and test, and optionally a validation set.

    A sample is one row of ``x_*`` with the same row of ``y_*``. For a language task
    (:attr:`is_sequence`) a sample is one *window*: T input tokens and the T next tokens as its
    targets; its loss is the mean of its T per-token cross entropies, and a batch's loss is the
    mean over its windows. Training, per-sample gradients, the Gram path and evaluation all use
    this definition, so a per-sample gradient of a language task is one window's gradient.
    A padded task of examples of different lengths (``jsonl:``, ``hfdata:``;
    :mod:`sgn_lab.data.examples`) has ``PAD_ID`` (-1) at the padding of x and
    ``IGNORE_INDEX`` (-100) in y where there is no target: a sample is one example, its loss
    the mean over its real targets, a batch's loss the mean over samples.

    Attributes
    ----------
    name
        The task string it was loaded from (``"linreg"``, ``"npz:/data/x.npz"``, ...).
    x_train, x_test
        float32 inputs of shape (n_train, *input_shape) and (n_test, *input_shape); for a
        language task, int64 token ids of shape (n, T).
    y_train, y_test
        int64 labels in ``[0, num_classes)`` of shape (n,) for classification; float32 values
        of shape (n,) for regression; for a language task, int64 next-token ids (n, T), row i
        being the input window x_i shifted by one token.
    x_val, y_val
        The validation set, laid out as ``x_train`` / ``y_train``, or None (both) when there is
        none: samples held out of the training set (:func:`hold_out_validation`, a run's
        ``validation_fraction``), so never trained on, never probed and never test samples.
    num_classes
        Number of classes; 0 for regression. For a language task, the vocabulary size.
    info
        Facts about how the data were made, for theory and bookkeeping; keys depend on the
        task (empty by default):

        - ``linreg``: ``"H"`` (d, d) float64, the covariance of x (diagonal);
          ``"w_star"`` (d,) float64, the true weights; ``"noise_std"`` σ, the standard
          deviation of the label noise ε; ``"condition"`` λ_max/λ_min of H. So
          ``y = x·w* + ε`` with ``x ~ N(0, H)`` and ``ε ~ N(0, σ²)``.
        - ``teacher-student``: ``"teacher"``, a list of (weight (out, in), bias (out,))
          float64 pairs in ``nn.Linear`` layout, tanh between layers and none after the last;
          ``"label_noise"``, the standard deviation of the Gaussian noise added to its outputs.
        - ``gaussian-mixture``: ``"centres"`` (classes, d) float64; each class is
          ``N(centre, I)``.
        - ``mnist1d``: ``"generator_seed"``, the seed given to the package's generator.
        - ``npz``: ``"path"``, ``"split"`` (``"file"`` or ``"seeded"``).
        - ``cifar10``: ``"folder"``, ``"classes"`` (label names), ``"standardize"``, and
          ``"mean"``, ``"std"`` (per channel, in [0, 1] units, of the 50 000 training images).
        - ``markov``: ``"transition"`` P (V, V) and ``"stationary"`` π (V,), float64;
          ``"entropy_rate"`` −Σ_i π_i Σ_j P_ij log P_ij in nats per token, the floor of the
          expected test loss of any model; ``"vocab_size"`` V; ``"context"`` T;
          ``"concentration"`` (the Dirichlet α of P's rows).
        - ``text``: ``"path"``, ``"tokens"`` (``"byte"`` or ``"char"``), ``"context"`` T,
          ``"vocab"`` (the characters, sorted by code point, for ``"char"``; None for bytes),
          ``"vocab_size"``.
        - ``jsonl``, ``hfdata``: ``"padded"`` True, ``"padding"`` (``"right"`` or
          ``"left"``), ``"vocab_size"``, ``"length"`` T, ``"loss_average"`` and the others
          listed in :mod:`sgn_lab.data.examples`.
    loss
        The task's mean-reduced loss ``loss(outputs, targets)``; None: the default for its
        targets (:attr:`loss_fn`).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    loss: LossFn | None = None
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError("a task's validation set needs both x_val and y_val, or neither")
        if self.x_val is not None and self.y_val is not None and len(self.x_val) != len(
                self.y_val):
            raise ValueError(f"x_val has {len(self.x_val)} samples but y_val has "
                             f"{len(self.y_val)}")

    @property
    def has_validation(self) -> bool:
        """True when the task holds a validation set (``x_val``, ``y_val``)."""
        return self.x_val is not None

    @property
    def is_sequence(self) -> bool:
        """True when every target is a sequence of tokens, (n, T): a language task."""
        return self.y_train.dim() == 2 and not self.y_train.is_floating_point()

    @property
    def loss_fn(self) -> LossFn:
        """``loss``, else cross entropy (classification), next-token cross entropy (token
        sequences) or ½ MSE (regression); see :mod:`sgn_lab.models.losses`."""
        if self.loss is not None:
            return self.loss
        return loss_for(self.num_classes, sequence=self.is_sequence)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])

    @property
    def is_classification(self) -> bool:
        """True when the targets are class labels (``num_classes > 0``)."""
        return self.num_classes > 0


def float32_tensor(x: np.ndarray) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)


def assemble_task(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    info: dict[str, Any],
    *,
    rng: np.random.Generator,
    test_fraction: float | None,
    n_train: int | None,
    n_test: int | None,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    to_inputs: Callable[[np.ndarray], Tensor] = float32_tensor,
) -> Task:
    """Split (seeded, unless a test set is given), subsample, and convert to tensors."""
    if x_test is None or y_test is None:
        assert test_fraction is not None
        order = rng.permutation(len(x))
        held_out = int(round(test_fraction * len(x)))
        if not 1 <= held_out < len(x):
            raise ValueError(
                f"test_fraction={test_fraction} of {len(x)} samples leaves {held_out} test and "
                f"{len(x) - held_out} training samples; both must be at least 1"
            )
        test, train = order[:held_out], order[held_out:]
        x_test, y_test = x, y
    else:
        train, test = np.arange(len(x)), np.arange(len(x_test))
    train = subset(train, n_train, name="n_train", rng=rng)
    test = subset(test, n_test, name="n_test", rng=rng)
    y_dtype = torch.long if classes else torch.float32
    return Task(
        name=name,
        x_train=to_inputs(x[train]),
        y_train=torch.as_tensor(y[train], dtype=y_dtype),
        x_test=to_inputs(x_test[test]),
        y_test=torch.as_tensor(y_test[test], dtype=y_dtype),
        num_classes=classes,
        info=info,
    )


def subset(indices: np.ndarray, size: int | None, *, name: str,
           rng: np.random.Generator) -> np.ndarray:
    """A seeded random ``size`` of ``indices`` (all of them, and no draw, for None).

    The first ``size`` of one permutation: for one seed, a smaller subset is part of a larger.
    """
    if size is None:
        return indices
    integer(name, size, 1)
    if size > len(indices):
        raise ValueError(f"{name}={size!r} exceeds the {len(indices)} samples available")
    return indices[rng.permutation(len(indices))[:size]]


def hold_out_validation(task: Task, validation_fraction: float, *, seed: int) -> Task:
    """``task`` with round(f · n) of its n training samples moved to a validation set.

    The validation samples are a random subset drawn with a CPU generator seeded with
    ``seed`` (a run derives it from its training seed, :data:`sgn_lab.seeds.Purpose.
    VALIDATION`); the rest stay the training set, both in their original order, and the test
    set is untouched. ``validation_fraction`` 0 returns ``task`` as it is.

    Raises ValueError when the fraction is outside [0, 1), when it leaves no validation or no
    training sample, or when the task has a validation set of its own already.
    """
    f = validation_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
        raise ValueError(f"validation_fraction must be a number in [0, 1), got {f!r}")
    if f == 0:
        return task
    if task.has_validation:
        raise ValueError(f"validation_fraction={f} asks for a validation set, but task "
                         f"{task.name!r} has its own already")
    n = len(task.x_train)
    held_out = int(round(f * n))
    if not 1 <= held_out < n:
        raise ValueError(f"validation_fraction={f} of {n} training samples leaves {held_out} "
                         f"validation and {n - held_out} training samples; both must be at "
                         "least 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:held_out].sort().values, order[held_out:].sort().values
    return replace(task, x_train=task.x_train[train], y_train=task.y_train[train],
                   x_val=task.x_train[val], y_val=task.y_train[val])
