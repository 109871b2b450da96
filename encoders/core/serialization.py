"""Safe, atomic checkpoint files (and JSON reports): the one place RFI reads and writes them.

Every checkpoint is read with ``torch.load(..., weights_only=True)``, so a file that would
run code on load is refused, never executed. Every file is written to a temporary name in
the same folder (``.<name>.<pid>.<random>.tmp``) and renamed into place, so a run killed at
any moment leaves the previous file intact; a later write to the same name removes the
temporary files of processes that no longer run.

:func:`load_checkpoint` refuses, with one line naming the file:

- **A changed file.** :func:`save_checkpoint` records :func:`content_hash` of the whole dict
  (every tensor's bytes with its key path, dtype and shape, and every other value with its key
  path) under :data:`CHECKSUM_KEY`; a file whose content no longer matches is refused, so a
  flipped bit in the weights or in a setting (a decoder's ``train_size``) is reported, never
  used. Files written before the checksum covered the settings carry :data:`TENSOR_HASH_KEY`
  (:func:`tensor_hash`, the tensors only) and no :data:`CHECKSUM_KEY`: only their tensors can be
  checked, and are. Files with neither (the first RFI files, foreign checkpoints) are not checked.
- **A format or version it does not know** (:func:`check_format`): a ``format`` that is not in
  :data:`FORMAT_VERSIONS`, or a ``version`` newer than this RFI reads. Files without ``format``
  (``robustness``-library checkpoints, torchvision state dicts) are read as foreign files.
- **NaN or Inf in a floating-point tensor** (the weights of a training that diverged): the
  first such tensor is named. So every command that loads a model refuses such a file before
  it computes anything from it.

:func:`write_json` refuses NaN and Inf, which JSON cannot hold, naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from encoders.core.errors import RFIError

CHECKSUM_KEY = "checksum_sha256"
"""Where :func:`save_checkpoint` records :func:`content_hash` (tensors and settings)."""
TENSOR_HASH_KEY = "content_sha256"
"""Where files written before :data:`CHECKSUM_KEY` existed record :func:`tensor_hash` (tensors only)."""
FORMAT_VERSIONS: dict[str, int] = {
    "rfi-encoder": 1,
    "rfi-decoder": 1,
    "rfi-autoencoder": 1,
    "rfi-anomaly": 1,
    "rfi-segmenter": 1,
}
"""The checkpoint formats RFI writes (their ``format`` key), each with the ``version`` it writes
(the newest it reads)."""


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
        parts = tmp.name[len(path.name) + 2 :].split(".")
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


def _leaves(obj: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, value)`` of every leaf of nested dicts (keys sorted, hash keys left out), lists and
    tuples; empty containers are leaves too. Paths look like ``/state_dict/tail.weight``."""
    if isinstance(obj, dict) and obj:
        for k in sorted(obj, key=str):
            if k not in (CHECKSUM_KEY, TENSOR_HASH_KEY):
                yield from _leaves(obj[k], f"{key}/{k}")
    elif isinstance(obj, (list, tuple)) and obj:
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{key}/{i}")
    elif isinstance(obj, (set, frozenset)) and obj:
        yield from _leaves(sorted(obj, key=repr), key)
    else:
        yield key, obj


