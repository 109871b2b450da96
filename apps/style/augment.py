"""Style augmentation for self-supervised learning (SASSL): ``StyleAugment`` and ``rfi augment``.

:class:`StyleAugment` is a batch transform: each image of a (B, 3, H, W) batch in [0, 1] is,
with probability ``p``, restyled through a :class:`~inversion.autoencoder.RobustAutoencoder`.
Its robust features take the channel statistics of a style (AdaIN, blended in feature space
by ``alpha``), the decoder turns them back into pixels, and the result is blended with the
original in pixel space by ``beta``. Styles are other images of the same batch (never the
image itself) or the images of a style folder, encoded once and cached as feature statistics.
The other images pass through untouched.

It is a ``torchvision.transforms.v2.Transform`` (so it sits in ``v2.Compose`` and passes
labels, masks and boxes through) and a plain ``nn.Module`` on batches (so it sits before or
after kornia's ``AugmentationSequential``, or inside it). :class:`MultiView` turns any batch
transform into N independent views per image, as contrastive learning needs.

Example:
    >>> from encoders import create_encoder
    >>> from inversion.decoders import Decoder
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
    >>> ae = RobustAutoencoder(enc, Decoder(32, stride=4, layer="layer3", channels=16))
    >>> aug = StyleAugment(ae, p=1.0, alpha=(0.5, 1.0), beta=(0.5, 1.0), generator=0)
    >>> views = MultiView(aug, views=2)(torch.rand(4, 3, 32, 32))
    >>> len(views), tuple(views[0].shape)
    (2, (4, 3, 32, 32))
"""
from __future__ import annotations

import copy
import logging
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import is_pure_tensor

from apps.style.transforms import adain
from encoders.core.config import yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.serialization import load_checkpoint
from encoders.core.imageio import check_images, list_images, read_image
from inversion.autoencoder import AUTOENCODER_FORMAT, RobustAutoencoder
from inversion.tiling import pad_to_multiple

log = logging.getLogger("rfi")

DEFAULT_ENCODER = Path("runs/encoders/resnet18_robust/checkpoint.pt")
DEFAULT_DECODER = Path("runs/decoders/resnet18_robust_layer3/decoder.pt")
TRAIN_FIRST = ("rfi train-encoder --config configs/encoder/resnet18_robust.yaml && "
               "rfi train-decoder --config configs/decoder/resnet18_robust_layer3.yaml")

StyleModel = RobustAutoencoder | str | os.PathLike | Sequence[str | os.PathLike] | None


