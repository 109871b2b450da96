"""Learnable polyphase up-sampling (LPU): the decoder-side partner of :class:`encoders.nets.downsample.LPD`.

An LPS encoder keeps, at every down-sampling, one polyphase component of its input (phase
``(i, j)``: the pixels ``x[..., i::2, j::2]``). The matching LPU of a decoder puts its input
back at that phase: the value of coarse pixel ``m`` goes to fine pixel ``2m + (i, j)``
(zero insertion at the chosen phase, as in the LPS paper) and is held over the next pixel
too (a fixed 2x2 hold filter: nearest-neighbour up-sampling anchored at the phase, the
same interpolation as the default decoder's). Both steps commute with circular shifts, so
with circular padding in every decoder convolution::

    decode(encode(shift(x))) == shift(decode(encode(x)))     (exactly, up to float rounding)

How the phases travel: an LPS encoder's forward returns
:class:`~encoders.nets.downsample.PhasedFeatures`, whose ``phases`` attribute maps each LPD's
name to its (B, 4) selection weights (one-hot in eval mode). A decoder built with
``upsample="lps"`` stores, for each of its up-sampling stages (coarse to fine), the name of
the matching LPD (``phase_from``) and reads the weights from the features it is given, or
from an explicit ``phases=`` argument. Nothing is cached between calls, so features of one
batch can never be decoded with the phases of another.

Example:
    >>> from encoders import create_encoder
    >>> from inversion.decoders import Decoder
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8, downsample="lps").eval()
    >>> dec = Decoder(32, 4, "layer3", channels=16, **polyphase_options(enc, "layer3")).eval()
    >>> x = torch.rand(1, 3, 32, 32)
    >>> shift = lambda t: t.roll((3, 5), (2, 3))
    >>> bool((dec(enc(shift(x), layers=["layer3"])) - shift(dec(enc(x, layers=["layer3"])))).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.core.errors import RFIError
from encoders.nets.downsample import hard_choice, phase_path, select_phase

log = logging.getLogger("rfi")


class LPU(nn.Module):
    """Up-sample by ``stride``, placing each input pixel at the phase its matching LPD chose.

    Args:
        stride: the up-sampling factor (the matching LPD's stride).

    Shape:
        - Input: features (B, C, h, w) and phase weights (B, stride**2), one-hot (or a
          soft mixture, e.g. Gumbel-softmax weights of an encoder in training mode).
        - Output: (B, C, h * stride, w * stride).

    Example:
        >>> from encoders.nets.downsample import polyphase, select_phase
        >>> x, w = torch.rand(1, 2, 4, 4), torch.tensor([[0., 0., 1., 0.]])  # phase (1, 0)
        >>> y = select_phase(polyphase(x, 2), w)
        >>> torch.equal(LPU()(y, w)[..., 1::2, 0::2], y)
        True
    """

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        s = self.stride
        if weights.shape != (x.shape[0], s * s):
            raise RFIError(f"LPU expects phase weights of shape ({x.shape[0]}, {s * s}), got {tuple(weights.shape)}")
        held = F.interpolate(x, scale_factor=s, mode="nearest")
        index = hard_choice(weights)
        if index is not None:  # one phase per image: roll each group of images sharing a phase
            out = torch.empty_like(held)
            for p in index.unique().tolist():
                group = (index == p).nonzero().squeeze(1)
                out[group] = held[group].roll((p // s, p % s), dims=(2, 3))
            return out
        # Soft weights (an encoder in training mode): the mixture of the rolled copies.
        placed = torch.stack([held.roll((i, j), dims=(2, 3)) for i in range(s) for j in range(s)], dim=1)
        return select_phase(placed, weights)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


def _phased(encoder: nn.Module) -> bool:
    """The encoder's forward returns phases: LPS, or a truly shift-equivariant Swin."""
    return getattr(encoder, "downsample", "stride") == "lps" or bool(getattr(encoder, "equivariant", False))


def _phase_path(encoder: nn.Module, layer: str) -> list[str]:
    """The encoder's phase choices before ``layer``, shallow to deep (one per stride-2 step)."""
    if hasattr(encoder, "phase_names"):
        return list(encoder.phase_names(layer))
    return phase_path(encoder.model, encoder.taps[layer])


def polyphase_options(encoder: nn.Module, layer: str, padding_mode: str = "circular") -> dict[str, Any]:
    """Decoder keyword arguments for inverting ``layer`` of ``encoder``: LPU for LPS encoders.

    For an encoder built with ``downsample="lps"`` (or an ``equivariant=True`` Swin, whose
    tokenizer's stride-``2**L`` phase counts as ``L`` stride-2 choices; see
    :mod:`encoders.nets.equivariant_vit`) this returns ``upsample="lps"``,
    ``phase_from`` (its LPD layers before ``layer``, deepest first: one per decoder
    up-sampling stage) and ``padding_mode="circular"`` (logged if ``padding_mode`` asked for
    another one: exact equivariance needs circular padding); for any other encoder
    ``{"padding_mode": padding_mode}``, i.e. the default decoder.

    Raises:
        RFIError: ``layer`` is not a layer of the encoder.
    """
    if not _phased(encoder):
        return {"padding_mode": padding_mode}
    node = encoder.taps.get(layer) if hasattr(encoder, "taps") else None
    if node is None:
        raise RFIError(f"unknown layer '{layer}' for {encoder.arch} (valid: {', '.join(encoder.taps)})")
    if padding_mode != "circular":
        log.info(
            "decoder for an LPS encoder: padding_mode '%s' -> 'circular' (needed for exact shift equivariance)",
            padding_mode,
        )
    return {"upsample": "lps", "phase_from": _phase_path(encoder, layer)[::-1], "padding_mode": "circular"}


def check_phase_source(encoder: nn.Module, layer: str, phase_from: Sequence[str]) -> None:
    """Refuse an LPS decoder whose ``phase_from`` is not the LPD path of ``layer`` in ``encoder``."""
    if not _phased(encoder):
        raise RFIError(
            f"the decoder for '{layer}' uses polyphase up-sampling (upsample=lps) and needs an "
            f"encoder built with downsample='lps' (or an equivariant=True Swin), not "
            f"'{getattr(encoder, 'downsample', 'stride')}'"
        )
    expected = _phase_path(encoder, layer)[::-1]
    if list(phase_from) != expected:
        raise RFIError(
            f"the decoder for '{layer}' takes phases from {list(phase_from)}, but this encoder's "
            f"LPD layers before '{layer}' are {expected}: encoder and decoder do not fit"
        )


def stage_phases(
    features: Tensor | Mapping[str, Tensor], phases: Mapping[str, Tensor] | None, phase_from: Sequence[str], layer: str
) -> list[Tensor]:
    """The weights for each LPU stage, from ``phases`` or the features' ``phases`` attribute."""
    phases = phases if phases is not None else getattr(features, "phases", None)
    missing = [name for name in phase_from if not phases or name not in phases]
    if missing:
        raise RFIError(
            f"the decoder for '{layer}' uses polyphase up-sampling and needs the phases the LPS "
            f"encoder chose ({', '.join(missing)} missing): decode the features the encoder returned "
            f"(RobustAutoencoder.encode / Encoder.forward), or pass phases=features.phases"
        )
    return [phases[name] for name in phase_from]
