"""Style transfer through a decoder pyramid (``rfi style apply``): :func:`stylize`.

The universal style transfer of Li et al. (2017, "Universal Style Transfer via Feature
Transforms"), coarse-to-fine through a decoder pyramid (:mod:`apps.style.pyramid`): starting
at the deepest layer, the current image is encoded, its features are given the style's
statistics (WCT: mean and covariance; AdaIN: channel means and standard deviations, see
:mod:`apps.style.transforms`), blended with the unmodified features by ``alpha``, and
decoded; the decoded image is re-encoded at the next shallower layer, and so on.
At every layer the image is first framed by a mirrored margin (:func:`border_margin`), so
that no feature it keeps sees the encoder's zero padding, and the statistics are measured
on the features inside the image only; the frame is cropped after decoding.
``preserve_color`` keeps the content's colours (only the luminance is transferred); several
styles mix with weights in feature space.

Example:
    >>> from encoders import create_encoder
    >>> from inversion.decoders import Decoder
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
    >>> info = enc.feature_info()
    >>> ae = RobustAutoencoder(enc, {k: Decoder(info[k][0], info[k][1], k, channels=16)
    ...                              for k in ("layer1", "layer2", "layer3")})
    >>> out = stylize(ae, torch.rand(1, 3, 37, 50), [torch.rand(3, 40, 40)], method="adain", alpha=0.8)
    >>> tuple(out.shape), bool(out.min() >= 0 and out.max() <= 1)
    ((1, 3, 37, 50), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.color
import torch
import torch.nn.functional as F
from torch import Tensor

from apps.style.transforms import METHODS, Method, blend_styles
from encoders.core.errors import RFIError
from inversion.autoencoder import RobustAutoencoder

GLOBAL_FRAME_STRIDES = 4
"""Width of the mirrored frame, in strides, for encoders with a global receptive field (see :func:`border_margin`)."""


def resize_longer(image: Tensor, size: int | None) -> Tensor:
    """Resize so the longer side is ``size`` px (antialiased bilinear); ``None`` keeps the image.

    Shape: (3, H, W) or (B, 3, H, W) -> same, with max(H', W') = size; values stay in [0, 1].
    """
    if size is None:
        return image
    if size < 1:
        raise RFIError(f"size must be a positive number of pixels, got {size}")
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    if scale == 1:
        return image
    batched = image.dim() == 4
    x = image if batched else image[None]
    x = F.interpolate(
        x,
        size=(max(1, round(h * scale)), max(1, round(w * scale))),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    ).clamp(0, 1)
    return x if batched else x[0]


def preserve_colors(stylized: Tensor, content: Tensor) -> Tensor:
    """Keep the content's colours: the luminance (Y of YCbCr) of ``stylized`` with the chroma
    (Cb, Cr) of ``content`` (the "luminance-only transfer" of Gatys et al., 2016).

    Shape: (B, 3, H, W) twice (same size) -> (B, 3, H, W), values in [0, 1].

    Example:
        >>> c, s = 0.4 + 0.2 * torch.rand(1, 3, 8, 8), 0.3 + 0.4 * torch.rand(1, 3, 8, 8)
        >>> ycbcr = kornia.color.rgb_to_ycbcr(preserve_colors(s, c))
        >>> torch.allclose(ycbcr[:, 0], kornia.color.rgb_to_ycbcr(s)[:, 0], atol=1e-4)
        True
        >>> torch.allclose(ycbcr[:, 1:], kornia.color.rgb_to_ycbcr(c)[:, 1:], atol=1e-4)
        True
    """
    luma = kornia.color.rgb_to_ycbcr(stylized)[:, :1]
    chroma = kornia.color.rgb_to_ycbcr(content)[:, 1:]
    return kornia.color.ycbcr_to_rgb(torch.cat([luma, chroma], dim=1)).clamp(0, 1)


def border_margin(ae: RobustAutoencoder, layer: str) -> int:
    """Width in pixels of the mirrored frame :func:`stylize` puts around an image before encoding it at ``layer``.

    An encoder zero-pads its convolutions at the image border (a stride-2 convolution only on
    the left and top), so its features near the border differ from any feature inside; WCT and
    AdaIN map them far from what the decoder has seen, and it draws a band along the edges.
    Inside a mirrored frame as wide as the encoder's receptive-field radius at ``layer``
    (:meth:`~inversion.autoencoder.RobustAutoencoder.margins`, measured once), rounded up to a
    whole stride, the features of the image see image content and no zeros. Encoders whose
    features depend on the whole image (the transformers) get :data:`GLOBAL_FRAME_STRIDES` strides.

    Example:
        >>> from encoders import create_encoder
        >>> from inversion.decoders import Decoder
        >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
        >>> ae = RobustAutoencoder(enc, Decoder(32, stride=4, layer="layer3"))
        >>> border_margin(ae, "layer3")  # receptive-field radius 26 px, stride 4
        28
    """
    stride = ae.strides[layer]
    if not ae.encoder.family.convolutional:
        return GLOBAL_FRAME_STRIDES * stride
    return max(1, math.ceil(ae.margins(layer)[0] / stride)) * stride


def mirror_pad(x: Tensor, left: int, right: int, top: int, bottom: int) -> Tensor:
    """Pad by mirroring the image at its border (``reflect``: the edge pixel is not repeated), any width.

    Unlike ``F.pad(mode="reflect")`` the pad may exceed the image (the mirror repeats); a 1-px
    side is repeated.

    Shape:
        (..., H, W) -> (..., top + H + bottom, left + W + right).

    Example:
        >>> mirror_pad(torch.arange(3.).view(1, 3), 4, 2, 0, 0)
        tensor([[0., 1., 2., 1., 0., 1., 2., 1., 0.]])
    """
    h, w = x.shape[-2:]
    return x[..., _mirror_index(h, top, bottom, x.device), :][..., _mirror_index(w, left, right, x.device)]


def _mirror_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i > n - 1, period - i, i)


def _framed(x: Tensor, margin: int, stride: int) -> Tensor:
    """``x`` in a mirrored frame of ``margin`` px, widened at the bottom/right to a multiple of ``stride``."""
    h, w = x.shape[-2:]
    height, width = (math.ceil((n + 2 * margin) / stride) * stride for n in (h, w))
    return mirror_pad(x, margin, width - w - margin, margin, height - h - margin)


def _inside(features: Tensor, margin: int, size: tuple[int, int], framed: tuple[int, int]) -> Tensor:
    """The features of a framed image whose cells lie inside the image (at least 2x2: AdaIN needs two values)."""
    spans = []
    for n, total, cells in zip(size, framed, features.shape[-2:]):
        start = math.ceil(margin * cells / total)
        spans.append(slice(start, min(cells, max(start + 2, (margin + n) * cells // total))))
    return features[..., spans[0], spans[1]]


def _as_batch(image: Tensor, name: str) -> Tensor:
    if not isinstance(image, Tensor):
        raise RFIError(f"{name} must be a tensor, got {type(image).__name__}")
    return image[None] if image.dim() == 3 else image


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``None`` -> equal weights; otherwise ``count`` non-negative numbers, not all zero, normalised to sum 1.

    Raises:
        RFIError: wrong count, a negative weight, or all zero.
    """
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise RFIError(f"got {len(weights)} style weights for {count} styles: give one weight per style")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise RFIError(f"style weights must be non-negative and not all zero, got {weights}")
    return [w / sum(weights) for w in weights]


