"""Datasets read from disk: image folders (flat or ImageNet-style class folders) and CIFAR-10.

Folder images are streamed by DataLoader workers (:func:`default_num_workers`), decoded as
8-bit pixels where the transforms allow it, with the standard ImageNet transforms or RFI's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from encoders.core.errors import RFIError
from encoders.core.imageio import HIGH_DEPTH_MODES, IMAGE_EXTENSIONS, open_image, read_image
from encoders.data.embedded import LabelledDataset, Split

Transforms = Literal["rfi", "imagenet"]
Decode = Literal["float", "uint8"]
Crop = Literal["resized", "random"]
TRANSFORMS, DECODES, CROPS = get_args(Transforms), get_args(Decode), get_args(Crop)
IMAGENET_RESIZE_RATIO = 256 / 224  # evaluation: resize the short side to 256, centre-crop 224


def default_num_workers(streamed: bool = True) -> int:
    """DataLoader worker processes for a dataset: ``min(8, cpus - 1)`` for files streamed from disk, else 0.

    ``$RFI_NUM_WORKERS`` overrides it (tests set 0). In-memory datasets (the embedded crops,
    CIFAR-10) gain nothing from workers, so they get 0 and their results stay as they were.

    Example:
        >>> default_num_workers(streamed=False)
        0
    """
    env = os.environ.get("RFI_NUM_WORKERS")
    if env is not None and env.strip():
        try:
            return max(0, int(env))
        except ValueError:
            raise RFIError(f"RFI_NUM_WORKERS must be an integer, got {env!r}") from None
    if not streamed:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


def resolve_num_workers(value: int | None, dataset: Dataset) -> int:
    """``value`` if given (>= 0), else :func:`default_num_workers` for ``dataset`` (streamed if it reads files)."""
    if value is not None and value >= 0:
        return value
    return default_num_workers(streamed=bool(getattr(dataset, "streamed", False)))


def read_image_uint8(path: str | os.PathLike) -> Tensor:
    """Decode an image file to a (3, H, W) uint8 RGB tensor (PIL; no float conversion).

    8-bit files are decoded exactly as :func:`encoders.core.imageio.read_image` decodes them
    (``read_image(p) == read_image_uint8(p) / 255``); 16-bit and float files go through
    ``read_image`` and are rounded to 8 bits.

    Raises:
        RFIError: missing, truncated or non-image file (naming it; see :func:`~encoders.core.imageio.open_image`).
    """
    with open_image(path) as im:
        if im.mode in HIGH_DEPTH_MODES:
            return read_image(path).mul(255).round().to(torch.uint8)
        arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _sort_key(rel: str) -> list[str]:
    return rel.split(os.sep)  # the order of sorted(Path...): component by component


def scan_images(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files under ``folder`` as paths relative to it, sorted as ``sorted(Path.rglob("*"))`` sorts them.

    Uses ``os.scandir`` (no ``Path`` object per file), so a folder of a million files is
    listed in seconds and held as strings only until :class:`ImageFiles` packs them.
    """
    found: list[str] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(folder, rel_dir) if rel_dir else folder) as it:
            for e in it:
                rel = os.path.join(rel_dir, e.name) if rel_dir else e.name
                if e.is_dir():
                    if recursive:
                        stack.append(rel)
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(rel)
    found.sort(key=_sort_key)
    return found


