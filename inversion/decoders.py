"""Fully convolutional decoders that invert an encoder layer's features back to pixels.

A :class:`Decoder` has no fully connected layer and no fixed size: trained on 32x32 crops
it inverts features of any image size (output = input features x stride). Optional skip
inputs (U-Net style) concatenate shallower encoder features at the matching resolution.

A decoder checkpoint is a plain dict (``weights_only`` safe)::

    {"format": "rfi-decoder", "version": 1, "decoder": Decoder.config(), "state_dict": {...},
     "encoder": Encoder.config(), "train_size": 32, ...extra}
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from encoders.checkpoints import load_state_dict_checked
from encoders.downsample import circular_convs
from encoders.errors import RFIError
from encoders.models import INPUT_TAP
from encoders.serialization import load_checkpoint, save_checkpoint
from inversion.upsample import LPU, stage_phases

DECODER_FORMAT = "rfi-decoder"


def _conv_block(cin: int, cout: int, padding_mode: str, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, padding_mode=padding_mode, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut. Shape: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, padding_mode: str = "reflect", norm: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(channels, channels, padding_mode, norm),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode, bias=not norm),
            nn.BatchNorm2d(channels) if norm else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


class Decoder(nn.Module):
    """Invert features of stride ``stride`` back to a 3-channel image in [0, 1].

    Architecture: 3x3 conv to ``channels``, ``blocks`` residual blocks, then log2(stride)
    stages of nearest x2 up-sampling + 3x3 conv (channels halve per stage, not below
    ``min_channels``), and a final 3x3 conv + sigmoid. Up-sampling layers live in
    ``self.up`` so they can be swapped (e.g. for polyphase up-sampling).

    Args:
        in_channels: channels of the inverted layer.
        stride: the layer's total down-sampling factor (1, 2, 4, ...; rounded to a power of two).
        layer: name of the encoder layer it inverts (stored in checkpoints).
        channels: width after the input conv.
        min_channels: the narrowest stage.
        blocks: residual blocks at the input resolution.
        skips: ``{layer: (channels, stride)}`` of shallower layers concatenated at their resolution
            (several may share one; ``input``, the image itself at stride 1, is one of them).
        padding_mode: ``reflect`` (default), ``zeros``, ``replicate`` or ``circular``.
        norm: use BatchNorm.
        upsample: ``nearest`` (default) or ``lps``: learnable polyphase up-sampling
            (:class:`inversion.upsample.LPU`), the partner of an LPS encoder; needs
            ``phase_from`` and circular padding (see :func:`inversion.upsample.polyphase_options`).
        phase_from: ``upsample="lps"`` only: for each up-sampling stage (coarse to fine),
            the name of the encoder LPD layer whose phase it restores.
        residual: output ``clamp(image + correction, 0, 1)`` instead of ``sigmoid(...)``,
            where ``image`` is the ``input`` skip (needed, with stride 1); the last conv
            starts at zero, so training starts from the identity. For restoration
            (denoising), where the output is close to the input.

    Shape:
        - Input: (B, in_channels, h, w), or a mapping ``{layer: tensor, **skips}``.
        - Output: (B, 3, h * 2^n, w * 2^n), values in [0, 1], n = round(log2(stride)).

    Example:
        >>> dec = Decoder(64, stride=4, layer="layer3")
        >>> tuple(dec(torch.rand(2, 64, 8, 8)).shape), tuple(dec(torch.rand(1, 64, 20, 13)).shape)
        ((2, 3, 32, 32), (1, 3, 80, 52))
    """

    def __init__(self, in_channels: int, stride: int, layer: str = "", channels: int = 128,
                 min_channels: int = 32, blocks: int = 1, skips: Mapping[str, tuple[int, int]] | None = None,
                 padding_mode: str = "reflect", norm: bool = True, upsample: str = "nearest",
                 phase_from: Sequence[str] | None = None, residual: bool = False):
        super().__init__()
        if stride < 1:
            raise RFIError(f"decoder stride must be >= 1, got {stride}")
        n = max(0, round(math.log2(stride)))
        self.upsample, self.phase_from = upsample, list(phase_from or [])
        if upsample == "lps":
            if len(self.phase_from) != n or padding_mode != "circular":
                raise RFIError(f"an upsample=lps decoder of stride {stride} needs phase_from naming {n} encoder LPD "
                               f"layers (got {len(self.phase_from)}) and padding_mode='circular' (got "
                               f"'{padding_mode}'): build it with inversion.upsample.polyphase_options(encoder, layer)")
        elif upsample != "nearest" or self.phase_from:
            raise RFIError(f"unknown decoder upsample '{upsample}' (valid: nearest, lps; phase_from only with lps)")
        self.in_channels, self.stride, self.layer = in_channels, stride, layer
        self.channels, self.min_channels, self.blocks = channels, min_channels, blocks
        self.skips = {k: (int(c), int(s)) for k, (c, s) in (skips or {}).items()}
        self.padding_mode, self.norm, self.residual = padding_mode, norm, residual
        if residual and self.skips.get(INPUT_TAP) != (3, 1):
            raise RFIError(f"a residual decoder needs the '{INPUT_TAP}' skip (the image, 3 channels, stride 1)")
        self.head = nn.Sequential(_conv_block(in_channels, channels, padding_mode, norm),
                                  *[ResidualBlock(channels, padding_mode, norm) for _ in range(blocks)])
        self.up = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.skip_at: dict[int, list[str]] = {}  # stage -> skips concatenated before its conv
        c, s = channels, 2 ** n
        for i in range(n):
            self.up.append(LPU(2) if upsample == "lps" else nn.Upsample(scale_factor=2, mode="nearest"))
            s //= 2
            here = [name for name, (_, ss) in self.skips.items() if ss == s]
            if here:
                self.skip_at[i] = here
            cout = max(min_channels, c // 2)
            self.stages.append(_conv_block(c + sum(self.skips[k][0] for k in here), cout, padding_mode, norm))
            c = cout
        self.tail = nn.Conv2d(c, 3, 3, padding=1, padding_mode=padding_mode)
        placed = {name for names in self.skip_at.values() for name in names}
        if placed != set(self.skips):
            bad = sorted(set(self.skips) - placed)
            raise RFIError(f"skip layers {bad} have no matching resolution in a stride-{stride} decoder")
        if residual:  # start as the identity: the correction is 0
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)
        if upsample == "lps":  # same weights and keys, faster circular padding
            circular_convs(self)

    @property
    def upsampling(self) -> int:
        """The decoder's total up-sampling factor (a power of two)."""
        return 2 ** len(self.up)

    @property
    def input_layers(self) -> list[str]:
        """Encoder layers this decoder consumes: the inverted layer, then skip layers."""
        return [self.layer, *self.skips]

    def config(self) -> dict[str, Any]:
        """Constructor arguments, as stored in checkpoints."""
        cfg = {"in_channels": self.in_channels, "stride": self.stride, "layer": self.layer,
               "channels": self.channels, "min_channels": self.min_channels, "blocks": self.blocks,
               "skips": {k: list(v) for k, v in self.skips.items()},
               "padding_mode": self.padding_mode, "norm": self.norm}
        if self.upsample != "nearest":  # only then, so default configs stay as they were
            cfg.update(upsample=self.upsample, phase_from=list(self.phase_from))
        if self.residual:
            cfg["residual"] = True
        return cfg

    def forward(self, features: Tensor | Mapping[str, Tensor],
                phases: Mapping[str, Tensor] | None = None) -> Tensor:
        """Decode ``features``; ``phases``: LPS decoders only, default ``features.phases`` (see LPU)."""
        if isinstance(features, Tensor):
            if self.skips:
                raise RFIError(f"this decoder also needs skip features {list(self.skips)}: pass a mapping")
            x, feats = features, {}
        else:
            x, feats = features[self.layer], features
        if x.shape[1] != self.in_channels:
            raise RFIError(f"decoder for '{self.layer}' expects {self.in_channels} channels, got {x.shape[1]}")
        if self.upsample == "lps":
            weights = stage_phases(features, phases, self.phase_from, self.layer)
        x = self.head(x)
        for i, (up, stage) in enumerate(zip(self.up, self.stages)):
            x = up(x, weights[i]) if self.upsample == "lps" else up(x)
            if i in self.skip_at:
                x = torch.cat([x, *(feats[k] for k in self.skip_at[i])], dim=1)
            x = stage(x)
        if self.residual:
            return (feats[INPUT_TAP] + self.tail(x)).clamp(0, 1)
        return torch.sigmoid(self.tail(x))


