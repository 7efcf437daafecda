"""The heavy-ball SGD update shared by the SGD-based noise methods."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def heavy_ball_step(
    p: Tensor, d_p: Tensor, state: dict[str, Any], lr: float, momentum: float
) -> None:
    """θ ← θ − η·v with v ← μ·v + g̃ (v = g̃ on the first step), or θ ← θ − η·g̃ when μ = 0.

    The same rule as ``torch.optim.SGD`` (dampening 0), so the noise methods built on it
    differ from the baseline only in the gradient g̃ they feed it.
    """
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            # First step: the buffer starts at g̃, as in torch.optim.SGD (not at zero).
            buf = state["momentum_buffer"] = d_p.detach().clone()
        else:
            buf.mul_(momentum).add_(d_p)
        d_p = buf
    p.add_(d_p, alpha=-lr)
