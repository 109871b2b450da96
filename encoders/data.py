"""Datasets shared by every job: the embedded photos, image folders and CIFAR-10.

The **embedded default** needs no download: real photographs that ship inside
scikit-image's wheel. Each photo is resized to a short side of 384 px and split by
*region* along its longer axis: the first two thirds give training crops, the last third
validation crops, so no validation pixel is ever seen in training. The labelled task is
"which photo does this crop come from" (8 classes).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from encoders.errors import RFIError
from encoders.imageio import IMAGE_EXTENSIONS, read_image

EMBEDDED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                   "immunohistochemistry", "retina", "stereo_motorcycle")
EMBEDDED_TEXTURES = ("brick", "grass", "gravel")
TRAIN_FRACTION = 2 / 3
Split = Literal["train", "val"]


@functools.lru_cache(maxsize=None)
def embedded_image(name: str, short_side: int = 384) -> Tensor:
    """One of scikit-image's shipped images as (3, H, W) in [0, 1], short side resized to ``short_side``."""
    import skimage.data

    if name not in EMBEDDED_PHOTOS + EMBEDDED_TEXTURES:
        raise RFIError(f"unknown embedded image '{name}' (valid: {', '.join(EMBEDDED_PHOTOS + EMBEDDED_TEXTURES)})")
    arr = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        arr = arr[0]  # (left, right, disparity): the left view
    img = torch.from_numpy(arr.copy()).float().div(255)
    img = img.unsqueeze(0).expand(3, -1, -1) if img.dim() == 2 else img.permute(2, 0, 1)[:3]
    h, w = img.shape[1:]
    scale = short_side / min(h, w)
    if scale != 1:
        img = F.interpolate(img[None], size=(round(h * scale), round(w * scale)), mode="bilinear",
                            antialias=True, align_corners=False)[0].clamp(0, 1)
    return img.contiguous()


def region(image: Tensor, split: Split) -> Tensor:
    """The training (first 2/3) or validation (last 1/3) region of an image, along its longer axis."""
    if split not in ("train", "val"):
        raise RFIError(f"split must be 'train' or 'val', got {split!r}")
    axis = 2 if image.shape[2] >= image.shape[1] else 1
    cut = int(image.shape[axis] * TRAIN_FRACTION)
    return image.narrow(axis, 0, cut) if split == "train" else image.narrow(axis, cut, image.shape[axis] - cut)


class EmbeddedCrops(Dataset):
    """Deterministic square crops of the embedded photos, labelled by photo.

    Args:
        split: ``train`` or ``val`` (disjoint regions of each photo).
        size: crop side in pixels (validation regions allow up to 128).
        num: number of crops, balanced over the photos.
        seed: crop positions are a pure function of (split, size, num, seed).
        photos: which embedded images to use (default: the 8 colour photos).

    Shape: items are ``(image (3, size, size) in [0, 1], label int)``.
    """

    def __init__(self, split: Split = "train", size: int = 32, num: int = 12000, seed: int = 0,
                 photos: tuple[str, ...] = EMBEDDED_PHOTOS):
        self.split, self.size = split, size
        self.classes = list(photos)
        self.regions = [region(embedded_image(p), split) for p in photos]
        for name, r in zip(photos, self.regions):
            if min(r.shape[1:]) < size:
                raise RFIError(f"crop size {size} is larger than the {split} region of '{name}' "
                               f"({r.shape[1]}x{r.shape[2]})")
        g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
        labels = torch.arange(num) % len(photos)
        u = torch.rand(num, 2, generator=g)
        limits = torch.tensor([[r.shape[1] - size + 1, r.shape[2] - size + 1] for r in self.regions])
        self.labels = labels
        self.positions = (u * limits[labels]).long()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        label = int(self.labels[i])
        top, left = self.positions[i].tolist()
        return self.regions[label][:, top:top + self.size, left:left + self.size].clone(), label


class ImageFiles(Dataset):
    """Images from a folder: class sub-folders (ImageNet style) or a flat folder (label 0).

    A folder with ``train/`` and ``val/`` sub-folders uses them as the splits; otherwise
    every fifth file (sorted by path) is held out for validation.

    Args:
        root: the folder.
        split: ``train`` (random resized crops + flips) or ``val`` (resize + centre crop).
        size: output side in pixels.
        resize: resize each image's short side to this first (default: ``size`` for ``val``).
        crop: ``resized`` (train: random-resized crops, scale 0.35-1) or ``random`` (train:
            plain random crops at the image's (resized) scale, e.g. for textures whose
            scale matters, as in anomaly detection).
        repeat: the train split lists every image this many times (more random crops per
            epoch from a small folder).
    """

    def __init__(self, root: str | os.PathLike, split: Split = "train", size: int = 32,
                 resize: int | None = None, crop: str = "resized", repeat: int = 1):
        root = Path(root)
        if not root.is_dir():
            raise RFIError(f"image folder not found: {root}")
        holdout = not ((root / "train").is_dir() and (root / "val").is_dir())
        if not holdout:
            root = root / split
        self.root = root
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if classes:
            items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
                     if f.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            classes = [root.name]
            items = [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not items:
            raise RFIError(f"no image files in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if holdout:
            items = [it for j, it in enumerate(items) if (j % 5 == 4) == (split == "val")]
            if not items:
                raise RFIError(f"{root}: too few images to hold out a validation split")
        if repeat < 1:
            raise RFIError(f"repeat must be >= 1, got {repeat}")
        self.items, self.classes = items * (repeat if split == "train" else 1), classes
        if crop not in ("resized", "random"):
            raise RFIError(f"unknown crop mode '{crop}' (valid: resized, random)")
        pre = [v2.Resize(resize, antialias=True)] if resize else []
        if split == "val":
            self.transform = v2.Compose([*(pre or [v2.Resize(size, antialias=True)]), v2.CenterCrop(size)])
        elif crop == "random":
            self.transform = v2.Compose([*pre, v2.RandomCrop(size, pad_if_needed=True, padding_mode="reflect"),
                                         v2.RandomHorizontalFlip()])
        else:
            self.transform = v2.Compose([*pre, v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
                                         v2.RandomHorizontalFlip()])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        return self.transform(read_image(path)).clamp(0, 1), label


def cifar10(root: str | os.PathLike, split: Split = "train", download: bool = False) -> Dataset:
    """torchvision's CIFAR-10 as (3, 32, 32) tensors in [0, 1]; never downloads unless asked."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=split == "train", download=download,
                     transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    except RuntimeError:
        raise RFIError(f"CIFAR-10 not found under {root}: download "
                       f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there "
                       f"(or set data.download=true where the machine is online)") from None
    ds.num_classes = 10
    return ds


@dataclass
class DataConfig:
    """Where a job's images come from (the ``data:`` section of a config).

    ``source``: ``embedded`` (default, no download), ``folder`` (``root`` = image folder)
    or ``cifar10`` (``root`` = its folder). ``size``: crop side. ``train_crops`` /
    ``val_crops``: number of embedded crops. ``seed``: embedded crop positions.
    ``resize`` / ``crop`` / ``repeat`` (``folder`` only): see :class:`ImageFiles`.
    """

    source: str = "embedded"
    root: str | None = None
    size: int = 32
    train_crops: int = 12000
    val_crops: int = 1000
    seed: int = 0
    download: bool = False
    resize: int | None = None
    crop: str = "resized"
    repeat: int = 1


def build_dataset(cfg: DataConfig, split: Split = "train", size: int | None = None) -> Dataset:
    """The dataset a :class:`DataConfig` names, for one split (``size`` overrides ``cfg.size``)."""
    size = size or cfg.size
    if cfg.source == "embedded":
        return EmbeddedCrops(split, size, cfg.train_crops if split == "train" else cfg.val_crops, cfg.seed)
    if cfg.source in ("folder", "cifar10") and not cfg.root:
        raise RFIError(f"data.source={cfg.source} needs data.root (the folder)")
    if cfg.source == "folder":
        return ImageFiles(cfg.root, split, size, resize=cfg.resize, crop=cfg.crop, repeat=cfg.repeat)
    if cfg.source == "cifar10":
        return cifar10(cfg.root, split, cfg.download)
    raise RFIError(f"unknown data.source '{cfg.source}' (valid: embedded, folder, cifar10)")
