"""Style augmentation for self-supervised learning (SASSL): :class:`StyleAugment`.

:class:`StyleAugment` is a batch transform: each image of a (B, 3, H, W) batch in [0, 1] is,
with probability ``p``, restyled through a :class:`~inversion.autoencoder.RobustAutoencoder`.
Its robust features take the channel statistics of a style (AdaIN, blended in feature space
by ``alpha``), the decoder turns them back into pixels, and the result is blended with the
original in pixel space by ``beta``. Styles are other images of the same batch (never the
image itself) or the images of a style folder, encoded once and cached as feature statistics.
The other images pass through untouched.

It is a ``torchvision.transforms.v2.Transform`` (so it sits in ``v2.Compose`` and passes
labels, masks and boxes through) and a plain ``nn.Module`` on batches (so it sits before or
after kornia's ``AugmentationSequential``, or inside it). :class:`apps.style.multiview.MultiView`
makes N views per image of it, :class:`apps.style.loader.StyledLoader` runs it beside the
training step, and ``rfi augment`` (:mod:`apps.commands.augment`) writes augmented views of
image files.

Example:
    >>> from encoders import create_encoder
    >>> from inversion.decoders import Decoder
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
    >>> ae = RobustAutoencoder(enc, Decoder(32, stride=4, layer="layer3", channels=16))
    >>> aug = StyleAugment(ae, p=1.0, alpha=(0.5, 1.0), beta=(0.5, 1.0), generator=0)
    >>> x = torch.rand(4, 3, 32, 32)
    >>> out = aug(x)
    >>> tuple(out.shape), bool(((out - x).abs().flatten(1).amax(1) > 0).all())
    ((4, 3, 32, 32), True)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import is_pure_tensor

from apps.style.pyramid import STYLE_APP
from apps.style.transforms import adain
from encoders.core.config import read_yaml, shipped_config, value_range
from encoders.core.errors import RFIError
from encoders.core.imageio import check_images, list_images, read_image
from encoders.weights.shipped import resolve_checkpoint
from inversion.autoencoder import RobustAutoencoder

log = logging.getLogger("rfi")

DEFAULT_ENCODER = Path("runs/encoders/resnet18_robust/checkpoint.pt")
DEFAULT_DECODER = Path("runs/decoders/resnet18_robust_layer3/decoder.pt")

StyleModel = RobustAutoencoder | str | os.PathLike | Sequence[str | os.PathLike] | None


# ----------------------------------------------------------------------------- the style model
def load_style_model(model: StyleModel = None, device: str | torch.device = "cpu") -> RobustAutoencoder:
    """The autoencoder a :class:`StyleAugment` restyles with.

    Args:
        model: a :class:`RobustAutoencoder`; a model file written by ``RobustAutoencoder.save``
            or ``shipped:NAME`` (``rfi weights list``); an ``(encoder checkpoint, decoder
            checkpoint[s])`` pair; or ``None`` for the default: the ``model`` of
            ``configs/apps/augment.yaml``, RFI's shipped style pyramid (``shipped:rfi_style_pyramid``).

    Raises:
        RFIError: the files are missing or do not fit, a shipped model not in this build (naming the
            ``model`` argument to pass instead), or a model file written for another use (``rfi
            denoise train``, ``rfi anomaly fit``).
    """
    if isinstance(model, RobustAutoencoder):
        return model.to(device)
    if model is None:
        model = read_yaml(shipped_config("apps/augment.yaml"))["model"]
    flag = "--model (Python: model=)"
    if isinstance(model, (str, os.PathLike)):  # a denoiser or an anomaly model is refused, naming what it is
        return RobustAutoencoder.load(resolve_checkpoint(model, flag=flag), device, kind=STYLE_APP)
    parts = [resolve_checkpoint(p, flag=flag) for p in model]
    if len(parts) < 2:
        raise RFIError(f"a style model pair needs an encoder and a decoder checkpoint, got {model!r}")
    return RobustAutoencoder.from_checkpoints(parts[0], parts[1:], device)


def _stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Channel mean and (unbiased) std, as :func:`adain` measures them. (B, C, h, w) -> 2 x (B, C)."""
    var, mean = torch.var_mean(features, dim=(2, 3))
    return mean, var.sqrt()


