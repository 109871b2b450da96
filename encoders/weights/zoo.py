"""A model zoo: the public checkpoints users of this field expect, fetched on request only.

Each :class:`ZooEntry` names a file by its URL, the file name it gets in the torch hub
cache (``torch.hub.get_dir()/checkpoints/``, where ``torch.hub`` and torchvision put
their downloads too) and how its content is checked:

- **torchvision** files carry the first hex digits of their SHA-256 in the file name
  (``alexnet-owt-7be5be79.pth``); that prefix is checked on every fetch and every
  :func:`resolve`, as ``torch.hub.load_state_dict_from_url(check_hash=True)`` does.
- The **robustness library**'s files (MadryLab, ``robustness`` 1.2.1 README) publish no
  hash. Their SHA-256 is recorded on first fetch (or on the first :func:`resolve` of a
  file put there by hand) in a small JSON next to the file (``<file>.sha256.json``) and
  checked on every later :func:`resolve` / :func:`fetch`: a file that changed after it
  was recorded is refused. The first copy is trusted as is (trust on first use).

:func:`fetch` downloads to a temporary file in the destination folder, with a progress
bar, checks the hash, and renames the file into place only when it matches: a bad hash
or an interrupted download leaves nothing behind. Without a network it raises
:class:`~encoders.core.errors.RFIError` with one line saying what to download and where to put
it. Nothing here runs unless asked: no test and no default job downloads.

Example:
    >>> [e.name for e in entries()][:3]
    ['imagenet_l2_3_0', 'imagenet_linf_4', 'imagenet_linf_8']
    >>> get_entry("torchvision_alexnet").filename
    'alexnet-owt-7be5be79.pth'
    >>> path = fetch("imagenet_l2_3_0")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from encoders.core.errors import RFIError

ZOO_PREFIX = "zoo:"
_CHUNK = 1 << 20
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")  # torch.hub's convention: name-<sha256 prefix>.ext
_ROBUSTNESS_README = "robustness 1.2.1 README (github.com/MadryLab/robustness), 'Pretrained models'"


@dataclass(frozen=True)
class ZooEntry:
    """One downloadable checkpoint.

    Args:
        name: what ``rfi weights fetch NAME`` takes.
        url: where it is downloaded from.
        arch: the :class:`~encoders.nets.models.Encoder` architecture its weights fit.
        dataset: what it was trained on.
        description: one line (training norm and radius, accuracy where published).
        source: where the URL (and hash) come from.
        filename: the file name in the cache (default: the URL's last path component).
        sha256: the published SHA-256 (full or a prefix of at least 6 hex digits), or
            ``None`` when none is published (then it is recorded on first fetch).
    """

    name: str
    url: str
    arch: str
    dataset: str
    description: str
    source: str
    filename: str = ""
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.filename:
            object.__setattr__(self, "filename", self.url.split("?", 1)[0].rsplit("/", 1)[-1])
        if self.sha256 is None:
            found = _HASH_IN_NAME.search(self.filename)
            if found:
                object.__setattr__(self, "sha256", found.group(1))

    @property
    def hash_check(self) -> str:
        """How the file is checked: ``published`` (a known hash or prefix) or ``recorded`` (on first fetch)."""
        return "published" if self.sha256 else "recorded"


def _robustness(name: str, url: str, dataset: str, description: str) -> ZooEntry:
    # Dropbox's share links (?dl=0) answer with an HTML page; ?dl=1 gives the file itself.
    return ZooEntry(name, url.replace("?dl=0", "?dl=1"), "resnet50", dataset, description, _ROBUSTNESS_README)


def _torchvision(name: str, enum: str, arch: str, description: str) -> ZooEntry:
    import torchvision.models as tvm

    weights = getattr(tvm, enum).IMAGENET1K_V1
    return ZooEntry(name, weights.url, arch, "imagenet", description, f"torchvision.models.{enum}.IMAGENET1K_V1")


def _build_entries() -> dict[str, ZooEntry]:
    rb = [
        _robustness(
            "imagenet_l2_3_0",
            "https://www.dropbox.com/s/knf4uimlqsi1yz8/imagenet_l2_3_0.pt?dl=0",
            "imagenet",
            "ResNet-50, L2 PGD training eps 3.0 (clean 57.90%, L2 eps 3.0: 35.16%)",
        ),
        _robustness(
            "imagenet_linf_4",
            "https://www.dropbox.com/s/axfuary2w1cnyrg/imagenet_linf_4.pt?dl=0",
            "imagenet",
            "ResNet-50, Linf PGD training eps 4/255 (clean 62.42%, Linf 4/255: 33.58%)",
        ),
        _robustness(
            "imagenet_linf_8",
            "https://www.dropbox.com/s/yxn15a9zklz3s8q/imagenet_linf_8.pt?dl=0",
            "imagenet",
            "ResNet-50, Linf PGD training eps 8/255 (clean 47.91%, Linf 8/255: 19.63%)",
        ),
        _robustness(
            "cifar_nat",
            "https://www.dropbox.com/s/yhpp4yws7sgi6lj/cifar_nat.pt?dl=0",
            "cifar10",
            "CIFAR ResNet-50, standard training (clean 95.25%)",
        ),
        _robustness(
            "cifar_l2_0_25",
            "https://www.dropbox.com/s/2qsp7pt6t7uo71w/cifar_l2_0_25.pt?dl=0",
            "cifar10",
            "CIFAR ResNet-50, L2 eps 0.25 (clean 92.77%, L2 0.25: 81.21%)",
        ),
        _robustness(
            "cifar_l2_0_5",
            "https://www.dropbox.com/s/1zazwjfzee7c8i4/cifar_l2_0_5.pt?dl=0",
            "cifar10",
            "CIFAR ResNet-50, L2 eps 0.5 (clean 90.83%, L2 0.5: 70.17%)",
        ),
        _robustness(
            "cifar_l2_1_0",
            "https://www.dropbox.com/s/s2x7thisiqxz095/cifar_l2_1_0.pt?dl=0",
            "cifar10",
            "CIFAR ResNet-50, L2 eps 1.0 (clean 81.62%, L2 1.0: 52.72%)",
        ),
        _robustness(
            "cifar_linf_8",
            "https://www.dropbox.com/s/c9qlt1lbdnu9tlo/cifar_linf_8.pt?dl=0",
            "cifar10",
            "CIFAR ResNet-50, Linf eps 8/255 (clean 87.03%, Linf 8/255: 53.49%)",
        ),
    ]
    tv = [
        _torchvision(
            "torchvision_alexnet",
            "AlexNet_Weights",
            "alexnet",
            "standard AlexNet (LPIPS 'alex' backbone; non-robust baseline)",
        ),
        _torchvision(
            "torchvision_vgg16", "VGG16_Weights", "vgg16", "standard VGG-16 (LPIPS 'vgg' backbone; non-robust baseline)"
        ),
        _torchvision(
            "torchvision_resnet50",
            "ResNet50_Weights",
            "resnet50",
            "standard ResNet-50 (the eps = 0 row of the robustness tables)",
        ),
    ]
    return {e.name: e for e in rb + tv}


ENTRIES: dict[str, ZooEntry] = _build_entries()


def entries() -> list[ZooEntry]:
    """Every entry of the zoo, in listing order."""
    return list(ENTRIES.values())


def get_entry(name: str) -> ZooEntry:
    """The entry called ``name``.

    Raises:
        RFIError: no such entry (the message lists the valid names).
    """
    name = name.removeprefix(ZOO_PREFIX)
    if name not in ENTRIES:
        raise RFIError(f"unknown model zoo name '{name}' (valid: {', '.join(ENTRIES)}; see `rfi weights list`)")
    return ENTRIES[name]


def cache_dir() -> Path:
    """The torch hub cache's checkpoint folder: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME`` moves it)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def destination(entry: ZooEntry, dest: str | os.PathLike | None = None) -> Path:
    """Where ``entry``'s file lives: ``dest/<filename>``, or the torch hub cache by default."""
    return (Path(dest) if dest is not None else cache_dir()) / entry.filename


def record_path(path: str | os.PathLike) -> Path:
    """The JSON next to a file that records its SHA-256 (``<file>.sha256.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256.json")


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, as 64 hex digits (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded(path: Path) -> str | None:
    rec = record_path(path)
    if not rec.is_file():
        return None
    try:
        value = json.loads(rec.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        raise RFIError(f"{rec} is not a valid hash record (delete it to record the file's hash again)") from None
    return str(value)


def _record(entry: ZooEntry, path: Path, digest: str) -> Path:
    from encoders.core.serialization import atomic_write  # imports torch: only when writing

    record = {
        "name": entry.name,
        "url": entry.url,
        "sha256": digest,
        "bytes": path.stat().st_size,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return atomic_write(record_path(path), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))


def _expected(entry: ZooEntry, path: Path) -> tuple[str | None, str]:
    """The hash (or prefix) a file must have, and where that hash comes from."""
    if entry.sha256:
        return entry.sha256.lower(), f"published by {entry.source}"
    recorded = _recorded(path)
    return (recorded, f"recorded in {record_path(path)}") if recorded else (None, "")


def verify(entry: ZooEntry, path: str | os.PathLike) -> str:
    """Check a local file against ``entry``'s published hash, or against its recorded hash.

    A robustness-library file without a record yet gets one (trust on first use).

    Returns:
        The file's SHA-256.

    Raises:
        RFIError: the file is missing or its hash does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise RFIError(f"{entry.name}: {path} not found ({offline_hint(entry, path.parent)})")
    digest = sha256_file(path)
    expected, where = _expected(entry, path)
    if expected is None:
        _record(entry, path, digest)
    elif not digest.startswith(expected):
        raise RFIError(
            f"{path}: SHA-256 {digest[:16]}... does not match {expected[:16]}... {where} "
            f"(a corrupt or different file: delete it and run `rfi weights fetch {entry.name}`)"
        )
    return digest


def offline_hint(entry: ZooEntry, dest: str | os.PathLike | None = None) -> str:
    """One line: what to download for ``entry`` and where to put it."""
    return f"download {entry.url} and put it at {destination(entry, dest)}"


def _download(entry: ZooEntry, tmp: str, show_progress: bool, timeout: float) -> str:
    from tqdm.auto import tqdm

    from encoders.core.runtime import progress

    digest = hashlib.sha256()
    request = urllib.request.Request(entry.url, headers={"User-Agent": "rfi-model-zoo"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as f:
        size = response.headers.get("Content-Length")
        total = int(size) if size and size.isdigit() else None
        bar = (
            progress(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name)
            if show_progress
            else tqdm(total=total, disable=True)
        )
        try:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
    return digest.hexdigest()


def fetch(
    entry: ZooEntry | str,
    dest: str | os.PathLike | None = None,
    force: bool = False,
    show_progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``entry`` (a name or a :class:`ZooEntry`) unless a verified copy is already there.

    The download goes to a temporary file in the destination folder and is renamed into
    place only after its hash matches the published one (torchvision) or the one recorded
    by an earlier fetch (``<file>.sha256.json``, kept by ``force``); with neither, its hash
    is recorded next to it.

    Args:
        entry: a zoo name (``rfi weights list``) or an entry.
        dest: destination folder (default: :func:`cache_dir`).
        force: download again even when a verified copy is present.
        show_progress: a tqdm progress bar on stderr.
        timeout: seconds to wait for the server.

    Returns:
        The path of the verified file.

    Raises:
        RFIError: unknown name; no network (one line: what to download, where to put it);
            a hash that does not match (nothing is left behind).
    """
    entry = get_entry(entry) if isinstance(entry, str) else entry
    path = destination(entry, dest)
    if path.is_file() and not force:
        verify(entry, path)
        return path
    from encoders.core.files import check_output_folder
    from encoders.core.serialization import atomic_write

    check_output_folder(path.parent, flag="--dest")  # a file in the way or a read-only place: one line
    expected, where = _expected(entry, path)  # published, or recorded by an earlier fetch (kept by --force)
    digest = ""

    def download_checked(tmp: str) -> None:  # atomic_write renames it into place only when this returns
        nonlocal digest
        try:
            digest = _download(entry, tmp, show_progress, timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise RFIError(f"could not download {entry.name} ({reason}): {offline_hint(entry, dest)}") from None
        if expected and not digest.startswith(expected):
            raise RFIError(
                f"refused {entry.url}: SHA-256 {digest[:16]}... does not match {expected[:16]}... "
                f"{where} (nothing was written)"
            )

    atomic_write(path, download_checked)
    if expected is None:
        _record(entry, path, digest)
    return path


def resolve(spec: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """A checkpoint path from a file path or a zoo name (``zoo:NAME`` or ``NAME``), verified, never downloaded.

    An existing file path is returned as is. A zoo name gives its file in the cache (or
    ``dest``), checked against its published or recorded hash on every call.

    Raises:
        RFIError: a zoo name whose file is not there (says how to fetch it), or a bad hash.
    """
    text = str(spec)
    if Path(text).is_file() or (not text.startswith(ZOO_PREFIX) and text not in ENTRIES):
        return Path(text)
    entry = get_entry(text)
    path = destination(entry, dest)
    if not path.is_file():
        raise RFIError(
            f"{entry.name} is not downloaded: run `rfi weights fetch {entry.name}`, or {offline_hint(entry, dest)}"
        )
    verify(entry, path)
    return path


def status(entry: ZooEntry, dest: str | os.PathLike | None = None) -> str:
    """``missing``, ``present`` (hash not checked yet) or ``present, hash recorded`` — without hashing."""
    path = destination(entry, dest)
    if not path.is_file():
        return "missing"
    return "present, hash recorded" if record_path(path).is_file() else "present"


def as_dict(entry: ZooEntry, dest: str | os.PathLike | None = None) -> dict:
    """The entry as a plain dict, with its destination and status (for ``rfi weights list --json``)."""
    return {
        **asdict(entry),
        "hash_check": entry.hash_check,
        "destination": str(destination(entry, dest)),
        "status": status(entry, dest),
    }
