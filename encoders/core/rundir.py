"""Run folders: one run at a time per folder.

:class:`RunLock` makes a training run the only writer of its ``--out`` folder: it creates
``<folder>/.lock`` exclusively (``O_CREAT | O_EXCL``, atomic on local file systems) with the
owner's pid and host, and removes it when the run ends, however it ends. A second run on the
same folder gets a one-line error naming the owner. A lock whose process no longer runs on
this host (a run killed with ``kill -9``) is stale, and so is an empty or unreadable one older
than :data:`LOCK_WRITE_SECONDS` (a run killed or out of disk space as it wrote it): either is
replaced, with a log line. A lock that cannot be written (disk full) is removed at once, so no
empty lock is left behind.

:class:`RunDir` is the rest of a run folder's bookkeeping, used by the training scaffold
(:class:`encoders.core.trainer.Trainer`) that every trainer subclasses: the
"checkpoint exists: pass --resume" guard, the resume config check (:func:`config_changes`
over :func:`flatten`-ed configs), the resolved ``config.yaml`` and the ``metrics.jsonl`` log.
:func:`step_seed` is the per-(step, rank) seed formula of the trainers' random draws, and
:class:`TrainResult` what the trainers return.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder):
    ...     RunLock(folder).acquire()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    encoders.core.rundir.RunInUseError: /tmp/... is in use by another run (pid ...
    >>> RunLock(folder).acquire().held
    True
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from torch import nn

from encoders.core.errors import RFIError
from encoders.core.runtime import MetricsLog
from encoders.core.serialization import atomic_write, pid_alive

log = logging.getLogger("rfi")
LOCK_NAME = ".lock"
LOCK_WRITE_SECONDS = 10.0
"""An empty or unreadable lock younger than this may be one being written; older, it is stale."""


class RunInUseError(RFIError):
    """Another live process holds the run folder's lock (so a caller sharing work may skip the run)."""


