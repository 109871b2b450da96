"""Reading and writing image files as tensors in [0, 1].

Grayscale, grayscale+alpha, RGBA, palette, 16-bit, 32-bit integer and float images are
converted to RGB floats in [0, 1], and each conversion is logged. High-depth images are scaled
by their mode and range (:func:`high_depth_peak`): a float image already in [0, 1] is kept as
it is, and where the range leaves the scale open (a float image above 1, an integer one at most
255) the log line says what was assumed. EXIF orientation is applied (a phone photo comes
out as a viewer shows it). A truncated or non-image file, one of more than
:func:`max_pixels` pixels (a decompression bomb) or one holding NaN/Inf raises
:class:`~encoders.core.errors.RFIError` naming the file; every reader of image files opens
them with :func:`open_image`, which does that. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.core.serialization import atomic_write

log = logging.getLogger("rfi")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
Image.MAX_IMAGE_PIXELS = None  # PIL's own bomb check is replaced by read_image's, which names the file
DEFAULT_MAX_PIXELS = 120_000_000  # 12000 x 10000; a 4000 x 3000 photo is 12 Mpx
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # PIL modes of 16-bit, integer and float grayscale


def max_pixels() -> int:
    """The largest image (in pixels) :func:`read_image` decodes: ``RFI_MAX_PIXELS`` or 120 Mpx."""
    value = os.environ.get("RFI_MAX_PIXELS", "")
    try:
        return int(value) if value else DEFAULT_MAX_PIXELS
    except ValueError:
        raise RFIError(f"RFI_MAX_PIXELS must be a whole number of pixels, got {value!r}") from None


def check_image_side(side: int | None, key: str) -> None:
    """Refuse an image size set by a flag or config key (images resized to ``side`` x ``side`` at most) that
    holds more than :func:`max_pixels` pixels, the largest image RFI reads from a file.

    Args:
        side: the side in px (``None``: images keep their size).
        key: the flag or key, for the message (e.g. ``"--size"``).

    Raises:
        RFIError: naming ``key``, the pixels and the memory one such image takes as floats.

    Example:
        >>> check_image_side(60000, "--size")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        encoders.core.errors.RFIError: --size 60000 asks for 60000x60000-px images (3600 Mpx, 43.2 GB as floats), ...
    """
    limit = max_pixels()
    if side is not None and side * side > limit:
        raise RFIError(
            f"{key} {side} asks for {side}x{side}-px images ({side * side / 1e6:.0f} Mpx, "
            f"{side * side * 3 * 4 / 1e9:.1f} GB as floats), above the limit of {limit / 1e6:.0f} Mpx: "
            f"choose a smaller {key} (or set RFI_MAX_PIXELS)"
        )


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Open an image file with PIL: decoded, EXIF orientation applied, what can go wrong as one line.

    The one place a bad image file becomes an :class:`~encoders.core.errors.RFIError` naming it: a
    missing file, a truncated or non-image file (PIL's ``UnidentifiedImageError``, ``OSError``,
    ``SyntaxError``, ``ValueError``, also when raised while the caller converts the image inside
    the ``with`` block) and one above :func:`max_pixels` (checked before decoding).

    Args:
        path: any format PIL reads.

    Yields:
        The decoded PIL image, in the file's own mode.

    Raises:
        RFIError: missing, truncated, non-image or too large file.

    Example:
        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "notes.png"
        >>> _ = bad.write_text("not an image")
        >>> with open_image(bad) as im:  # doctest: +ELLIPSIS
        ...     pass
        Traceback (most recent call last):
        encoders.core.errors.RFIError: .../notes.png is not a readable image (cannot identify image file ...)
    """
    path = Path(path)
    limit = max_pixels()
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > limit:
                raise RFIError(
                    f"{path} is {w}x{h} ({w * h / 1e6:.0f} Mpx), above the limit of {limit / 1e6:.0f} Mpx "
                    f"(a decompression bomb?); to read it anyway set RFI_MAX_PIXELS={w * h}"
                )
            im.load()
            yield ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise RFIError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RFIError(f"{path} is not a readable image ({detail})") from None


def high_depth_peak(mode: str, low: float, high: float) -> tuple[float, str]:
    """The value that stands for white in a high-depth grayscale image (:data:`HIGH_DEPTH_MODES`), and why.

    Decided by the mode and the range of the values: 16-bit modes (``I;16*``) are 0-65535; a
    float image (``F``) within [0, 1] is taken as it is; above 1, a float or 32-bit integer
    (``I``) image is taken as 0-255 when its values stay within 255, else as 0-65535, and as
    0-max beyond that. The note says which, and that it was assumed where the range leaves it open.

    Args:
        mode: the PIL mode.
        low, high: the smallest and largest pixel value.

    Returns:
        ``(peak, note)``: divide by ``peak`` for [0, 1]; ``note`` for the log line.

    Example:
        >>> high_depth_peak("F", 0.0, 0.8)
        (1.0, 'float values in [0, 1], kept as they are')
        >>> high_depth_peak("F", 0.0, 200.0)
        (255.0, 'values up to 200: assumed 0-255')
    """
    if mode.startswith("I;16"):
        peak, note = 65535.0, "16-bit, 0-65535"
    elif mode == "F" and high <= 1:
        peak, note = 1.0, "float values in [0, 1], kept as they are"
    elif high <= 255:
        peak, note = 255.0, f"values up to {high:g}: assumed 0-255"
    elif high <= 65535:
        peak, note = 65535.0, f"values up to {high:g}: assumed 0-65535"
    else:
        peak, note = high, f"values up to {high:g}: scaled by their maximum"
    if low < 0:
        note += f"; negative values (down to {low:g}) clipped to 0"
    return peak, note


