"""``RobustAutoencoder``: a frozen encoder plus decoders for one or more of its layers.

This is the one object the apps use: ``encode`` (images -> features), ``decode``
(features -> images) and ``reconstruct`` (both, with overlapping tiles for large images).
"""
from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.checkpoints import ENCODER_FORMAT, encoder_checkpoint, encoder_from_checkpoint, load_encoder
from encoders.errors import RFIError
from encoders.imageio import check_images
from encoders.models import Encoder
from encoders.runtime import autocast, check_precision, memory_format
from encoders.serialization import load_checkpoint, save_checkpoint
from inversion.decoders import DECODER_FORMAT, Decoder, decoder_checkpoint, decoder_from_checkpoint
from inversion.upsample import check_phase_source

AUTOENCODER_FORMAT = "rfi-autoencoder"


def load_encoder_file(path: str | os.PathLike, arch: str | None = None, arch_key: str = "--arch",
                      **kwargs: Any) -> Encoder:
    """An encoder from an RFI, ``robustness``-library or torchvision checkpoint file.

    RFI checkpoints record their architecture; the other two formats need ``arch``.

    Args:
        path: the checkpoint file.
        arch: the architecture (e.g. ``resnet50``); needed for foreign files, checked for RFI ones.
        arch_key: how the user names the architecture in the command at hand (``--arch`` or
            ``encoder.arch``), quoted in the error when ``arch`` is missing.
        **kwargs: passed to :func:`encoders.checkpoints.load_encoder` (``layers``, ...).

    Raises:
        RFIError: a foreign file without ``arch`` (one line saying ``--arch resnet50`` or
            ``encoder.arch=resnet50``), or weights that do not fit.
    """
    try:
        return load_encoder(path, name=arch, **kwargs)
    except RFIError as e:
        if arch is None and "is not an RFI encoder checkpoint" in str(e):
            example = f"{arch_key} resnet50" if arch_key.startswith("-") else f"{arch_key}=resnet50"
            raise RFIError(f"{path} is not an RFI encoder checkpoint (a robustness-library or torchvision file?): "
                           f"name its architecture with {arch_key} (e.g. {example})") from None
        raise


