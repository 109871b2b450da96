"""Anomaly maps to scores: Gaussian smoothing of (B, 1, H, W) maps and one score per image."""
from __future__ import annotations

import numpy as np
from torch import Tensor


def smooth(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of (B, 1, H, W) maps (kornia, reflected borders); ``sigma`` in pixels, 0 = none."""
    if sigma <= 0:
        return maps
    import kornia

    k = 2 * int(np.ceil(3 * sigma)) + 1
    k = min(k, 2 * (min(maps.shape[-2:]) // 2) - 1)  # reflect padding needs the kernel inside the image
    return kornia.filters.gaussian_blur2d(maps, (k, k), (sigma, sigma), border_type="reflect") if k >= 3 else maps


def image_scores(maps: Tensor, how: str = "topk", topk: float = 0.01) -> Tensor:
    """One score per image from (B, 1, H, W) anomaly maps: top-k mean, max or mean. Returns (B,)."""
    flat = maps.flatten(1)
    if how == "max":
        return flat.max(1).values
    if how == "mean":
        return flat.mean(1)
    k = max(1, int(round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)
