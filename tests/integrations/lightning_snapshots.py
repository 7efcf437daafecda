"""A Lightning callback for the tests: the weights at each optimizer step, taken where
SGNCallback measures, so that a test can recompute the SGN at those weights apart.

Imported by the tests after ``pytest.importorskip("lightning.pytorch")``.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch


class Snapshots(pl.Callback):
    """The weights at each optimizer step, taken where SGNCallback measures."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, trainer, module) -> None:
        self.weights.setdefault(trainer.global_step, copy.deepcopy(module.state_dict()))

    def on_train_start(self, trainer, module) -> None:
        self._take(trainer, module)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self._take(trainer, module)
