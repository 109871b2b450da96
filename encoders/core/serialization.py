"""Safe, atomic checkpoint files.

Every checkpoint is read with ``torch.load(..., weights_only=True)``, so a file that would
run code on load is refused, never executed. Every file is written to a temporary name in
the same folder (``.<name>.<pid>.<random>.tmp``) and renamed into place, so a run killed at
any moment leaves the previous file intact; a later write to the same name removes the
temporary files of processes that no longer run.

Integrity: :func:`save_checkpoint` records a SHA-256 of every tensor's bytes (with its key
path, dtype and shape) under :data:`HASH_KEY`; :func:`load_checkpoint` recomputes it and
refuses a file whose tensors changed (a flipped byte on disk is reported, never used).
Files without the key (older RFI files, foreign checkpoints) load as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from encoders.core.errors import RFIError

HASH_KEY = "content_sha256"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.<pid>.*.tmp`` files next to ``path`` left by processes that were killed."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and int(parts[0]) != os.getpid() and not pid_alive(int(parts[0])):
            tmp.unlink(missing_ok=True)


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
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (numpy and other number types as floats).

    Example:
        >>> import tempfile
        >>> p = write_json({"psnr": 25.0}, Path(tempfile.mkdtemp()) / "r.json")
        >>> json.loads(p.read_text())
        {'psnr': 25.0}
    """
    text = json.dumps(obj, indent=2, default=float) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def content_hash(obj: Any) -> str:
    """SHA-256 over every tensor in ``obj`` (nested dicts/lists), with key paths, dtypes and shapes.

    Example:
        >>> a = {"w": torch.ones(2)}
        >>> content_hash(a) == content_hash({"w": torch.ones(2)}) != content_hash({"w": torch.zeros(2)})
        True
    """
    digest = hashlib.sha256()

    def walk(x: Any, key: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if k != HASH_KEY:
                    walk(x[k], f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{key}/{i}")

    walk(obj, "")
    return digest.hexdigest()


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` atomically (temp file + rename), with its :func:`content_hash`."""
    obj = {**obj, HASH_KEY: content_hash(obj)}
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
    except Exception as e:  # garbage makes the unpickler fail in many ways (KeyError, struct.error, ...)
        detail = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise RFIError(f"{path} is not a valid checkpoint (truncated, corrupt or not a checkpoint: {detail})") from None
    if not isinstance(obj, dict):
        raise RFIError(f"{path} is not a checkpoint dictionary (found {type(obj).__name__})")
    if HASH_KEY in obj:
        if content_hash(obj) != obj[HASH_KEY]:
            raise RFIError(f"{path} is corrupt: its tensors do not match the checksum written with them "
                           f"(a changed or damaged file); use a backup or retrain")
        obj = {k: v for k, v in obj.items() if k != HASH_KEY}
    return obj
