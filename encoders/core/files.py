"""Files in, files out: the one loop every image command (invert, denoise apply, style apply, augment) runs.

``rfi anomaly score`` (which writes a CSV and maps, not one image per input) follows the same
per-input and exit-code policy through :func:`check_finite` and :func:`partial_exit`.

The policy, the same for every command:

- **Before any work**: the output folder is checked (``--out`` must not be empty or a file, its
  names not too long for the file system, and it must be creatable and writable, with room when
  the size is known; :func:`check_output_file` does the same for a command that writes one
  file), and the output names are
  planned: two inputs that would write the same file, or an output that would replace an
  input, are refused with one line naming both. Nothing is read or written until then.
- **Per input**: a file that cannot be read, holds NaN/Inf, or whose result is not finite
  (e.g. an fp16 overflow) is named and skipped; the others are processed.
- **Writes** are atomic (temp file + rename, see :func:`encoders.core.serialization.atomic_write`);
  a write that fails (disk full, read-only) stops the batch with one line naming the path,
  since every later write would fail too. Every other writing command (trainings, reports,
  JSON results) runs its work inside :func:`reported_writes`, which makes such a failure the
  same one line naming its output.
- **Exit code**: 0 when every input was written; :data:`EXIT_PARTIAL` (1) when some inputs
  failed and the others were written; 2 (an :class:`~encoders.core.errors.RFIError`) when none
  could be processed or the outputs cannot be written at all.

Example:
    >>> import tempfile, torch
    >>> from encoders.core.imageio import write_image
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = write_image(torch.rand(3, 8, 8), d / "in" / "a.png")
    >>> batch = FileBatch(["%s/in" % d], d / "out", names=lambda p: [p.stem + "_x.png"])
    >>> batch.run(lambda src, image: [1 - image])
    0
    >>> sorted(p.name for p in (d / "out").iterdir())
    ['a_x.png']
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.core.imageio import list_images, read_image, write_image
from encoders.core.runtime import progress

log = logging.getLogger("rfi")

EXIT_PARTIAL = 1
"""Exit code when some inputs failed (each named on stderr) and the others were written."""


WRITE_ERRORS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
}
"""The ``errno`` values of a failed write that :func:`write_failure` reports, and how."""
TEMPORARY_NAME_ROOM = 32
"""Characters an output file's name must leave free for its temporary name (``.<name>.<pid>.<random>.tmp``)."""


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, in words, or ``None`` when ``error`` is not a failed write.

    A failed write is an :class:`OSError` of :data:`WRITE_ERRORS` (``open``/``write``/``close`` of
    a full disk) or the ``RuntimeError`` of ``torch.save``'s writer on a full disk (``unexpected pos``).

    Example:
        >>> write_failure(OSError(errno.ENOSPC, "No space left on device"))
        'disk full'
        >>> write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
        'disk full (the checkpoint writer stopped)'
        >>> write_failure(ValueError("x")) is None
        True
    """
    if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
        return WRITE_ERRORS[error.errno]
    if isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "file write failed" in str(error)):
        return "disk full (the checkpoint writer stopped)"
    return None


@contextlib.contextmanager
def reported_writes(target: str | os.PathLike, flag: str = "--out") -> Iterator[None]:
    """Run a command's work so that a failed write (disk full, quota, read-only) is one line naming its output.

    Atomic writes leave nothing half-written behind, so the line says what to do: free space
    or choose another output. Any other error passes through unchanged.

    Args:
        target: the command's output (folder or file), named when the error does not name a file.
        flag: the option that set it, for the message.

    Raises:
        RFIError: a write failed (see :func:`write_failure`).

    Example:
        >>> with reported_writes("runs/x"):  # doctest: +ELLIPSIS
        ...     raise OSError(errno.ENOSPC, "No space left on device")
        Traceback (most recent call last):
        encoders.core.errors.RFIError: cannot write to --out runs/x: disk full; free some space or choose another --out
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        why = write_failure(e)
        if why is None:
            raise
        where = getattr(e, "filename", None) or f"to {flag} {os.fspath(target)}"
        fix = f"choose another {flag}" if "read-only" in why else f"free some space or choose another {flag}"
        raise RFIError(f"cannot write {where}: {why}; {fix}") from None