def _window(size: int, ramp_start: int, ramp_end: int, device: torch.device) -> Tensor:
    """1-D blending weights: linear ramps over the first/last ``ramp_*`` pixels, 1 elsewhere."""
    w = torch.ones(size, device=device)
    for ramp, sl in ((ramp_start, slice(0, ramp_start)), (ramp_end, slice(size - ramp_end, size))):
        if ramp > 0:
            r = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp
            w[sl] = torch.minimum(w[sl], r if sl.start == 0 else r.flip(0))
    return w


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of ``tile``-px tiles covering ``length`` px, neighbours sharing >= ``overlap`` px."""
    if tile >= length:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return sorted({round(i * (length - tile) / (n - 1)) for i in range(n)}) if n > 1 else [0]


def _in_precision(method):
    """Run an image-to-image method under the autoencoder's ``precision`` (autocast) and
    ``channels_last`` settings; the result comes back in the input's dtype."""

    @functools.wraps(method)
    def wrapped(self: "RobustAutoencoder", x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.precision == "fp32" and not self.channels_last:
            return method(self, x, *args, **kwargs)
        dtype = x.dtype
        x = x.contiguous(memory_format=memory_format(self.channels_last))
        with self.autocast():
            out = method(self, x, *args, **kwargs)
        return out.to(dtype).contiguous()

    return wrapped


class RobustAutoencoder(nn.Module):
    """A frozen encoder and decoders for one or more of its layers (a decoder pyramid).

    Args:
        encoder: the (robust) encoder; frozen and put in eval mode.
        decoders: one decoder, or a mapping ``{layer: decoder}`` (e.g. for style transfer).
        max_pixels: ``reconstruct`` switches to tiles above this many pixels per image.

    Shape:
        - ``encode``: (B, 3, H, W) in [0, 1] -> ``{layer: (B, C, H/s, W/s)}``.
        - ``decode``: features -> (B, 3, H, W) in [0, 1].
        - ``reconstruct``: (B, 3, H, W) -> (B, 3, H, W), any H, W.

    Example:
        >>> from encoders import create_encoder
        >>> from inversion.decoders import Decoder
        >>> enc = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
        >>> ae = RobustAutoencoder(enc, Decoder(64, stride=4, layer="layer3"))
        >>> tuple(ae.reconstruct(torch.rand(1, 3, 45, 70)).shape)
        (1, 3, 45, 70)
    """

    def __init__(self, encoder: Encoder, decoders: Decoder | Mapping[str, Decoder],
                 max_pixels: int = 1024 * 1024):
        super().__init__()
        if isinstance(decoders, Decoder):
            decoders = {decoders.layer: decoders}
        if not decoders:
            raise RFIError("RobustAutoencoder needs at least one decoder")
        self.encoder = encoder.eval().requires_grad_(False)
        self.decoders = nn.ModuleDict({k: d.eval() for k, d in decoders.items()})
        self.layer = next(iter(self.decoders))
        self.max_pixels = max_pixels
        self.precision, self.channels_last = "fp32", False  # see set_precision
        info = encoder.feature_info()
        for layer, dec in self.decoders.items():
            if layer not in encoder.layer_names:
                raise RFIError(f"decoder is for layer '{layer}', which {encoder.arch} does not have "
                               f"(valid: {', '.join(encoder.layer_names)})")
            for name in dec.input_layers:
                channels = info.get(name, (None,))[0]
                expect = dec.in_channels if name == layer else dec.skips[name][0]
                if channels != expect:
                    raise RFIError(f"decoder for '{layer}' expects {expect} channels at '{name}', but the "
                                   f"{encoder.arch} encoder gives {channels}: encoder and decoder do not fit")
            if getattr(dec, "upsample", "nearest") == "lps":
                check_phase_source(encoder, layer, dec.phase_from)
        self.strides = {k: info[k][1] for k in self.decoders}

    def set_precision(self, precision: str = "fp32", channels_last: bool = False) -> "RobustAutoencoder":
        """Compute precision and memory format for :meth:`reconstruct` and :meth:`autocast`.

        Args:
            precision: ``fp32`` (default), ``bf16`` or ``fp16`` (``torch.autocast``; the
                weights stay fp32, :meth:`reconstruct` returns the input's dtype).
            channels_last: NHWC memory format for the modules and inputs (faster on GPU).

        Example:
            >>> from encoders import create_encoder
            >>> from inversion.decoders import Decoder
            >>> enc = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
            >>> ae = RobustAutoencoder(enc, Decoder(64, stride=4, layer="layer3")).set_precision("bf16")
            >>> ae.reconstruct(torch.rand(1, 3, 32, 32)).dtype
            torch.float32
        """
        check_precision(precision, next(self.parameters()).device)
        self.precision, self.channels_last = precision, channels_last
        return self.to(memory_format=memory_format(channels_last))

    def autocast(self):
        """The autocast context of :attr:`precision` on the modules' device, for commands that call
        :meth:`encode` / :meth:`decode` themselves (``with ae.autocast(): ...``; fp32: a no-op)."""
        return autocast(next(self.parameters()).device, self.precision)

    def train(self, mode: bool = True) -> "RobustAutoencoder":  # the encoder always stays in eval mode
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def layers(self) -> list[str]:
        """Layers with a decoder, shallow to deep."""
        return [k for k in self.encoder.layer_names if k in self.decoders]

    def _decoder(self, layer: str | None) -> Decoder:
        layer = layer or self.layer
        if layer not in self.decoders:
            raise RFIError(f"no decoder for layer '{layer}' (have: {', '.join(self.decoders)})")
        return self.decoders[layer]

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def encode(self, x: Tensor, layer: str | None = None) -> "OrderedDict[str, Tensor]":
        """Features that the decoder of ``layer`` (default: the first) needs: its layer, then skips.

        For an LPS encoder the result also carries the chosen phases (``.phases``, see
        :mod:`inversion.upsample`), which :meth:`decode` uses.
        """
        x = check_images(x, dtype=self._dtype)
        dec = self._decoder(layer)
        feats = self.encoder(x, layers=dec.input_layers)
        out = OrderedDict((k, feats[k]) for k in dec.input_layers)
        if getattr(feats, "phases", None) is not None:
            out = type(feats)(out, feats.phases)
        return out

    def features(self, x: Tensor, layers: Sequence[str]) -> "OrderedDict[str, Tensor]":
        """Encoder features at any ``layers`` (no decoder needed)."""
        return self.encoder(check_images(x, dtype=self._dtype), layers=layers)

    def decode(self, features: Tensor | Mapping[str, Tensor], layer: str | None = None,
               size: tuple[int, int] | None = None, phases: Mapping[str, Tensor] | None = None) -> Tensor:
        """Images from features of ``layer`` (a tensor, or the mapping :meth:`encode` returns).

        Args:
            features: (B, C, h, w) features, or ``{layer: ..., **skips}``.
            layer: which decoder (default: the first).
            size: the output's (H, W): the decoder's stages reach it exactly (any stride,
                e.g. AlexNet's); default: the features' size times the decoder's up-sampling.
            phases: LPS decoders only: the encoder's phases (default: ``features.phases``, set
                by :meth:`encode`); pass them when decoding features you computed yourself.
        """
        layer = layer or self.layer
        feats = features if isinstance(features, Tensor) else features
        if isinstance(feats, Tensor) and not torch.isfinite(feats).all():
            raise RFIError("features contain NaN or Inf values")
        dec = self._decoder(layer)
        if getattr(dec, "upsample", "nearest") == "lps":
            out = dec(feats, phases=phases)
        else:  # exact size, any stride (AlexNet's 17 included)
            out = dec(feats, size=size)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
        return out

    def _reconstruct_whole(self, x: Tensor, layer: str) -> Tensor:
        s = self.strides[layer]
        h, w = x.shape[-2:]
        # Pad to a multiple of a power-of-two stride, and to at least 2x2 features (the
        # decoder's reflect padding needs 2 px), reflecting the border, then crop back. Other
        # strides (AlexNet's 17: 3x3/2 pools) do not divide any size evenly: the decoder
        # reaches the exact size itself, and only the minimum size is padded to.
        m = self.encoder.size_multiple(layer) if hasattr(self.encoder, "size_multiple") else 1
        if m > 1:  # an equivariant Swin takes only multiples of its total stride x window size
            ph, pw = (-h) % m, (-w) % m
        elif s & (s - 1) == 0:
            ph, pw = max((-h) % s, 2 * s - h), max((-w) % s, 2 * s - w)
        else:
            ph, pw = max(0, 3 * s - h), max(0, 3 * s - w)
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.decode(self.encode(x, layer), layer, size=tuple(x.shape[-2:]))
        return out[..., :h, :w]

    @torch.no_grad()
    @_in_precision
    def reconstruct(self, x: Tensor, layer: str | None = None, tile: int | None = None,
                    overlap: int | None = None) -> Tensor:
        """Encode and decode, same size out as in; large images go through overlapping tiles.

        Args:
            x: images (B, 3, H, W) in [0, 1].
            layer: which decoder (default: the first).
            tile: tile side in pixels (default: whole image up to ``max_pixels``, else 512).
            overlap: pixels shared by neighbouring tiles (default: tile // 4); the tiles are
                blended with linear ramps over the overlap, so no seams show.
        """
        x = check_images(x, dtype=self._dtype)
        layer = layer or self.layer
        h, w = x.shape[-2:]
        if tile is None:
            if h * w <= self.max_pixels:
                return self._reconstruct_whole(x, layer)
            tile = 512
        s = self.strides[layer]
        tile = max(s, tile - tile % s)
        overlap = tile // 4 if overlap is None else overlap
        if tile >= h and tile >= w:
            return self._reconstruct_whole(x, layer)
        overlap = min(overlap, tile - s)
        out = torch.zeros_like(x)
        weight = torch.zeros(1, 1, h, w, device=x.device)
        tops, lefts = tile_positions(h, tile, overlap), tile_positions(w, tile, overlap)
        for top in tops:
            for left in lefts:
                rec = self._reconstruct_whole(x[..., top:top + tile, left:left + tile], layer)
                ph, pw = rec.shape[-2:]
                # Ramps only on edges shared with a neighbour: tile borders (poor context) get
                # little weight, and the weights sum to > 0 everywhere.
                wy = _window(ph, overlap if top > 0 else 0, overlap if top + ph < h else 0, x.device)
                wx = _window(pw, overlap if left > 0 else 0, overlap if left + pw < w else 0, x.device)
                win = (wy[:, None] * wx[None, :])[None, None]
                out[..., top:top + ph, left:left + pw] += rec * win
                weight[..., top:top + ph, left:left + pw] += win
        return out / weight.clamp_min(1e-8)

    # ----------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write one self-contained file (encoder + decoders), atomically."""
        return save_checkpoint({
            "format": AUTOENCODER_FORMAT, "version": 1,
            "encoder": encoder_checkpoint(self.encoder),
            "decoders": {k: decoder_checkpoint(d, self.encoder.config()) for k, d in self.decoders.items()},
            **extra}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "RobustAutoencoder":
        """Load a file written by :meth:`save`."""
        return cls.from_checkpoint(load_checkpoint(path), str(path), device)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], source: str = "checkpoint",
                        device: str | torch.device = "cpu") -> "RobustAutoencoder":
        """Rebuild from the dict :meth:`save` writes (for callers that already read the file)."""
        if ckpt.get("format") != AUTOENCODER_FORMAT:
            what = {"rfi-encoder": "an encoder checkpoint", "rfi-decoder": "a decoder checkpoint"}.get(
                ckpt.get("format"), f"format={ckpt.get('format')!r}")
            raise RFIError(f"{source} is not an RFI autoencoder file (encoder + decoders in one file): it is {what}")
        if not isinstance(ckpt.get("encoder"), Mapping) or not isinstance(ckpt.get("decoders"), Mapping) \
                or not ckpt["decoders"]:
            raise RFIError(f"{source} is a damaged autoencoder file ('encoder' or 'decoders' missing)")
        encoder = encoder_from_checkpoint(ckpt["encoder"], f"{source} (encoder)")
        decoders = {k: decoder_from_checkpoint(d, f"{source} (decoder {k})") if isinstance(d, Mapping) else
                    decoder_from_checkpoint({}, f"{source} (decoder {k})") for k, d in ckpt["decoders"].items()}
        return cls(encoder, decoders).to(device)

    @classmethod
    def from_checkpoints(cls, encoder: str | os.PathLike | Encoder,
                         decoders: str | os.PathLike | Sequence[str | os.PathLike],
                         device: str | torch.device = "cpu", arch: str | None = None,
                         arch_key: str = "--arch") -> "RobustAutoencoder":
        """Build from an encoder checkpoint (or encoder) and one or more decoder checkpoints.

        The encoder file may be an RFI, ``robustness``-library or torchvision checkpoint: the
        latter two are rebuilt as the architecture ``arch``, by default the one the decoder
        checkpoints record (``rfi train-decoder`` stores its encoder's configuration).

        Raises:
            RFIError: unreadable files, or a decoder that does not fit the encoder.
        """
        paths = [decoders] if isinstance(decoders, (str, os.PathLike)) else list(decoders)
        ckpts = []
        for p in paths:
            ckpt = load_checkpoint(p)
            if ckpt.get("format") == ENCODER_FORMAT:
                raise RFIError(f"{p} is an encoder checkpoint; a decoder checkpoint was expected")
            if ckpt.get("format") != DECODER_FORMAT:
                raise RFIError(f"{p} is not an RFI decoder checkpoint")
            ckpts.append((p, ckpt))
        if not isinstance(encoder, Encoder):
            recorded = next(((c.get("encoder") or {}).get("arch") for _, c in ckpts
                             if (c.get("encoder") or {}).get("arch")), None)
            try:
                encoder = load_encoder_file(encoder, arch, arch_key)
            except RFIError as e:  # a foreign file: the decoders say which architecture it is
                if arch is not None or recorded is None or "is not an RFI encoder checkpoint" not in str(e):
                    raise
                encoder = load_encoder_file(encoder, recorded, arch_key)
        decs: dict[str, Decoder] = {}
        for p, ckpt in ckpts:
            trained_for = ckpt.get("encoder") or {}
            if trained_for and trained_for.get("arch") != encoder.arch:
                raise RFIError(f"{p} was trained for a {trained_for.get('arch')} encoder, not {encoder.arch}")
            dec = decoder_from_checkpoint(ckpt, str(p))
            decs[dec.layer] = dec
        return cls(encoder, decs).to(device)