def _stats_map(mean: Tensor, std: Tensor) -> Tensor:
    """A (B, C, 1, 2) feature map whose channel mean and unbiased std are exactly ``mean`` and ``std``.

    :func:`adain` reads only those two statistics from a style, so this two-pixel map stands in
    for the style's full feature map: values ``mean -/+ std / sqrt(2)``.
    """
    d = std / math.sqrt(2)
    return torch.stack([mean - d, mean + d], dim=-1).unsqueeze(-2)


# ----------------------------------------------------------------------------- the transform
class StyleAugment(v2.Transform):
    """Restyle each image of a batch with probability ``p`` (SASSL style augmentation).

    For a chosen image ``x`` with style ``s``: ``f = adain(E(x), E(s), a)``, ``y = D(f)``,
    ``out = b * y + (1 - b) * x`` with ``a ~ U(alpha)`` and ``b ~ U(beta)`` drawn per image.
    ``E``/``D`` are the encoder layer and decoder of the autoencoder (skip features, if the
    decoder takes any, stay the content's). Images not chosen are returned untouched and never
    reach the autoencoder (with ``styles='batch'`` the chosen images lend each other their
    styles; only when a single image is chosen is one other image encoded for its style).

    Args:
        model: the autoencoder (see :func:`load_style_model`): a ``RobustAutoencoder``, a model
            file or ``shipped:NAME``, an ``(encoder, decoder)`` checkpoint pair, or ``None`` for the
            default, RFI's shipped style pyramid.
        p: probability that an image is restyled, in [0, 1].
        alpha: feature-space blend range ``(lo, hi)`` in [0, 1]: 0 keeps the content's
            statistics (a plain reconstruction), 1 takes the style's. A number means ``(v, v)``.
        beta: pixel-space blend range ``(lo, hi)`` in [0, 1]: 0 returns the original, 1 the
            stylised image.
        styles: ``'batch'`` (another image of the same batch, never the image itself) or an
            image folder (loaded once, resized to ``style_size``, encoded once; the channel
            statistics are cached).
        generator: a ``torch.Generator`` or an int seed for every random draw; ``None`` uses
            torch's global generator.
        layer: which decoder of the autoencoder (default: its deepest, e.g. layer3 of a pyramid).
        style_size: short side, in pixels, that folder styles are resized to before encoding.
        work_size: short side, in pixels, at which images are stylised (``None``: at their own
            size). A batch whose short side is larger is resized down to it (antialiased),
            stylised there, and the change the stylisation makes is resized back up and added
            to the full-size original, so its fine detail is kept and the cost stops growing
            with the image size. Batches at or below it are stylised exactly as with ``None``.

    Shape:
        - Input: (B, 3, H, W) in [0, 1], any H, W, float dtype and device (the autoencoder
          follows the batch's device; it computes in its own dtype, the output has the input's).
        - Output: (B, 3, H, W) in [0, 1].

    Raises:
        RFIError: ``p`` or a range outside [0, 1] or lo > hi; an empty or unreadable style
            folder; a batch of one with ``styles='batch'``; images outside [0, 1]; a
            ``work_size`` below 1.

    Example:
        >>> from encoders import create_encoder
        >>> from inversion.decoders import Decoder
        >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
        >>> aug = StyleAugment(RobustAutoencoder(enc, Decoder(32, 4, "layer3", channels=16)), p=0.5,
        ...                    generator=torch.Generator().manual_seed(0))
        >>> pipeline = v2.Compose([v2.RandomHorizontalFlip(), aug])
        >>> tuple(pipeline(torch.rand(8, 3, 32, 32)).shape)
        (8, 3, 32, 32)
    """

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def __init__(
        self,
        model: StyleModel = None,
        p: float = 0.5,
        alpha: float | Sequence[float] = (0.5, 1.0),
        beta: float | Sequence[float] = (0.5, 1.0),
        styles: str | os.PathLike = "batch",
        generator: torch.Generator | int | None = None,
        layer: str | None = None,
        style_size: int = 64,
        work_size: int | None = None,
    ):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise RFIError(f"p (probability of restyling an image) must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.alpha = value_range(alpha, "alpha", 0, 1)
        self.beta = value_range(beta, "beta", 0, 1)
        if style_size < 1:
            raise RFIError(f"style_size must be a positive number of pixels, got {style_size}")
        self.generator = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
        if work_size is not None and (isinstance(work_size, bool) or not isinstance(work_size, int) or work_size < 1):
            raise RFIError(f"work_size must be a positive number of pixels or null, got {work_size!r}")
        self.style_size, self.work_size = style_size, work_size
        self.styles = "batch" if str(styles) == "batch" else str(styles)
        style_files = [] if self.styles == "batch" else self._list_styles(Path(styles))
        # NHWC convolutions run about 1.6x faster than NCHW on CPU (oneDNN); results are the same.
        autoencoder = load_style_model(model).to(memory_format=torch.channels_last)
        self.layer = layer or autoencoder.layers[-1]
        if self.layer not in autoencoder.layers:
            raise RFIError(
                f"the style model has no decoder for layer '{self.layer}' (have: {', '.join(autoencoder.layers)})"
            )
        self.autoencoder = autoencoder
        self.stride = autoencoder.strides[self.layer]
        mean, std = self._encode_styles(style_files) if style_files else (torch.empty(0), torch.empty(0))
        self.register_buffer("style_mean", mean, persistent=False)
        self.register_buffer("style_std", std, persistent=False)

    @property
    def num_styles(self) -> int:
        """Number of cached folder styles (0 for ``styles='batch'``)."""
        return len(self.style_mean)

    @staticmethod
    def _list_styles(folder: Path) -> list[Path]:
        if not folder.is_dir():
            raise RFIError(f"style folder not found: {folder}")
        return list_images([folder])

    @torch.no_grad()
    def _encode_styles(self, files: list[Path]) -> tuple[Tensor, Tensor]:
        means, stds = [], []
        for path in files:
            try:
                img = read_image(path)
            except RFIError as e:
                log.warning("skipping style %s", e)
                continue
            scale = self.style_size / min(img.shape[1:])
            size = [max(self.stride, round(s * scale)) for s in img.shape[1:]]
            img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
            feats = self._encode(img.to(self._model_device()))[self.layer]
            mean, std = _stats(feats)
            means.append(mean[0].cpu())
            stds.append(std[0].cpu())
        if not means:
            raise RFIError(f"style folder {self.styles} holds no readable image")
        log.info("cached feature statistics of %d style image(s) from %s", len(means), self.styles)
        return torch.stack(means), torch.stack(stds)

    def _model_device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def _encode(self, x: Tensor) -> dict[str, Tensor]:
        """Encoder features of images padded to a size the autoencoder takes whole (its ``pad``: a
        multiple of the stride, at least two strides, so even a 1x1 image is restyled)."""
        x = self.autoencoder.pad(x, self.layer)
        return self.autoencoder.encode(x.contiguous(memory_format=torch.channels_last), self.layer)

    # v2.Transform protocol: make_params draws once per call, transform applies to each image input.
    def check_inputs(self, flat_inputs: list[Any]) -> None:
        images = [x for x in flat_inputs if isinstance(x, tv_tensors.Image) or is_pure_tensor(x)]
        if not images:
            given = type(flat_inputs[0]).__name__ if flat_inputs else "nothing"
            hint = ""
            if any(isinstance(x, np.ndarray) for x in flat_inputs):
                hint = (
                    ": convert it with torch.from_numpy(a) (an (H, W, 3) uint8 image: "
                    "torch.from_numpy(a).permute(2, 0, 1)[None] / 255)"
                )
            raise RFIError(f"StyleAugment takes a torch.Tensor batch (B, 3, H, W) in [0, 1], got {given}{hint}")
        if images and (images[0].dim() != 4 or images[0].shape[0] == 0):
            raise RFIError(
                f"StyleAugment takes a non-empty batch (B, 3, H, W) in [0, 1], got shape {tuple(images[0].shape)}"
            )
        if images and self.styles == "batch" and images[0].dim() == 4 and images[0].shape[0] < 2:
            raise RFIError(
                "styles='batch' needs batches of at least 2 images (an image is never its own "
                "style); got a batch of 1: use a style folder or a larger batch"
            )

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Per-image random draws: ``chosen`` (B,) bool, ``alpha``, ``beta`` (B,), ``style`` (B,) indices.

        With ``styles='batch'`` an image's style is another *chosen* image when at least two are
        chosen (any other image otherwise): by symmetry still uniform over the other images of the
        batch, and only the chosen images need encoding. Four uniforms are drawn per image whatever
        ``p`` is, so the generator advances the same way on every call.
        """
        x = flat_inputs[0]
        b = x.shape[0] if x.dim() == 4 else 0
        g = self.generator
        u = torch.rand(4, b, generator=g, device=g.device if g is not None else "cpu").cpu()
        chosen = u[0] < self.p
        if self.styles == "batch":
            idx = torch.arange(b)
            pool = idx[chosen] if chosen.sum() >= 2 else idx
            in_pool = torch.isin(idx, pool)
            n = (len(pool) - in_pool.long()).clamp_min(1)
            k = (u[3] * n).long().clamp_max(n - 1)
            # the k-th element of the pool without the image itself: skip its own position
            k = k + (in_pool & (k >= torch.searchsorted(pool, idx))).long()
            style = pool[k.clamp_max(len(pool) - 1)]
        else:
            style = (u[3] * self.num_styles).long().clamp_max(self.num_styles - 1)
        (lo_a, hi_a), (lo_b, hi_b) = self.alpha, self.beta
        return {
            "chosen": chosen,
            "alpha": lo_a + (hi_a - lo_a) * u[1],
            "beta": lo_b + (hi_b - lo_b) * u[2],
            "style": style,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Image):
            return tv_tensors.wrap(self.stylize(inpt.as_subclass(Tensor), params), like=inpt)
        return self.stylize(inpt, params)

    @torch.no_grad()
    def stylize(self, x: Tensor, params: dict[str, Any]) -> Tensor:
        """Apply the draws of :meth:`make_params` to the batch ``x`` (B, 3, H, W) in [0, 1]."""
        check_images(x)
        if x.shape[0] != len(params["chosen"]):
            raise RFIError(f"StyleAugment params were drawn for {len(params['chosen'])} images, got {x.shape[0]}")
        chosen = params["chosen"].nonzero().flatten().to(x.device)
        if chosen.numel() == 0:
            return x
        if self._model_device() != x.device:
            self.to(x.device)
        h, w = x.shape[-2:]
        if self.work_size is not None and min(h, w) > self.work_size:
            scale = self.work_size / min(h, w)
            # resized in float32: antialiased resizing does not take every dtype on every device
            small = F.interpolate(
                x.float(),
                size=(max(1, round(h * scale)), max(1, round(w * scale))),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).clamp(0, 1)
            change = self._stylize_chosen(small, chosen, params) - small[chosen]
            change = F.interpolate(change, size=(h, w), mode="bilinear", align_corners=False)
            out = x.clone()
            out[chosen] = (x[chosen] + change.to(x.dtype)).clamp(0, 1)
            return out
        out = x.clone()
        out[chosen] = self._stylize_chosen(x, chosen, params)
        return out

    def _stylize_chosen(self, x: Tensor, chosen: Tensor, params: dict[str, Any]) -> Tensor:
        """The chosen images of ``x`` restyled and pixel-blended: (len(chosen), 3, H, W) in [0, 1]."""
        dtype = next(self.autoencoder.parameters()).dtype
        style = params["style"].to(x.device)[chosen]
        alpha = params["alpha"].to(x.device)[chosen]
        beta = params["beta"].to(x.device, x.dtype)[chosen].view(-1, 1, 1, 1)
        if self.styles == "batch":
            # Encode each needed image once: the chosen ones and the ones lending their style.
            needed, where = torch.unique(torch.cat([chosen, style]), return_inverse=True)
            feats = self._encode(x[needed].to(dtype))
            rows = where[: len(chosen)]
            mean, std = _stats(feats[self.layer][where[len(chosen) :]])
        else:
            feats = self._encode(x[chosen].to(dtype))
            rows = None
            mean, std = self.style_mean[style], self.style_std[style]
        content = {k: v if rows is None else v[rows] for k, v in feats.items()}
        content[self.layer] = adain(content[self.layer], _stats_map(mean, std), alpha)
        # Shift-invariant (LPS) autoencoders pass the encoder's chosen phases to the decoder.
        phases = getattr(feats, "phases", None)
        extra = {} if phases is None else {"phases": {k: v if rows is None else v[rows] for k, v in phases.items()}}
        h, w = x.shape[-2:]
        styled = self.autoencoder.decode(content, self.layer, **extra)[..., :h, :w].to(x.dtype)
        return (beta * styled + (1 - beta) * x[chosen]).clamp(0, 1)

    def extra_repr(self) -> str:
        return (
            f"p={self.p}, alpha={self.alpha}, beta={self.beta}, styles={self.styles!r}, "
            f"layer={self.layer!r}, work_size={self.work_size}"
            + (f", num_styles={self.num_styles}" if self.num_styles else "")
        )
