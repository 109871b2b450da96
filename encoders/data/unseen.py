"""Unseen images: photographs that ship inside installed wheels and that no RFI model trains on.

Every RFI model trained on the embedded default learns from eight scikit-image photos
(:data:`encoders.data.embedded.EMBEDDED_PHOTOS`); their held-out *regions* test generalisation to new
pixels of the same scenes only. This set tests it on new scenes: the other natural images of
the installed packages (nothing is downloaded), never used by any training job.

=====================  ==========================================  =========================
name                   what                                        from
=====================  ==========================================  =========================
``china``              temple and trees, colour, 427x640           scikit-learn sample images
``flower``             flower close-up, colour, 427x640            scikit-learn sample images
``grace_hopper``       portrait, colour, 600x512                   matplotlib sample data
``camera``             cameraman, grey, 512x512                    scikit-image
``coins``              coins on a table, grey, 303x384             scikit-image
``moon``               lunar surface, grey, 512x512                scikit-image
``page``               printed page, grey, 191x384                 scikit-image
``text``               text on a photograph, grey, 172x448         scikit-image
``cell``               microscopy, grey, 660x550                   scikit-image
``clock_motion``       clock with motion blur, grey, 300x400       scikit-image
=====================  ==========================================  =========================

Grey images are converted to RGB (three equal channels). Excluded on purpose: the other view
of the stereo motorcycle (same scene as a training photo), synthetic drawings (phantom,
checkerboards, logos) and the textures used by the anomaly benchmark.

Example:
    >>> x = unseen_image("china")
    >>> tuple(x.shape), float(x.min()) >= 0, float(x.max()) <= 1
    ((3, 427, 640), True, True)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from encoders.core.errors import RFIError


def _skimage(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def _sklearn(name: str) -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / name


def _matplotlib(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


UNSEEN_IMAGES = {
    "china": (_sklearn, "china.jpg"),
    "flower": (_sklearn, "flower.jpg"),
    "grace_hopper": (_matplotlib, "grace_hopper.jpg"),
    "camera": (_skimage, "camera.png"),
    "coins": (_skimage, "coins.png"),
    "moon": (_skimage, "moon.png"),
    "page": (_skimage, "page.png"),
    "text": (_skimage, "text.png"),
    "cell": (_skimage, "cell.png"),
    "clock_motion": (_skimage, "clock_motion.png"),
}
"""Name -> (package locator, file name) of every unseen image."""


def unseen_path(name: str) -> Path:
    """The file of one unseen image inside its installed package."""
    if name not in UNSEEN_IMAGES:
        raise RFIError(f"unknown unseen image '{name}' (valid: {', '.join(UNSEEN_IMAGES)})")
    locate, file = UNSEEN_IMAGES[name]
    path = locate(file)
    if not path.is_file():
        raise RFIError(f"unseen image '{name}' is missing from the installed package ({path})")
    return path


def unseen_image(name: str) -> Tensor:
    """One unseen image as an RGB tensor (3, H, W) in [0, 1], at its native size (grey -> 3 equal channels)."""
    with Image.open(unseen_path(name)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float().div(255)


class UnseenCrops(Dataset):
    """Square crops of the unseen images, the same every time (seeded), for evaluation.

    Args:
        size: crop side in pixels (images smaller than that are skipped with their name).
        num: number of crops, spread evenly over the images.
        seed: seed of the crop positions.
        names: the images to use (default: all of :data:`UNSEEN_IMAGES`).

    Shape:
        items ``(image (3, size, size) in [0, 1], index of the source image)``.

    Example:
        >>> crops = UnseenCrops(size=64, num=20)
        >>> x, label = crops[0]
        >>> len(crops), tuple(x.shape), crops.names[label]
        (20, (3, 64, 64), 'china')
    """

    def __init__(self, size: int = 32, num: int = 500, seed: int = 0, names: list[str] | None = None):
        if size < 1 or num < 1:
            raise RFIError(f"unseen crops need size >= 1 and num >= 1, got {size} and {num}")
        images = {n: unseen_image(n) for n in (names or list(UNSEEN_IMAGES))}
        self.images = [img for img in images.values() if min(img.shape[-2:]) >= size]
        self.names = [n for n, img in images.items() if min(img.shape[-2:]) >= size]
        if not self.images:
            raise RFIError(f"no unseen image is at least {size} px on its short side")
        g = torch.Generator().manual_seed(seed)
        self.crops = []
        for i in range(num):
            k = i % len(self.images)
            h, w = self.images[k].shape[-2:]
            top = int(torch.randint(0, h - size + 1, (1,), generator=g))
            left = int(torch.randint(0, w - size + 1, (1,), generator=g))
            self.crops.append((k, top, left))
        self.size = size

    @property
    def num_classes(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        k, top, left = self.crops[i]
        return self.images[k][:, top : top + self.size, left : left + self.size], k


def unseen_folder(out: str | os.PathLike) -> Path:
    """Copy the unseen images into ``out`` as PNGs (for commands that take ``--data FOLDER``)."""
    from encoders.core.imageio import write_image

    out = Path(out)
    for name in UNSEEN_IMAGES:
        target = out / f"{name}.png"
        if not target.exists():
            write_image(unseen_image(name), target)
    return out
