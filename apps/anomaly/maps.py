"""Anomaly maps, element by element: the error of a reconstruction, smoothing, one score per image, heat maps.

Every map here is a (B, 1, H, W) tensor, higher = more anomalous; the detector
(:mod:`apps.anomaly.detector`) combines them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from apps.anomaly.config import Colormap, FeatureMetric, ImageScore, PixelMetric


def pixel_error(x: Tensor, reconstruction: Tensor, metric: PixelMetric) -> Tensor:
    """Per-pixel reconstruction error, averaged over the channels: ``l1``, ``l2`` or ``ssim`` ((1 - SSIM) / 2).

    Shape:
        (B, 3, H, W), (B, 3, H, W) -> (B, 1, H, W)
    """
    if metric == "ssim":
        import kornia

        return (1 - kornia.metrics.ssim(x, reconstruction, 11, padding="same")).mean(1, keepdim=True) / 2
    if metric == "l1":
        return (x - reconstruction).abs().mean(1, keepdim=True)
    return (x - reconstruction).pow(2).mean(1, keepdim=True)


def feature_error(a: Tensor, b: Tensor, metric: FeatureMetric) -> Tensor:
    """Per-location distance of two feature maps: mean squared error (``l2``) or cosine distance (``cosine``).

    Shape:
        (B, C, h, w), (B, C, h, w) -> (B, 1, h, w)
    """
    if metric == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=1, eps=1e-6).unsqueeze(1)
    return (a - b).pow(2).mean(1, keepdim=True)


def smooth(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of (B, 1, H, W) maps (kornia, reflected borders); ``sigma`` in pixels, 0 = none."""
    if sigma <= 0:
        return maps
    import kornia

    k = 2 * int(np.ceil(3 * sigma)) + 1
    k = min(k, 2 * (min(maps.shape[-2:]) // 2) - 1)  # reflect padding needs the kernel inside the image
    return kornia.filters.gaussian_blur2d(maps, (k, k), (sigma, sigma), border_type="reflect") if k >= 3 else maps


def image_scores(maps: Tensor, how: ImageScore = "topk", topk: float = 0.01) -> Tensor:
    """One score per image from (B, 1, H, W) anomaly maps: top-k mean, max or mean. Returns (B,).

    Example:
        >>> maps = torch.zeros(1, 1, 10, 10)
        >>> maps[0, 0, 0, :2] = 4.0
        >>> image_scores(maps, "topk", 0.02).tolist(), image_scores(maps, "max").tolist()
        ([4.0], [4.0])
    """
    flat = maps.flatten(1)
    if how == "max":
        return flat.max(1).values
    if how == "mean":
        return flat.mean(1)
    k = max(1, int(round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


def overlay(image: Tensor, amap: Tensor, vmax: float, cmap: Colormap = "jet", alpha: float = 0.5) -> Tensor:
    """Heat-map overlay: ``amap`` coloured from 0 to ``vmax`` with ``cmap`` and blended onto ``image``.

    Args:
        image: (3, H, W) in [0, 1].
        amap: (H', W') or (1, H', W') anomaly map; upsampled to (H, W).
        vmax: the map value that gets the top colour (> 0).
        cmap: a matplotlib colormap.
        alpha: weight of the colours.

    Returns:
        (3, H, W) in [0, 1].
    """
    import matplotlib

    amap = amap.reshape(1, 1, *amap.shape[-2:]).float().cpu()
    if amap.shape[-2:] != image.shape[-2:]:
        amap = F.interpolate(amap, size=image.shape[-2:], mode="bilinear", align_corners=False)
    level = (amap[0, 0] / vmax).clamp(0, 1).numpy()
    colors = torch.from_numpy(matplotlib.colormaps[cmap](level)[..., :3]).permute(2, 0, 1)
    return ((1 - alpha) * image.cpu() + alpha * colors.float()).clamp(0, 1)
