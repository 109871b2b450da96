"""Fixtures for the whole suite: torch on one thread for tiny models."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest
import torch

# Tests use tiny in-memory data: no DataLoader worker processes unless a test asks for them.
os.environ.setdefault("RFI_NUM_WORKERS", "0")


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread: tiny models are faster so, and much faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a test module (module scope, so module fixtures that train get it too)."""
    with single_threaded():
        yield
