"""Sizes set by flags, configs or the API, checked against the machine's memory before anything is allocated.

A width, a channel count or an image size typed by mistake (``width=64``, ``decoder.channels=200000``,
``--size 60000``) would otherwise make PyTorch allocate until the kernel kills the process. A
model is counted on PyTorch's ``meta`` device first (shapes only, no memory: :func:`meta_parameters`),
and what a job would hold is compared with the memory of the machine (:func:`memory_bytes`) by
:func:`check_memory`, which refuses with the number and the key or flag to change.

Example:
    >>> from torch import nn
    >>> meta_parameters(lambda: nn.Linear(1000, 1000))
    1001000
    >>> check_memory(10 * memory_bytes(), "a 'width' of 64", "lower width")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    encoders.core.errors.RFIError: a 'width' of 64 needs about ... GB, more than the ... GB of memory ...
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from encoders.core.errors import RFIError

FLOAT_BYTES = 4
"""Bytes per parameter or activation (fp32, the precision models are built in)."""
TRAINING_COPIES = 4
"""fp32 copies of each parameter a training holds: the weights, their gradients and Adam's two moments."""
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


def memory_bytes() -> int:
    """The memory this process may use: the machine's physical memory, or its container's limit when lower.

    Returns:
        Bytes; where the system cannot say (no ``sysconf``), a number no job reaches.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**62
    try:
        limit = CGROUP_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def meta_parameters(build: Callable[[], nn.Module]) -> int:
    """The number of parameters of the module ``build()`` makes, counted on the ``meta`` device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def check_memory(need_bytes: float, what: str, fix: str) -> None:
    """Refuse a job that would hold more than the memory of the machine (:func:`memory_bytes`).

    Args:
        need_bytes: an estimate of what the job holds at once.
        what: what asks for it, naming the key or flag and its value (e.g. ``"decoder.channels=200000"``).
        fix: what to change (e.g. ``"lower decoder.channels"``).

    Raises:
        RFIError: one line with the estimate, the memory and ``fix``.
    """
    have = memory_bytes()
    if need_bytes > have:
        raise RFIError(
            f"{what} needs about {need_bytes / 1e9:,.1f} GB, more than the {have / 1e9:,.1f} GB of "
            f"memory of this machine: {fix}"
        )