@torch.no_grad()
def stylize(
    ae: RobustAutoencoder,
    content: Tensor,
    styles: Tensor | Sequence[Tensor],
    weights: Sequence[float] | None = None,
    method: Method = "wct",
    alpha: float = 1.0,
    preserve_color: bool = False,
    layers: Sequence[str] | None = None,
    tile: int | None = None,
) -> Tensor:
    """Restyle ``content`` coarse-to-fine through a decoder pyramid.

    For each layer, deepest first: encode the current image, transform its features towards
    the style's (:func:`apps.style.transforms.blend_styles`), decode; the result is the
    input of the next shallower layer. Each image (content and style) is framed by a mirrored
    margin (:func:`border_margin`) widened to a multiple of the layer's stride; statistics
    are measured on the features inside the image and the frame is cropped after decoding,
    so any size works and no band appears along the edges; images larger than the
    autoencoder's ``max_pixels`` are encoded and decoded in tiles with receptive-field
    margins (:meth:`~inversion.autoencoder.RobustAutoencoder.encode_tiled` and
    ``decode_tiled``; equal to a whole pass), so memory stays bounded.

    Args:
        ae: a decoder pyramid (a ``RobustAutoencoder`` with decoders for several layers).
        content: (B, 3, H, W) or (3, H, W) images in [0, 1].
        styles: one style image or a list of them, each (3, h, w), (1, 3, h, w) (shared by the
            batch) or (B, 3, h, w) (one per content image); any sizes, values in [0, 1].
        weights: one non-negative weight per style (normalised to sum 1); default equal.
        method: ``wct`` (mean and covariance) or ``adain`` (channel mean and std).
        alpha: content-style trade-off in [0, 1] at every layer: 0 keeps the features
            (plain chained reconstruction), 1 fully restyles.
        preserve_color: transfer only the luminance, keeping the content's colours
            (:func:`preserve_colors`).
        layers: pyramid layers to use (default: all that have a decoder).
        tile: tile side in pixels for large images, margins included (default: the square
            of the autoencoder's ``max_pixels``).

    Returns:
        Stylised images, same shape as ``content``, values in [0, 1].

    Raises:
        RFIError: bad method, alpha, weights or layers, or images that are not in [0, 1].
    """
    if method not in METHODS:
        raise RFIError(f"unknown style method '{method}' (valid: {', '.join(METHODS)})")
    if not 0.0 <= float(alpha) <= 1.0:
        raise RFIError(f"alpha must be in [0, 1], got {alpha}")
    single = isinstance(content, Tensor) and content.dim() == 3
    x = _as_batch(content, "content")
    styles = [styles] if isinstance(styles, Tensor) else list(styles)
    if not styles:
        raise RFIError("stylize needs at least one style image")
    styles = [_as_batch(s, f"style {i}").to(x.device) for i, s in enumerate(styles)]
    for i, s in enumerate(styles):
        if s.shape[0] not in (1, x.shape[0]):
            raise RFIError(f"style {i} has batch size {s.shape[0]}: use 1 (shared) or {x.shape[0]} (one per content)")
    weights = check_weights(weights, len(styles))
    if layers is None:
        layers = ae.layers
    else:
        layers = ae.encoder.check_layers(list(layers))
        missing = [k for k in layers if k not in ae.decoders]
        if missing:
            raise RFIError(
                f"no decoder for layer(s) {', '.join(missing)} in this pyramid (have: {', '.join(ae.layers)})"
            )
    deepest = max(layers, key=ae.strides.get)
    style_margin = border_margin(ae, deepest)  # the widest frame: every layer's fits inside
    style_feats = []
    for s in styles:
        framed = _framed(s, style_margin, ae.strides[deepest])
        feats = ae.features(framed, layers)
        style_feats.append({k: _inside(f, style_margin, s.shape[-2:], framed.shape[-2:]) for k, f in feats.items()})
    h, w = x.shape[-2:]
    out = x
    for layer in reversed(layers):  # deepest first
        margin = border_margin(ae, layer)
        framed = _framed(out, margin, ae.strides[layer])
        feats = ae.encode_tiled(framed, layer, tile)
        feats[layer] = blend_styles(
            feats[layer],
            [f[layer] for f in style_feats],
            weights,
            method,
            float(alpha),
            stats_from=_inside(feats[layer], margin, (h, w), framed.shape[-2:]),
        )
        dec = ae.decode_tiled(feats, layer, tile)
        if dec.shape[-2:] != framed.shape[-2:]:  # a decoder whose up-sampling differs from the stride
            dec = F.interpolate(dec, size=framed.shape[-2:], mode="bilinear", align_corners=False)
        out = dec[..., margin : margin + h, margin : margin + w].clamp(0, 1)
    if preserve_color:
        out = preserve_colors(out, x)
    return out[0] if single else out
