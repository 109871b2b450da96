"""Safe, atomic checkpoint files.

Every checkpoint is read with ``torch.load(..., weights_only=True)``, so a file that would
run code on load is refused, never executed. Every file is written to a temporary name in
the same folder and renamed into place, so a run killed at any moment leaves the previous
file intact.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from encoders.errors import RFIError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    Args:
        path: final destination; its folder is created.
        write: writes the whole file to the temporary path it is given.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give outputs the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` atomically (temp file + rename)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``) onto the CPU.

    Raises:
        RFIError: the file is missing, truncated, not a checkpoint, or would run code.
    """
    path = Path(path)
    if not path.is_file():
        raise RFIError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):  # it names a Python class or function
            raise RFIError(
                f"refused to load {path}: it holds Python objects that would run code on load "
                f"(only tensors and plain containers are accepted)") from None
        # Any other weights_only failure: not pickle data a checkpoint can hold (e.g. a text file).
        detail = next((line.strip() for line in str(e).splitlines() if line.strip().startswith("Unsupported")),
                      "unpickling failed")
        raise RFIError(f"{path} is not a valid checkpoint ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RFIError(f"{path} is not a valid checkpoint (truncated or corrupt: {first})") from None
    if not isinstance(obj, dict):
        raise RFIError(f"{path} is not a checkpoint dictionary (found {type(obj).__name__})")
    return obj
