"""Run folders: one run at a time per folder.

:class:`RunLock` makes a training run the only writer of its ``--out`` folder: it creates
``<folder>/.lock`` exclusively (``O_CREAT | O_EXCL``, atomic on local file systems) with the
owner's pid and host, and removes it when the run ends, however it ends. A second run on the
same folder gets a one-line error naming the owner. A lock whose process no longer runs on
this host (a run killed with ``kill -9``) is stale: it is replaced, with a log line.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder):
    ...     RunLock(folder).acquire()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    encoders.errors.RFIError: /tmp/... is in use by another run (pid ...
    >>> RunLock(folder).acquire().held
    True
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from encoders.errors import RFIError

log = logging.getLogger("rfi")
LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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

    def _owner(self) -> tuple[int, str]:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return -1, "?"  # being written, or garbage: treated as live unless it is empty and old

    def acquire(self) -> "RunLock":
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
                pid, host = self._owner()
                if host == socket.gethostname() and pid > 0 and not _pid_alive(pid):
                    log.info("removing the stale lock of run %d (no longer running) in %s", pid, self.folder)
                    self.path.unlink(missing_ok=True)
                    continue
                raise RFIError(f"{self.folder} is in use by another run (pid {pid} on {host}): wait for it to "
                               f"finish or choose another --out; if no such run exists, delete {self.path}") from None
            except OSError as e:
                raise RFIError(f"cannot write to the run folder {self.folder}: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
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

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def lock_for_run(folder: str | os.PathLike, ctx: Any) -> RunLock:
    """Lock a training run's folder: rank 0 takes the lock, and every rank raises if it cannot.

    Args:
        folder: the run folder.
        ctx: the run's :class:`~encoders.runtime.DistContext` (``main``, ``all_gather``).

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
