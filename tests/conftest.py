"""Shared test fixtures."""

import os
from collections.abc import Iterator

# Models are built from configs with random weights; nothing may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for modules of tiny tensors, restored afterwards.

    Extra threads only add synchronisation there; on a shared 2-core runner they made the
    Lanczos tests about 10x slower. Use with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
