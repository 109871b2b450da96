"""How well decoders invert features: :func:`evaluate_autoencoder` (``rfi evaluate``: :mod:`apps.commands.evaluate`).

Held-out images (validation crops of the embedded photos, from regions no training crop
touched, or a user folder's validation split) are reconstructed at several multiples of
the decoder's training size, and compared with PSNR, SSIM and, where its backbone
weights are present locally, LPIPS. The scale :data:`FULL` (``"full"``) measures the
held-out images *whole*, at their own sizes (:func:`whole_images`), one image at a time.
Several autoencoders (e.g. standard vs robust encoder) are evaluated on the same images;
a grid PNG per scale shows original | model 1 | model 2 ... with the columns labelled by
the run names.

Example:
    >>> from encoders import create_encoder
    >>> from inversion import Decoder, RobustAutoencoder
    >>> enc = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
    >>> ae = RobustAutoencoder(enc, Decoder(64, stride=4, layer="layer3"))
    >>> result = evaluate_autoencoder(ae, scales=(1, 2), train_size=32, num=4)
    >>> [row["size"] for row in result["scales"]]
    [32, 64]
    >>> whole = evaluate_autoencoder(ae, scales=("full",), num=2)["scales"][0]
    >>> whole["scale"], whole["size"], whole["n"], [im["size"] for im in whole["per_image"]]
    ('full', None, 2, [[384, 128], [384, 193]])
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from encoders.core.errors import RFIError
from encoders.core.imageio import read_image, to_uint8
from encoders.core.runtime import progress
from encoders.core.serialization import atomic_write
from encoders.data.embedded import EMBEDDED_PHOTOS, EmbeddedCrops, embedded_image, region
from encoders.data.folders import ImageFiles
from inversion.autoencoder import RobustAutoencoder
from inversion.metrics import lpips_distance, psnr, ssim
from inversion.perceptual import load_lpips, lpips_status

log = logging.getLogger("rfi")
GRID_ROWS = 6


EMBEDDED, UNSEEN = "embedded", "unseen"
FULL = "full"
"""The scale that measures the held-out images whole, at their own sizes (:func:`whole_images`)."""
THUMBNAIL = 192
"""Side (px) of the grid thumbnails of whole images (centre square, resized with antialiasing)."""


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


def whole_images(
    num: int | None = 100, folder: str | os.PathLike | None = None, unreadable: list[str] | None = None
) -> list[tuple[str, Tensor]]:
    """The held-out images whole, at their own (different) sizes: the data of the scale :data:`FULL`.

    Args:
        num: at most this many (the first ones, in a fixed order; ``None``: all).
        folder: ``None`` or ``"embedded"`` (the validation region of each embedded photo,
            :func:`encoders.data.embedded.region`: the last third along its longer axis, which no
            training crop touches), ``"unseen"`` (the images of :mod:`encoders.data.unseen`, in
            the order of :data:`~encoders.data.unseen.UNSEEN_IMAGES`) or an image folder (its
            validation split, as :func:`held_out_images` lists it; unreadable files are named in
            the log and left out).
        unreadable: if given, receives ``"<path>: <why>"`` for each file of ``folder`` that could
            not be read.

    Returns:
        ``[(name, image (3, H, W) in [0, 1]), ...]``: photo / image names, or the folder's file names.

    Raises:
        RFIError: no usable image (the message names what was left out and why).

    The scale ``"full"`` of :func:`compare_autoencoders` reads the same images one at a time
    (:func:`iter_whole_images`), so a folder of large photos is never held in memory at once.

    Example:
        >>> [(name, tuple(x.shape)) for name, x in whole_images(2, "unseen")]
        [('china', (3, 427, 640)), ('flower', (3, 427, 640))]
        >>> [(name, tuple(x.shape)) for name, x in whole_images(1)]
        [('astronaut', (3, 384, 128))]
    """
    return list(iter_whole_images(num, folder, unreadable))


def iter_whole_images(
    num: int | None = 100, folder: str | os.PathLike | None = None, unreadable: list[str] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """:func:`whole_images` read one at a time (same arguments, same images, same order).

    Raises:
        RFIError: when the source is unknown (at the first ``next``) or, once every file was
            tried, none could be read (nothing was yielded then).
    """
    if num is not None and num < 1:
        raise RFIError(f"num must be >= 1, got {num}")
    if folder in (None, EMBEDDED):
        for name in EMBEDDED_PHOTOS[:num]:
            yield name, region(embedded_image(name), "val").contiguous()
        return
    if folder == UNSEEN:
        from encoders.data.unseen import UNSEEN_IMAGES, unseen_image

        for name in list(UNSEEN_IMAGES)[:num]:
            yield name, unseen_image(name)
        return
    if not Path(folder).is_dir():
        raise RFIError(f"--data {folder}: no such folder (or {EMBEDDED} / {UNSEEN})")
    ds = ImageFiles(folder, "val")  # the file list of the validation split (no crop is applied here)
    found, left_out = 0, []
    for i in range(len(ds)):
        if found == num:
            break
        path = ds.path(i)
        try:
            image = read_image(path).clamp(0, 1)
        except (RFIError, OSError) as e:  # read_image's message starts with the path: keep the rest
            why = str(e).removeprefix(str(path)).lstrip(": ") or str(e)
            log.warning("left out of the full-size evaluation: %s: %s", path.name, why)
            left_out.append(f"{path.name}: {why}")
            if unreadable is not None:
                unreadable.append(f"{path}: {why}")
            continue
        found += 1
        yield path.name, image
    if not found:
        raise RFIError(
            f"no readable validation image in {folder}"
            + (f" ({len(left_out)} left out: {'; '.join(left_out[:3])})" if left_out else "")
        )


def thumbnail(image: Tensor, side: int = THUMBNAIL) -> Tensor:
    """The centre square of ``image`` (its short side), resized with antialiasing to ``side`` px.

    Shape:
        (3, H, W) -> (3, side, side).

    Example:
        >>> tuple(thumbnail(torch.rand(3, 300, 500)).shape)
        (3, 192, 192)
    """
    h, w = image.shape[-2:]
    short = min(h, w)
    top, left = (h - short) // 2, (w - short) // 2
    square = image[None, :, top : top + short, left : left + short].float()
    return F.interpolate(square, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


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


@torch.no_grad()
def _measure_one(ae: RobustAutoencoder, name: str, x: Tensor, lpips_model) -> tuple[dict[str, Any], Tensor]:
    """One whole image (3, H, W): ``({"name", "size", "psnr", "ssim", "lpips"}, reconstruction)``.

    :meth:`RobustAutoencoder.reconstruct` takes any size and tiles the large ones (as ``rfi invert`` does).
    """
    device = next(ae.parameters()).device
    rec = ae.reconstruct(x[None].to(device)).cpu().float()
    measured = {"name": name, "size": list(x.shape[-2:]), "psnr": psnr(rec, x[None]).item()}
    measured["ssim"] = ssim(rec, x[None]).item()
    measured["lpips"] = None
    if lpips_model is not None:
        try:
            measured["lpips"] = lpips_distance(rec, x[None], lpips_model, 1).item()
        except RuntimeError:  # AlexNet's stride-4 stem and pools need about 31 px or more
            pass
    return measured, rec[0]


def _whole_row(per_image: list[dict[str, Any]], lpips_model) -> dict[str, Any]:
    """The ``"full"`` row: means and standard deviations over the whole images, and the images' own figures."""
    lp = [r["lpips"] for r in per_image if r["lpips"] is not None]
    small = len(per_image) - len(lp) if lpips_model is not None else 0
    p = torch.tensor([r["psnr"] for r in per_image], dtype=torch.float64)
    s = torch.tensor([r["ssim"] for r in per_image], dtype=torch.float64)
    row: dict[str, Any] = {
        "n": len(per_image),
        "psnr": p.mean().item(),
        "psnr_std": p.std().item() if len(p) > 1 else 0.0,
        "ssim": s.mean().item(),
        "ssim_std": s.std().item() if len(s) > 1 else 0.0,
        "lpips": sum(lp) / len(lp) if lp else None,
    }
    if small:
        row["lpips_note"] = f"{small} of {len(per_image)} images are too small for LPIPS" + (
            " (the mean is over the others)" if lp else ""
        )
    row["per_image"] = per_image
    return row


