"""Discriminators for the adversarial term of decoder training.

Two kinds, both fully convolutional up to a global pooling, so they accept any image size
and share one call signature ``disc(images, features) -> logits``:

- :class:`DeePSiMDiscriminator` (Dosovitskiy & Brox, 2016, "Generating images with
  perceptual similarity metrics based on deep networks"): an image branch and a
  feature branch, each pooled to a vector, concatenated and classified. The features are
  the encoder features the decoder inverted, so the discriminator judges whether an image
  is a plausible *inversion of those features* (a conditional GAN), not merely realistic.
- :class:`PatchDiscriminator` (pix2pix's PatchGAN, Isola et al., 2017): one logit per
  image patch; it ignores the features.

No normalisation layers: real and fake images go through the discriminator as one batch,
and batch statistics would leak between them. Both take ``spectral_norm=True``: spectral
normalisation (Miyato et al., 2018) of every convolution and linear layer
(``torch.nn.utils.parametrizations.spectral_norm``), as the robust-inversion paper's
discriminator uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from encoders.core.errors import RFIError

DISCRIMINATORS = ("deepsim", "patch")


def _down(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]


def _spectral(module: nn.Module) -> None:
    """Spectral normalisation on every convolution and linear layer of ``module``."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(m)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``layers`` stride-2 4x4 convolutions (channels doubling, at most 8x), a 3x3
    convolution and a 3x3 convolution to one logit per patch.

    Args:
        channels: width of the first convolution.
        layers: down-sampling convolutions (the receptive field grows with each).
        spectral_norm: spectral normalisation of every layer.

    Shape:
        - images: (B, 3, H, W) in [0, 1]; features: ignored (may be ``None``).
        - output: (B, 1, H / 2^layers, W / 2^layers) logits (at least 1x1).

    Example:
        >>> d = PatchDiscriminator(channels=16, layers=3)
        >>> tuple(d(torch.rand(2, 3, 32, 32)).shape)
        (2, 1, 4, 4)
    """

    def __init__(self, channels: int = 64, layers: int = 3, spectral_norm: bool = False):
        super().__init__()
        self.channels, self.layers, self.spectral_norm = channels, layers, bool(spectral_norm)
        mods: list[nn.Module] = []
        c_in, c = 3, channels
        for i in range(layers):
            c = channels * min(2**i, 8)
            mods += _down(c_in, c)
            c_in = c
        mods += [nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*mods)
        if self.spectral_norm:
            _spectral(self)

    def config(self) -> dict[str, Any]:
        cfg = {"kind": "patch", "channels": self.channels, "layers": self.layers}
        if self.spectral_norm:
            cfg["spectral_norm"] = True
        return cfg

    def forward(self, images: Tensor, features: Tensor | None = None) -> Tensor:
        return self.net(images * 2 - 1)


class DeePSiMDiscriminator(nn.Module):
    """Two-branch conditional discriminator on (image, encoder features).

    Image branch: four stride-2 4x4 convolutions (``channels`` ... 8x ``channels``), global
    average pooling. Feature branch: 1x1 then 3x3 convolutions on the feature map, global
    average pooling. The two vectors are concatenated and mapped to one logit by a
    two-layer MLP.

    Args:
        feature_channels: channels of the encoder layer that the decoder inverts.
        channels: width of the first image convolution.
        spectral_norm: spectral normalisation of every layer.

    Shape:
        - images: (B, 3, H, W) in [0, 1]; features: (B, feature_channels, h, w), any h, w.
        - output: (B, 1) logits.

    Example:
        >>> d = DeePSiMDiscriminator(feature_channels=32, channels=16)
        >>> tuple(d(torch.rand(2, 3, 32, 32), torch.rand(2, 32, 8, 8)).shape)
        (2, 1)
    """

    def __init__(self, feature_channels: int, channels: int = 64, spectral_norm: bool = False):
        super().__init__()
        self.feature_channels, self.channels, self.spectral_norm = feature_channels, channels, bool(spectral_norm)
        c = channels
        self.image = nn.Sequential(
            *_down(3, c),
            *_down(c, 2 * c),
            *_down(2 * c, 4 * c),
            *_down(4 * c, 8 * c),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature = nn.Sequential(
            nn.Conv2d(feature_channels, 4 * c, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * c, 4 * c, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(12 * c, 4 * c), nn.LeakyReLU(0.2, inplace=True), nn.Linear(4 * c, 1))
        if self.spectral_norm:
            _spectral(self)

    def config(self) -> dict[str, Any]:
        cfg = {"kind": "deepsim", "feature_channels": self.feature_channels, "channels": self.channels}
        if self.spectral_norm:
            cfg["spectral_norm"] = True
        return cfg

    def forward(self, images: Tensor, features: Tensor | None = None) -> Tensor:
        if features is None:
            raise RFIError("the DeePSiM discriminator needs the encoder features as its second input")
        return self.head(torch.cat([self.image(images * 2 - 1), self.feature(features)], dim=1))


def build_discriminator(kind: str, feature_channels: int, channels: int = 64, spectral_norm: bool = False) -> nn.Module:
    """A discriminator by name: ``deepsim`` (image + features) or ``patch`` (PatchGAN).

    Example:
        >>> d = build_discriminator("deepsim", 32, 16, spectral_norm=True)
        >>> d.config()["spectral_norm"], hasattr(d.head[0], "parametrizations")
        (True, True)

    Raises:
        RFIError: unknown ``kind``.
    """
    if kind == "deepsim":
        return DeePSiMDiscriminator(feature_channels, channels, spectral_norm)
    if kind == "patch":
        return PatchDiscriminator(channels, spectral_norm=spectral_norm)
    raise RFIError(f"unknown discriminator '{kind}' (valid: {', '.join(DISCRIMINATORS)})")


def discriminator_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a discriminator from its :meth:`config` dict (as stored in decoder checkpoints)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind == "deepsim":
        return DeePSiMDiscriminator(**cfg)
    if kind == "patch":
        return PatchDiscriminator(**cfg)
    raise RFIError(f"unknown discriminator '{kind}' (valid: {', '.join(DISCRIMINATORS)})")
