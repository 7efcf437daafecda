"""Torch's random state on the CPU and on a CUDA device, taken and put back as one value.

The per-sample passes draw their dropout masks from it: a pass run again from the same state
draws the same masks, and a check that must not move the caller's random state puts it back.
"""

from __future__ import annotations

import torch
from torch import Tensor

RandomState = tuple[Tensor, Tensor | None]  # (CPU state, the CUDA device's state or None)


def rng_state(device: torch.device) -> RandomState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: RandomState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def rng_changed(state: RandomState, device: torch.device) -> bool:
    """Whether anything was drawn since ``state`` was taken."""
    now = rng_state(device)
    return not torch.equal(now[0], state[0]) or (
        state[1] is not None and not torch.equal(now[1], state[1]))