def _check_scales(scales: Sequence[int | str]) -> None:
    for s in scales:
        if s == FULL:
            continue
        try:
            ok = int(s) >= 1 and int(s) == float(s)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise RFIError(f"scales must be positive integers or '{FULL}', got {list(scales)}")


def compare_autoencoders(
    models: Mapping[str, RobustAutoencoder],
    scales: Sequence[int | str] = (1, 2, 4),
    train_size: int | None = 32,
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
        scales: multiples of ``train_size`` to evaluate at, and/or :data:`FULL` (``"full"``): the
            held-out images whole at their own sizes (:func:`whole_images`, at most ``num``).
        train_size: the decoders' training resolution (px; ``None`` will do when every scale is ``"full"``).
        num: images per scale.
        seed: embedded crop positions.
        folder: evaluate on this image folder instead of the embedded crops.
        lpips_model: an ``lpips.LPIPS`` (see :func:`inversion.perceptual.load_lpips`) or ``None``.
        lpips_note: why LPIPS is missing (stored in the result when ``lpips_model`` is ``None``).
        batch_size: images per forward pass.
        grid_dir: write ``grid_<s>x.png`` (original | each model) there; ``grid_full.png`` shows
            thumbnails (:func:`thumbnail`) of the whole images.
        grid_rows: images per grid.

    Returns:
        ``{"train_size", "num", "seed", "data", "lpips", "models": {name: [row per scale]},
        "grids": {scale: path}}``; a row holds ``scale, size, n, psnr, psnr_std, ssim,
        ssim_std, lpips`` (``None`` when not computed). The row of :data:`FULL` has scale
        ``"full"``, size ``None``, the means and standard deviations over the whole images, LPIPS
        averaged over them, and ``per_image``: ``[{"name", "size": [H, W], "psnr", "ssim", "lpips"}, ...]``.
        Scales whose images do not fit the data (e.g. larger than the embedded validation
        regions) are skipped with a note (``"skipped": {"<s>x" or "full": why}``); the folder's
        files that could not be read are listed, once each, in ``"left_out"`` (``"<path>: <why>"``).
    """
    if not models:
        raise RFIError("nothing to evaluate: give at least one encoder/decoder pair")
    _check_scales(scales)
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
        if scale == FULL:
            _compare_whole(models, num, folder, lpips_model, grid_dir, grid_rows, result, unreadable, bar)
            continue
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


def _compare_whole(models, num, folder, lpips_model, grid_dir, grid_rows, result, unreadable, bar) -> None:
    """The :data:`FULL` scale of :func:`compare_autoencoders`: its rows, grid or skip note go into ``result``."""
    images = iter_whole_images(num, folder, unreadable)  # one in memory at a time, every model on it
    per_image: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    thumbs: list[list[Tensor]] = [[] for _ in range(len(models) + 1)]  # original | each model
    while True:
        try:
            image_name, x = next(images)
        except StopIteration:
            break
        except RFIError as e:  # nothing readable: nothing was measured
            log.warning("scale %s skipped: %s", FULL, e)
            result["skipped"][FULL] = str(e)
            bar.update(len(models))
            return
        keep = len(thumbs[0]) < grid_rows
        if keep:
            thumbs[0].append(thumbnail(x))
        for k, (name, ae) in enumerate(models.items(), 1):
            measured, rec = _measure_one(ae, image_name, x, lpips_model)
            per_image[name].append(measured)
            if keep:
                thumbs[k].append(thumbnail(rec))
    for name in models:
        result["models"][name].append({"scale": FULL, "size": None, **_whole_row(per_image[name], lpips_model)})
        bar.update(1)
    columns = [torch.stack(t) for t in thumbs]
    if grid_dir is not None:
        path = comparison_grid(columns, ["original", *models], Path(grid_dir) / f"grid_{FULL}.png")
        result["grids"][FULL] = str(path)


def evaluate_autoencoder(
    ae: RobustAutoencoder,
    scales: Sequence[int | str] = (1, 2, 4),
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
        scales: multiples of ``train_size``, and/or ``"full"`` (the held-out images whole).
        train_size: the decoder's training resolution (px).
        num, seed, folder, lpips_model, batch_size: as in :func:`compare_autoencoders`.

    Returns:
        ``{"train_size", "num", "lpips", "scales": [{"scale", "size", "n", "psnr", "psnr_std",
        "ssim", "ssim_std", "lpips"}, ...]}`` (the ``"full"`` row: see :func:`compare_autoencoders`).
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
    """The result of :func:`compare_autoencoders` as a markdown table (one row per model and scale).

    The :data:`FULL` row reads ``| full | whole (N images) |`` in the scale and size columns.

    Example:
        >>> row = {"psnr": 20.0, "psnr_std": 1.5, "ssim": 0.5, "lpips": None, "n": 3}
        >>> print(format_table({"models": {"robust": [{**row, "scale": 2, "size": 64},
        ...                                           {**row, "scale": "full", "size": None}]}}))
        | model | scale | size | PSNR (dB) | SSIM | LPIPS |
        |---|---|---|---|---|---|
        | robust | 2x | 64 | 20.00 +- 1.50 | 0.500 | n/a |
        | robust | full | whole (3 images) | 20.00 +- 1.50 | 0.500 | n/a |
    """
    lines = ["| model | scale | size | PSNR (dB) | SSIM | LPIPS |", "|---|---|---|---|---|---|"]
    for name, rows in result["models"].items():
        for r in rows:
            lp = "n/a" if r["lpips"] is None else f"{r['lpips']:.3f}"
            if r["scale"] == FULL:
                scale, size = FULL, f"whole ({r['n']} images)"
            else:
                scale, size = f"{r['scale']}x", r["size"]
            lines.append(
                f"| {name} | {scale} | {size} | {r['psnr']:.2f} +- {r['psnr_std']:.2f} | {r['ssim']:.3f} | {lp} |"
            )
    return "\n".join(lines)


def lpips_for(net: str = "alex", weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """``(lpips model or None, note)``: LPIPS when its backbone is here, else ``None`` and how to provide it."""
    ok, note = lpips_status(net, weights)
    if not ok:
        return None, note
    return load_lpips(net, weights, device), note
