"""Base class for optimizers that draw random numbers: a seeded generator in the state dict."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from sgn_lab import checks


class SeededOptimizer(Optimizer):
    """An Optimizer with its own ``torch.Generator``, seeded and saved with the state.

    The generator lives on the device of the first parameter, so noise is drawn where it is
    used; its state travels in :meth:`state_dict`, so a run saved and loaded mid-way draws the
    same numbers as one that never stopped. ``seed=None`` takes a seed from torch's global
    generator (reproducible under ``torch.manual_seed``).
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], seed: int | None):
        super().__init__(params, defaults)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        else:
            seed = checks.integer("seed", seed, 0)
        device = self.param_groups[0]["params"][0].device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is not None:
            self.generator.set_state(generator_state.cpu())

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and groups: without this a deep copy
        # or a pickle would lose the generator.
        state = super().__getstate__()
        state["generator_state"] = self.generator.get_state()
        state["generator_device"] = str(self.generator.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Optimizer.load_state_dict also calls this, with state and groups only: the
        # generator is then left as it is (load_state_dict restores it itself).
        state = dict(state)
        if "generator_state" in state:
            self.generator = torch.Generator(device=state.pop("generator_device"))
            self.generator.set_state(state.pop("generator_state"))
        super().__setstate__(state)