def _non_finite_number(obj: Any) -> str | None:
    """The key path of the first number in ``obj`` that is NaN or Inf (one-element tensors and numpy
    numbers included), or ``None``."""
    for key, value in _leaves(obj):
        if isinstance(value, (str, bytes, bool)) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue
        if not math.isfinite(number):
            return key.lstrip("/") or "(the value itself)"
    return None


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (numpy and other number types as floats).

    JSON has no NaN or Inf (``json.dumps`` would write ``NaN``, which JSON readers refuse), so a
    report holding one is refused and nothing is written: a measurement that came out NaN is
    a failure to report, not a figure.

    Raises:
        RFIError: a value is NaN or Inf (named by its key path).

    Example:
        >>> import tempfile
        >>> p = write_json({"psnr": 25.0}, Path(tempfile.mkdtemp()) / "r.json")
        >>> json.loads(p.read_text())
        {'psnr': 25.0}
        >>> write_json({"models": {"robust": {"psnr": float("nan")}}}, p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        encoders.core.errors.RFIError: refusing to write ... 'models/robust/psnr' is NaN or Inf, which JSON cannot hold
    """
    try:
        text = json.dumps(obj, indent=2, default=float, allow_nan=False) + "\n"
    except ValueError:
        key = _non_finite_number(obj)
        if key is None:
            raise
        raise RFIError(f"refusing to write {path}: '{key}' is NaN or Inf, which JSON cannot hold") from None
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _digest(obj: Any, settings: bool) -> str:
    digest = hashlib.sha256()
    for key, x in _leaves(obj):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif settings:
            digest.update(f"{key}|{type(x).__name__}|{x!r}|".encode())
    return digest.hexdigest()


def content_hash(obj: Any) -> str:
    """SHA-256 over everything in ``obj`` (nested dicts, lists, tuples) but its hash keys: each tensor's
    bytes with its key path, dtype and shape, each other value with its key path, type and ``repr``.

    Example:
        >>> a = {"w": torch.ones(2), "train_size": 32}
        >>> content_hash(a) == content_hash({"w": torch.ones(2), "train_size": 32})
        True
        >>> content_hash(a) == content_hash({"w": torch.ones(2), "train_size": 48})
        False
    """
    return _digest(obj, settings=True)


def tensor_hash(obj: Any) -> str:
    """SHA-256 over the tensors of ``obj`` only (key paths, dtypes, shapes, bytes): the hash files written
    before :data:`CHECKSUM_KEY` existed carry under :data:`TENSOR_HASH_KEY`.

    Example:
        >>> tensor_hash({"w": torch.ones(2), "train_size": 32}) == tensor_hash({"w": torch.ones(2), "train_size": 48})
        True
    """
    return _digest(obj, settings=False)


def check_format(ckpt: Mapping[str, Any], source: str) -> None:
    """Refuse a checkpoint ``format`` RFI does not know, or a ``version`` newer than it reads
    (:data:`FORMAT_VERSIONS`); a dict without ``format`` (a foreign file) passes.

    Args:
        ckpt: a checkpoint dict (or one of the files nested in it).
        source: the file it came from (for messages).

    Raises:
        RFIError: naming the format or the version.

    Example:
        >>> check_format({"format": "rfi-decoder", "version": 99}, "d.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        encoders.core.errors.RFIError: d.pt is an rfi-decoder file of version 99, newer than this RFI reads (1): ...
    """
    if "format" not in ckpt:
        return
    fmt = ckpt["format"]
    if not isinstance(fmt, str) or fmt not in FORMAT_VERSIONS:
        raise RFIError(
            f"{source} has an unknown checkpoint format {fmt!r} (RFI reads {', '.join(FORMAT_VERSIONS)}, "
            f"and robustness-library or torchvision files, which have no format): a file of another "
            f"program, or of a newer RFI"
        )
    version = ckpt.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RFIError(f"{source} has an invalid {fmt} version {version!r} (a damaged file)")
    if version > FORMAT_VERSIONS[fmt]:
        raise RFIError(
            f"{source} is an {fmt} file of version {version}, newer than this RFI reads "
            f"({FORMAT_VERSIONS[fmt]}): upgrade RFI (pip install -U robust-inversion)"
        )


def non_finite_tensor(obj: Any) -> str | None:
    """The key path of the first floating-point tensor in ``obj`` holding NaN or Inf, or ``None``.

    Example:
        >>> non_finite_tensor({"state_dict": {"w": torch.ones(2), "b": torch.tensor([0.0, float("nan")])}})
        'state_dict/b'
    """
    for key, x in _leaves(obj):
        if (
            isinstance(x, torch.Tensor)
            and (x.is_floating_point() or x.is_complex())
            and not bool(torch.isfinite(x).all())
        ):
            return key.lstrip("/")
    return None


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` atomically (temp file + rename), with its :func:`content_hash`.

    The same ``obj`` gives the same bytes wherever it is written: ``torch.save`` is handed an open
    file, so its zip archive is named ``archive`` rather than after the temporary file's name.
    """
    obj = {k: v for k, v in obj.items() if k not in (CHECKSUM_KEY, TENSOR_HASH_KEY)}
    obj[CHECKSUM_KEY] = content_hash(obj)

    def write(tmp: str | os.PathLike) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``) onto the CPU.

    Raises:
        RFIError: the file is missing, truncated, not a checkpoint, or would run code; its content does not
            match its checksum; an unknown format or a newer version; NaN or Inf in a tensor (see the module).
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
                f"(only tensors and plain containers are accepted)"
            ) from None
        # Any other weights_only failure: not pickle data a checkpoint can hold (e.g. a text file).
        detail = next(
            (line.strip() for line in str(e).splitlines() if line.strip().startswith("Unsupported")),
            "unpickling failed",
        )
        raise RFIError(f"{path} is not a valid checkpoint ({detail})") from None
    except Exception as e:  # garbage makes the unpickler fail in many ways (KeyError, struct.error, ...)
        detail = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise RFIError(f"{path} is not a valid checkpoint (truncated, corrupt or not a checkpoint: {detail})") from None
    if not isinstance(obj, dict):
        raise RFIError(f"{path} is not a checkpoint dictionary (found {type(obj).__name__})")
    corrupt = (
        f"{path} is corrupt: its content does not match the checksum written with it "
        f"(a changed or damaged file); use a backup or retrain"
    )
    if CHECKSUM_KEY in obj:
        if content_hash(obj) != obj[CHECKSUM_KEY]:
            raise RFIError(corrupt)
    elif TENSOR_HASH_KEY in obj and tensor_hash(obj) != obj[TENSOR_HASH_KEY]:  # a file of an older RFI
        raise RFIError(corrupt)
    obj = {k: v for k, v in obj.items() if k not in (CHECKSUM_KEY, TENSOR_HASH_KEY)}
    check_format(obj, str(path))
    bad = non_finite_tensor(obj)
    if bad is not None:
        raise RFIError(
            f"{path} holds NaN or Inf values (first in '{bad}'): a training that diverged or a damaged "
            f"file, which would give false figures; retrain, or use an earlier checkpoint"
        )
    return obj
