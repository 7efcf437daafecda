"""Train/eval flags of a model's modules, put back as they were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def restored_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model.eval()`` or ``.train()`` freely; afterwards every module has
    its own flag back. ``model.train(was_training)`` would not do: it sets every submodule to
    the top-level flag, so a submodule frozen in eval mode (a BatchNorm, an encoder) would come
    back in train mode."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
