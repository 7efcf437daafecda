"""A Hugging Face Trainer callback for the tests: the weights at each optimizer step, taken
where SGNTrainerCallback measures, so that a test can recompute the SGN at those weights apart.

Imported by the tests after ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import copy

import torch
from transformers import TrainerCallback


class Snapshots(TrainerCallback):
    """The weights at each optimizer step, taken where SGNTrainerCallback measures."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, state, model) -> None:
        self.weights.setdefault(state.global_step, copy.deepcopy(model.state_dict()))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._take(state, model)
