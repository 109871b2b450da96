"""Projected gradient descent (PGD) attacks under L2 and L-infinity constraints.

The attack follows Madry et al. (2018) and the MadryLab ``robustness`` library's
``L2Step`` / ``LinfStep``: an optional random start inside the ε-ball, then ``steps``
ascent steps on the cross-entropy (normalised gradient for L2, gradient sign for L∞),
each followed by a projection onto the ε-ball and onto the valid image range [0, 1].
It is hand-written (about 40 lines) rather than taken from that library because its
attacker no longer imports on current torchvision and calls ``.cuda()`` unconditionally;
``tests/encoders/test_interop.py`` cross-checks the two on the same model and ε. One
deliberate difference: the library clamps its input to [0, 1] inside the model, and
``torch.clamp`` has a zero gradient at the bounds, so its attack never moves a pixel that
sits at 0 or 1; here such pixels keep their gradient (the projection keeps them in range).
On images away from the bounds the two produce the same iterates.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.errors import RFIError

NORMS = ("l2", "linf")


def default_step_size(eps: float, steps: int) -> float:
    """``2.5 * eps / steps``: Madry et al.'s rule, enough to reach the ball's boundary from anywhere inside."""
    return 2.5 * eps / max(steps, 1)


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    delta = x_adv - x
    if norm == "l2":
        delta = delta * (eps / _per_sample_norm(delta).clamp_min(eps))  # shrink onto the ball if outside
    else:
        delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    if norm == "l2":  # a random direction on the sphere of radius eps (as ``robustness``'s L2Step)
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        noise = noise * eps / _per_sample_norm(noise).clamp_min(1e-12)
    else:  # uniform in the cube
        noise = (torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device) * 2 - 1) * eps
    return (x + noise).clamp(0, 1)


def pgd(model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float, steps: int,
        step_size: float | None = None, norm: str = "l2", random_start: bool = True,
        generator: torch.Generator | None = None) -> Tensor:
    """Untargeted PGD: images within ``eps`` of ``x`` that maximise the cross-entropy on ``y``.

    The caller chooses the model's mode: attack in ``eval()`` mode (as the ``robustness``
    library does during adversarial training) so batch-norm statistics are neither
    updated by nor computed from the adversarial iterates. Parameter gradients are left
    untouched (only the input gradient is computed).

    Args:
        model_fn: maps images in [0, 1] to logits, e.g. ``encoder.logits``.
        x: clean images in [0, 1].
        y: integer labels.
        eps: radius of the ball (L2 norm of the whole image, or per-pixel L∞ bound).
        steps: number of ascent steps (0 returns the random start, or ``x``).
        step_size: size of each step; default :func:`default_step_size` (``2.5 * eps / steps``).
        norm: ``"l2"`` or ``"linf"``.
        random_start: start from a random point of the ball (on its sphere for L2).
        generator: random generator for the start (default: torch's global one).

    Returns:
        Adversarial images, detached, same shape as ``x``, values in [0, 1], within ``eps`` of ``x``.

    Shape:
        - x: (B, C, H, W); y: (B,); output: (B, C, H, W).

    Example:
        >>> from encoders import create_encoder
        >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8).eval()
        >>> x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 8, (4,))
        >>> x_adv = pgd(enc.logits, x, y, eps=0.5, steps=3)
        >>> bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all())
        True
    """
    if norm not in NORMS:
        raise RFIError(f"unknown attack norm '{norm}' (valid: {', '.join(NORMS)})")
    if eps < 0 or steps < 0:
        raise RFIError(f"attack eps and steps must be non-negative, got eps={eps}, steps={steps}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model_fn(x_adv), y, reduction="sum")  # sum: per-sample gradients unscaled
        grad, = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if norm == "l2":
                step = grad / _per_sample_norm(grad).clamp_min(1e-12)
            else:
                step = grad.sign()
            x_adv = _project(x_adv + step_size * step, x, eps, norm)
    return x_adv.detach()
