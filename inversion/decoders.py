"""Fully convolutional decoders that invert an encoder layer's features back to pixels.

A :class:`Decoder` has no fully connected layer and no fixed size: trained on 32x32 crops
it inverts features of any image size (output = input features x stride). Optional skip
inputs (U-Net style) concatenate shallower encoder features at the matching resolution.
The same decoder predicts dense maps other than images: ``out_channels`` maps of raw scores
with ``logits=True`` (e.g. class logits per pixel, :mod:`apps.segment`).

A decoder checkpoint is a plain dict (``weights_only`` safe)::

    {"format": "rfi-decoder", "version": 1, "decoder": Decoder.config(), "state_dict": {...},
     "encoder": Encoder.config(), "encoder_sha256": <fingerprint of its weights>, "train_size": 32, ...extra}

``encoder`` and ``encoder_sha256`` record the encoder it was trained on
(:func:`~encoders.weights.checkpoints.encoder_fingerprint`); ``RobustAutoencoder.from_checkpoints``
refuses another encoder unless told the mismatch is deliberate. Files without
``encoder_sha256`` are checked by the encoder's settings only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.core.errors import RFIError
from encoders.core.serialization import FORMAT_VERSIONS, check_format, load_checkpoint, save_checkpoint
from encoders.nets.downsample import circular_convs
from encoders.nets.models import INPUT_TAP, Encoder
from encoders.weights.checkpoints import build_from_config, encoder_fingerprint, load_state_dict_checked
from inversion.upsample import LPU, stage_phases

DECODER_FORMAT = "rfi-decoder"


DECODER_PRESETS = ("cpu", "paper")
CPU_PRESET: dict[str, Any] = {
    "channels": 64,
    "min_channels": 32,
    "blocks": 1,
    "stage_blocks": 0,
    "spectral_norm": False,
}
"""The ``cpu`` preset (the default of ``rfi train-decoder``): small and fast, trained in minutes on a CPU."""


def decoder_preset(name: str, in_channels: int) -> dict[str, Any]:
    """Decoder capacity by name: ``cpu`` (the default) or ``paper``.

    ``paper`` follows the generator of the robust-inversion paper (Rojas-Gomez et al.,
    "Inverting adversarially robust networks for image synthesis"; its AlexNet conv5
    generator is DeePSiM-like: convolutions at the feature resolution, then up-sampling
    stages of two 3x3 convolutions each, batch norm and spectral norm on every
    convolution): ``channels`` = the layer's channels clipped to [256, 512], two residual
    blocks at the feature resolution, one extra convolution per stage, spectral norm.

    Args:
        name: ``cpu`` or ``paper``.
        in_channels: channels of the inverted layer (the ``paper`` width follows them).

    Returns:
        Keyword arguments of :class:`Decoder` (``channels, min_channels, blocks, stage_blocks, spectral_norm``).

    Example:
        >>> decoder_preset("paper", 2048)["channels"], decoder_preset("cpu", 2048)["channels"]
        (512, 64)
    """
    if name == "cpu":
        return dict(CPU_PRESET)
    if name == "paper":
        return {
            "channels": min(512, max(256, int(in_channels))),
            "min_channels": 32,
            "blocks": 2,
            "stage_blocks": 1,
            "spectral_norm": True,
        }
    raise RFIError(f"unknown decoder preset '{name}' (decoder.preset; valid: {', '.join(DECODER_PRESETS)})")


def _pow2(stride: int) -> int:
    """The power of two nearest (in log scale) to ``stride``: AlexNet's 17 -> 16."""
    return 2 ** max(0, round(math.log2(stride)))


def stage_sizes(start: int, stages: int, anchors: Mapping[int, int]) -> list[int]:
    """Side lengths after each up-sampling stage, hitting every ``anchors[stage]`` exactly.

    Between two anchors (the start counts as stage -1) sizes grow geometrically; after the
    last anchor they double, so with no anchors this is the plain x2 ladder.

    Example:
        >>> stage_sizes(13, 4, {3: 224}), stage_sizes(7, 3, {}), stage_sizes(4, 3, {2: 32})
        ([26, 54, 110, 224], [14, 28, 56], [8, 16, 32])
    """
    out: list[int] = []
    prev_i, prev = -1, start
    for i in range(stages):
        if i in anchors:
            out.append(int(anchors[i]))
            prev_i, prev = i, int(anchors[i])
            continue
        nxt = min((j for j in anchors if j > i), default=None)
        if nxt is None:
            out.append(out[-1] * 2 if out else start * 2)
        else:
            ratio = anchors[nxt] / prev
            out.append(max(1, round(prev * ratio ** ((i - prev_i) / (nxt - prev_i)))))
    return out


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
            nn.BatchNorm2d(channels) if norm else nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


class Decoder(nn.Module):
    """Invert features of stride ``stride`` back to a 3-channel image in [0, 1] (or to ``out_channels`` logit maps).

    Architecture: 3x3 conv to ``channels``, ``blocks`` residual blocks, then n stages of
    nearest up-sampling + 3x3 conv (+ ``stage_blocks`` more 3x3 convs; channels halve per
    stage, not below ``min_channels``), and a final 3x3 conv + sigmoid, where n =
    round(log2(stride)). Up-sampling layers live in ``self.up`` so they can be swapped
    (e.g. for polyphase up-sampling).

    Any stride, any size: each stage up-samples x2, unless ``forward`` is given the output
    ``size`` (or skip features): then the stages reach exactly the skips' resolutions and
    ``size``, growing geometrically in between. So AlexNet (strides 4, 8 and 17 at 224 px:
    13x13 conv5 features, 4 stages) decodes to exactly 224x224, or 227x227, and a ResNet to
    any odd size; for inputs whose size is the features' times 2^n the result is the same
    as plain x2 stages.

    Args:
        in_channels: channels of the inverted layer.
        stride: the layer's total down-sampling factor (its number of up-sampling stages is
            round(log2(stride)); e.g. AlexNet conv5's 17 -> 4 stages).
        layer: name of the encoder layer it inverts (stored in checkpoints).
        channels: width after the input conv.
        min_channels: the narrowest stage.
        blocks: residual blocks at the input resolution.
        skips: ``{layer: (channels, stride)}`` of shallower layers concatenated at their resolution
            (several may share one; ``input``, the image itself at stride 1, is one of them);
            a skip joins the stage whose power-of-two stride is nearest its own.
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
        stage_blocks: extra 3x3 conv blocks in each up-sampling stage (the ``paper`` preset: 1).
        spectral_norm: spectral normalisation on every convolution (the paper's generator).
        refine_blocks: full-resolution capacity for restoration: a 3x3 conv fusing the last
            stage's output with the ``input`` skip (when present), then this many residual
            blocks at the output resolution, before the tail (0: none, as before).
        out_channels: channels of the output (3: an image).
        logits: output the last conv's raw scores (no sigmoid, no clamping), e.g. class logits
            per pixel for segmentation; not with ``residual``.

    Shape:
        - Input: (B, in_channels, h, w), or a mapping ``{layer: tensor, **skips}``.
        - Output: (B, out_channels, H, W), values in [0, 1] unless ``logits``: ``size`` when
          given, else set by the skips, else (h * 2^n, w * 2^n), n = round(log2(stride)).

    Example:
        >>> dec = Decoder(64, stride=4, layer="layer3")
        >>> tuple(dec(torch.rand(2, 64, 8, 8)).shape), tuple(dec(torch.rand(1, 64, 20, 13)).shape)
        ((2, 3, 32, 32), (1, 3, 80, 52))
        >>> alex = Decoder(256, stride=17, layer="conv5", channels=32)  # AlexNet: 13x13 at 224 px
        >>> tuple(alex(torch.rand(1, 256, 13, 13), size=(224, 224)).shape)
        (1, 3, 224, 224)
        >>> seg = Decoder(64, stride=4, layer="layer3", out_channels=6, logits=True)  # 6 class-logit maps
        >>> tuple(seg(torch.rand(1, 64, 8, 8)).shape)
        (1, 6, 32, 32)
    """

    def __init__(
        self,
        in_channels: int,
        stride: int,
        layer: str = "",
        channels: int = 128,
        min_channels: int = 32,
        blocks: int = 1,
        skips: Mapping[str, tuple[int, int]] | None = None,
        padding_mode: str = "reflect",
        norm: bool = True,
        upsample: str = "nearest",
        phase_from: Sequence[str] | None = None,
        residual: bool = False,
        stage_blocks: int = 0,
        spectral_norm: bool = False,
        refine_blocks: int = 0,
        out_channels: int = 3,
        logits: bool = False,
    ):
        super().__init__()
        if stride < 1:
            raise RFIError(f"decoder stride must be >= 1, got {stride}")
        if out_channels < 1 or (residual and (logits or out_channels != 3)):
            raise RFIError(
                f"a decoder needs out_channels >= 1 (got {out_channels}); a residual one outputs an "
                f"image (out_channels=3, logits=False)"
            )
        self.out_channels, self.logits = int(out_channels), bool(logits)
        n = max(0, round(math.log2(stride)))
        self.upsample, self.phase_from = upsample, list(phase_from or [])
        if upsample == "lps":
            if len(self.phase_from) != n or padding_mode != "circular":
                raise RFIError(
                    f"an upsample=lps decoder of stride {stride} needs phase_from naming {n} encoder LPD "
                    f"layers (got {len(self.phase_from)}) and padding_mode='circular' (got "
                    f"'{padding_mode}'): build it with inversion.upsample.polyphase_options(encoder, layer)"
                )
        elif upsample != "nearest" or self.phase_from:
            raise RFIError(f"unknown decoder upsample '{upsample}' (valid: nearest, lps; phase_from only with lps)")
        self.in_channels, self.stride, self.layer = in_channels, stride, layer
        self.channels, self.min_channels, self.blocks = channels, min_channels, blocks
        self.skips = {k: (int(c), int(s)) for k, (c, s) in (skips or {}).items()}
        self.padding_mode, self.norm, self.residual = padding_mode, norm, residual
        self.stage_blocks, self.spectral_norm = int(stage_blocks), bool(spectral_norm)
        if residual and self.skips.get(INPUT_TAP) != (3, 1):
            raise RFIError(f"a residual decoder needs the '{INPUT_TAP}' skip (the image, 3 channels, stride 1)")
        self.head = nn.Sequential(
            _conv_block(in_channels, channels, padding_mode, norm),
            *[ResidualBlock(channels, padding_mode, norm) for _ in range(blocks)],
        )
        self.up = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.skip_at: dict[int, list[str]] = {}  # stage -> skips concatenated before its conv
        c, s = channels, 2**n
        for i in range(n):
            self.up.append(LPU(2) if upsample == "lps" else nn.Upsample(scale_factor=2, mode="nearest"))
            s //= 2
            here = [name for name, (_, ss) in self.skips.items() if _pow2(ss) == s]
            if here:
                self.skip_at[i] = here
            cout = max(min_channels, c // 2)
            self.stages.append(
                nn.Sequential(
                    *_conv_block(c + sum(self.skips[k][0] for k in here), cout, padding_mode, norm),
                    *[_conv_block(cout, cout, padding_mode, norm) for _ in range(self.stage_blocks)],
                )
            )
            c = cout
        self.refine_blocks = int(refine_blocks)
        if self.refine_blocks > 0:  # created only then, so older checkpoints keep their keys
            self.refine = nn.Sequential(
                _conv_block(c + (3 if INPUT_TAP in self.skips else 0), c, padding_mode, norm),
                *[ResidualBlock(c, padding_mode, norm) for _ in range(self.refine_blocks)],
            )
        self.tail = nn.Conv2d(c, self.out_channels, 3, padding=1, padding_mode=padding_mode)
        placed = {name for names in self.skip_at.values() for name in names}
        if placed != set(self.skips):
            bad = sorted(set(self.skips) - placed)
            raise RFIError(f"skip layers {bad} have no matching resolution in a stride-{stride} decoder")
        if residual:  # start as the identity: the correction is 0
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)
        if upsample == "lps":  # same weights and keys, faster circular padding
            circular_convs(self)
        if self.spectral_norm:
            for module in list(self.modules()):
                if isinstance(module, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(module)

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
        cfg = {
            "in_channels": self.in_channels,
            "stride": self.stride,
            "layer": self.layer,
            "channels": self.channels,
            "min_channels": self.min_channels,
            "blocks": self.blocks,
            "skips": {k: list(v) for k, v in self.skips.items()},
            "padding_mode": self.padding_mode,
            "norm": self.norm,
        }
        if self.upsample != "nearest":  # only then, so default configs stay as they were
            cfg.update(upsample=self.upsample, phase_from=list(self.phase_from))
        if self.residual:
            cfg["residual"] = True
        if self.stage_blocks:
            cfg["stage_blocks"] = self.stage_blocks
        if self.spectral_norm:
            cfg["spectral_norm"] = True
        if self.refine_blocks:
            cfg["refine_blocks"] = self.refine_blocks
        if self.out_channels != 3 or self.logits:
            cfg.update(out_channels=self.out_channels, logits=self.logits)
        return cfg

    def stage_sizes(
        self, features: Tensor, feats: Mapping[str, Tensor], size: Sequence[int] | None
    ) -> list[tuple[int, int]] | None:
        """(H, W) after each up-sampling stage, or ``None`` for plain x2 stages.

        Anchors: each skip's resolution at its stage and ``size`` at the last stage; the
        other stages grow geometrically between them (see :func:`stage_sizes`).
        """
        n = len(self.up)
        anchors: dict[int, tuple[int, int]] = {
            i: tuple(feats[names[0]].shape[-2:]) for i, names in self.skip_at.items()
        }
        if size is not None and n:
            size = (int(size[0]), int(size[1]))
            if n - 1 in anchors and anchors[n - 1] != size:
                raise RFIError(
                    f"decoder for '{self.layer}': output size {size} differs from its stride-1 skip "
                    f"{self.skip_at[n - 1]} of size {anchors[n - 1]}"
                )
            anchors[n - 1] = size
        if not anchors:
            return None
        h, w = features.shape[-2:]
        hs = stage_sizes(h, n, {i: a[0] for i, a in anchors.items()})
        ws = stage_sizes(w, n, {i: a[1] for i, a in anchors.items()})
        return list(zip(hs, ws))

    def forward(
        self,
        features: Tensor | Mapping[str, Tensor],
        phases: Mapping[str, Tensor] | None = None,
        size: Sequence[int] | None = None,
    ) -> Tensor:
        """Decode ``features`` to images of ``size`` (H, W) (default: see the class).

        ``phases``: LPS decoders only, default ``features.phases`` (see LPU).
        """
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
        sizes = None if self.upsample == "lps" else self.stage_sizes(x, feats, size)
        x = self.head(x)
        for i, (up, stage) in enumerate(zip(self.up, self.stages)):
            if self.upsample == "lps":
                x = up(x, weights[i])
            elif sizes is None or sizes[i] == (2 * x.shape[-2], 2 * x.shape[-1]):
                x = up(x)  # the plain x2 stage (identical to the exact-size one)
            else:
                x = F.interpolate(x, size=sizes[i], mode="nearest")
            if i in self.skip_at:
                x = torch.cat([x, *(feats[k] for k in self.skip_at[i])], dim=1)
            x = stage(x)
        if self.refine_blocks > 0:  # full-resolution residual blocks, fed the image again when it is a skip
            if INPUT_TAP in self.skips and feats[INPUT_TAP].shape[-2:] == x.shape[-2:]:
                x = torch.cat([x, feats[INPUT_TAP]], dim=1)
            elif INPUT_TAP in self.skips:
                x = torch.cat(
                    [x, F.interpolate(feats[INPUT_TAP], size=x.shape[-2:], mode="bilinear", align_corners=False)], dim=1
                )
            x = self.refine(x)
        if self.residual:
            out = (feats[INPUT_TAP] + self.tail(x)).clamp(0, 1)
        elif self.logits:
            out = self.tail(x)
        else:
            out = torch.sigmoid(self.tail(x))
        if size is not None and tuple(out.shape[-2:]) != (int(size[0]), int(size[1])):  # stride 1, LPS
            out = F.interpolate(out, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
            out = out if self.logits else out.clamp(0, 1)
        return out


def decoder_checkpoint(
    decoder: Decoder, encoder: Encoder | Mapping[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """The checkpoint dict of ``decoder``, recording the encoder it was trained on.

    Args:
        decoder: the decoder.
        encoder: the encoder it was trained on: its settings and the fingerprint of its weights
            (``encoder_sha256``) are recorded; a mapping (``Encoder.config()``) records the settings only.
        **extra: more keys (training size, metrics, training state).
    """
    if isinstance(encoder, Encoder):
        extra = {"encoder_sha256": encoder_fingerprint(encoder), **extra}
        encoder = encoder.config()
    return {
        "format": DECODER_FORMAT,
        "version": FORMAT_VERSIONS[DECODER_FORMAT],
        "decoder": decoder.config(),
        "state_dict": decoder.state_dict(),
        "encoder": dict(encoder or {}),
        **extra,
    }


def save_decoder(
    decoder: Decoder, path: str | os.PathLike, encoder: Encoder | Mapping[str, Any] | None = None, **extra: Any
) -> Path:
    """Atomically write a decoder checkpoint (see :func:`decoder_checkpoint`)."""
    return save_checkpoint(decoder_checkpoint(decoder, encoder, **extra), path)


def decoder_from_checkpoint(ckpt: Mapping[str, Any], source: str = "checkpoint") -> Decoder:
    """Rebuild a :class:`Decoder` from a checkpoint dict (see :func:`decoder_checkpoint`).

    Raises:
        RFIError: another kind of file, an unknown format or a newer version, damaged settings, or
            weights that do not fit.
    """
    check_format(ckpt, source)
    if ckpt.get("format") != DECODER_FORMAT:
        hint = {
            "rfi-encoder": ": it is an encoder checkpoint (pass it as the encoder)",
            "rfi-autoencoder": ": it is an autoencoder file (pass it as --model)",
        }.get(ckpt.get("format"), "")
        raise RFIError(f"{source} is not an RFI decoder checkpoint (format={ckpt.get('format')!r}){hint}")
    if not isinstance(ckpt.get("decoder"), Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise RFIError(f"{source} is a damaged decoder checkpoint ('decoder' settings or 'state_dict' missing)")
    cfg = dict(ckpt["decoder"])
    skips = cfg.get("skips", {})
    if not isinstance(skips, Mapping) or not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in skips.values()):
        raise RFIError(f"{source}: invalid decoder skips {skips!r}")
    cfg["skips"] = {k: tuple(v) for k, v in skips.items()}
    decoder = build_from_config(Decoder, cfg, source)
    load_state_dict_checked(decoder, ckpt["state_dict"], source)
    return decoder.eval()


def load_decoder(path: str | os.PathLike) -> tuple[Decoder, dict[str, Any]]:
    """Load a decoder checkpoint file; returns the decoder and the whole checkpoint dict."""
    ckpt = load_checkpoint(path)
    return decoder_from_checkpoint(ckpt, str(path)), ckpt
