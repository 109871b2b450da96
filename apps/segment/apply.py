"""``rfi segment apply``: label maps of image files, as palette PNGs of class indices (and overlays)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from apps.segment.model import Segmenter
from encoders.core.errors import RFIError
from encoders.core.files import FileBatch
from encoders.data.voc import voc_palette, write_label_png

OVERLAY_ALPHA = 0.5
"""The weight of the label colours in an overlay."""


def overlay(image: Tensor, labels: Tensor, alpha: float = OVERLAY_ALPHA) -> Tensor:
    """The image blended with the palette colour of each pixel's class.

    Shape: image (3, H, W) in [0, 1], labels (H, W) -> (3, H, W) in [0, 1].

    Example:
        >>> overlay(torch.zeros(3, 1, 1), torch.tensor([[1]])).flatten().tolist()  # class 1: (128, 0, 0)
        [0.250980406999588, 0.0, 0.0]
    """
    colours = torch.tensor(voc_palette(), dtype=torch.float32).view(256, 3) / 255
    tint = colours[labels.long().cpu()].permute(2, 0, 1)
    return (1 - alpha) * image.cpu() + alpha * tint


class LabelBatch(FileBatch):
    """A :class:`~encoders.core.files.FileBatch` whose (H, W) integer results are written as palette PNGs."""

    def write(self, image: Tensor, dst: Path, what: str) -> None:
        if image.is_floating_point():
            return super().write(image, dst, what)
        try:
            write_label_png(image, dst)
        except OSError as e:
            why = e.strerror or str(e)
            raise RFIError(f"cannot write {dst}: {why} ({len(self.written)} file(s) written before)") from None
        self.written.append(dst)


def segment_files(
    model: Segmenter, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, with_overlay: bool = False
) -> int:
    """Write ``<out>/<name>.png`` (the label map: a palette PNG of class indices, VOC colours) for each input image.

    Args:
        model: a segmenter (:func:`apps.segment.model.load_segmenter`), in eval mode.
        inputs: image files and folders (a folder's image files, not recursive).
        out: output folder (created); no output may overwrite an input.
        with_overlay: also write ``<out>/<name>_overlay.png``, the image tinted with its label colours.

    Returns:
        The exit code of :mod:`encoders.core.files` (0, or 1 when some inputs failed, each named).

    Raises:
        RFIError: no readable input, or outputs that cannot be written.
    """
    batch = LabelBatch(
        inputs, out, names=lambda p: [f"{p.stem}.png"] + [f"{p.stem}_overlay.png"] * with_overlay, desc="segment"
    )
    device = next(model.parameters()).device

    def process(src: Path, image: Tensor) -> list[Tensor]:
        with torch.no_grad():
            labels = model.predict(image.unsqueeze(0).to(device))[0].cpu()
        return [labels, overlay(image, labels)] if with_overlay else [labels]

    return batch.run(process)
