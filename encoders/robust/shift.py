"""Shift consistency and equivariance of encoders and autoencoders.

The command is ``rfi shift-consistency`` (:mod:`apps.commands.shift_consistency`).

Every image is circularly shifted by two random offsets ``a`` and ``b`` (uniform over all
offsets, as in the LPS paper) and the model sees both copies:

- **classification shift consistency**: the percentage of images whose predicted class is
  the same for both copies (100% for an LPS encoder in eval mode);
- **feature equivariance error**: ``||F(T_b x) - T_k F(T_a x)|| / ||F(T_b x)||`` at one layer,
  for the best circular shift ``k`` of the feature map (found by FFT cross-correlation,
  then measured exactly), averaged over images (0 for LPS);
- with a decoder, **reconstruction equivariance**: the largest pixel difference between
  ``D(E(T_b x))`` and ``T_{b-a} D(E(T_a x))`` per image (mean over images), and the
  percentage of images reconstructed exactly equivariantly (largest difference <= 1e-5);
  plus the reconstruction PSNR of the unshifted images.

The same figures hold for every encoder: CNNs (``downsample='lps'`` is exactly invariant)
and Swin / SwinV2 transformers (``equivariant=True`` is, see :mod:`encoders.nets.equivariant_vit`),
with their stages tapped as (B, C, H, W) maps.

Example:
    >>> from encoders import create_encoder
    >>> from encoders.data.embedded import EmbeddedCrops
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8, downsample="lps")
    >>> r = shift_consistency(enc, EmbeddedCrops("val", 16, num=8), layer="layer3")
    >>> r["consistency"], r["feature_equiv_error"] < 1e-5
    (1.0, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from encoders.core.errors import RFIError
from encoders.core.runtime import progress
from encoders.nets.models import Encoder

EXACT_TOL = 1e-5


def circular_shift(x: Tensor, offsets: Tensor) -> Tensor:
    """Roll each image by its own (dy, dx). Shape: x (B, C, H, W), offsets (B, 2) -> (B, C, H, W)."""
    return torch.stack([xi.roll((int(dy), int(dx)), dims=(1, 2)) for xi, (dy, dx) in zip(x, offsets.tolist())])


def random_offsets(n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """``n`` offsets (dy, dx) uniform over all circular shifts of a ``height`` x ``width`` image."""
    return torch.stack(
        [torch.randint(height, (n,), generator=generator), torch.randint(width, (n,), generator=generator)], dim=1
    )


def feature_equivariance_error(fa: Tensor, fb: Tensor) -> Tensor:
    """Per-image ``min_k ||fb - roll(fa, k)|| / ||fb||`` over circular shifts ``k`` of the feature map.

    The best ``k`` maximises the cross-correlation (computed with an FFT); the error at that
    ``k`` is then measured directly, so an exact match gives 0 (not FFT round-off).

    Shape: fa, fb (B, C, h, w) -> (B,).
    """
    fa, fb = fa.double(), fb.double()
    corr = torch.fft.irfft2(torch.fft.rfft2(fb) * torch.fft.rfft2(fa).conj(), s=fb.shape[-2:]).sum(1)
    best = corr.flatten(1).argmax(1)
    w = fb.shape[-1]
    offsets = torch.stack([best // w, best % w], dim=1)
    diff = (fb - circular_shift(fa, offsets)).flatten(1).norm(dim=1)
    return (diff / fb.flatten(1).norm(dim=1).clamp_min(1e-12)).float()


@torch.no_grad()
def shift_consistency(
    encoder: Encoder,
    dataset: Dataset,
    layer: str | None = None,
    reconstruct: Callable[[Tensor], Tensor] | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Shift consistency of ``encoder`` (eval mode) and, with ``reconstruct``, equivariance of an autoencoder.

    Args:
        encoder: the encoder (put in eval mode; its mode is restored).
        dataset: items ``(image (3, H, W) in [0, 1], label)``.
        layer: the layer of the feature equivariance error (default: the deepest).
        reconstruct: images -> reconstructions, e.g. ``RobustAutoencoder.reconstruct``.
        max_images: use this many images, evenly spread over the dataset (default: all).
        batch_size: images per batch.
        seed: seed of the random shifts.
        device: default: the encoder's.

    Returns:
        ``images``, ``accuracy`` (unshifted), ``consistency`` (fraction), ``layer``,
        ``feature_equiv_error``; with ``reconstruct`` also ``psnr`` (dB, unshifted),
        ``recon_equiv_error`` (mean over images of the largest pixel difference, images in
        [0, 1]) and ``recon_exact`` (fraction of images within 1e-5).
    """
    if len(dataset) == 0:
        raise RFIError("the dataset is empty")
    layer = layer or encoder.layer_names[-1]
    encoder.check_layers([layer])
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    n = len(dataset) if max_images is None else max(1, min(max_images, len(dataset)))
    if n < len(dataset):
        dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, n).round().long().tolist())
    generator = torch.Generator().manual_seed(seed)
    was_training = encoder.training
    encoder.eval()
    sums = {"correct": 0.0, "consistent": 0.0, "feature": 0.0, "psnr": 0.0, "recon": 0.0, "exact": 0.0}
    for x, y in progress(DataLoader(dataset, batch_size=batch_size), desc="shift consistency"):
        a = random_offsets(x.shape[0], x.shape[-2], x.shape[-1], generator)
        b = random_offsets(x.shape[0], x.shape[-2], x.shape[-1], generator)
        x, y = x.to(device), y.to(device)
        xa, xb = circular_shift(x, a), circular_shift(x, b)
        sums["correct"] += (encoder.logits(x).argmax(1) == y).sum().item()
        sums["consistent"] += (encoder.logits(xa).argmax(1) == encoder.logits(xb).argmax(1)).sum().item()
        fa, fb = encoder(xa, layers=[layer])[layer], encoder(xb, layers=[layer])[layer]
        sums["feature"] += feature_equivariance_error(fa, fb).sum().item()
        if reconstruct is not None:
            # PSNR with peak 1, written out: encoders sit below inversion (and its metrics) in the layering
            mse = (reconstruct(x).clamp(0, 1) - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            sums["psnr"] += (-10 * torch.log10(mse)).sum().item()
            ra, rb = reconstruct(xa), reconstruct(xb)
            err = (rb - circular_shift(ra, b - a)).abs().flatten(1).amax(1)
            sums["recon"] += err.sum().item()
            sums["exact"] += (err <= EXACT_TOL).sum().item()
    encoder.train(was_training)
    result = {
        "images": n,
        "accuracy": sums["correct"] / n,
        "consistency": sums["consistent"] / n,
        "layer": layer,
        "feature_equiv_error": sums["feature"] / n,
    }
    if reconstruct is not None:
        result.update(psnr=sums["psnr"] / n, recon_equiv_error=sums["recon"] / n, recon_exact=sums["exact"] / n)
    return result


def format_table(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """Results of :func:`shift_consistency` (one row per model) as a text table."""
    recon = any("psnr" in r for r in rows)
    width = max([5, *map(len, names)])
    head = f"{'model':<{width}} {'images':>6} {'acc':>6} {'consistency':>11} {'layer':>8} {'feat. equiv err':>15}"
    if recon:
        head += f" {'PSNR dB':>7} {'recon equiv err':>15} {'exact':>6}"
    lines = [head, "-" * len(head)]
    for name, r in zip(names, rows):
        line = (
            f"{name:<{width}} {r['images']:>6d} {100 * r['accuracy']:>5.1f}% {100 * r['consistency']:>10.1f}% "
            f"{r['layer']:>8} {r['feature_equiv_error']:>15.2e}"
        )
        if "psnr" in r:
            line += f" {r['psnr']:>7.2f} {r['recon_equiv_error']:>15.2e} {100 * r['recon_exact']:>5.1f}%"
        elif recon:
            line += f" {'-':>7} {'-':>15} {'-':>6}"
        lines.append(line)
    return "\n".join(lines)