# ----------------------------------------------------------------------------- arguments
def unit_range(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """``0.3`` -> ``(0.3, 0.3)``; ``(lo, hi)`` is checked: 0 <= lo <= hi <= 1.

    Raises:
        RFIError: not one or two numbers, outside [0, 1], or lo > hi.
    """
    values = [value] if isinstance(value, (int, float)) else list(value)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise RFIError(f"{name} must be one number or a range (lo, hi) in [0, 1], got {value!r}")
    lo, hi = float(values[0]), float(values[1])
    if not 0 <= lo <= hi <= 1:
        raise RFIError(f"{name} range must satisfy 0 <= lo <= hi <= 1, got ({lo:g}, {hi:g})")
    return lo, hi


def load_style_model(model: StyleModel = None, device: str | torch.device = "cpu") -> RobustAutoencoder:
    """The autoencoder a :class:`StyleAugment` restyles with.

    Args:
        model: a :class:`RobustAutoencoder`; a model file written by ``RobustAutoencoder.save``;
            an ``(encoder checkpoint, decoder checkpoint[s])`` pair; or ``None`` for the
            default robust autoencoder (:data:`DEFAULT_ENCODER` + :data:`DEFAULT_DECODER`).

    Raises:
        RFIError: the files are missing or do not fit (naming what to train first).
    """
    if isinstance(model, RobustAutoencoder):
        return model.to(device)
    if model is None:
        missing = [str(p) for p in (DEFAULT_ENCODER, DEFAULT_DECODER) if not p.is_file()]
        if missing:
            raise RFIError(f"the default style model needs {' and '.join(missing)}: train it first "
                           f"({TRAIN_FIRST}) or pass a model file / (encoder, decoder) pair")
        model = (DEFAULT_ENCODER, DEFAULT_DECODER)
    if isinstance(model, (str, os.PathLike)):
        ckpt = load_checkpoint(model)  # read once
        fmt = ckpt.get("format")
        if fmt != AUTOENCODER_FORMAT:
            raise RFIError(f"{model} is not an RFI autoencoder file (format={fmt!r}): pass a model written by "
                           f"RobustAutoencoder.save, or an (encoder, decoder) checkpoint pair")
        return RobustAutoencoder.from_checkpoint(ckpt, str(model), device)
    parts = list(model)
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
            file, an ``(encoder, decoder)`` checkpoint pair, or ``None`` for the default.
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
        layer: which decoder of the autoencoder (default: its first).
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

    def __init__(self, model: StyleModel = None, p: float = 0.5, alpha: float | Sequence[float] = (0.5, 1.0),
                 beta: float | Sequence[float] = (0.5, 1.0), styles: str | os.PathLike = "batch",
                 generator: torch.Generator | int | None = None, layer: str | None = None,
                 style_size: int = 64, work_size: int | None = None):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise RFIError(f"p (probability of restyling an image) must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.alpha = unit_range(alpha, "alpha")
        self.beta = unit_range(beta, "beta")
        if style_size < 1:
            raise RFIError(f"style_size must be a positive number of pixels, got {style_size}")
        self.generator = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
        if work_size is not None and (isinstance(work_size, bool) or not isinstance(work_size, int)
                                      or work_size < 1):
            raise RFIError(f"work_size must be a positive number of pixels or null, got {work_size!r}")
        self.style_size, self.work_size = style_size, work_size
        self.styles = "batch" if str(styles) == "batch" else str(styles)
        style_files = [] if self.styles == "batch" else self._list_styles(Path(styles))
        # NHWC convolutions run about 1.6x faster than NCHW on CPU (oneDNN); results are the same.
        autoencoder = load_style_model(model).to(memory_format=torch.channels_last)
        self.layer = layer or autoencoder.layer
        if self.layer not in autoencoder.layers:
            raise RFIError(f"the style model has no decoder for layer '{self.layer}' "
                           f"(have: {', '.join(autoencoder.layers)})")
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
            img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True,
                                align_corners=False).clamp(0, 1)
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

    def _encode(self, x: Tensor) -> "dict[str, Tensor]":
        """Encoder features of images padded (reflect) to a multiple of the decoder's stride."""
        x = pad_to_multiple(x, self.stride)
        return self.autoencoder.encode(x.contiguous(memory_format=torch.channels_last), self.layer)

    # v2.Transform protocol: make_params draws once per call, transform applies to each image input.
    def check_inputs(self, flat_inputs: list[Any]) -> None:
        images = [x for x in flat_inputs if isinstance(x, tv_tensors.Image) or is_pure_tensor(x)]
        if images and (images[0].dim() != 4 or images[0].shape[0] == 0):
            raise RFIError(f"StyleAugment takes a non-empty batch (B, 3, H, W) in [0, 1], got shape "
                           f"{tuple(images[0].shape)}")
        if images and self.styles == "batch" and images[0].dim() == 4 and images[0].shape[0] < 2:
            raise RFIError("styles='batch' needs batches of at least 2 images (an image is never its own "
                           "style); got a batch of 1: use a style folder or a larger batch")

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
        return {"chosen": chosen, "alpha": lo_a + (hi_a - lo_a) * u[1], "beta": lo_b + (hi_b - lo_b) * u[2],
                "style": style}

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
            small = F.interpolate(x.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                  mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
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
            rows = where[:len(chosen)]
            mean, std = _stats(feats[self.layer][where[len(chosen):]])
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
        return (f"p={self.p}, alpha={self.alpha}, beta={self.beta}, styles={self.styles!r}, "
                f"layer={self.layer!r}, work_size={self.work_size}" + (f", num_styles={self.num_styles}" if self.num_styles else ""))


class MultiView(nn.Module):
    """N independently augmented views of each batch, for contrastive learning (lightly-style).

    Args:
        transforms: one batch transform used for every view, or one per view.
        views: number of views when a single transform is given (default 2).

    Shape:
        - Input: (B, 3, H, W).
        - Output: a list of ``views`` tensors (B, 3, H', W').

    Example:
        >>> two = MultiView(v2.RandomHorizontalFlip(), views=2)
        >>> [tuple(v.shape) for v in two(torch.rand(3, 3, 8, 8))]
        [(3, 3, 8, 8), (3, 3, 8, 8)]
    """

    def __init__(self, transforms: Callable[[Tensor], Tensor] | Sequence[Callable[[Tensor], Tensor]],
                 views: int | None = None):
        super().__init__()
        if callable(transforms):
            transforms = [transforms] * (2 if views is None else views)
        elif views is not None and views != len(transforms):
            raise RFIError(f"MultiView got {len(transforms)} transforms but views={views}")
        if len(transforms) < 1:
            raise RFIError("MultiView needs at least one view")
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):  # register modules so .to(device) reaches them
            if isinstance(t, nn.Module):
                self.add_module(f"view{i}", t)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [t(x) for t in self.transforms]


# ----------------------------------------------------------------------------- rfi augment
@yaml_dataclass("apps/augment.yaml")
class AugmentConfig:
    """``rfi augment`` settings (YAML: ``configs/apps/augment.yaml``; command-line flags win).

    ``model``: an autoencoder file; else ``encoder`` + ``decoder`` checkpoints; else the default
    robust autoencoder. ``styles``: ``batch`` or a style folder. ``size``: images are resized
    (short side) and centre-cropped to ``size`` x ``size``. ``batch_size``: images restyled
    together (with ``styles: batch`` they lend each other their styles).
    """

    model: str | None
    encoder: str | None
    decoder: str | None
    styles: str
    p: float
    alpha: list[float]
    beta: list[float]
    style_size: int
    work_size: int | None
    views: int
    size: int
    batch_size: int
    seed: int
    device: str
    sheet_rows: int


# ----------------------------------------------------------------------------- asynchronous stylisation
BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
"""A batch transform that draws every random number from the generator it is given: ``fn(x, generator)``."""


def batch_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of batch ``index`` (random stream ``stream``): a pure function of its arguments.

    :class:`StyledLoader` seeds one generator per batch, view and purpose from it, so a batch's
    random draws depend on neither the thread that computes it nor on where a run resumed.

    Example:
        >>> batch_seed(0, 5) == batch_seed(0, 5), batch_seed(0, 5) != batch_seed(0, 6)
        (True, True)
    """
    return ((seed * 1_000_003 + index) * 1_009 + stream) % (2 ** 63)


def _with_generator(style: StyleAugment, generator: torch.Generator) -> StyleAugment:
    """A shallow copy of ``style`` (same autoencoder, same cached styles) drawing from ``generator``."""
    twin = copy.copy(style)
    twin.generator = generator
    return twin


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class StyledLoader:
    """Batches of ``loader`` passed through ``before`` -> ``style_augment`` -> ``after``, prepared ahead
    in a background thread while the training step runs (SASSL's asynchronous stylisation).

    For batch ``i`` (counted from ``start``) and view ``v``, ``before`` and ``after`` draw from
    ``torch.Generator().manual_seed(batch_seed(seed, i, 2 * v))`` and StyleAugment from a
    generator seeded with ``batch_seed(seed, i, 2 * v + 1)``: the output is a pure function of
    the batch, its index and ``seed``. So the background thread yields exactly what
    ``background=False`` (the same work, in the calling thread) yields, a run resumed at batch
    ``start`` continues exactly, and a run without StyleAugment (``style_augment=None``) sees the
    same crops and colour draws as a run with it.

    The worker thread runs torch ops, which release the GIL: on CPU it computes on another core
    (``threads`` sets its intra-op threads; the training loop's are not changed), on CUDA it
    enqueues its kernels on a side stream; the main stream waits for a batch's event before
    using it. It only helps when a core (or the GPU) has spare capacity: on a machine whose
    cores are all busy, it takes them from the training step.

    Memory: at most ``prefetch`` prepared batches wait in the queue, one is being prepared and
    one is in use, so about ``(prefetch + 2) x views x batch bytes`` (e.g. batch 128 of
    3x32x32 float32, 2 views, prefetch 2: 4 x 2 x 1.5 MiB = 12 MiB), plus StyleAugment's
    activations for one batch.

    Shutdown: an error in the worker is re-raised in the training loop (at the next batch);
    when the loop raises, breaks or is interrupted (Ctrl-C), leaving the ``with`` block (or
    :meth:`close`, or the iterator being closed or collected) stops the worker and waits for
    it (at most the batch it is computing). The thread is a daemon: it never keeps the
    interpreter alive.

    Args:
        loader: an iterable of batches: tensors (B, 3, H, W) in [0, 1], or tuples / lists whose
            first item is one (the other items pass through, e.g. labels).
        style_augment: a :class:`StyleAugment`, or ``None`` for the pipeline without it.
        before: ``fn(x, generator)`` applied before StyleAugment (e.g. crop and flip), or ``None``.
        after: ``fn(x, generator)`` applied after it (e.g. colour jitter), or ``None``.
        views: independent views per batch: 1 yields a tensor per batch, more yield a list.
        seed: base seed of the per-batch generators.
        start: index of the first batch (a resumed run passes its step).
        prefetch: batches prepared ahead (queue bound, >= 1).
        background: ``True``: a worker thread; ``False``: in the calling thread (synchronous).
        device: move each batch there (non-blocking) before the transforms (default: as is).
        threads: torch intra-op threads of the worker thread (default: torch's default for a new thread).

    Shape:
        - Input: ``loader`` batches (B, 3, H, W) in [0, 1].
        - Output: (B, 3, H', W') per view (as ``after`` makes them), or a list of ``views`` of them;
          for tuple batches, the same tuple with the images replaced.

    Attributes:
        style_seconds: seconds spent in StyleAugment per batch (all views), in order.
        wait_seconds: seconds the consumer waited for each batch (0 when it was ready).

    Raises:
        RFIError: ``prefetch`` or ``views`` < 1, a batch that is not an image tensor.

    Example:
        >>> from encoders import create_encoder
        >>> from inversion.decoders import Decoder
        >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
        >>> aug = StyleAugment(RobustAutoencoder(enc, Decoder(32, 4, "layer3", channels=16)), p=0.5)
        >>> batches = [torch.rand(4, 3, 16, 16) for _ in range(3)]
        >>> with StyledLoader(batches, aug, seed=0) as loader:
        ...     fast = [x for x in loader]
        >>> slow = list(StyledLoader(batches, aug, seed=0, background=False))
        >>> all(torch.equal(a, b) for a, b in zip(fast, slow))
        True
    """

    def __init__(self, loader: Any, style_augment: StyleAugment | None = None, *,
                 before: BatchTransform | None = None, after: BatchTransform | None = None, views: int = 1,
                 seed: int = 0, start: int = 0, prefetch: int = 2, background: bool = True,
                 device: str | torch.device | None = None, threads: int | None = None):
        if prefetch < 1 or views < 1:
            raise RFIError(f"StyledLoader needs prefetch >= 1 and views >= 1, got prefetch={prefetch}, views={views}")
        self.loader, self.style, self.before, self.after = loader, style_augment, before, after
        self.views, self.seed, self.start, self.prefetch = views, seed, start, prefetch
        self.background, self.threads = background, threads
        self.device = torch.device(device) if device is not None else None
        self.style_seconds: list[float] = []
        self.wait_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None

    # ------------------------------------------------------------------ the work of one batch
    def process(self, batch: Any, index: int) -> Any:
        """Views of one batch (what the loader yields for batch number ``index``)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise RFIError(f"StyledLoader batches must be (B, 3, H, W) image tensors (or tuples starting with "
                           f"one), got {type(images).__name__}")
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
        out, spent = [], 0.0
        for v in range(self.views):
            g = torch.Generator().manual_seed(batch_seed(self.seed, index, 2 * v))
            x = self.before(images, g) if self.before is not None else images
            if self.style is not None:
                t0 = time.perf_counter()
                x = _with_generator(self.style, torch.Generator().manual_seed(batch_seed(self.seed, index, 2 * v + 1)))(x)
                spent += time.perf_counter() - t0
            out.append(self.after(x, g) if self.after is not None else x)
        self.style_seconds.append(spent)
        result: Any = out[0] if self.views == 1 else out
        if isinstance(batch, (tuple, list)):
            return type(batch)([result, *batch[1:]]) if isinstance(batch, tuple) else [result, *batch[1:]]
        return result

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        self.close()  # one active pass at a time
        if not self.background:
            return self._synchronous()
        self._warm_up()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop), daemon=True,
                                        name="StyledLoader")
        self._thread.start()
        return self._consume(self._queue, self._thread)

    def _warm_up(self) -> None:
        """Build the style encoder's feature extractor here, before the worker starts.

        ``torch.fx`` tracing (which RFI encoders run on their first forward) patches
        ``nn.Module.__call__`` process-wide, so it must not run in one thread while another
        computes: models the training loop uses must likewise have run once before iterating.
        """
        if self.style is None:
            return
        p = next(self.style.autoencoder.parameters())
        side = 2 * self.style.stride
        with torch.no_grad():
            self.style._encode(torch.zeros(2, 3, side, side, device=p.device, dtype=p.dtype))

    def _synchronous(self):
        for i, batch in enumerate(self.loader):
            t0 = time.perf_counter()
            out = self.process(batch, self.start + i)
            self.wait_seconds.append(time.perf_counter() - t0)
            yield out

    def _put(self, q: queue.Queue, stop: threading.Event, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, q: queue.Queue, stop: threading.Event) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's intra-op threads only
        cuda = self.device is not None and self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            for i, batch in enumerate(self.loader):
                if stop.is_set():
                    return
                if stream is not None:
                    with torch.cuda.stream(stream):
                        out = self.process(batch, self.start + i)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    out, event = self.process(batch, self.start + i), None
                if not self._put(q, stop, (out, event)):
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            self._put(q, stop, _Failure(e))
            return
        self._put(q, stop, _DONE)

    def _consume(self, q: queue.Queue, thread: threading.Thread):
        try:
            while True:
                t0 = time.perf_counter()
                while True:
                    try:
                        item = q.get(timeout=0.1)
                        break
                    except queue.Empty:
                        if not thread.is_alive() and q.empty():
                            raise RFIError("StyledLoader's worker thread stopped without a result") from None
                self.wait_seconds.append(time.perf_counter() - t0)
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                out, event = item
                if event is not None:  # the training stream waits for the side stream's work on this batch
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in _tensors(out):
                        t.record_stream(current)
                yield out
        finally:
            if self._thread is thread:  # not a newer pass's worker
                self.close()

    def close(self) -> None:
        """Stop the worker thread (if any) and wait for it; safe to call more than once."""
        thread, q = self._thread, self._queue
        self._stop.set()
        if q is not None:
            while True:  # unblock a worker waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
            if thread.is_alive():
                log.warning("StyledLoader: the worker thread did not stop within 60 s")
        self._thread, self._queue = None, None

    def __enter__(self) -> StyledLoader:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.loader)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []
