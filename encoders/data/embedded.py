"""The embedded photos: the labelled "which photo" crops every default job trains on.

The **embedded default** needs no download: real photographs that ship inside
scikit-image's wheel. Each photo is resized to a short side of 384 px and split by
*region* along its longer axis: the first two thirds give training crops, the last third
validation crops, so no validation pixel is ever seen in training. The labelled task is
"which photo does this crop come from" (8 classes).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from encoders.core.errors import RFIError

EMBEDDED_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
EMBEDDED_TEXTURES = ("brick", "grass", "gravel")
TRAIN_FRACTION = 2 / 3
Split = Literal["train", "val"]


@functools.cache
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
        img = F.interpolate(
            img[None], size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp(0, 1)
    return img.contiguous()


def region(image: Tensor, split: Split) -> Tensor:
    """The training (first 2/3) or validation (last 1/3) region of an image, along its longer axis."""
    if split not in ("train", "val"):
        raise RFIError(f"split must be 'train' or 'val', got {split!r}")
    axis = 2 if image.shape[2] >= image.shape[1] else 1
    cut = int(image.shape[axis] * TRAIN_FRACTION)
    return image.narrow(axis, 0, cut) if split == "train" else image.narrow(axis, cut, image.shape[axis] - cut)


class LabelledDataset(Dataset):
    """A dataset whose ``classes`` list names its labels (``num_classes`` is their number)."""

    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class EmbeddedCrops(LabelledDataset):
    """Deterministic square crops of the embedded photos, labelled by photo.

    Args:
        split: ``train`` or ``val`` (disjoint regions of each photo).
        size: crop side in pixels (validation regions allow up to 128).
        num: number of crops, balanced over the photos.
        seed: crop positions are a pure function of (split, size, num, seed).
        photos: which embedded images to use (default: the 8 colour photos).

    Shape: items are ``(image (3, size, size) in [0, 1], label int)``.
    """

    def __init__(
        self,
        split: Split = "train",
        size: int = 32,
        num: int = 12000,
        seed: int = 0,
        photos: tuple[str, ...] = EMBEDDED_PHOTOS,
    ):
        self.split, self.size = split, size
        self.classes = list(photos)
        self.regions = [region(embedded_image(p), split) for p in photos]
        for name, r in zip(photos, self.regions):
            if min(r.shape[1:]) < size:
                raise RFIError(
                    f"crop size {size} is larger than the {split} region of '{name}' ({r.shape[1]}x{r.shape[2]})"
                )
        g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
        labels = torch.arange(num) % len(photos)
        u = torch.rand(num, 2, generator=g)
        limits = torch.tensor([[r.shape[1] - size + 1, r.shape[2] - size + 1] for r in self.regions])
        self.labels = labels
        self.positions = (u * limits[labels]).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        label = int(self.labels[i])
        top, left = self.positions[i].tolist()
        return self.regions[label][:, top : top + self.size, left : left + self.size].clone(), label
