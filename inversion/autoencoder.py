"""``RobustAutoencoder``: a frozen encoder plus decoders for one or more of its layers.

This is the one object the apps use: ``encode`` (images -> features), ``decode``
(features -> images) and ``reconstruct`` (both, with overlapping tiles for large images).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.core.errors import RFIError
from encoders.core.imageio import check_images
from encoders.core.runtime import autocast, check_precision, memory_format
from encoders.core.serialization import FORMAT_VERSIONS, check_format, load_checkpoint, save_checkpoint
from encoders.nets.models import Encoder
from encoders.weights.checkpoints import (
    ENCODER_FORMAT,
    encoder_checkpoint,
    encoder_fingerprint,
    encoder_from_checkpoint,
)
from encoders.weights.shipped import resolve_checkpoint
from inversion.decoders import DECODER_FORMAT, Decoder, decoder_checkpoint, decoder_from_checkpoint
from inversion.tiling import conv_radius, pad_to_multiple, receptive_radius, tiled_apply
from inversion.upsample import check_phase_source

AUTOENCODER_FORMAT = "rfi-autoencoder"
log = logging.getLogger("rfi")
_STRUCTURE = {"format", "version", "encoder", "decoders", "decoder", "state_dict"}
MODEL_KINDS = {
    "denoise": "a denoiser (rfi denoise train)",
    "style": "a style pyramid (rfi style train)",
    "anomaly": "an anomaly model (rfi anomaly fit)",
}
"""What an autoencoder file can be written for (see :func:`model_kind`), as messages name it."""
_FORMAT_NAMES = {
    ENCODER_FORMAT: "an encoder checkpoint",
    DECODER_FORMAT: "a decoder checkpoint",
    "rfi-anomaly": MODEL_KINDS["anomaly"],
    "rfi-segmenter": "a segmenter (rfi segment train)",
}


def _has_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    return False


def checkpoint_metadata(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint dict records besides its model: its keys other than the format, the model
    settings and the weights, without values that hold tensors (optimiser or RNG state).

    Example:
        >>> checkpoint_metadata({"format": "rfi-decoder", "state_dict": {}, "train_size": 32,
        ...                      "optimizer": {"state": {0: torch.zeros(1)}}})
        {'train_size': 32}
    """
    return {k: v for k, v in ckpt.items() if k not in _STRUCTURE and not _has_tensor(v)}


def model_kind(ckpt: Mapping[str, Any]) -> str | None:
    """What an autoencoder file (or its :attr:`RobustAutoencoder.metadata`) was written for: its ``app``
    (``denoise``, ``style``), ``anomaly`` when it holds an anomaly model's ``anomaly`` section, else
    ``None`` (a plain autoencoder, usable for any of them).

    Example:
        >>> model_kind({"app": "denoise", "sigma": [0, 50]}), model_kind({"anomaly": {}}), model_kind({})
        ('denoise', 'anomaly', None)
    """
    if isinstance(ckpt.get("app"), str):
        return ckpt["app"]
    return "anomaly" if "anomaly" in ckpt else None


