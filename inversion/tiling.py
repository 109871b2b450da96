"""One tiler for every image-to-image function of RFI: pad to a multiple, tile, batch, stitch.

Large images go through a function (an encoder, a decoder, a whole reconstruction, an anomaly
map) in overlapping *windows* of at most ``tile`` x ``tile`` input pixels, several windows per
call (bounded by a pixel budget). Each window keeps ``margin`` pixels of context on every side
that has a neighbour; the output of those margins is cropped away (``blend=False``) or
cross-faded with linear ramps (``blend=True``), and the rest is stitched into the result.

How the margin is chosen:

- *exact* (crop): a margin of at least the function's receptive-field radius makes every kept
  output pixel see exactly the context it sees in a whole pass, so the tiled result equals the
  whole pass (up to float summation order), provided the windows start on multiples of the
  function's total stride (``align``). :func:`receptive_radius` measures the radius from the
  gradient support of one output pixel (any architecture); :func:`conv_radius` bounds it from
  the convolutions of a decoder, whose convolutions all run at its input resolution or finer.
- *measured / blended*: a function that is not translation-equivariant (global phase choices
  of LPS, window attention of Swin) cannot be tiled exactly; a fixed margin then gives close
  results and ``blend=True`` hides the seams.

Windows are shrunk to the smallest size that keeps their number (so the extra work is about
the margins, not a rounded-up last tile), and all windows have one size so they batch.

Example:
    >>> conv = torch.nn.Conv2d(3, 3, 5, padding=2)
    >>> x = torch.rand(1, 3, 50, 70)
    >>> with torch.no_grad():
    ...     y = tiled_apply(conv, x, tile=24, margin=2)
    ...     torch.allclose(y, conv(x), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.core.errors import RFIError

TensorOrMap = Tensor | Mapping[str, Tensor]


def pad_to_multiple(x: Tensor, multiple: int, min_size: int = 0, mode: str = "reflect") -> Tensor:
    """Pad on the bottom/right to multiples of ``multiple`` that are at least ``min_size``.

    ``reflect`` falls back to ``replicate`` where the image is too small to reflect (torch's
    reflect needs the pad to be smaller than the side). Crop back with ``out[..., :h, :w]``.

    Args:
        x: images or feature maps (..., H, W).
        multiple: the sides become multiples of this (>= 1).
        min_size: and at least this many pixels.
        mode: ``reflect``, ``replicate`` or ``constant`` (zeros).

    Shape:
        (B, C, H, W) -> (B, C, H', W'), H' = the smallest multiple of ``multiple`` >= max(H, min_size).

    Example:
        >>> x = torch.arange(9.).view(1, 1, 3, 3)
        >>> pad_to_multiple(x, 4)[0, 0]
        tensor([[0., 1., 2., 1.],
                [3., 4., 5., 4.],
                [6., 7., 8., 7.],
                [3., 4., 5., 4.]])
        >>> tuple(pad_to_multiple(x, 4, min_size=8).shape)
        (1, 1, 8, 8)
    """
    if multiple < 1:
        raise RFIError(f"pad multiple must be a positive number of pixels, got {multiple}")
    h, w = x.shape[-2:]
    ph = max(math.ceil(h / multiple) * multiple, math.ceil(min_size / multiple) * multiple) - h
    pw = max(math.ceil(w / multiple) * multiple, math.ceil(min_size / multiple) * multiple) - w
    if not (ph or pw):
        return x
    if mode == "reflect" and not (ph < h and pw < w):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def tile_positions(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of ``tile``-px tiles covering ``length`` px, neighbours sharing >= ``overlap`` px.

    The fewest tiles that do it, spread evenly; starts are multiples of ``align`` when
    ``length - tile`` is (the last tile always ends at ``length``).

    Example:
        >>> tile_positions(100, 40, 8)
        [0, 30, 60]
        >>> tile_positions(96, 40, 8, align=8)
        [0, 32, 56]
    """
    if tile >= length:
        return [0]
    if overlap >= tile:
        raise RFIError(f"tile overlap ({overlap} px) must be smaller than the tile ({tile} px)")
    step = max(1, (tile - overlap) // align)  # in units of align
    span = (length - tile) / align
    n = math.ceil(span / step) + 1
    starts = sorted({align * round(i * span / (n - 1)) for i in range(n)})
    starts[-1] = length - tile
    return starts


def receptive_radius(
    fn: Callable[[Tensor], TensorOrMap],
    channels: int,
    size: int = 128,
    max_size: int = 2048,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> int:
    """Receptive-field radius of ``fn`` in input pixels, measured from the gradient support.

    The sum of one central output pixel is back-propagated to a random input (two images, so a
    dead ReLU on one path does not hide a pixel); the radius is how far the non-zero gradient
    reaches beyond the input pixels under that output pixel. The probe doubles until the
    support stays inside it (or ``max_size`` is reached: then an error).

    Args:
        fn: maps (N, channels, S, S) to a tensor or a mapping of tensors (the first is probed).
        channels: input channels of ``fn``.
        size: first probe side in pixels.
        max_size: largest probe side.

    Raises:
        RFIError: the receptive field does not fit ``max_size`` (the function is global).

    Example:
        >>> receptive_radius(torch.nn.Conv2d(1, 1, 7, padding=3), 1)
        3
    """
    while True:
        x = torch.rand(2, channels, size, size, device=device, dtype=dtype, requires_grad=True)
        with torch.enable_grad():
            y = fn(x)
            y = next(iter(y.values())) if isinstance(y, Mapping) else y
            cy, cx = y.shape[-2] // 2, y.shape[-1] // 2
            y[..., cy, cx].sum().backward()
        support = x.grad.abs().sum((0, 1)) > 0
        rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
        sy, sx = size / y.shape[-2], size / y.shape[-1]  # input pixels per output pixel
        radius = max(
            math.ceil(cy * sy) - int(rows.min()),
            int(rows.max()) - (math.ceil((cy + 1) * sy) - 1),
            math.ceil(cx * sx) - int(cols.min()),
            int(cols.max()) - (math.ceil((cx + 1) * sx) - 1),
            0,
        )
        inside = rows.min() > 0 and cols.min() > 0 and rows.max() < size - 1 and cols.max() < size - 1
        if inside:
            return radius
        if size * 2 > max_size:
            raise RFIError(f"receptive field wider than {max_size} px: this function cannot be tiled exactly")
        size *= 2


def conv_radius(module: nn.Module) -> int:
    """An upper bound of a decoder's receptive-field radius, in its input (feature) pixels.

    Every convolution adds ``(k // 2) * dilation`` pixels at its own resolution, which for a
    decoder is its input resolution or finer, so their sum bounds the radius; +1 covers
    interpolating up-samplers.

    Example:
        >>> conv_radius(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.Conv2d(1, 1, 5)))
        4
    """
    return 1 + sum((m.kernel_size[0] // 2) * m.dilation[0] for m in module.modules() if isinstance(m, nn.Conv2d))


def _ramp(size: int, start: int, end: int, device: torch.device) -> Tensor:
    """1-D blending weights: linear ramps over the first ``start`` / last ``end`` pixels, 1 elsewhere."""
    w = torch.ones(size, device=device)
    if start > 0:
        w[:start] = (torch.arange(start, device=device) + 0.5) / start
    if end > 0:
        w[size - end :] = torch.minimum(w[size - end :], (torch.arange(end, device=device).flip(0) + 0.5) / end)
    return w


def _axis(length: int, tile: int, margin: int, align: int) -> tuple[int, list[tuple[int, int, int, int, int]]]:
    """Window size and, per window along one axis: start, kept (core) interval, overlaps with
    the previous and the next window."""
    if length <= tile:
        return length, [(0, 0, length, 0, 0)]
    core = tile - 2 * margin
    if core < align:
        raise RFIError(
            f"tile of {tile} px leaves no room inside its {margin}-px margins: use a tile of at least "
            f"{2 * margin + align} px"
        )
    n = math.ceil((length - 2 * margin) / core)
    # the smallest window that keeps n windows (the work beyond the image is then only the margins)
    size = min(tile, math.ceil(math.ceil((length + 2 * margin * (n - 1)) / n) / align) * align)
    starts = tile_positions(length, size, 2 * margin, align)
    overlaps = [a + size - b for a, b in zip(starts, starts[1:])]
    cuts = [0] + [b + (o // 2 // align) * align for b, o in zip(starts[1:], overlaps)] + [length]
    before, after = [0] + overlaps, overlaps + [0]
    return size, list(zip(starts, cuts, cuts[1:], before, after))


def tiled_apply(
    fn: Callable[[TensorOrMap], TensorOrMap],
    x: TensorOrMap,
    tile: int,
    margin: int,
    align: int = 1,
    batch_pixels: int | None = None,
    blend: bool = False,
) -> TensorOrMap:
    """Apply ``fn`` to overlapping windows of ``x`` in batches and stitch the outputs.

    Args:
        fn: a fully convolutional function; its output (a tensor or a mapping of tensors) has
            the spatial size of its input times a fixed factor (e.g. 1/4 for an encoder layer of
            stride 4, 4 for its decoder), the same for every call.
        x: (B, C, H, W), or a mapping of such tensors whose sides are integer multiples of the
            first one's (skip features of a decoder): windows are cut from all at once, in
            units of the first.
        tile: window side in pixels of (the first tensor of) ``x``, margins included.
        margin: context kept around each window's core: at least the receptive-field radius
            of ``fn`` for a result equal to the whole pass (rounded up to ``align``).
        align: windows start on multiples of this (the total stride of ``fn``; exactness
            also needs H and W to be multiples of it: see :func:`pad_to_multiple`).
        batch_pixels: input pixels per call of ``fn`` (several windows of all B images);
            default: one window per call.
        blend: cross-fade neighbours with linear ramps over their overlap instead of cropping
            the margins (for functions that cannot be tiled exactly: hides seams).

    Shape:
        (B, C, H, W) -> what ``fn`` returns for the whole (B, C, H, W).

    Returns:
        The stitched output, of ``fn``'s type (tensor or mapping).

    Raises:
        RFIError: ``tile`` not larger than ``2 * margin``, or bad numbers.

    Example:
        >>> pool = torch.nn.AvgPool2d(4)
        >>> x = torch.rand(2, 3, 64, 48)
        >>> torch.allclose(tiled_apply(pool, x, tile=16, margin=0, align=4), pool(x))
        True
    """
    if tile < 1 or margin < 0 or align < 1:
        raise RFIError(
            f"tile must be >= 1 px, margin >= 0 and align >= 1; got tile={tile}, margin={margin}, align={align}"
        )
    grid = next(iter(x.values())) if isinstance(x, Mapping) else x
    h, w = grid.shape[-2:]
    margin = math.ceil(margin / align) * align
    if h <= tile and w <= tile:
        return fn(x)
    (th, rows), (tw, cols) = _axis(h, tile, margin, align), _axis(w, tile, margin, align)
    windows = [(r, c) for r in rows for c in cols]
    b = grid.shape[0]
    per_call = max(1, (batch_pixels or 0) // (b * th * tw))
    out: dict[str, Tensor] = {}
    weight: dict[str, Tensor] = {}

    def cut(t: Tensor, top: int, left: int) -> Tensor:
        r = t.shape[-1] // w
        return t[..., top * r : (top + th) * r, left * r : (left + tw) * r]

    for i in range(0, len(windows), per_call):
        group = windows[i : i + per_call]
        if isinstance(x, Mapping):
            inp: TensorOrMap = {k: torch.cat([cut(v, r[0], c[0]) for r, c in group]) for k, v in x.items()}
        else:
            inp = torch.cat([cut(x, r[0], c[0]) for r, c in group])
        res = fn(inp)
        for k, y in res.items() if isinstance(res, Mapping) else [("", res)]:
            sy, sx = y.shape[-2] / th, y.shape[-1] / tw  # output pixels per input pixel
            if k not in out:
                out[k] = y.new_zeros(b, y.shape[1], round(h * sy), round(w * sx))
                weight[k] = y.new_zeros(1, 1, *out[k].shape[-2:])
            for j, ((top, r0, r1, up, down), (left, c0, c1, lt, rt)) in enumerate(group):
                part = y[j * b : (j + 1) * b]
                if blend:  # linear ramps over the whole overlap with each neighbour
                    win = (
                        _ramp(part.shape[-2], round(up * sy), round(down * sy), y.device)[:, None]
                        * _ramp(part.shape[-1], round(lt * sx), round(rt * sx), y.device)[None, :]
                    )
                    ys = slice(round(top * sy), round(top * sy) + part.shape[-2])
                    xs = slice(round(left * sx), round(left * sx) + part.shape[-1])
                    out[k][..., ys, xs] += part * win
                    weight[k][..., ys, xs] += win
                else:
                    out[k][..., round(r0 * sy) : round(r1 * sy), round(c0 * sx) : round(c1 * sx)] = part[
                        ...,
                        round((r0 - top) * sy) : round((r1 - top) * sy),
                        round((c0 - left) * sx) : round((c1 - left) * sx),
                    ]
    if blend:
        out = {k: v / weight[k].clamp_min(1e-8) for k, v in out.items()}
    return out[""] if set(out) == {""} else out
