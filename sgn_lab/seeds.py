"""Seeds derived from a run's seed: one independent stream per named purpose.

Every random choice of a run derives from (run seed, step, purpose) rather than from a shared
generator, so a resumed run draws exactly what an uninterrupted one does, and a measurement
never touches the training loop's random state. The purposes' numbers are part of every
result drawn from them: never renumber one.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Purpose(IntEnum):
    PROBE = 0  # which training samples a measurement probes
    GRADS = 1  # random layers (dropout) during per-sample gradients
    STATS = 2  # the isotropic reference spectrum, random projections of the noise
    CURVATURE = 3  # Lanczos start vectors and Hutchinson probes
    UPDATES = 4  # the replicas of the per-step update noise
    OPTIMIZER = 7  # an optimizer's own generator (injected noise)
    DATA_ORDER = 8  # the order of the training minibatches
    CHUNK = 9  # random layers of one chunk of a streamed computation
    PROJECTION = 10  # the blocks of a streamed random projection (sketch)
    VALIDATION = 11  # which training samples are held out as the validation set


class SweepPurpose(IntEnum):
    """Purposes of the seeds a sweep derives from (seed, sweep, point, purpose)."""

    PROBLEM = 0  # the random problem (data set, teacher) of a sweep
    ROTATION = 1  # the random rotation of a quadratic's eigenbasis
    DRAWS = 2  # the samples drawn at one point
    OPTIMIZER = 3  # the optimizer's injected noise (full covariance)
    DIAGONAL = 4  # the optimizer's injected noise (diagonal covariance)
    ISOTROPIC = 5  # the isotropic reference spectrum


def derive(seed: int, *keys: int) -> int:
    """A 62-bit seed mixed from ``seed`` and ``keys`` (numpy's SeedSequence: no two tuples
    collide), for ``torch.manual_seed`` and numpy generators alike."""
    state = np.random.SeedSequence([int(seed), *(int(k) for k in keys)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 2)


def seed_for(seed: int, step: int, purpose: Purpose) -> int:
    """The seed of ``purpose`` at ``step`` of a run seeded with ``seed``."""
    return derive(seed, step, int(purpose))


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded with :func:`derive` (draws on the CPU: the same on every device)."""
    return torch.Generator().manual_seed(derive(seed, *keys))
