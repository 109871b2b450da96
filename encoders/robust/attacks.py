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

Mixed precision (``precision="bf16"`` or ``"fp16"``, as in adversarial training with
``precision`` set): only the model's forward pass runs under ``torch.autocast``. The
iterate ``x_adv``, the random start, the cross-entropy (on logits cast to fp32), the input
gradient, the step and both projections stay in fp32, so the ε-ball and the [0, 1] range
are enforced exactly, whatever the model's compute precision; the gradient itself comes
back through the model in bf16/fp16 and is only as accurate as that (a direction: the L2
step normalises it and the L∞ step takes its sign, so its scale never matters). Under
fp16 the loss is multiplied by :data:`FP16_LOSS_SCALE` before the backward pass, so small
input gradients do not underflow to zero (the step is invariant to that factor), and a
step whose gradient overflows (Inf/NaN) is recomputed in fp32.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.core.runtime import autocast, check_precision

NORMS = ("l2", "linf")
FP16_LOSS_SCALE = 1024.0
"""Factor on the attack's loss under fp16 autocast (keeps input gradients above fp16's underflow)."""


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


def check_attack(eps: float, steps: int, step_size: float | None = None, min_steps: int = 1) -> None:
    """Refuse attack settings that would print a false robustness figure.

    A negative radius or step size turns PGD into an *anti*-attack (accuracy under attack
    above clean accuracy); ``steps < min_steps`` measures nothing.

    Raises:
        RFIError: ``eps`` not finite or < 0, ``steps`` < ``min_steps``, ``step_size`` not finite or <= 0.

    Example:
        >>> check_attack(0.5, 10, -0.125)
        Traceback (most recent call last):
        encoders.core.errors.RFIError: step size must be a finite number > 0, got -0.125
    """
    if not math.isfinite(eps) or eps < 0:
        raise RFIError(f"eps (attack radius) must be a finite number >= 0, got {eps}")
    if steps < min_steps:
        raise RFIError(f"steps (PGD steps) must be >= {min_steps}, got {steps}")
    if step_size is not None and (not math.isfinite(step_size) or step_size <= 0):
        raise RFIError(f"step size must be a finite number > 0, got {step_size}")


def pgd(model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float, steps: int,
        step_size: float | None = None, norm: str = "l2", random_start: bool = True,
        generator: torch.Generator | None = None, precision: str = "fp32") -> Tensor:
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
        precision: ``fp32`` (default), ``bf16`` or ``fp16``: autocast around the model's
            forward only; the update, projection and perturbation stay in fp32 (see the
            module docstring).

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
    check_attack(eps, steps, step_size, min_steps=0)
    check_precision(precision, key="attack precision")
    dtype = x.dtype
    x = x.detach()
    if eps == 0:
        return x.clone()
    if precision != "fp32":  # the iterates live in fp32 even if the images came in lower precision
        x = x.float()
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad = _input_gradient(model_fn, x_adv, y, precision)
        if precision == "fp16" and not torch.isfinite(grad).all():  # overflow: this step in fp32
            grad = _input_gradient(model_fn, x_adv, y, "fp32")
        with torch.no_grad():
            if norm == "l2":
                step = grad / _per_sample_norm(grad).clamp_min(1e-12)
            else:
                step = grad.sign()
            x_adv = _project(x_adv + step_size * step, x, eps, norm)
    return x_adv.detach().to(dtype)


def _input_gradient(model_fn: Callable[[Tensor], Tensor], x_adv: Tensor, y: Tensor, precision: str) -> Tensor:
    """d(summed cross-entropy)/d(x_adv), the forward under autocast, the loss in fp32."""
    with autocast(x_adv.device, precision):
        logits = model_fn(x_adv)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")  # sum: per-sample gradients unscaled
    if precision == "fp16":
        loss = loss * FP16_LOSS_SCALE
    grad, = torch.autograd.grad(loss, x_adv)
    return grad / FP16_LOSS_SCALE if precision == "fp16" else grad
