"""The segmenter: an encoder and a decoder that predicts class logits at the input size, and its model file.

The decoder is :class:`inversion.decoders.Decoder` with ``out_channels`` = the number of
classes and ``logits=True``, built by :func:`build_segmenter` with
:func:`inversion.upsample.polyphase_options`: for an encoder that records the phases of its
down-sampling (``downsample='lps'`` CNNs, ``equivariant=True`` transformers: any registered
architecture that does) it up-samples with :class:`inversion.upsample.LPU` at those phases,
with circular padding, so that for every circular shift ``T``::

    segmenter(T x) == T segmenter(x)        (eval mode, up to float rounding)

Any other encoder gets the plain decoder (nearest up-sampling), which is not equivariant.

A model file is one dict (``weights_only`` safe)::

    {"format": "rfi-segmenter", "version": 1, "classes": [...], "finetune": bool,
     "encoder": <encoder checkpoint>, "decoder": <decoder checkpoint>, ...extra}

Example:
    >>> from encoders import create_encoder
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8, downsample="lps")
    >>> seg = build_segmenter(enc, "layer3", ["a", "b", "c"], channels=16).eval()
    >>> x = torch.rand(1, 3, 32, 32)
    >>> tuple(seg(x).shape), bool((seg(x.roll((3, 5), (2, 3))) - seg(x).roll((3, 5), (2, 3))).abs().max() < 1e-4)
    ((1, 3, 32, 32), True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from encoders.core.errors import RFIError
from encoders.core.imageio import check_images
from encoders.core.serialization import FORMAT_VERSIONS, load_checkpoint, save_checkpoint
from encoders.nets.models import Encoder
from encoders.weights.checkpoints import encoder_checkpoint, encoder_from_checkpoint
from inversion.decoders import Decoder, decoder_checkpoint, decoder_from_checkpoint
from inversion.tiling import pad_to_multiple
from inversion.upsample import check_phase_source, polyphase_options

SEGMENTER_FORMAT = "rfi-segmenter"


class Segmenter(nn.Module):
    """An encoder and a class-logit decoder for one of its layers.

    Args:
        encoder: the encoder (frozen unless ``finetune``).
        decoder: a :class:`~inversion.decoders.Decoder` with ``logits=True`` and one output
            channel per class, for a layer of ``encoder``.
        classes: the class names, in label order.
        finetune: train the encoder with the decoder; otherwise its weights are frozen and it
            stays in eval mode (also in :meth:`train`).

    Shape:
        - Input: (B, 3, H, W) in [0, 1], any H, W (padded at the bottom/right to
          :attr:`size_multiple`, then cropped back; sizes that are multiples keep the shift
          equivariance exact).
        - Output: (B, len(classes), H, W) logits.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, classes: Sequence[str], finetune: bool = False):
        super().__init__()
        if not decoder.logits or decoder.out_channels != len(classes):
            raise RFIError(
                f"a segmenter's decoder outputs logits for each of its {len(classes)} classes "
                f"(got out_channels={decoder.out_channels}, logits={decoder.logits})"
            )
        if decoder.layer not in encoder.layer_names:
            raise RFIError(
                f"the decoder is for layer '{decoder.layer}', which {encoder.arch} does not have "
                f"(valid: {', '.join(encoder.layer_names)})"
            )
        if decoder.upsample == "lps":
            check_phase_source(encoder, decoder.layer, decoder.phase_from)
        self.encoder, self.decoder = encoder, decoder
        self.classes, self.finetune = list(classes), bool(finetune)
        self.encoder.requires_grad_(self.finetune)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if not self.finetune:  # a frozen encoder keeps its eval-mode statistics and phase choices
            self.encoder.eval()
        return self

    @property
    def size_multiple(self) -> int:
        """Image sides the segmenter takes whole: multiples of the encoder's and the decoder's up-sampling."""
        multiple = self.encoder.size_multiple(self.decoder.layer)
        return multiple * self.decoder.upsampling // math.gcd(multiple, self.decoder.upsampling)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(check_images(x), self.size_multiple)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune):
            feats = self.encoder(x, layers=self.decoder.input_layers)
        return self.decoder(feats, size=tuple(x.shape[-2:]))[..., :h, :w]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The class of each pixel. Shape: (B, 3, H, W) -> (B, H, W) int64."""
        return self(x).argmax(1)


def build_segmenter(
    encoder: Encoder,
    layer: str,
    classes: Sequence[str],
    skips: Sequence[str] = (),
    finetune: bool = False,
    padding_mode: str = "reflect",
    **capacity: Any,
) -> Segmenter:
    """A segmenter for ``layer`` of ``encoder`` (channels and strides measured on the encoder).

    Args:
        encoder: the encoder.
        layer: the layer the decoder starts from.
        classes: the class names (one logit map each).
        skips: shallower layers joined at their resolution (``input``: the image itself).
        finetune: see :class:`Segmenter`.
        padding_mode: the decoder's padding (phase-recording encoders always get ``circular``).
        **capacity: more :class:`~inversion.decoders.Decoder` arguments (``channels``, ``blocks``, ...).
    """
    info = encoder.feature_info()
    if layer not in info:
        raise RFIError(f"unknown layer '{layer}' for {encoder.arch} (valid: {', '.join(encoder.layer_names)})")
    channels, stride = info[layer]
    decoder = Decoder(
        channels,
        stride,
        layer,
        skips={s: info[s] for s in skips},
        out_channels=len(classes),
        logits=True,
        **capacity,
        **polyphase_options(encoder, layer, padding_mode),
    )
    return Segmenter(encoder, decoder, classes, finetune)


def segmenter_checkpoint(segmenter: Segmenter, **extra: Any) -> dict[str, Any]:
    """The model-file dict of ``segmenter`` (see the module docstring), with ``extra`` keys."""
    return {
        "format": SEGMENTER_FORMAT,
        "version": FORMAT_VERSIONS[SEGMENTER_FORMAT],
        "classes": list(segmenter.classes),
        "finetune": segmenter.finetune,
        "encoder": encoder_checkpoint(segmenter.encoder),
        "decoder": decoder_checkpoint(segmenter.decoder, segmenter.encoder.config()),
        **extra,
    }


def save_segmenter(segmenter: Segmenter, path: str | os.PathLike, **extra: Any) -> Path:
    """Atomically write a model file."""
    return save_checkpoint(segmenter_checkpoint(segmenter, **extra), path)


def segmenter_from_checkpoint(ckpt: Mapping[str, Any], source: str = "checkpoint") -> Segmenter:
    """Rebuild a :class:`Segmenter` (eval mode) from a model-file dict.

    Raises:
        RFIError: not a segmenter file, or a damaged one (naming ``source``).
    """
    if ckpt.get("format") != SEGMENTER_FORMAT:
        raise RFIError(
            f"{source} is not an RFI segmenter file (format={ckpt.get('format')!r}): train one with rfi segment train"
        )
    if not all(isinstance(ckpt.get(k), Mapping) for k in ("encoder", "decoder")) or not ckpt.get("classes"):
        raise RFIError(f"{source} is a damaged segmenter file ('encoder', 'decoder' or 'classes' missing)")
    encoder = encoder_from_checkpoint(ckpt["encoder"], f"{source} (encoder)")
    decoder = decoder_from_checkpoint(ckpt["decoder"], f"{source} (decoder)")
    return Segmenter(encoder, decoder, ckpt["classes"], bool(ckpt.get("finetune", False))).eval()


def load_segmenter(path: str | os.PathLike, device: str | torch.device = "cpu") -> Segmenter:
    """Load a model file written by ``rfi segment train``.

    Raises:
        RFIError: missing (says how to train one), unreadable or not a segmenter file.
    """
    path = Path(path)
    if not path.is_file():
        raise RFIError(f"segmenter model not found: {path} (train one with rfi segment train, or pass --model)")
    return segmenter_from_checkpoint(load_checkpoint(path), str(path)).to(device)