class ImageFiles(LabelledDataset):
    """Images from a folder: class sub-folders (ImageNet style) or a flat folder (label 0), streamed from disk.

    A folder with ``train/`` and ``val/`` sub-folders uses them as the splits; otherwise
    every fifth file (sorted by path) is held out for validation.

    Nothing but the file list is held in memory, packed in two numpy arrays (relative
    paths as bytes, labels), so DataLoader worker processes share it without copying
    (no per-item Python objects whose reference counts would unshare the pages); each
    item is read, decoded and augmented in the worker that loads it.

    Args:
        root: the folder.
        split: ``train`` (random crops + flips) or ``val`` (resize + centre crop).
        size: output side in pixels.
        resize: resize each image's short side to this first (default for ``val``:
            ``size``, or ``size * 256 / 224`` with ``transforms="imagenet"``).
        crop: ``resized`` (train: random-resized crops, scale 0.35-1) or ``random`` (train:
            plain random crops at the image's (resized) scale, e.g. for textures whose
            scale matters, as in anomaly detection). ``transforms="rfi"`` only.
        repeat: the train split lists every image this many times (more random crops per
            epoch from a small folder).
        transforms: ``rfi`` (the crops above) or ``imagenet`` (the standard ImageNet
            recipe: train ``RandomResizedCrop(size)`` (scale 0.08-1, aspect 3/4-4/3) +
            horizontal flip; val ``Resize(size * 256 / 224)`` + ``CenterCrop(size)``).
        decode: ``uint8`` (decode to 8 bits, crop and resize in uint8, convert to float
            after: less work per item) or ``float`` (convert first, as RFI did before:
            bit-identical to earlier results). Default: ``uint8`` for ``imagenet``,
            ``float`` for ``rfi``.

    Shape: items are ``(image (3, size, size) float32 in [0, 1], label int)``.

    Example:
        >>> import tempfile, torch
        >>> from encoders.core.imageio import write_image
        >>> root = tempfile.mkdtemp()
        >>> for i in range(5):
        ...     _ = write_image(torch.rand(3, 40, 50), f"{root}/cat/{i}.png")
        >>> ds = ImageFiles(root, "train", 32, transforms="imagenet")
        >>> len(ds), ds[0][0].shape, ds[0][0].dtype
        (4, torch.Size([3, 32, 32]), torch.float32)
    """

    streamed = True  # read from disk item by item (see default_num_workers)

    def __init__(
        self,
        root: str | os.PathLike,
        split: Split = "train",
        size: int = 32,
        resize: int | None = None,
        crop: str = "resized",
        repeat: int = 1,
        transforms: str = "rfi",
        decode: str | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise RFIError(f"image folder not found: {root}")
        if transforms not in TRANSFORMS:
            raise RFIError(f"unknown data.transforms '{transforms}' (valid: {', '.join(TRANSFORMS)})")
        decode = decode or ("uint8" if transforms == "imagenet" else "float")
        if decode not in DECODES:
            raise RFIError(f"unknown data.decode '{decode}' (valid: {', '.join(DECODES)})")
        holdout = not ((root / "train").is_dir() and (root / "val").is_dir())
        if not holdout:
            root = root / split
        self.root = root
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        rel: list[str] = []
        labels: list[int] = []
        if classes:
            for i, c in enumerate(classes):
                files = scan_images(root / c)
                rel.extend(os.path.join(c, f) for f in files)
                labels.extend([i] * len(files))
        else:
            classes = [root.name]
            rel = scan_images(root, recursive=False)
            labels = [0] * len(rel)
        if not rel:
            raise RFIError(f"no image files in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if holdout:
            keep = [j for j in range(len(rel)) if (j % 5 == 4) == (split == "val")]
            if not keep:
                raise RFIError(f"{root}: too few images to hold out a validation split")
            rel, labels = [rel[j] for j in keep], [labels[j] for j in keep]
        if repeat < 1:
            raise RFIError(f"repeat must be >= 1, got {repeat}")
        # One contiguous buffer each: workers share these pages instead of copying a list of objects.
        self._paths = np.array([r.encode("utf-8", "surrogateescape") for r in rel], dtype=np.bytes_)
        self._labels = np.array(labels, dtype=np.int64)
        self.repeat = repeat if split == "train" else 1
        self.classes, self.split, self.size, self.decode, self.transforms = classes, split, size, decode, transforms
        if crop not in CROPS:
            raise RFIError(f"unknown crop mode '{crop}' (valid: {', '.join(CROPS)})")
        self.transform = self._build_transform(split, size, resize, crop, transforms)

    @staticmethod
    def _build_transform(split: Split, size: int, resize: int | None, crop: str, transforms: str) -> v2.Compose:
        pre = [v2.Resize(resize, antialias=True)] if resize else []
        if transforms == "imagenet":
            if split == "val":
                side = resize or round(size * IMAGENET_RESIZE_RATIO)
                return v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(size)])
            return v2.Compose([*pre, v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
        if split == "val":
            return v2.Compose([*(pre or [v2.Resize(size, antialias=True)]), v2.CenterCrop(size)])
        if crop == "random":
            return v2.Compose(
                [*pre, v2.RandomCrop(size, pad_if_needed=True, padding_mode="reflect"), v2.RandomHorizontalFlip()]
            )
        return v2.Compose(
            [*pre, v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )

    @property
    def items(self) -> list[tuple[Path, int]]:
        """``(path, label)`` of every listed file (built on demand: O(files); for inspection, not loading)."""
        return [(self.path(j), int(self._labels[j])) for j in range(len(self._paths))] * self.repeat

    def path(self, i: int) -> Path:
        """The file behind item ``i``."""
        return self.root / os.fsdecode(self._paths[i % len(self._paths)])

    def __len__(self) -> int:
        return len(self._paths) * self.repeat

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        j = i % len(self._paths)
        path = self.root / os.fsdecode(self._paths[j])
        if self.decode == "uint8":  # crop and resize 8-bit pixels, convert only the output
            return self.transform(read_image_uint8(path)).float().div(255), int(self._labels[j])
        return self.transform(read_image(path)).clamp(0, 1), int(self._labels[j])


def cifar10(root: str | os.PathLike, split: Split = "train", download: bool = False) -> Dataset:
    """torchvision's CIFAR-10 as (3, 32, 32) tensors in [0, 1]; never downloads unless asked."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(
            str(root),
            train=split == "train",
            download=download,
            transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]),
        )
    except RuntimeError:
        raise RFIError(
            f"CIFAR-10 not found under {root}: download "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there "
            f"(or set data.download=true where the machine is online)"
        ) from None
    ds.num_classes = 10
    return ds
