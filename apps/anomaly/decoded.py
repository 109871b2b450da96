"""Normal images decoded once into a memory-mapped file, and the decoder-training crops read from it.

``rfi anomaly fit`` (:mod:`apps.anomaly.fitting`) reads every normal image through
:class:`DecodedImages`: its decoder's training and validation crops (:class:`NormalCrops`), its
memory bank and its score statistics all come from the one file, at the working resolution
(:func:`prepare_image`). The file lives in a temporary folder next to the model file
(:func:`decoding_folder`), removed however the fit ends; one left by a fit killed with ``kill -9``
is removed by the next fit next to the same model file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from encoders.core.errors import RFIError
from encoders.core.imageio import read_image
from encoders.core.runtime import progress
from encoders.core.serialization import pid_alive
from encoders.data.embedded import Split

log = logging.getLogger("rfi")


def prepare_image(image: Tensor, image_size: int | None) -> Tensor:
    """Resize a (3, H, W) image to the working resolution (short side ``image_size``; ``None``: as is)."""
    if image_size and min(image.shape[-2:]) != image_size:
        image = v2.functional.resize(image, image_size, antialias=True).clamp(0, 1)
    return image


@contextlib.contextmanager
def decoding_folder(model: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder for the decoded images of the fit that writes ``model``: ``.<stem>_decoded.<pid>.*``
    next to it.

    It is removed when the block ends, however it ends (an error, Ctrl-C, or ``kill``, which
    ``rfi`` turns into an exception). The folders of fits killed with ``kill -9`` (whose pid no
    longer runs) next to the same model file are removed first, with a log line.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> stale = d / ".brick_decoded.4206769.abc"  # above the default pid_max: a fit that was killed
        >>> stale.mkdir()
        >>> with decoding_folder(d / "brick.pt") as folder:
        ...     folder.name.startswith(f".brick_decoded.{os.getpid()}.")
        True
        >>> list(d.iterdir())
        []
    """
    model = Path(model)
    prefix = f".{model.stem}_decoded."
    for folder in model.parent.glob(prefix + "*"):
        pid = folder.name[len(prefix) :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            log.info("removing %s, left by a fit that was killed", folder)
            shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}.", dir=model.parent) as tmp:
        yield Path(tmp)


class DecodedImages:
    """Images decoded once into one memory-mapped uint8 file, at the working resolution.

    ``rfi anomaly fit`` samples its decoder-training crops, builds its memory bank and measures
    its score statistics from this file: each image file is decoded once, and a 32-px training
    crop is a view of the mapped array, not a decode. The file holds the images back to back as
    (3, H, W) uint8 (3 MiB per 1024-px image); its pages are shared by DataLoader worker
    processes and are reclaimable by the operating system.

    Images are read with :func:`~encoders.core.imageio.read_image` and resized (``image_size``: short
    side, float, antialiased: :func:`prepare_image`), then rounded to 8 bits:
    8-bit files at their stored size are kept exactly; a resized image, or a 16-bit file,
    differs from the float one by at most half a grey level.

    Args:
        paths: the image files; unreadable ones are skipped and named in the log.
        file: where to write the mapped data (the caller removes it).
        image_size: working resolution, short side in pixels (``None``: as stored).

    Example:
        >>> import tempfile
        >>> from encoders.core.imageio import write_image
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = write_image(torch.rand(3, 40, 50), d / "a.png")
        >>> cache = DecodedImages([d / "a.png", d / "missing.png"], d / "decoded.u8")
        >>> len(cache), cache.shape(0), cache.image(0).dtype
        (1, (3, 40, 50), torch.float32)
    """

    def __init__(self, paths: Sequence[Path], file: str | os.PathLike, image_size: int | None = None):
        self.file = Path(file)
        self.paths: list[Path] = []
        self._index: list[tuple[int, tuple[int, int, int]]] = []  # (byte offset, (3, H, W))
        offset = 0
        with open(self.file, "wb") as f:
            for p in progress(paths, desc="decoding images", unit="img"):
                try:
                    x = prepare_image(read_image(p), image_size)
                except RFIError as e:
                    log.warning("skipping %s", e)
                    continue
                a = x.mul(255).round().to(torch.uint8).numpy()
                f.write(a.tobytes())
                self.paths.append(Path(p))
                self._index.append((offset, tuple(a.shape)))
                offset += a.size
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}  # a worker process maps the file itself

    def shape(self, i: int) -> tuple[int, int, int]:
        """(3, H, W) of image ``i``, without reading it."""
        return self._index[i][1]

    def uint8(self, i: int) -> Tensor:
        """Image ``i`` as a (3, H, W) uint8 tensor: a view of the mapped file (copy-on-write, nothing copied)."""
        if self._data is None:
            self._data = np.memmap(self.file, dtype=np.uint8, mode="c")
        offset, shape = self._index[i]
        return torch.from_numpy(self._data[offset : offset + int(np.prod(shape))].reshape(shape))

    def image(self, i: int) -> Tensor:
        """Image ``i`` as a (3, H, W) float tensor in [0, 1] (a copy)."""
        return self.uint8(i).float().div(255)


class NormalCrops(Dataset):
    """Crops of ``size`` px at the images' own scale from a :class:`DecodedImages`: the decoder's training set.

    ``split="train"``: ``repeat`` random crops per image per epoch (random position and
    horizontal flip, as :class:`encoders.data.folders.ImageFiles` with ``crop="random"``: the same
    crops for the same torch seed). ``split="val"``: ``repeat`` fixed crops per image, their
    positions a pure function of ``seed``: validation at the training scale, not whole
    images shrunk to ``size``. Images smaller than ``size`` are padded by reflection.

    Args:
        images: the decoded images.
        indices: which of them.
        split: ``train`` or ``val``.
        size: crop side in pixels.
        repeat: crops per image.
        seed: the validation crop positions.

    Shape: items are (3, size, size) float32 in [0, 1].
    """

    def __init__(
        self, images: DecodedImages, indices: Sequence[int], split: Split, size: int, repeat: int = 1, seed: int = 0
    ):
        if split not in ("train", "val"):
            raise RFIError(f"unknown split '{split}' (valid: train, val)")
        if not indices:
            raise RFIError(f"no images for the {split} crops")
        self.images, self.indices, self.split = images, list(indices), split
        self.size, self.repeat, self.seed = size, repeat, seed
        self.transform = v2.Compose(
            [v2.RandomCrop(size, pad_if_needed=True, padding_mode="reflect"), v2.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.indices) * self.repeat

    def __getitem__(self, i: int) -> Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} crops")
        x = self.images.uint8(self.indices[i % len(self.indices)])
        if self.split == "train":
            return self.transform(x).float().div(255)
        s = self.size
        _, h, w = x.shape
        if h < s or w < s:
            x = v2.functional.pad(x, [0, 0, max(s - w, 0), max(s - h, 0)], padding_mode="reflect")
            _, h, w = x.shape
        top, left = (int(v) for v in np.random.default_rng([self.seed, i]).integers(0, [h - s + 1, w - s + 1]))
        return x[:, top : top + s, left : left + s].float().div(255)
