"""The two contrastive views of each image, and where StyleAugment (SASSL) sits among their steps.

Views are random resized crop + flip, colour jitter + grayscale (:class:`Views`), drawn from
explicit per-batch generators, so every batch's views are a pure function of (seed, step):
a resumed run continues bit-identically, the views can be made in a background thread
(:class:`apps.style.loader.StyledLoader`), and a run with StyleAugment sees the same crops
and jitter as one without. StyleAugment (:func:`build_style`) sits where ``style.position``
says (:meth:`Views.stages`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import kornia.color
import kornia.enhance
import torch
from kornia.geometry.transform import crop_and_resize
from torch import Tensor

from apps.ssl.config import StyleConfig, StylePosition, ViewConfig
from apps.style.augment import StyleAugment, load_style_model
from encoders.core.config import value_range

ViewStep = Callable[[Tensor, torch.Generator], Tensor]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


class Views:
    """Contrastive views whose every random draw comes from the generator passed in.

    ``geometry``: random resized crop (torchvision's area-scale / log-aspect sampling; a crop
    larger than the image is clipped instead of re-drawn) to ``size`` and horizontal flip.
    ``colour``: colour jitter with probability ``jitter_p`` (kornia's torchvision-formula
    brightness, contrast, saturation, hue, in that fixed order) and grayscale with
    probability ``gray_p``. Both draw the same number of numbers whatever the data, so the
    draws of a run with StyleAugment and one without are the same.

    Args:
        cfg: crop, flip, jitter and grayscale settings.
        size: side of the square views.

    Raises:
        RFIError: ``crop_scale`` or ``crop_ratio`` not one number or a range [lo, hi] with lo <= hi.

    Shape:
        (B, 3, H, W) in [0, 1] -> ``geometry`` -> (B, 3, size, size) -> ``colour`` -> the same shape.

    Example:
        >>> views = Views(ViewConfig(), size=16)
        >>> g = torch.Generator().manual_seed(0)
        >>> tuple(views.colour(views.geometry(torch.rand(4, 3, 24, 24), g), g).shape)
        (4, 3, 16, 16)
    """

    def __init__(self, cfg: ViewConfig, size: int):
        self.cfg, self.size = cfg, size
        self.scale = value_range(cfg.crop_scale, "views.crop_scale", 0, 1)
        self.ratio = value_range(cfg.crop_ratio, "views.crop_ratio", 0)

    def geometry(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Random resized crop to ``size`` and horizontal flip, per image."""
        b, _, h, w = x.shape
        c = self.cfg
        area = h * w * _uniform(b, *self.scale, g)
        ratio = torch.exp(_uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), g))
        cw = torch.sqrt(area * ratio).clamp(1, w)
        ch = torch.sqrt(area / ratio).clamp(1, h)
        x0 = torch.rand(b, generator=g) * (w - cw)
        y0 = torch.rand(b, generator=g) * (h - ch)
        flip = torch.rand(b, generator=g) < c.flip_p
        x1, y1 = x0 + cw - 1, y0 + ch - 1
        boxes = torch.stack(
            [
                torch.stack([x0, y0], -1),
                torch.stack([x1, y0], -1),
                torch.stack([x1, y1], -1),
                torch.stack([x0, y1], -1),
            ],
            1,
        )
        out = crop_and_resize(x, boxes.to(x.device, x.dtype), (self.size, self.size), align_corners=True)
        return torch.where(flip.to(x.device).view(-1, 1, 1, 1), out.flip(-1), out)

    def colour(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Colour jitter (brightness, contrast, saturation, hue) and random grayscale, per image."""
        b = x.shape[0]
        c = self.cfg
        lo = max(0.0, 1 - c.jitter)
        factors = [_uniform(b, lo, 1 + c.jitter, g) for _ in range(3)]
        hue = _uniform(b, -c.hue, c.hue, g)
        apply = (torch.rand(b, generator=g) < c.jitter_p).to(x.device).view(-1, 1, 1, 1)
        gray = (torch.rand(b, generator=g) < c.gray_p).to(x.device).view(-1, 1, 1, 1)
        f = [t.to(x.device, x.dtype) for t in factors]
        y = kornia.enhance.adjust_brightness_accumulative(x, f[0])
        y = kornia.enhance.adjust_contrast_with_mean_subtraction(y, f[1])
        y = kornia.enhance.adjust_saturation_with_gray_subtraction(y, f[2])
        y = kornia.enhance.adjust_hue(y, (2 * math.pi * hue).to(x.device, x.dtype)).clamp(0, 1)
        x = torch.where(apply, y, x)
        return torch.where(gray, kornia.color.rgb_to_grayscale(x).expand_as(x), x)

    def stages(self, position: StylePosition) -> tuple[ViewStep | None, ViewStep | None]:
        """The view steps ``(before, after)`` StyleAugment, for ``style.position``.

        ``before_crop``: StyleAugment on the source crop, then crop/flip and colour;
        ``after_crop``: crop/flip, StyleAugment, colour; ``after_jitter``: crop/flip, colour,
        StyleAugment. ``None``: no step on that side.
        """
        if position == "before_crop":
            return None, lambda x, g: self.colour(self.geometry(x, g), g)
        if position == "after_jitter":
            return lambda x, g: self.colour(self.geometry(x, g), g), None
        return self.geometry, self.colour


def build_style(cfg: StyleConfig, device: torch.device) -> StyleAugment | None:
    """The run's StyleAugment (``None`` unless ``cfg.enabled``).

    Raises:
        RFIError: the style model's files are missing or do not fit.
    """
    if not cfg.enabled:
        return None
    model = cfg.model or ((cfg.encoder, cfg.decoder) if cfg.encoder else None)
    return StyleAugment(
        load_style_model(model, device),
        p=cfg.p,
        alpha=cfg.alpha,
        beta=cfg.beta,
        styles=cfg.styles,
        style_size=cfg.style_size,
        work_size=cfg.work_size,
    ).to(device)
