"""PASCAL VOC semantic segmentation, read from its folder layout, and class-index PNGs (read and write).

The layout (VOC2012's ``VOCdevkit/VOC2012`` folder, or any tree built like it)::

    <root>/JPEGImages/<id>.jpg                    the photos
    <root>/SegmentationClass/<id>.png             palette PNGs: pixel value = class index, 255 = ignore
    <root>/ImageSets/Segmentation/train.txt       one <id> per line (val.txt: the validation split)

A label PNG is a palette ("P") image whose pixel values are class indices (the palette only
colours them; :func:`voc_palette` is VOC's) or a grey ("L") image of class indices.
:data:`IGNORE_INDEX` (255: VOC's object borders) counts in no loss and no metric.

Bad input is named and skipped, and refused when nothing is left: an id without its mask or
image, a mask that is not a class-index PNG, a mask whose size is not its image's, or a
mask with a class at or above the configured number of classes.

Example:
    >>> voc_palette()[:9]  # background black, aeroplane dark red, bicycle dark green
    [0, 0, 0, 128, 0, 0, 0, 128, 0]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.core.imageio import read_image
from encoders.core.serialization import atomic_write
from encoders.data.embedded import LabelledDataset, Split

log = logging.getLogger("rfi")

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 21 VOC classes, in label order."""
IGNORE_INDEX = 255
"""The label of pixels that count in no loss and no metric (VOC's object borders)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def voc_palette(num: int = 256) -> list[int]:
    """VOC's colour map: ``3 * num`` RGB values (class ``k`` at ``[3k, 3k + 3)``), as PIL's ``putpalette`` takes.

    Colours come from the bits of the class index (VOC devkit's ``labelcolormap``).
    """
    palette = []
    for k in range(num):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def read_label_png(path: str | os.PathLike) -> Tensor:
    """A class-index PNG (palette or grey) as (H, W) int64 class indices.

    Raises:
        RFIError: unreadable, or not a palette / grey image (e.g. an RGB rendering of the labels).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise RFIError(
                    f"{path} is not a class-index PNG (palette or grey image of class indices), but mode {img.mode}"
                )
            return torch.from_numpy(np.array(img, dtype=np.int64))
    except OSError as e:
        raise RFIError(f"cannot read label image {path}: {e}") from None


def write_label_png(labels: Tensor | np.ndarray, path: str | os.PathLike, palette: list[int] | None = None) -> Path:
    """Atomically write (H, W) class indices in [0, 255] as a palette PNG (colours: ``palette``, default VOC's).

    Example:
        >>> import tempfile
        >>> path = write_label_png(torch.tensor([[0, 1], [15, 255]]), Path(tempfile.mkdtemp()) / "m.png")
        >>> read_label_png(path).tolist()
        [[0, 1], [15, 255]]
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.ndim != 2 or arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise RFIError(f"label map for {path} must be (H, W) class indices in [0, 255], got shape {arr.shape}")
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette(palette or voc_palette())
    return atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def _image_file(folder: Path, name: str) -> Path | None:
    return next((folder / f"{name}{s}" for s in IMAGE_SUFFIXES if (folder / f"{name}{s}").is_file()), None)


class VOCSegmentation(LabelledDataset):
    """The images and masks of one split of a VOC tree (see the module docstring), checked once.

    Training items are random ``size`` crops (and horizontal flips, drawn from torch's global
    RNG); validation items the centre crop. Images smaller than ``size`` are padded (image
    with 0, mask with :data:`IGNORE_INDEX`).

    Args:
        root: the folder holding ``JPEGImages/``, ``SegmentationClass/`` and ``ImageSets/Segmentation/``.
        split: ``train`` or ``val``: the ids of ``ImageSets/Segmentation/<split>.txt``.
        size: crop side in pixels.
        num_classes: masks with a class index at or above it (other than 255) are skipped.
        resize: first resize each image (and mask, nearest) so that its shorter side is this many px.

    Shape: items are ``(image (3, size, size) float32 in [0, 1], labels (size, size) int64)``.

    Raises:
        RFIError: the root or the split file is missing, or no usable image is left.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: Split = "train",
        size: int = 256,
        num_classes: int = len(VOC_CLASSES),
        resize: int | None = None,
    ):
        self.root, self.split, self.size, self.resize = Path(root), split, size, resize
        if not self.root.is_dir():
            raise RFIError(f"VOC folder not found: {self.root} (data.root)")
        ids_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids_file.is_file():
            raise RFIError(
                f"{ids_file} is missing: a VOC tree lists its {split} images there (one id per line; "
                f"data.root={self.root})"
            )
        self.classes = list(VOC_CLASSES[:num_classes]) + [f"class_{k}" for k in range(len(VOC_CLASSES), num_classes)]
        self.items: list[tuple[Path, Path]] = []
        skipped: list[str] = []
        for name in (line.strip() for line in ids_file.read_text().splitlines()):
            if not name:
                continue
            try:
                self.items.append(self._check(name, num_classes))
            except RFIError as e:
                skipped.append(str(e))
                log.warning("skipped %s", e)
        if not self.items:
            raise RFIError(
                f"no usable image in {ids_file} ({len(skipped)} skipped{', first: ' + skipped[0] if skipped else ''})"
            )
        if skipped:
            log.warning(
                "%s: %d of %d images skipped (named above)", ids_file, len(skipped), len(skipped) + len(self.items)
            )

    def _check(self, name: str, num_classes: int) -> tuple[Path, Path]:
        """The (image, mask) files of ``name``, or a one-line :class:`RFIError` saying why it cannot be used."""
        image = _image_file(self.root / "JPEGImages", name)
        mask = self.root / "SegmentationClass" / f"{name}.png"
        if image is None:
            raise RFIError(f"{self.root / 'JPEGImages' / name}.jpg: image missing")
        if not mask.is_file():
            raise RFIError(f"{image}: its mask {mask} is missing")
        labels = read_label_png(mask)
        with Image.open(image) as img:
            if img.size != (labels.shape[1], labels.shape[0]):
                raise RFIError(f"{mask} is {labels.shape[1]}x{labels.shape[0]}, its image {img.size[0]}x{img.size[1]}")
        bad = labels[(labels >= num_classes) & (labels != IGNORE_INDEX)]
        if bad.numel():
            raise RFIError(
                f"{mask} has class {int(bad.max())}, but data.num_classes is {num_classes} "
                f"(classes 0..{num_classes - 1}, {IGNORE_INDEX} = ignore)"
            )
        return image, mask

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.items[i]
        image, labels = read_image(image_path), read_label_png(mask_path)
        if self.resize:
            h, w = labels.shape
            scale = self.resize / min(h, w)
            shape = (max(1, round(h * scale)), max(1, round(w * scale)))
            image = F.interpolate(image[None], size=shape, mode="bilinear", antialias=True, align_corners=False)[
                0
            ].clamp(0, 1)
            labels = F.interpolate(labels[None, None].float(), size=shape, mode="nearest")[0, 0].long()
        pad_h, pad_w = max(0, self.size - labels.shape[0]), max(0, self.size - labels.shape[1])
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
            labels = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        h, w = labels.shape
        if self.split == "train":
            top, left = int(torch.randint(h - self.size + 1, ())), int(torch.randint(w - self.size + 1, ()))
        else:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        image = image[:, top : top + self.size, left : left + self.size]
        labels = labels[top : top + self.size, left : left + self.size]
        if self.split == "train" and bool(torch.rand(()) < 0.5):
            image, labels = image.flip(-1), labels.flip(-1)
        return image.contiguous(), labels.contiguous()
