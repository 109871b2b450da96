"""How well decoders invert features: :func:`evaluate_autoencoder` (``rfi evaluate``: :mod:`apps.commands.evaluate`).

Held-out images (validation crops of the embedded photos, from regions no training crop
touched, or a user folder's validation split) are reconstructed at several multiples of
the decoder's training size, and compared with PSNR, SSIM and, where its backbone
weights are present locally, LPIPS. Several autoencoders (e.g. standard vs robust
encoder) are evaluated on the same images; a grid PNG per scale shows
original | model 1 | model 2 ... with the columns labelled by the run names.

Example:
    >>> from encoders import create_encoder
    >>> from inversion import Decoder, RobustAutoencoder
    >>> enc = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
    >>> ae = RobustAutoencoder(enc, Decoder(64, stride=4, layer="layer3"))
    >>> result = evaluate_autoencoder(ae, scales=(1, 2), train_size=32, num=4)
    >>> [row["size"] for row in result["scales"]]
    [32, 64]
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from encoders.core.errors import RFIError
from encoders.core.imageio import to_uint8
from encoders.core.runtime import progress
from encoders.core.serialization import atomic_write
from encoders.data.embedded import EmbeddedCrops
from encoders.data.folders import ImageFiles
from inversion.autoencoder import RobustAutoencoder
from inversion.metrics import lpips_distance, psnr, ssim
from inversion.perceptual import load_lpips, lpips_status

log = logging.getLogger("rfi")
GRID_ROWS = 6


EMBEDDED, UNSEEN = "embedded", "unseen"


def held_out_images(
    size: int,
    num: int = 100,
    seed: int = 0,
    folder: str | os.PathLike | None = None,
    unreadable: list[str] | None = None,
) -> Tensor:
    """Held-out images of side ``size``: embedded validation crops, unseen images, or a folder's validation split.

    Args:
        size: side in pixels.
        num: how many (a folder gives at most its validation images).
        seed: crop positions of the embedded and unseen crops.
        folder: ``None`` or ``"embedded"`` (validation regions of the embedded photos),
            ``"unseen"`` (crops of images no job trains on, :mod:`encoders.data.unseen`), or an image
            folder (``train/`` + ``val/`` sub-folders, or every fifth file held out; images are
            resized (short side) and centre-cropped to ``size``). A folder's unreadable files
            and images smaller than ``size`` (which would be up-scaled into the metric) are
            named in the log and left out.
        unreadable: if given, receives ``"<path>: <why>"`` for each file of ``folder`` that could
            not be read (the files too small for ``size`` are not failures of the input and are
            only logged).

    Returns:
        Tensor (N, 3, size, size) in [0, 1].

    Raises:
        RFIError: no usable image (the message names what was left out and why).
    """
    if folder in (None, EMBEDDED):
        ds = EmbeddedCrops("val", size, num, seed)
        return torch.stack([ds[i][0] for i in range(min(num, len(ds)))])
    if folder == UNSEEN:
        from encoders.data.unseen import UnseenCrops

        ds = UnseenCrops(size, num, seed)
        return torch.stack([ds[i][0] for i in range(len(ds))])
    if not Path(folder).is_dir():
        raise RFIError(f"--data {folder}: no such folder (or {EMBEDDED} / {UNSEEN})")
    ds = ImageFiles(folder, "val", size)
    images, left_out = [], []
    for i in range(len(ds)):
        if len(images) == num:
            break
        path = ds.path(i)
        try:
            with Image.open(path) as im:
                width, height = im.size
            if min(width, height) >= size:
                images.append(ds[i][0])
            else:
                left_out.append(f"{path.name}: {width}x{height} is smaller than the {size}-px evaluation size")
        except (RFIError, OSError) as e:
            why = str(e).split(": ")[-1] if str(path) in str(e) else str(e)
            left_out.append(f"{path.name}: {why}")
            if unreadable is not None:
                unreadable.append(f"{path}: {why}")
    for note in left_out:
        log.warning("left out of the %d-px evaluation: %s", size, note)
    if not images:
        raise RFIError(
            f"no usable {size}-px validation image in {folder}"
            + (f" ({len(left_out)} left out: {'; '.join(left_out[:3])})" if left_out else "")
        )
    return torch.stack(images)


def _lpips_note(model, status: str | None) -> str:
    if model is not None:
        return "LPIPS computed"
    return f"LPIPS not computed: {status}" if status else "LPIPS not computed"


@torch.no_grad()
def _measure(
    ae: RobustAutoencoder, images: Tensor, lpips_model, batch_size: int, keep: int
) -> tuple[dict[str, Any], Tensor]:
    device = next(ae.parameters()).device
    recs = torch.cat([ae.reconstruct(b.to(device)).cpu() for b in images.split(batch_size)])
    p, s = psnr(recs, images), ssim(recs, images)
    row: dict[str, Any] = {
        "n": len(images),
        "psnr": p.mean().item(),
        "psnr_std": p.std().item() if len(p) > 1 else 0.0,
        "ssim": s.mean().item(),
        "ssim_std": s.std().item() if len(s) > 1 else 0.0,
        "lpips": None,
    }
    if lpips_model is not None:
        try:
            row["lpips"] = lpips_distance(recs, images, lpips_model, batch_size).mean().item()
        except RuntimeError:  # AlexNet's stride-4 stem and pools need about 31 px or more
            row["lpips_note"] = f"images of {images.shape[-1]} px are too small for LPIPS"
    return row, recs[:keep]


def compare_autoencoders(
    models: Mapping[str, RobustAutoencoder],
    scales: Sequence[int] = (1, 2, 4),
    train_size: int = 32,
    num: int = 100,
    seed: int = 0,
    folder: str | os.PathLike | None = None,
    lpips_model=None,
    lpips_note: str | None = None,
    batch_size: int = 16,
    grid_dir: str | os.PathLike | None = None,
    grid_rows: int = GRID_ROWS,
) -> dict[str, Any]:
    """Evaluate several autoencoders on the same held-out images at several scales.

    Args:
        models: ``{run name: autoencoder}`` (e.g. ``{"standard": ..., "robust": ...}``).
        scales: multiples of ``train_size`` to evaluate at.
        train_size: the decoders' training resolution (px).
        num: images per scale.
        seed: embedded crop positions.
        folder: evaluate on this image folder instead of the embedded crops.
        lpips_model: an ``lpips.LPIPS`` (see :func:`inversion.perceptual.load_lpips`) or ``None``.
        lpips_note: why LPIPS is missing (stored in the result when ``lpips_model`` is ``None``).
        batch_size: images per forward pass.
        grid_dir: write ``grid_<s>x.png`` (original | each model) there.
        grid_rows: images per grid.

    Returns:
        ``{"train_size", "num", "seed", "data", "lpips", "models": {name: [row per scale]},
        "grids": {scale: path}}``; a row holds ``scale, size, n, psnr, psnr_std, ssim,
        ssim_std, lpips`` (``None`` when not computed). Scales whose images do not fit the
        data (e.g. larger than the embedded validation regions) are skipped with a note
        (``"skipped": {"<s>x": why}``); the folder's files that could not be read are listed,
        once each, in ``"left_out"`` (``"<path>: <why>"``).
    """
    if not models:
        raise RFIError("nothing to evaluate: give at least one encoder/decoder pair")
    if any(int(s) < 1 for s in scales):
        raise RFIError(f"scales must be positive integers, got {list(scales)}")
    result: dict[str, Any] = {
        "train_size": train_size,
        "num": num,
        "seed": seed,
        "data": str(folder) if folder else "embedded validation crops",
        "lpips": _lpips_note(lpips_model, lpips_note),
        "models": {name: [] for name in models},
        "grids": {},
        "skipped": {},
        "left_out": [],
    }
    bar = progress(total=len(models) * len(scales), desc="evaluate")
    unreadable: list[str] = []
    for scale in scales:
        size = train_size * int(scale)
        try:
            images = held_out_images(size, num, seed, folder, unreadable)
        except RFIError as e:
            log.warning("scale %dx skipped: %s", scale, e)
            result["skipped"][f"{scale}x"] = str(e)
            bar.update(len(models))
            continue
        columns = [images[:grid_rows]]
        for name, ae in models.items():
            row, recs = _measure(ae, images, lpips_model, batch_size, grid_rows)
            result["models"][name].append({"scale": int(scale), "size": size, **row})
            columns.append(recs)
            bar.update(1)
        if grid_dir is not None:
            path = comparison_grid(columns, ["original", *models], Path(grid_dir) / f"grid_{scale}x.png")
            result["grids"][f"{scale}x"] = str(path)
    bar.close()
    result["left_out"] = sorted(set(unreadable))
    return result


def evaluate_autoencoder(
    ae: RobustAutoencoder,
    scales: Sequence[int] = (1, 2, 4),
    train_size: int = 32,
    num: int = 100,
    seed: int = 0,
    folder: str | os.PathLike | None = None,
    lpips_model=None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """PSNR / SSIM / LPIPS of one autoencoder's reconstructions at several scales.

    Args:
        ae: the autoencoder (its first decoder is evaluated).
        scales: multiples of ``train_size``.
        train_size: the decoder's training resolution (px).
        num, seed, folder, lpips_model, batch_size: as in :func:`compare_autoencoders`.

    Returns:
        ``{"train_size", "num", "lpips", "scales": [{"scale", "size", "n", "psnr", "psnr_std",
        "ssim", "ssim_std", "lpips"}, ...]}``.
    """
    res = compare_autoencoders({"model": ae}, scales, train_size, num, seed, folder, lpips_model, batch_size=batch_size)
    return {
        "train_size": train_size,
        "num": num,
        "lpips": res["lpips"],
        "scales": res["models"]["model"],
        "skipped": res["skipped"],
    }


def comparison_grid(
    columns: Sequence[Tensor], names: Sequence[str], path: str | os.PathLike, min_side: int = 128, pad: int = 2
) -> Path:
    """A PNG grid, one row per image and one labelled column per tensor.

    Args:
        columns: tensors (B, 3, H, W) in [0, 1], same B, H, W.
        names: a label per column (drawn above it).
        path: output PNG (written atomically).
        min_side: small images are enlarged (nearest neighbour, integer factor) to at least this.
    """
    from PIL import ImageDraw, ImageFont

    if len(columns) != len(names):
        raise RFIError(f"{len(columns)} grid columns but {len(names)} names")
    h = columns[0].shape[-2]
    factor = max(1, math.ceil(min_side / h))
    tiles = torch.stack([c.detach().float().cpu().clamp(0, 1) for c in columns], dim=1).flatten(0, 1)
    if factor > 1:
        tiles = F.interpolate(tiles, scale_factor=factor, mode="nearest")
    grid = to_uint8(make_grid(tiles, nrow=len(columns), padding=pad, pad_value=1.0))
    font = ImageFont.load_default(size=14)
    header = 20
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    cell = tiles.shape[-1] + pad
    for i, name in enumerate(names):
        left, _, right, _ = draw.textbbox((0, 0), name, font=font)
        draw.text((pad + i * cell + max(0, (cell - pad - (right - left)) // 2), 3), name, fill="black", font=font)
    path = Path(path)
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def format_table(result: Mapping[str, Any]) -> str:
    """The result of :func:`compare_autoencoders` as a markdown table (one row per model and scale)."""
    lines = ["| model | scale | size | PSNR (dB) | SSIM | LPIPS |", "|---|---|---|---|---|---|"]
    for name, rows in result["models"].items():
        for r in rows:
            lp = "n/a" if r["lpips"] is None else f"{r['lpips']:.3f}"
            lines.append(
                f"| {name} | {r['scale']}x | {r['size']} | {r['psnr']:.2f} +- {r['psnr_std']:.2f} | "
                f"{r['ssim']:.3f} | {lp} |"
            )
    return "\n".join(lines)


def lpips_for(net: str = "alex", weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """``(lpips model or None, note)``: LPIPS when its backbone is here, else ``None`` and how to provide it."""
    ok, note = lpips_status(net, weights)
    if not ok:
        return None, note
    return load_lpips(net, weights, device), note
