"""What every training job shares: seeding, devices, resumable RNG state, metrics logs, image grids.

Training jobs draw every random number from torch's generators (never ``random`` or
``numpy``), so :func:`rng_state` / :func:`set_rng_state` stored in a checkpoint make
``--resume`` continue exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from encoders.errors import RFIError
from encoders.imageio import write_image
from encoders.serialization import atomic_write


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, torch (CPU and CUDA) and return a CPU generator for data order.

    Deterministic kernels are requested (``warn_only``: ops without one still run).
    """
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RFIError(f"unknown device '{name}' (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RFIError(f"device '{name}' asked for, but CUDA is not available here")
    return device


def rng_state() -> dict[str, Any]:
    """torch's global RNG states (CPU and CUDA) in a form a ``weights_only`` checkpoint holds."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal or ``RFI_NO_PROGRESS`` is set)."""
    disable = True if os.environ.get("RFI_NO_PROGRESS") else None
    return tqdm(iterable, dynamic_ncols=True, disable=disable, **kwargs)


class MetricsLog:
    """Append-only JSON-lines metrics log (one object per line, each with a ``step``).

    Args:
        path: the ``.jsonl`` file.
        resume_step: when resuming, lines with ``step`` beyond it (written after the
            checkpoint being resumed) are dropped, so the log matches an uninterrupted run.
        enabled: ``False`` on non-zero DDP ranks: nothing is written.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write(self.path, lambda tmp: open(tmp, "w").close())
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def save_grid(columns: Sequence[Tensor], path: str | os.PathLike, max_rows: int = 8, pad: int = 2) -> Path:
    """Write a PNG grid with one row per image and one column per tensor (e.g. input | reconstruction).

    Args:
        columns: tensors (B, 3, H, W) in [0, 1]; images of different sizes are resized to the first's.
        path: output PNG (written atomically).
        max_rows: at most this many rows.
    """
    ref = columns[0][:max_rows]
    cols = [torch.nn.functional.interpolate(c[:max_rows].float(), size=ref.shape[-2:], mode="bilinear",
                                            align_corners=False) if c.shape[-2:] != ref.shape[-2:] else c[:max_rows]
            for c in columns]
    tiles = torch.stack([c.detach().float().cpu().clamp(0, 1) for c in cols], dim=1).flatten(0, 1)
    return write_image(make_grid(tiles, nrow=len(columns), padding=pad, pad_value=1.0), path)
