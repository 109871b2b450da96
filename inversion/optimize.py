"""Optimisation-based feature inversion: the slow baseline that trained decoders replace.

Gradient descent (Adam, cosine-decayed step size) on the pixels of an image so that its
encoder features at one layer match the target's (Mahendran & Vedaldi 2015, and the
"representation inversion" of robust models in Engstrom et al. 2019). The pixels are
parameterised as ``sigmoid(z)``, so they always stay in [0, 1]; a total-variation prior
(``kornia.losses.total_variation``) favours piecewise-smooth images.

Loss per image: ``||phi(x) - phi_0||^2 / ||phi_0||^2 + tv_weight * TV(x)``, with TV the
mean absolute difference between neighbouring pixels. Images in a batch are inverted
independently (the loss is a sum over images and Adam acts per pixel).

Example:
    >>> from encoders import create_encoder
    >>> enc = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
    >>> x = torch.rand(1, 3, 32, 32)
    >>> rec = invert_by_optimization(enc, x, "layer2", steps=5)
    >>> tuple(rec.shape), bool(rec.min() >= 0 and rec.max() <= 1)
    ((1, 3, 32, 32), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import kornia
import torch
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.core.imageio import check_images
from encoders.core.runtime import progress as progress_bar
from encoders.nets.models import Encoder

Init = Literal["noise", "mean"]
NOISE = 0.1  # half-width of the uniform noise added to the mean colour by init="noise"


def _initial_logits(
    shape: tuple[int, ...], encoder: Encoder, init: Init, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    mean = encoder.normalizer.new_mean.detach().to(device).view(1, 3, 1, 1).expand(shape).clone()
    if init == "noise":
        u = torch.rand(shape, generator=generator, device="cpu" if generator is None else generator.device)
        mean = mean + (2 * u.to(device) - 1) * NOISE
    elif init != "mean":
        raise RFIError(f"init must be 'noise' or 'mean', got {init!r}")
    return torch.logit(mean.clamp(1e-3, 1 - 1e-3))


def invert_by_optimization(
    encoder: Encoder,
    target: Tensor | Mapping[str, Tensor],
    layer: str,
    steps: int = 300,
    lr: float = 0.2,
    tv_weight: float = 0.05,
    init: Init = "noise",
    generator: torch.Generator | None = None,
    size: tuple[int, int] | None = None,
    progress: bool = False,
) -> Tensor:
    """Find images whose ``layer`` features match the target's.

    Args:
        encoder: the encoder (kept in eval mode, its weights untouched).
        target: images (B, 3, H, W) in [0, 1] whose features are inverted, or their features
            at ``layer``: a tensor (B, C, h, w) with C != 3 or a mapping ``{layer: tensor}``.
        layer: the encoder layer to match (e.g. ``layer3``).
        steps: Adam steps.
        lr: Adam step size on the logits (decays to 0 on a cosine schedule).
        tv_weight: weight of the total-variation prior (0 switches it off).
        init: ``noise`` (mean colour +- uniform noise, from ``generator``) or ``mean`` (flat
            mean colour, deterministic).
        generator: torch generator for the initial noise (reproducible runs).
        size: output (H, W) when ``target`` holds features (default: feature size x stride).
        progress: show a progress bar.

    Returns:
        Images (B, 3, H, W) in [0, 1], detached.

    Raises:
        RFIError: NaN/Inf or malformed target, unknown layer, bad ``init`` or ``steps``.
    """
    if steps < 0:
        raise RFIError(f"steps must be >= 0, got {steps}")
    layer = encoder.check_layers([layer])[0]
    param = next(encoder.parameters())
    device = param.device
    if isinstance(target, Mapping):
        target = target[layer]
    if not isinstance(target, Tensor) or target.dim() != 4:
        raise RFIError("target must be images (B, 3, H, W) or features (B, C, h, w)")
    was_training = encoder.training
    grads = [p.requires_grad for p in encoder.parameters()]
    encoder.eval().requires_grad_(False)
    try:
        if target.shape[1] == 3:
            check_images(target, "target images")
            with torch.no_grad():
                feats = encoder(target.to(device), layers=[layer])[layer]
            size = tuple(target.shape[-2:])
        else:
            if not torch.isfinite(target).all():
                raise RFIError("target features contain NaN or Inf values")
            feats = target.to(device)
            if size is None:
                stride = encoder.feature_info()[layer][1]
                size = (feats.shape[-2] * stride, feats.shape[-1] * stride)
        norm = feats.pow(2).flatten(1).sum(1).clamp_min(1e-12)
        z = _initial_logits((feats.shape[0], 3, *size), encoder, init, generator, device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        for _ in progress_bar(range(steps), desc="optimise", leave=False) if progress else range(steps):
            x = torch.sigmoid(z)
            out = encoder(x, layers=[layer])[layer]
            if out.shape != feats.shape:
                raise RFIError(
                    f"images of {size[0]}x{size[1]} give '{layer}' features of shape "
                    f"{tuple(out.shape)}, not the target's {tuple(feats.shape)}: pass size="
                )
            loss = (out - feats).pow(2).flatten(1).sum(1) / norm
            if tv_weight:
                loss = loss + tv_weight * kornia.losses.total_variation(x, reduction="mean").mean(1)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            sched.step()
        return torch.sigmoid(z).detach()
    finally:
        for p, g in zip(encoder.parameters(), grads):
            p.requires_grad_(g)
        encoder.train(was_training)
