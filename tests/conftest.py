"""Fixtures for the whole suite: torch on one thread, no progress bars, logging restored, a tiny encoder."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

# Tests use tiny in-memory data: no DataLoader worker processes unless a test asks for them.
os.environ.setdefault("RFI_NUM_WORKERS", "0")
os.environ.setdefault("RFI_NO_PROGRESS", "1")


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


def tiny_net(seed: int = 0, **overrides: Any):
    """The suite's tiny encoder: a random ResNet-18 at width 0.125 with a 3x3 stem and 8 classes, in eval mode.

    ``layer3`` has 32 channels at stride 4. ``overrides`` go to ``create_encoder`` (e.g. ``width=0.25``).
    """
    from encoders import create_encoder

    torch.manual_seed(seed)
    kwargs = {"width": 0.125, "small_input": True, "num_classes": 8, **overrides}
    return create_encoder(kwargs.pop("arch", "resnet18"), **kwargs).eval()


@pytest.fixture
def tiny_encoder_net():
    """A fresh :func:`tiny_net` (seed 0) for one test."""
    return tiny_net()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``rfi`` (apps.cli.main) points logging at the captured stderr; undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