class RunLock:
    """Exclusive lock on a run folder (a context manager; also :meth:`acquire` / :meth:`release`).

    Args:
        folder: the run folder (created if missing).
        enabled: ``False`` makes it a no-op (non-zero DDP ranks: rank 0 holds the lock).
    """

    def __init__(self, folder: str | os.PathLike, enabled: bool = True):
        self.folder, self.enabled = Path(folder), enabled
        self.path = self.folder / LOCK_NAME
        self.held = self.created = False

    def _owner(self) -> tuple[int, str] | None:
        """The ``(pid, host)`` written in the lock, or ``None`` when it is empty or unreadable."""
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None

    def _check_stale(self) -> None:
        """Return if the existing lock may be replaced (saying why in the log); raise if a run holds it."""
        owner = self._owner()
        if owner is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:  # released meanwhile
                return
            if age < LOCK_WRITE_SECONDS:
                raise RunInUseError(
                    f"{self.folder} is being locked by another run (its {self.path} is being written): "
                    f"try again in a moment, or choose another --out"
                )
            log.warning("replacing the empty or unreadable lock %s (left by a run that could not write it)", self.path)
            return
        pid, host = owner
        if host == socket.gethostname() and pid > 0 and not pid_alive(pid):
            log.info("removing the stale lock of run %d (no longer running) in %s", pid, self.folder)
            return
        raise RunInUseError(
            f"{self.folder} is in use by another run (pid {pid} on {host}): wait for it to "
            f"finish or choose another --out; if no such run exists, delete {self.path}"
        )

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RFIError` naming the run that holds it."""
        if not self.enabled or self.held:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise RFIError(f"--out {self.folder} is a file, not a folder: name a folder for the run")
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RFIError(f"cannot create the run folder {self.folder}: {e.strerror or e}") from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise RFIError(f"cannot write to the run folder {self.folder}: {e.strerror or e}") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {socket.gethostname()}\n")
            except OSError as e:  # disk full as the lock is written: leave no empty lock behind
                self.path.unlink(missing_ok=True)
                if self.created and not any(self.folder.iterdir()):
                    self.folder.rmdir()
                raise RFIError(f"cannot write the lock {self.path}: {e.strerror or e}") from None
            self.held = True
            return self
        raise RFIError(f"could not lock {self.folder}: another run keeps taking {self.path}")

    def release(self) -> None:
        """Remove the lock if this process holds it (and the folder, if the lock made it and it stayed empty)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created and not any(self.folder.iterdir()):
                self.folder.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def lock_for_run(folder: str | os.PathLike, ctx: Any) -> RunLock:
    """Lock a training run's folder: rank 0 takes the lock, and every rank raises if it cannot.

    Args:
        folder: the run folder.
        ctx: the run's :class:`~encoders.core.runtime.DistContext` (``main``, ``all_gather``).

    Returns:
        The held lock (a context manager that releases it).
    """
    lock = RunLock(folder, enabled=ctx.main)
    try:
        lock.acquire()
        error = None
    except RFIError as e:
        error = str(e)
    errors = [e for e in ctx.all_gather(error) if e]
    if errors:
        lock.release()
        raise RFIError(errors[0])
    return lock


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a config as :func:`encoders.core.config.config_to_dict` gives it) with dotted keys.

    Tuples become lists (a config read back from YAML has lists); an empty mapping stays a value.

    Example:
        >>> flatten({"optim": {"lr": 0.1, "betas": (0.9, 0.99)}, "options": {}, "seed": 0})
        {'optim.lr': 0.1, 'optim.betas': [0.9, 0.99], 'options': {}, 'seed': 0}
    """
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


def config_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], free: Iterable[str] = (), defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """The dotted keys in which two (nested) configs differ, sorted.

    Args:
        old: the config a run started with (e.g. from its checkpoint).
        new: the config it is resumed with.
        free: keys that may differ: a key and every key below it (``"eval"`` frees ``eval.steps``).
        defaults: the current defaults (nested), standing in for keys ``old`` lacks (keys added
            since the run started).

    Example:
        >>> config_changes({"seed": 0, "eval": {"steps": 5}}, {"seed": 1, "eval": {"steps": 9}, "new": 2},
        ...                free=["eval"], defaults={"new": 2})
        ['seed']
    """
    old, new, defaults = flatten(old), flatten(new), flatten(defaults or {})
    free = tuple(free)
    is_free = lambda k: any(k == f or k.startswith(f + ".") for f in free)  # noqa: E731
    return [k for k in sorted(set(old) | set(new)) if not is_free(k) and old.get(k, defaults.get(k)) != new.get(k)]


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of a run's random draws at ``step`` on process ``rank``: a pure function, so a resumed
    run draws what an uninterrupted one would.

    Example:
        >>> step_seed(0, 5, 1), step_seed(1, 0)
        (20496, 4099012297)
    """
    return ((seed * 1_000_003 + step) * 4099 + rank) % (2**63)


@dataclass
class TrainResult:
    """What a trainer returns: the file it wrote, the trained module and its final metrics.

    A ``TrainResult`` is also :class:`os.PathLike` and prints as ``path``, so code that used the path
    a trainer used to return (``load_checkpoint(result)``, ``Path(result)``, ``print(result)``) still works.

    Attributes:
        path: the checkpoint or model file.
        model: the trained module (eval mode), on the device it trained on.
        metrics: the run's final metrics (what its ``metrics.jsonl`` ends with; keys per trainer).
    """

    path: Path
    model: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


class RunDir:
    """The bookkeeping files of a training run's folder (only ``main``, rank 0, writes).

    Args:
        folder: the run folder (``--out``).
        checkpoint: the name of the run's checkpoint in it.
        main: ``False`` on non-zero DDP ranks: nothing is written.

    Example:
        >>> import tempfile
        >>> run = RunDir(tempfile.mkdtemp(), "checkpoint.pt")
        >>> run.has_checkpoint(resume=False)
        False
        >>> run.write_config({"seed": 0, "optim": {"lr": 0.1}})
        >>> print(run.config_path.read_text(), end="")
        seed: 0
        optim:
          lr: 0.1
        >>> _ = run.checkpoint.write_bytes(b"")
        >>> run.has_checkpoint(resume=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        encoders.core.errors.RFIError: /tmp/.../checkpoint.pt exists: pass --resume to continue that run, ...
    """

    def __init__(self, folder: str | os.PathLike, checkpoint: str = "checkpoint.pt", main: bool = True):
        self.folder, self.main = Path(folder), main
        self.checkpoint = self.folder / checkpoint
        self.config_path = self.folder / "config.yaml"
        self.metrics_path = self.folder / "metrics.jsonl"

    def has_checkpoint(self, resume: bool) -> bool:
        """Whether there is a checkpoint to resume; one there without ``resume`` is an error (never overwritten)."""
        if not self.checkpoint.exists():
            if resume and self.main:
                log.info("nothing to resume in %s: starting a new run", self.folder)
            return False
        if not resume:
            raise RFIError(f"{self.checkpoint} exists: pass --resume to continue that run, or choose another --out")
        return True

    def check_resume(
        self,
        old: Mapping[str, Any],
        new: Mapping[str, Any],
        free: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise :class:`RFIError` naming the keys in which the resumed config differs (see :func:`config_changes`)."""
        changed = config_changes(old, new, free, defaults)
        if changed:
            raise RFIError(
                f"cannot resume {self.checkpoint}: the config differs in {', '.join(changed)} "
                f"(use the run's {self.config_path} or another --out)"
            )

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write the resolved config to ``config.yaml`` (atomically)."""
        if self.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(dict(config), sort_keys=False)
            atomic_write(self.config_path, lambda tmp: Path(tmp).write_text(text))

    def metrics(self, resume_step: int | None = None) -> MetricsLog:
        """The run's ``metrics.jsonl`` (:class:`~encoders.core.runtime.MetricsLog`): new, or cut at ``resume_step``."""
        return MetricsLog(self.metrics_path, resume_step=resume_step, enabled=self.main)