def decoder_checkpoint(decoder: Decoder, encoder_config: Mapping[str, Any] | None = None,
                       **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of ``decoder``, recording the encoder it was trained for."""
    return {"format": DECODER_FORMAT, "version": 1, "decoder": decoder.config(),
            "state_dict": decoder.state_dict(), "encoder": dict(encoder_config or {}), **extra}


def save_decoder(decoder: Decoder, path: str | os.PathLike, encoder_config: Mapping[str, Any] | None = None,
                 **extra: Any) -> Path:
    """Atomically write a decoder checkpoint."""
    return save_checkpoint(decoder_checkpoint(decoder, encoder_config, **extra), path)


def decoder_from_checkpoint(ckpt: Mapping[str, Any], source: str = "checkpoint") -> Decoder:
    """Rebuild a :class:`Decoder` from a checkpoint dict (see :func:`decoder_checkpoint`)."""
    if ckpt.get("format") != DECODER_FORMAT:
        raise RFIError(f"{source} is not an RFI decoder checkpoint (format={ckpt.get('format')!r})")
    cfg = dict(ckpt["decoder"])
    cfg["skips"] = {k: tuple(v) for k, v in cfg.get("skips", {}).items()}
    decoder = Decoder(**cfg)
    load_state_dict_checked(decoder, ckpt["state_dict"], source)
    return decoder.eval()


def load_decoder(path: str | os.PathLike) -> tuple[Decoder, dict[str, Any]]:
    """Load a decoder checkpoint file; returns the decoder and the whole checkpoint dict."""
    ckpt = load_checkpoint(path)
    return decoder_from_checkpoint(ckpt, str(path)), ckpt