def _nearest_existing(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists (a name too long to look up counts as missing)."""

    def exists(p: Path) -> bool:
        try:
            return p.exists()
        except OSError:  # ENAMETOOLONG
            return False

    while not exists(path) and path != path.parent:
        path = path.parent
    return path


def _check_names(path: Path, existing: Path, flag: str, room: int = 0) -> None:
    """Refuse names in ``path`` (below the folder ``existing``) the file system cannot hold (``room``: kept free
    in the last name)."""
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer: the common limit
        name_max = 255
    parts = path.parts[len(existing.parts) :] if existing != path else ()
    for i, part in enumerate(parts):
        limit = name_max - (room if i == len(parts) - 1 else 0)
        if len(os.fsencode(part)) > limit:
            shown = part if len(part) <= 40 else part[:20] + "..." + part[-12:]
            raise RFIError(
                f"{flag} {shown}: the name is {len(os.fsencode(part))} bytes long, more than the "
                f"{limit} this file system allows: choose a shorter name"
            )


def check_output_file(path: str | os.PathLike, flag: str = "--out", need_bytes: int = 0) -> Path:
    """Make sure the file ``path`` can be written (atomically, its folder created), without writing anything.

    Args:
        path: the file a command will write.
        flag: the option's name, for messages.
        need_bytes: see :func:`check_output_folder`.

    Raises:
        RFIError: empty, an existing folder, a name too long for the file system (with room for
            its temporary name), or a folder that cannot be written (see :func:`check_output_folder`).
    """
    if not os.fspath(path):
        raise RFIError(f"{flag} is empty: name the file to write")
    path = Path(path)
    existing = _nearest_existing(path)
    if existing == path and path.is_dir():
        raise RFIError(f"{flag} {path} is a folder: name the file to write (in it or elsewhere)")
    if existing.is_dir():
        _check_names(path, existing, flag, room=TEMPORARY_NAME_ROOM)
    check_output_folder(path.parent, need_bytes, flag=f"{flag} folder")
    return path


def check_output_folder(out: str | os.PathLike, need_bytes: int = 0, flag: str = "--out") -> Path:
    """Make sure files can be written in ``out`` (created at the first write), without writing anything.

    Args:
        out: the output folder.
        need_bytes: an estimate of what will be written; refused when the disk has less free.
        flag: the option's name, for messages.

    Raises:
        RFIError: ``out`` is empty, names too long for the file system, ``out`` (or a folder above
            it) is a file, or the nearest existing folder is not writable (read-only file system,
            permissions) or lacks the free space.
    """
    if not os.fspath(out):
        raise RFIError(f"{flag} is empty: name a folder (it is created if missing)")
    out = Path(out)
    existing = _nearest_existing(out)
    if not existing.is_dir():
        what = f"{flag} {out}" if existing == out else f"{existing} (above {flag} {out})"
        raise RFIError(f"{what} is a file, not a folder: name a folder (it is created if missing)")
    _check_names(out, existing, flag)
    try:  # a probe file, removed at once: os.access does not see read-only mounts for root
        fd, probe = tempfile.mkstemp(prefix=".rfi-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RFIError(f"cannot write to {flag} {out}: {e.strerror or e}") from None
    if need_bytes:
        free = shutil.disk_usage(existing).free
        if free < need_bytes:
            raise RFIError(f"{flag} {out}: {free / 2**20:.0f} MiB free, about {need_bytes / 2**20:.0f} MiB needed")
    return out


def plan_outputs(
    inputs: Sequence[Path], out: Path, names: Callable[[Path], Sequence[str]], protect: Iterable[Path] = ()
) -> list[list[Path]]:
    """The output paths of each input, refusing collisions and overwriting any input.

    Args:
        inputs: the input files.
        out: the output folder.
        names: file names written for one input (e.g. ``lambda p: [p.stem + ".png"]``).
        protect: other files that must not be overwritten (e.g. style images).

    Raises:
        RFIError: two inputs would write the same file, or an output is an input.
    """
    planned = [[out / name for name in names(src)] for src in inputs]
    seen: dict[Path, Path] = {}
    for src, dsts in zip(inputs, planned):
        for dst in dsts:
            key = dst.resolve()
            if key in seen:
                raise RFIError(
                    f"{seen[key]} and {src} would both be written to {dst}: rename one of them "
                    f"or use separate --out folders"
                )
            seen[key] = src
    sources = {p.resolve() for p in [*inputs, *protect]}
    clash = [dst for dsts in planned for dst in dsts if dst.resolve() in sources]
    if clash:
        raise RFIError(f"refusing to overwrite input {clash[0]}: choose an --out folder other than the inputs'")
    return planned


def partial_exit(failures: Sequence[str]) -> int:
    """The exit code of a files-in/files-out command once its outputs are written (see the module docstring).

    Args:
        failures: one message per input that failed (``"<path>: <why>"``).

    Returns:
        0 when nothing failed; else :data:`EXIT_PARTIAL`, after naming each failed input on
        stderr, one line each.
    """
    if not failures:
        return 0
    print(f"rfi: {len(failures)} input(s) failed (the others were written):", *failures, sep="\n  ", file=sys.stderr)
    return EXIT_PARTIAL


def check_finite(x: Tensor, what: str) -> Tensor:
    """Return ``x``, or raise naming ``what`` when it holds NaN or Inf."""
    if not torch.isfinite(x).all():
        raise RFIError(f"{what} holds NaN or Inf values")
    return x


class FileBatch:
    """Read images, process each, write the results: with the module's checks and exit policy.

    Args:
        inputs: image files and folders (a folder's image files, sorted, not recursive).
        out: output folder.
        names: the output file names for one input path (several for e.g. augmented views).
        protect: other input files that must never be overwritten.
        desc: progress-bar label.

    Raises:
        RFIError: (at construction, before any work) no readable inputs listed, or an output
            problem (see :func:`check_output_folder`, :func:`plan_outputs`).
    """

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike],
        out: str | os.PathLike,
        names: Callable[[Path], Sequence[str]] = lambda p: [p.stem + ".png"],
        protect: Iterable[Path] = (),
        desc: str = "images",
    ):
        self.failures: list[str] = []
        self.files: list[Path] = []
        for item in inputs:
            try:
                self.files.extend(list_images([item]))
            except RFIError as e:
                self.failures.append(str(e))
                log.error("%s", e)
        if not self.files:
            raise RFIError("no input images: " + ("; ".join(self.failures) or "none given"))
        self.out = check_output_folder(out)
        self.targets = plan_outputs(self.files, self.out, names, protect)
        self.desc = desc
        self.written: list[Path] = []

    def fail(self, src: Path, error: Exception) -> None:
        """Record that ``src`` failed (named once in the message)."""
        msg = str(error)
        self.failures.append(msg if str(src) in msg else f"{src}: {msg}")
        log.error("skipped %s", self.failures[-1])

    def write(self, image: Tensor, dst: Path, what: str) -> None:
        """Write one (3, H, W) result after checking it is finite; disk errors stop the batch."""
        check_finite(image, f"the result for {what} (is the model file corrupt?)")
        try:
            write_image(image, dst)
        except OSError as e:
            why = write_failure(e) or e.strerror or str(e)
            raise RFIError(f"cannot write {dst}: {why} ({len(self.written)} file(s) written before)") from None
        self.written.append(dst)

    def run(
        self, process: Callable[[Path, Tensor], Sequence[Tensor]], read: Callable[[Path], Tensor] = read_image
    ) -> int:
        """Process every input: ``process(path, image (3, H, W))`` returns one result per output name.

        Returns:
            The exit code (0, or :data:`EXIT_PARTIAL` with the failures on stderr).

        Raises:
            RFIError: nothing could be processed, or an output could not be written.
        """
        for src, dsts in progress(list(zip(self.files, self.targets)), desc=self.desc, unit="img"):
            try:
                image = check_finite(read(src), str(src))
                results = [
                    check_finite(r.detach().cpu(), f"the result for {src} (is the model file corrupt?)")
                    for r in process(src, image)
                ]
            except RFIError as e:
                self.fail(src, e)
                continue
            for result, dst in zip(results, dsts):
                self.write(result, dst, str(src))
        return self.finish()

    def finish(self) -> int:
        """Say what was written and return the exit code (see the module docstring)."""
        if not self.written:
            raise RFIError(f"no output written: all {len(self.failures)} input(s) failed: " + "; ".join(self.failures))
        log.info("wrote %d file(s) to %s", len(self.written), self.out)
        return partial_exit(self.failures)