def read_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as an RGB float tensor.

    Args:
        path: any format PIL reads.

    Returns:
        Tensor of shape (3, H, W), values in [0, 1].

    Raises:
        RFIError: missing, truncated or non-image file (see :func:`open_image`), or NaN/Inf pixels.
    """
    with open_image(path) as im:
        mode = im.mode
        if mode in HIGH_DEPTH_MODES:
            arr = np.asarray(im, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise RFIError(f"{path} holds NaN or Inf pixel values")
            peak, note = high_depth_peak(mode, float(arr.min(initial=0)), float(arr.max(initial=0)))
            log.info("%s: converted %s grayscale to RGB (%s)", path, mode, note)
            arr = np.clip(arr / peak, 0, 1)
            return torch.from_numpy(arr).float().unsqueeze(0).expand(3, -1, -1).contiguous()
        if mode != "RGB":
            note = {
                "L": "grayscale",
                "LA": "grayscale+alpha (alpha dropped)",
                "P": "palette",
                "PA": "palette+alpha (alpha dropped)",
                "RGBA": "RGBA (alpha dropped)",
                "1": "1-bit",
                "CMYK": "CMYK",
            }.get(mode, mode)
            log.info("%s: converted %s to RGB", path, note)
            im = im.convert("RGB")
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


def check_images(x: Any, name: str = "images", dtype: torch.dtype | None = None) -> Tensor:
    """Refuse anything but a finite, non-empty (B, 3, H, W) float batch in [0, 1].

    Args:
        x: the batch.
        name: what it is, for messages.
        dtype: convert a floating-point batch of another precision to this one (e.g. the
            model's ``float32`` for a ``float64`` batch); integer batches are refused, never rescaled.

    Returns:
        ``x`` (converted to ``dtype`` when given).

    Raises:
        RFIError: not a tensor, wrong shape, empty, integer dtype, NaN/Inf, or values outside [0, 1].

    Example:
        >>> check_images(torch.rand(2, 3, 8, 8, dtype=torch.float64), dtype=torch.float32).dtype
        torch.float32
        >>> check_images(torch.rand(3, 8, 8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        encoders.core.errors.RFIError: images must be a (B, 3, H, W) batch, got (3, 8, 8): add a batch ...
    """
    if not isinstance(x, Tensor):
        raise RFIError(
            f"{name} must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(x).__name__}"
            + (
                " (use torch.from_numpy(a).permute(2, 0, 1)[None] / 255 for an (H, W, 3) uint8 array)"
                if isinstance(x, np.ndarray)
                else ""
            )
        )
    if x.dim() != 4 or x.shape[1] != 3:
        hint = (
            ": add a batch dimension (x[None])"
            if x.dim() == 3 and x.shape[0] == 3
            else (": give 3 channels (RGB; x.expand(-1, 3, -1, -1) for grey)" if x.dim() == 4 else "")
        )
        raise RFIError(f"{name} must be a (B, 3, H, W) batch, got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise RFIError(f"{name} is empty: got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise RFIError(
            f"{name} must be floating point in [0, 1], got {x.dtype}"
            + (" (divide by 255)" if x.dtype == torch.uint8 else "")
        )
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if not torch.isfinite(x).all():
        raise RFIError(f"{name} contain NaN or Inf values")
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise RFIError(
            f"{name} must have values in [0, 1], got [{lo:.3g}, {hi:.3g}]" + (" (divide by 255)" if hi > 2 else "")
        )
    return x


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) float tensor in [0, 1] -> (H, W, 3) uint8 array."""
    if image.dim() != 3:
        raise ValueError(f"expected (C, H, W), got {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def write_image(image: Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Atomically write a (3, H, W) tensor in [0, 1] (or an (H, W[, 3]) uint8 array) as an image file."""
    arr = to_uint8(image) if isinstance(image, Tensor) else image
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format=fmt))


def list_images(paths: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expand files and folders into a sorted list of image files.

    Raises:
        RFIError: a path does not exist, or a folder holds no image files.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in (p.rglob("*") if recursive else p.iterdir())
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise RFIError(f"no image files in folder {p} (looked for {', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise RFIError(f"no such file or folder: {p}")
    return out