def check_pair(
    decoder_ckpt: Mapping[str, Any],
    encoder: Encoder,
    decoder_source: str,
    encoder_source: str,
    allow_mismatch: bool = False,
    fingerprint: str | None = None,
) -> None:
    """Refuse to pair a decoder checkpoint with an encoder other than the one it was trained on.

    The decoder records that encoder's settings (``encoder``) and, in files written since RFI
    records it, the fingerprint of its weights (``encoder_sha256``, see
    :func:`~encoders.weights.checkpoints.encoder_fingerprint`): the latter catches a standard
    encoder given a decoder trained on the robust one of the same architecture.

    Args:
        decoder_ckpt: the decoder's checkpoint dict.
        encoder: the encoder it is about to be used with.
        decoder_source: the decoder file, for messages.
        encoder_source: the encoder file (or a description), for messages.
        allow_mismatch: accept other settings or weights of the same architecture (a deliberate
            mismatch, e.g. to measure how a decoder transfers); another architecture is always refused.
        fingerprint: ``encoder_fingerprint(encoder)`` when the caller has it (computed here when needed).

    Raises:
        RFIError: one line naming both files and what differs.
    """
    trained_on = decoder_ckpt.get("encoder") or {}
    if not isinstance(trained_on, Mapping):
        raise RFIError(f"{decoder_source} is a damaged decoder checkpoint (its 'encoder' record is not a mapping)")
    if trained_on and trained_on.get("arch") != encoder.arch:
        raise RFIError(
            f"{decoder_source} was trained for a {trained_on.get('arch')} encoder, not {encoder.arch} "
            f"({encoder_source})"
        )
    if allow_mismatch:
        return
    config = {"downsample": "stride", **encoder.config()}  # files record downsample only when it is not stride
    recorded = {"downsample": "stride", **trained_on} if trained_on else {}
    differ = [
        f"{k} {recorded[k]!r} vs {config[k]!r}"
        for k in sorted(recorded)
        if k in config and _plain(recorded[k]) != _plain(config[k])
    ]
    trained_sha256 = decoder_ckpt.get("encoder_sha256")
    if not differ and trained_sha256 is not None and trained_sha256 != (fingerprint or encoder_fingerprint(encoder)):
        trained_path = decoder_ckpt.get("encoder_path")
        differ.append("its weights" + (f"; it was trained on {trained_path}" if trained_path else ""))
    if differ:
        raise RFIError(
            f"{decoder_source} was trained on another {encoder.arch} encoder than {encoder_source} "
            f"(differs in {'; '.join(differ)}): use the encoder it was trained on, or pass "
            f"--allow-mismatch (Python: allow_mismatch=True) to pair them on purpose"
        )


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (settings compare the same before and after a file round trip)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _in_precision(method):
    """Run an image-to-image method under the autoencoder's ``precision`` (autocast) and
    ``channels_last`` settings; the result comes back in the input's dtype."""

    @functools.wraps(method)
    def wrapped(self: RobustAutoencoder, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
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
        max_pixels: ``reconstruct`` switches to tiles above this many pixels per image; tiles
            (:mod:`inversion.tiling`) are batched within this many pixels per forward pass.
        metadata: what the files it was loaded from record besides the weights (see
            :attr:`metadata`).

    Attributes:
        metadata: for :meth:`load` / :meth:`from_checkpoint`, the extra keys the file was saved
            with (``save(path, **extra)``, e.g. a denoiser's ``sigma``); for
            :meth:`from_checkpoints`, ``{"encoder": {...}, "decoders": {layer: {...}}}`` with
            each file's metadata (e.g. the decoder's ``train_size`` and ``val_psnr``, the
            encoder's ``eval``), see :func:`checkpoint_metadata`. Empty when built directly.

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

    def __init__(
        self,
        encoder: Encoder,
        decoders: Decoder | Mapping[str, Decoder],
        max_pixels: int = 1024 * 1024,
        metadata: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.metadata: dict[str, Any] = dict(metadata or {})
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
                raise RFIError(
                    f"decoder is for layer '{layer}', which {encoder.arch} does not have "
                    f"(valid: {', '.join(encoder.layer_names)})"
                )
            for name in dec.input_layers:
                channels = info.get(name, (None,))[0]
                expect = dec.in_channels if name == layer else dec.skips[name][0]
                if channels != expect:
                    raise RFIError(
                        f"decoder for '{layer}' expects {expect} channels at '{name}', but the "
                        f"{encoder.arch} encoder gives {channels}: encoder and decoder do not fit"
                    )
            if getattr(dec, "upsample", "nearest") == "lps":
                check_phase_source(encoder, layer, dec.phase_from)
        self.strides = {k: info[k][1] for k in self.decoders}

    def set_precision(self, precision: str = "fp32", channels_last: bool = False) -> RobustAutoencoder:
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

    def train(self, mode: bool = True) -> RobustAutoencoder:  # the encoder always stays in eval mode
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def layers(self) -> list[str]:
        """Layers with a decoder, shallow to deep."""
        return [k for k in self.encoder.layer_names if k in self.decoders]

    @property
    def kind(self) -> str | None:
        """What the file it was loaded from was written for (:func:`model_kind` of :attr:`metadata`)."""
        return model_kind(self.metadata)

    def _layer(self, layer: str | None) -> str:
        """``layer`` (default: the first decoder's), refused unless a decoder inverts it."""
        layer = layer or self.layer
        if layer not in self.decoders:
            raise RFIError(f"no decoder for layer '{layer}' (have: {', '.join(self.decoders)})")
        return layer

    def _decoder(self, layer: str | None) -> Decoder:
        return self.decoders[self._layer(layer)]

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def encode(self, x: Tensor, layer: str | None = None) -> OrderedDict[str, Tensor]:
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

    def features(self, x: Tensor, layers: Sequence[str]) -> OrderedDict[str, Tensor]:
        """Encoder features at any ``layers`` (no decoder needed)."""
        return self.encoder(check_images(x, dtype=self._dtype), layers=layers)

    def decode(
        self,
        features: Tensor | Mapping[str, Tensor],
        layer: str | None = None,
        size: tuple[int, int] | None = None,
        phases: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Images from features of ``layer`` (a tensor, or the mapping :meth:`encode` returns).

        Args:
            features: (B, C, h, w) features, or ``{layer: ..., **skips}``.
            layer: which decoder (default: the first).
            size: the output's (H, W): the decoder's stages reach it exactly (any stride,
                e.g. AlexNet's); default: the features' size times the decoder's up-sampling.
            phases: LPS decoders only: the encoder's phases (default: ``features.phases``, set
                by :meth:`encode`); pass them when decoding features you computed yourself.
        """
        layer = self._layer(layer)
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

    def pad(self, x: Tensor, layer: str | None = None) -> Tensor:
        """Pad images (bottom/right) to a size the encoder and decoder of ``layer`` take whole.

        Power-of-two strides: a multiple of the stride and at least 2x2 features (the decoder's
        reflect padding needs 2 px); other strides (AlexNet's 17: 3x3/2 pools divide no size
        evenly; the decoder reaches the exact size itself): at least 3 strides; an equivariant
        Swin: a multiple of its total stride x window. Crop back with ``out[..., :H, :W]``.

        Shape:
            (B, 3, H, W) -> (B, 3, H', W'), H' >= H, W' >= W.
        """
        layer = self._layer(layer)
        s = self.strides[layer]
        m = self.encoder.size_multiple(layer) if hasattr(self.encoder, "size_multiple") else 1
        if m > 1:
            return pad_to_multiple(x, m)
        if s & (s - 1) == 0:
            return pad_to_multiple(x, s, min_size=2 * s)
        return pad_to_multiple(x, 1, min_size=3 * s)

    def _reconstruct_whole(self, x: Tensor, layer: str) -> Tensor:
        h, w = x.shape[-2:]
        x = self.pad(x, layer)
        out = self.decode(self.encode(x, layer), layer, size=tuple(x.shape[-2:]))
        return out[..., :h, :w]

    def tiles_exactly(self, layer: str | None = None) -> bool:
        """Whether tiles of ``layer``'s encoding and decoding can equal the whole pass exactly:
        a CNN encoder without LPS (whose phase choice is global), a power-of-two stride and a
        decoder that up-samples by exactly that stride."""
        layer = self._layer(layer)
        s, dec = self.strides[layer], self._decoder(layer)
        return (
            self.encoder.family.convolutional
            and getattr(self.encoder, "downsample", "stride") != "lps"
            and s & (s - 1) == 0
            and getattr(dec, "upsample", "nearest") != "lps"
            and dec.upsampling == s
        )

    def margins(self, layer: str | None = None) -> tuple[int, int]:
        """Tile margins for exact tiling: (encoder's receptive-field radius in image pixels,
        measured by :func:`~inversion.tiling.receptive_radius`; decoder's in feature pixels,
        bounded by :func:`~inversion.tiling.conv_radius`). Measured once per layer."""
        layer = self._layer(layer)
        cache = self.__dict__.setdefault("_margins", {})
        if layer not in cache:
            p = next(self.encoder.parameters())
            enc = receptive_radius(
                lambda t: self.encoder(t, layers=[layer]),
                3,
                size=max(128, 8 * self.strides[layer]),
                device=p.device,
                dtype=p.dtype,
            )
            cache[layer] = (enc, conv_radius(self._decoder(layer)))
        return cache[layer]

    def _tile_side(self, tile: int | None, layer: str) -> int:
        """The window side: ``tile`` (default: the square of ``max_pixels``), at least the
        smallest window whose exact margins leave a core, a multiple of the stride."""
        s = self.strides[layer]
        enc, dec = self.margins(layer)
        smallest = max(2 * math.ceil(enc / s) * s + s, (2 * dec + 1) * s)
        side = math.isqrt(self.max_pixels) if tile is None else tile
        if side < smallest:
            if tile is not None:
                log.info(
                    "tile %d px is below the receptive field of %s's encoder and decoder: using %d px",
                    tile,
                    layer,
                    smallest,
                )
            side = smallest
        return side - side % s

    def encode_tiled(self, x: Tensor, layer: str | None = None, tile: int | None = None) -> OrderedDict[str, Tensor]:
        """:meth:`encode` in overlapping tiles (:func:`~inversion.tiling.tiled_apply`), equal to
        the whole pass, when ``x`` has more than ``max_pixels`` pixels per image or ``tile`` is
        given; otherwise (or when :meth:`tiles_exactly` is false) a plain :meth:`encode`.

        Args:
            x: (B, 3, H, W) in [0, 1], H and W multiples of the stride (see :meth:`pad`).
            layer: which decoder's features (default: the first).
            tile: window side in pixels, margins included (default: the square of ``max_pixels``).
        """
        layer = self._layer(layer)
        h, w = x.shape[-2:]
        if (tile is None and h * w <= self.max_pixels) or not self.tiles_exactly(layer):
            return self.encode(x, layer)
        feats = tiled_apply(
            lambda t: self.encode(t, layer),
            x,
            self._tile_side(tile, layer),
            self.margins(layer)[0],
            align=self.strides[layer],
            batch_pixels=self.max_pixels,
        )
        return OrderedDict(feats)

    def decode_tiled(self, features: Mapping[str, Tensor], layer: str | None = None, tile: int | None = None) -> Tensor:
        """:meth:`decode` in overlapping tiles with the decoder's receptive field as margin, so
        the result equals a whole decode (the decoder is convolutional, its BatchNorm in eval
        mode); tiles when the output has more than ``max_pixels`` pixels or ``tile`` is given.

        Args:
            features: ``{layer: (B, C, h, w), **skips}`` as :meth:`encode` returns.
            layer: which decoder (default: the first).
            tile: window side in output pixels, margins included (default: the square of ``max_pixels``).

        Returns:
            (B, 3, h * s, w * s) images in [0, 1], ``s`` the stride.
        """
        layer = self._layer(layer)
        main, s = features[layer], self.strides[layer]
        if (tile is None and main.shape[-2] * main.shape[-1] * s * s <= self.max_pixels) or not self.tiles_exactly(
            layer
        ):
            return self.decode(features, layer)
        return tiled_apply(
            lambda f: self.decode(f, layer),
            features,
            self._tile_side(tile, layer) // s,
            self.margins(layer)[1],
            batch_pixels=self.max_pixels // (s * s),
        )

    @torch.no_grad()
    @_in_precision
    def reconstruct(
        self, x: Tensor, layer: str | None = None, tile: int | None = None, overlap: int | None = None
    ) -> Tensor:
        """Encode and decode, same size out as in; large images go through overlapping tiles.

        Tiles run in batches of up to ``max_pixels`` pixels. By default they are *exact*: the
        encoding is tiled with the encoder's measured receptive-field radius as margin, then the
        decoding with the decoder's, and the margins are cropped, so the result equals the whole
        pass (to float rounding; :meth:`margins`). Encoders whose features depend on the whole
        image (LPS, Swin) and ``overlap`` given fall back to blending whole reconstructions of
        tiles with linear ramps over ``overlap`` pixels (close, not equal, with no visible seams).

        Args:
            x: images (B, 3, H, W) in [0, 1].
            layer: which decoder (default: the first).
            tile: window side in pixels, margins included (default: whole image up to
                ``max_pixels``, else the square of ``max_pixels``); raised to the smallest
                window the receptive field allows in exact mode.
            overlap: blend mode: pixels shared by neighbouring tiles (default: tile // 4 where
                exact tiling is impossible).

        Shape:
            (B, 3, H, W) -> (B, 3, H, W).
        """
        x = check_images(x, dtype=self._dtype)
        layer = self._layer(layer)
        h, w = x.shape[-2:]
        if tile is None and h * w <= self.max_pixels:
            return self._reconstruct_whole(x, layer)
        if overlap is None and self.tiles_exactly(layer):
            side = self._tile_side(tile, layer)
            feats = self.encode_tiled(self.pad(x, layer), layer, side)
            return self.decode_tiled(feats, layer, side)[..., :h, :w]
        s = self.strides[layer]
        tile = max(s, (tile or math.isqrt(self.max_pixels)) // s * s)
        overlap = min(tile // 4 if overlap is None else overlap, tile - s)
        return tiled_apply(
            lambda t: self._reconstruct_whole(t, layer),
            x,
            tile,
            overlap // 2,
            align=s,
            batch_pixels=self.max_pixels,
            blend=True,
        )

    # ----------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write one self-contained file (encoder + decoders), atomically."""
        return save_checkpoint(
            {
                "format": AUTOENCODER_FORMAT,
                "version": FORMAT_VERSIONS[AUTOENCODER_FORMAT],
                "encoder": encoder_checkpoint(self.encoder),
                "decoders": {k: decoder_checkpoint(d, self.encoder.config()) for k, d in self.decoders.items()},
                **extra,
            },
            path,
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", kind: str | None = None
    ) -> RobustAutoencoder:
        """Load a file written by :meth:`save` (read once); its extra keys are in :attr:`metadata`.

        ``kind``: see :meth:`from_checkpoint`.
        """
        return cls.from_checkpoint(load_checkpoint(path), str(path), device, kind)

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Mapping[str, Any],
        source: str = "checkpoint",
        device: str | torch.device = "cpu",
        kind: str | None = None,
    ) -> RobustAutoencoder:
        """Rebuild from the dict :meth:`save` writes (for callers that already read the file).

        Args:
            ckpt: the file's dict.
            source: the file, for messages.
            device: where the modules go.
            kind: what the caller needs (a key of :data:`MODEL_KINDS`, e.g. ``denoise``): a file
                written for another kind (:func:`model_kind`) is refused; a plain autoencoder
                file, which records none, is accepted.

        Raises:
            RFIError: another kind of file, an unknown format or a newer version, or damaged contents.
        """
        check_format(ckpt, source)
        wanted = MODEL_KINDS.get(kind, kind) if kind else "an RFI autoencoder file (encoder + decoders in one file)"
        if ckpt.get("format") != AUTOENCODER_FORMAT:
            what = _FORMAT_NAMES.get(ckpt.get("format"), f"format={ckpt.get('format')!r}")
            raise RFIError(f"{source} is not {wanted}: it is {what}")
        recorded = model_kind(ckpt)
        if kind is not None and recorded is not None and recorded != kind:
            raise RFIError(f"{source} is not {wanted}: it is {MODEL_KINDS.get(recorded, recorded)}")
        if (
            not isinstance(ckpt.get("encoder"), Mapping)
            or not isinstance(ckpt.get("decoders"), Mapping)
            or not ckpt["decoders"]
        ):
            raise RFIError(f"{source} is a damaged autoencoder file ('encoder' or 'decoders' missing)")
        encoder = encoder_from_checkpoint(ckpt["encoder"], f"{source} (encoder)")
        decoders = {
            k: decoder_from_checkpoint(d, f"{source} (decoder {k})")
            if isinstance(d, Mapping)
            else decoder_from_checkpoint({}, f"{source} (decoder {k})")
            for k, d in ckpt["decoders"].items()
        }
        return cls(encoder, decoders, metadata=checkpoint_metadata(ckpt)).to(device)

    @classmethod
    def from_checkpoints(
        cls,
        encoder: str | os.PathLike | Encoder,
        decoders: str | os.PathLike | Sequence[str | os.PathLike],
        device: str | torch.device = "cpu",
        arch: str | None = None,
        arch_key: str = "--arch",
        allow_mismatch: bool = False,
    ) -> RobustAutoencoder:
        """Build from an encoder checkpoint (or encoder) and one or more decoder checkpoints.

        Either may be a shipped model (``shipped:NAME``, :mod:`encoders.weights.shipped`). The encoder
        file may be an RFI, ``robustness``-library or torchvision checkpoint: the latter two are
        rebuilt as the architecture ``arch``, by default the one the decoder checkpoints record
        (``rfi train-decoder`` stores its encoder's configuration).
        Each file is read once; what they record besides the weights is in :attr:`metadata`.
        Each decoder must have been trained on this encoder (:func:`check_pair`), unless
        ``allow_mismatch``.

        Raises:
            RFIError: unreadable files, a decoder trained on another encoder, or one that does not fit it.
        """
        paths = [decoders] if isinstance(decoders, (str, os.PathLike)) else list(decoders)
        paths = [resolve_checkpoint(p, kind="decoder") for p in paths]
        ckpts = []
        for p in paths:
            ckpt = load_checkpoint(p)
            if ckpt.get("format") == ENCODER_FORMAT:
                raise RFIError(f"{p} is an encoder checkpoint; a decoder checkpoint was expected")
            if ckpt.get("format") != DECODER_FORMAT:
                raise RFIError(f"{p} is not an RFI decoder checkpoint")
            ckpts.append((p, ckpt))
        encoder_meta: dict[str, Any] = {}
        encoder_source = f"the {encoder.arch} encoder given" if isinstance(encoder, Encoder) else str(encoder)
        if not isinstance(encoder, Encoder):
            encoder = resolve_checkpoint(encoder, kind="encoder")
            enc_ckpt = load_checkpoint(encoder)
            if arch is None and enc_ckpt.get("format") != ENCODER_FORMAT:  # a foreign file: as the decoders record
                arch = next(
                    ((c.get("encoder") or {}).get("arch") for _, c in ckpts if (c.get("encoder") or {}).get("arch")),
                    None,
                )
            encoder_meta = checkpoint_metadata(enc_ckpt)
            encoder = encoder_from_checkpoint(enc_ckpt, str(encoder), arch, arch_key=arch_key)
            del enc_ckpt
        decs: dict[str, Decoder] = {}
        meta: dict[str, Any] = {}
        fingerprint = (
            None if allow_mismatch or not any("encoder_sha256" in c for _, c in ckpts) else encoder_fingerprint(encoder)
        )  # once, for every decoder
        for p, ckpt in ckpts:
            check_pair(ckpt, encoder, str(p), encoder_source, allow_mismatch, fingerprint)
            dec = decoder_from_checkpoint(ckpt, str(p))
            decs[dec.layer] = dec
            meta[dec.layer] = checkpoint_metadata(ckpt)
        return cls(encoder, decs, metadata={"encoder": encoder_meta, "decoders": meta}).to(device)
