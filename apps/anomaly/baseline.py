"""The raw-pixel baseline: PatchCore's recipe on k x k pixel patches instead of encoder features.

Each pixel's anomaly score is the distance from its ``patch`` x ``patch`` neighbourhood of raw RGB
values (reflected at the borders) to the nearest normal patch. It is :class:`~apps.anomaly.memory.MemoryBank`
unchanged, with :class:`PixelPatches` standing in for the encoder: the same random subsample
(``memory.patches_per_image``), greedy coreset (``memory.coreset``, ``memory.projection``),
chunked ``torch.cdist`` search (``memory.chunk_mb``, ``memory.neighbours``) and smoothing
(``memory.sigma``) as ``method: memory``. What a detector gains over it is what its features add.

Example:
    >>> from apps.anomaly.config import MemoryConfig
    >>> normal = [torch.full((3, 16, 16), 0.5) for _ in range(2)]
    >>> test = torch.full((2, 3, 16, 16), 0.5)
    >>> test[1, :, 6:10, 6:10] = 1.0  # a bright square
    >>> maps = raw_pixel_maps(normal, test, patch=3, memory=MemoryConfig(coreset=0.5, sigma=0))
    >>> tuple(maps.shape), float(maps[0].max()), float(maps[1, 0, 8, 8]) > 0
    ((2, 1, 16, 16), 0.0, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from apps.anomaly.config import MemoryConfig
from apps.anomaly.memory import MemoryBank
from encoders.core.errors import RFIError

LAYER = "pixels"
"""The one "layer" of :class:`PixelPatches`."""


class PixelPatches(torch.nn.Module):
    """An encoder look-alike whose only feature map holds each pixel's raw ``patch`` x ``patch`` neighbourhood.

    Args:
        patch: odd side of the neighbourhood in pixels.

    Shape:
        ``forward(x)["pixels"]``: (B, 3, H, W) -> (B, 3 * patch**2, H, W).
    """

    layer_names = (LAYER,)

    def __init__(self, patch: int):
        super().__init__()
        if patch < 1 or patch % 2 == 0:
            raise RFIError(f"the raw-pixel patch side must be an odd number >= 1, got {patch}")
        self.patch = patch

    def check_layers(self, layers: Sequence[str]) -> list[str]:
        """``layers`` itself when it is ``["pixels"]`` (as :meth:`encoders.nets.models.Encoder.check_layers`)."""
        if list(layers) != [LAYER]:
            raise RFIError(f"raw pixel patches have the one layer '{LAYER}', not {list(layers)}")
        return [LAYER]

    def forward(self, x: Tensor, layers: Sequence[str] = (LAYER,)) -> dict[str, Tensor]:
        self.check_layers(layers)
        b, _, h, w = x.shape
        pad = self.patch // 2
        if pad >= min(h, w):
            raise RFIError(f"images of {w}x{h} px are too small for {self.patch}x{self.patch} pixel patches")
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
        return {LAYER: F.unfold(padded, self.patch).reshape(b, -1, h, w)}


@torch.no_grad()
def raw_pixel_maps(
    normal: Sequence[Tensor], test: Sequence[Tensor] | Tensor, patch: int, memory: MemoryConfig
) -> Tensor:
    """Anomaly maps of ``test`` from a memory bank of the raw pixel patches of ``normal`` (on the CPU).

    Score them as a detector's maps: :func:`apps.anomaly.maps.image_scores`, then
    :func:`apps.anomaly.metrics.image_metrics` and :func:`apps.anomaly.metrics.pixel_metrics`.

    Args:
        normal: (3, H, W) normal images in [0, 1].
        test: (3, H, W) test images in [0, 1], all of one size.
        patch: odd patch side in pixels (``patch`` x ``patch`` x 3 values per pixel).
        memory: the bank's settings, as for ``method: memory`` (``layers`` and ``pool`` are ignored:
            the features are the patches themselves).

    Returns:
        (N, 1, H, W) maps: distance to the nearest normal patch(es), smoothed by ``memory.sigma``.

    Raises:
        RFIError: no normal images, test images of several sizes, an even patch side, or a bank over
            ``memory.max_mb`` (the message says what to set).
    """
    if len({tuple(x.shape) for x in test}) > 1:
        raise RFIError("raw_pixel_maps needs test images of one size: resize them first")
    encoder = PixelPatches(patch)
    config = dataclasses.replace(memory, layers=[LAYER], pool=1)
    bank = MemoryBank.fit(encoder, normal, config, device="cpu", progress_bar=False, count=len(normal))
    return torch.cat([bank.maps(encoder, x[None].float().cpu()) for x in test])
