"""Losses for training decoders: pixel, feature matching, perceptual (LPIPS) and adversarial.

:class:`DecoderLoss` is the weighted sum that ``rfi train-decoder`` minimises; each term
has a weight in the config and a weight of 0 switches it off (and skips its computation).
Targets are always the *clean* images: when the decoder's input was corrupted (e.g. noise
for denoising), it learns to reconstruct the clean image from the corrupted features.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.core.errors import RFIError
from encoders.nets.models import Encoder

PIXEL_LOSSES = ("l1", "l2")
GAN_LOSSES = ("hinge", "nonsaturating")
REDUCTIONS = ("mean", "sum")


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise RFIError(f"unknown loss reduction '{reduction}' (valid: {', '.join(REDUCTIONS)})")


def pixel_loss(output: Tensor, target: Tensor, kind: str = "l1", reduction: str = "mean") -> Tensor:
    """Mean (or, ``reduction="sum"``, summed) absolute (``l1``) or squared (``l2``) pixel error.

    Shape: output, target: (B, 3, H, W) in [0, 1] -> scalar.

    Example:
        >>> float(pixel_loss(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5), "l2"))
        0.25
        >>> float(pixel_loss(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5), "l1", "sum"))
        6.0
    """
    if reduction not in REDUCTIONS:
        raise RFIError(f"unknown loss reduction '{reduction}' (valid: {', '.join(REDUCTIONS)})")
    if kind == "l1":
        return F.l1_loss(output, target, reduction=reduction)
    if kind == "l2":
        return F.mse_loss(output, target, reduction=reduction)
    raise RFIError(f"unknown pixel loss '{kind}' (valid: {', '.join(PIXEL_LOSSES)})")


def feature_loss(output_features: Tensor, target_features: Tensor, reduction: str = "mean") -> Tensor:
    """Relative squared feature error ``||f(x̂) - f(x)||² / ||f(x)||²`` over the batch.

    With ``reduction="sum"``: the plain summed squared error ``||f(x̂) - f(x)||²`` (the
    robust-inversion paper's recipe, whose weights assume summed losses).

    Dividing by the target's energy makes the weight mean the same thing for every layer
    and encoder (a robust and a standard encoder have very different feature scales), so
    "same losses" compares like with like.

    Shape: (B, C, h, w) twice -> scalar (0 for identical features, 1 for an all-zero output).

    Example:
        >>> f = torch.ones(2, 4, 3, 3)
        >>> float(feature_loss(f, f)), float(feature_loss(torch.zeros_like(f), f))
        (0.0, 1.0)
    """
    target_features = target_features.detach()
    error = (output_features - target_features).pow(2).sum()
    if reduction == "sum":
        return error
    if reduction != "mean":
        raise RFIError(f"unknown loss reduction '{reduction}' (valid: {', '.join(REDUCTIONS)})")
    return error / target_features.pow(2).sum().clamp_min(1e-12)


def generator_loss(fake_logits: Tensor, kind: str = "hinge", reduction: str = "mean") -> Tensor:
    """Adversarial loss of the decoder (generator) given the discriminator's logits on its output.

    ``hinge`` and ``nonsaturating`` both use ``-D(x̂)`` style objectives: hinge ``-mean(D)``
    (Lim & Ye 2017, as in SAGAN), non-saturating ``mean(softplus(-D))`` = ``-log sigmoid(D)``
    (Goodfellow et al. 2014). ``reduction="sum"`` sums over the logits instead.
    """
    if kind == "hinge":
        return _reduce(-fake_logits, reduction)
    if kind == "nonsaturating":
        return _reduce(F.softplus(-fake_logits), reduction)
    raise RFIError(f"unknown GAN loss '{kind}' (valid: {', '.join(GAN_LOSSES)})")


def discriminator_loss(
    real_logits: Tensor, fake_logits: Tensor, kind: str = "hinge", reduction: str = "mean"
) -> Tensor:
    """Discriminator loss: real images should score high, reconstructions low.

    hinge: ``mean(relu(1 - D(x))) + mean(relu(1 + D(x̂)))``; non-saturating (binary
    cross-entropy): ``mean(softplus(-D(x))) + mean(softplus(D(x̂)))``.

    Example:
        >>> big = torch.full((4, 1), 5.0)
        >>> float(discriminator_loss(big, -big, "hinge"))
        0.0
    """
    if kind == "hinge":
        return _reduce(F.relu(1 - real_logits), reduction) + _reduce(F.relu(1 + fake_logits), reduction)
    if kind == "nonsaturating":
        return _reduce(F.softplus(-real_logits), reduction) + _reduce(F.softplus(fake_logits), reduction)
    raise RFIError(f"unknown GAN loss '{kind}' (valid: {', '.join(GAN_LOSSES)})")


class DecoderLoss:
    """Weighted sum of the decoder-training terms; a weight of 0 switches a term off.

    Args:
        encoder: the frozen encoder (feature term: its features of the reconstruction at ``layer``).
        layer: the inverted layer.
        pixel, feature, lpips, adversarial: weights of the terms.
        pixel_type: ``l1`` or ``l2``.
        lpips_model: an ``lpips.LPIPS`` module (needed when ``lpips > 0``).
        discriminator: a module ``disc(images, features) -> logits`` (needed when ``adversarial > 0``).
        gan_loss: ``hinge`` or ``nonsaturating``.
        reduction: ``mean`` (default: pixel and adversarial terms averaged, feature term
            relative) or ``sum`` (all summed over the batch, feature term absolute: the
            robust-inversion paper's recipe, pixel 2e-6 / feature 0.01 / adversarial 100).

    Shape:
        - output, target: (B, 3, H, W) in [0, 1]; condition: (B, C, h, w), the features
          the decoder inverted (the discriminator's second input).
        - returns (total loss scalar, ``{term: detached scalar}``).

    Example:
        >>> from encoders import create_encoder
        >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8).eval()
        >>> loss = DecoderLoss(enc, "layer2", pixel=1.0, feature=1.0)
        >>> x = torch.rand(2, 3, 16, 16)
        >>> total, terms = loss(x.flip(-1), x, enc(x, layers=["layer2"])["layer2"])
        >>> sorted(terms)
        ['feature', 'pixel', 'total']
    """

    def __init__(
        self,
        encoder: Encoder,
        layer: str,
        pixel: float = 1.0,
        feature: float = 0.0,
        lpips: float = 0.0,
        adversarial: float = 0.0,
        pixel_type: str = "l1",
        lpips_model: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        gan_loss: str = "hinge",
        reduction: str = "mean",
    ):
        weights = {"pixel": pixel, "feature": feature, "lpips": lpips, "adversarial": adversarial}
        bad = [f"{k}={v}" for k, v in weights.items() if not v >= 0]
        if bad:
            raise RFIError(f"loss weights must be >= 0, got {', '.join(bad)}")
        if pixel_type not in PIXEL_LOSSES:
            raise RFIError(f"unknown pixel loss '{pixel_type}' (valid: {', '.join(PIXEL_LOSSES)})")
        if gan_loss not in GAN_LOSSES:
            raise RFIError(f"unknown GAN loss '{gan_loss}' (valid: {', '.join(GAN_LOSSES)})")
        if reduction not in REDUCTIONS:
            raise RFIError(f"unknown loss reduction '{reduction}' (valid: {', '.join(REDUCTIONS)})")
        self.reduction = reduction
        if lpips > 0 and lpips_model is None:
            raise RFIError("loss.lpips > 0 needs an LPIPS model")
        if adversarial > 0 and discriminator is None:
            raise RFIError("loss.adversarial > 0 needs a discriminator")
        self.weights = weights
        self.layer, self.pixel_type, self.gan_loss = layer, pixel_type, gan_loss
        # A plain class, not an nn.Module: the encoder and LPIPS are frozen and the
        # discriminator has its own optimiser and checkpoint entry, so the loss holds no state.
        self.encoder, self.lpips_model, self.discriminator = encoder, lpips_model, discriminator

    @property
    def active(self) -> list[str]:
        """Names of the terms with a non-zero weight."""
        return [k for k, w in self.weights.items() if w > 0]

    def __call__(
        self, output: Tensor, target: Tensor, condition: Tensor | None = None, target_features: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its terms (unweighted, detached) for a batch of reconstructions.

        Args:
            output: reconstructions.
            target: the clean images.
            condition: the features the decoder was given (for the DeePSiM discriminator).
            target_features: encoder features of ``target`` at ``layer`` (computed when ``None``).
        """
        w = self.weights
        terms: dict[str, Tensor] = {}
        total = output.new_zeros(())
        if w["pixel"] > 0:
            terms["pixel"] = pixel_loss(output, target, self.pixel_type, self.reduction)
            total = total + w["pixel"] * terms["pixel"]
        if w["feature"] > 0:
            if target_features is None:
                with torch.no_grad():
                    target_features = self.encoder(target, layers=[self.layer])[self.layer]
            terms["feature"] = feature_loss(
                self.encoder(output, layers=[self.layer])[self.layer], target_features, self.reduction
            )
            total = total + w["feature"] * terms["feature"]
        if w["lpips"] > 0:
            terms["lpips"] = _reduce(self.lpips_model(output, target, normalize=True), self.reduction)
            total = total + w["lpips"] * terms["lpips"]
        if w["adversarial"] > 0:
            disc = self.discriminator
            disc.requires_grad_(False)  # the generator step must not train the discriminator
            try:
                terms["adversarial"] = generator_loss(disc(output, condition), self.gan_loss, self.reduction)
            finally:
                disc.requires_grad_(True)
            total = total + w["adversarial"] * terms["adversarial"]
        terms = {k: v.detach() for k, v in terms.items()}
        terms["total"] = total.detach()
        return total, terms

    def discriminator_step_loss(
        self, real: Tensor, fake: Tensor, condition: Tensor | None, discriminator: nn.Module | None = None
    ) -> Tensor:
        """The discriminator's loss on clean images vs (detached) reconstructions.

        Real and fake go through ``discriminator`` (default: the loss's own; pass its DDP
        wrapper when distributed) as one batch, so one forward and one backward.
        """
        disc = discriminator if discriminator is not None else self.discriminator
        cond = None if condition is None else torch.cat([condition, condition]).detach()
        logits = disc(torch.cat([real, fake.detach()]), cond)
        real_logits, fake_logits = logits.chunk(2)
        return discriminator_loss(real_logits, fake_logits, self.gan_loss, self.reduction)


def term_weights(weights: Mapping[str, float]) -> str:
    """A short human-readable summary of the active terms, e.g. ``pixel 1 + feature 0.1``."""
    return " + ".join(f"{k} {v:g}" for k, v in weights.items() if v > 0) or "(no term)"
