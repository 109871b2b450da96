"""Per-image reconstruction metrics: PSNR, SSIM and LPIPS.

All take two batches of images in [0, 1] of the same shape and return one value per image,
so callers can average, take medians or pick examples. SSIM is kornia's (Gaussian 11x11
window, sigma 1.5, border windows excluded), which equals scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)`` averaged over channels.

Example:
    >>> x = torch.rand(2, 3, 32, 32)
    >>> y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    >>> psnr(x, y).shape, ssim(x, y).shape
    (torch.Size([2]), torch.Size([2]))
"""

from __future__ import annotations

import kornia
import torch
from torch import Tensor

from encoders.core.errors import RFIError

SSIM_WINDOW = 11
MAX_PSNR = 100.0


def _check_pair(x: Tensor, y: Tensor, min_size: int = 1) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise RFIError(
            f"metrics need two (B, C, H, W) batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < min_size:
        raise RFIError(
            f"images of {x.shape[-2]}x{x.shape[-1]} px are too small for this metric (need at least {min_size} px)"
        )


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB, per image (peak value 1).

    Hand-written (one line) because ``kornia.metrics.psnr`` averages the error over the
    whole batch and so gives a single number. Identical images give :data:`MAX_PSNR`.

    Args:
        x: images (B, C, H, W) in [0, 1].
        y: images of the same shape.

    Returns:
        Tensor (B,) of PSNR values in dB (higher is better).
    """
    _check_pair(x, y)
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(10 ** (-MAX_PSNR / 10)))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity, per image (kornia, 11x11 Gaussian window, valid windows only).

    Args:
        x: images (B, C, H, W) in [0, 1], H and W at least 11.
        y: images of the same shape.

    Returns:
        Tensor (B,) in [-1, 1] (1 = identical).
    """
    _check_pair(x, y, SSIM_WINDOW)
    return kornia.metrics.ssim(x.float(), y.float(), SSIM_WINDOW, max_val=1.0, padding="valid").mean((1, 2, 3))


@torch.no_grad()
def lpips_distance(x: Tensor, y: Tensor, model, batch_size: int = 32) -> Tensor:
    """LPIPS perceptual distance, per image (lower is better).

    Args:
        x: images (B, 3, H, W) in [0, 1].
        y: images of the same shape.
        model: an ``lpips.LPIPS`` module, e.g. from :func:`inversion.perceptual.load_lpips`.
        batch_size: images per forward pass.

    Returns:
        Tensor (B,) of distances (0 = identical).
    """
    _check_pair(x, y)
    device = next(model.parameters()).device
    out = [
        model(a.to(device).float(), b.to(device).float(), normalize=True).flatten()
        for a, b in zip(x.split(batch_size), y.split(batch_size))
    ]
    return torch.cat(out).cpu()
