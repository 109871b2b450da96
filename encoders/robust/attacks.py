"""Gradient attacks under L2 and L-infinity constraints: iterated (PGD) and single-step (FGSM-RS, N-FGSM).

:func:`pgd` follows Madry et al. (2018) and the MadryLab ``robustness`` library's
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

The single-step attacks are the ones fast adversarial training uses (see
:mod:`encoders.robust.fast` for the training methods, the papers' settings and the L2
adaptation):

- :func:`fgsm_rs` (Wong, Rice & Kolter 2020, "Fast is better than free"): a start drawn
  uniformly in the ε-ball, one step of ``1.25 ε``, projection onto the ε-ball and [0, 1].
- :func:`n_fgsm` (de Jorge et al. 2022): noise drawn uniformly in the ball of radius
  ``2 ε``, one step of ``ε``, and *no* projection onto the ε-ball, only onto [0, 1]: the
  perturbation may be as large as ``noise + step_size`` (``3 ε`` by default).

Under L2 the "uniform" draws are uniform in the L2 ball (a random direction, radius
``r u^(1/d)`` for ``d`` pixel values) and the steps follow the normalised gradient; under
L∞ the draws are uniform in the cube and the steps follow the gradient's sign.

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
import typing
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.core.runtime import autocast, check_precision

Norm = Literal["l2", "linf"]
NORMS = typing.get_args(Norm)
FP16_LOSS_SCALE = 1024.0
"""Factor on the attack's loss under fp16 autocast (keeps input gradients above fp16's underflow)."""


def default_step_size(eps: float, steps: int) -> float:
    """``2.5 * eps / steps``: Madry et al.'s rule, enough to reach the ball's boundary from anywhere inside."""
    return 2.5 * eps / max(steps, 1)


def check_norm(norm: str, key: str = "attack norm") -> None:
    """Refuse a norm other than ``l2`` and ``linf``, naming the config ``key``.

    Raises:
        RFIError: unknown norm.

    Example:
        >>> check_norm("l1", key="adv.norm")
        Traceback (most recent call last):
        encoders.core.errors.RFIError: unknown adv.norm 'l1' (valid: l2, linf)
    """
    if norm not in NORMS:
        raise RFIError(f"unknown {key} '{norm}' (valid: {', '.join(NORMS)})")


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project_to_ball(delta: Tensor, eps: float, norm: str) -> Tensor:
    """The perturbations ``delta`` moved onto the ε-ball of ``norm`` (each sample on its own).

    L2: a sample outside the ball is shrunk onto its sphere; L∞: each value is clamped to
    ``[-eps, eps]``. Samples inside the ball are unchanged.

    Shape:
        - delta: (B, ...); output: same.

    Example:
        >>> project_to_ball(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0, "l2")
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    if norm == "l2":
        return delta * (eps / _per_sample_norm(delta).clamp_min(eps))
    return delta.clamp(-eps, eps)


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    return (x + project_to_ball(x_adv - x, eps, norm)).clamp(0, 1)


def _randn(
    like: Tensor, generator: torch.Generator | None, uniform: bool = False, shape: tuple[int, ...] | None = None
) -> Tensor:
    """Standard normal (or uniform in [0, 1)) values shaped as ``like`` (or ``shape``) with its dtype and device,
    drawn on the generator's device."""
    device = generator.device if generator is not None else like.device
    draw = torch.rand if uniform else torch.randn
    return draw(shape or like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def uniform_in_ball(like: Tensor, radius: float, norm: str, generator: torch.Generator | None = None) -> Tensor:
    """Perturbations drawn uniformly in the ball of ``radius`` (per sample), shaped as ``like``.

    L∞: each value uniform in ``[-radius, radius]``. L2: a uniform direction and a radius
    ``radius * u^(1/d)`` (``u`` uniform in [0, 1), ``d`` the values per sample), which is
    uniform in the L2 ball (for images nearly on its sphere: ``u^(1/d)`` is close to 1).

    Args:
        like: a tensor (B, ...) giving the shape, dtype and device.
        radius: the ball's radius (>= 0).
        norm: ``"l2"`` or ``"linf"``.
        generator: random generator (default: torch's global one).

    Returns:
        The perturbations, same shape as ``like``.

    Example:
        >>> noise = uniform_in_ball(torch.zeros(4, 3, 8, 8), 0.5, "l2", torch.Generator().manual_seed(0))
        >>> bool((noise.flatten(1).norm(dim=1) <= 0.5).all())
        True
    """
    if norm == "linf":
        return (_randn(like, generator, uniform=True) * 2 - 1) * radius
    direction = _randn(like, generator)
    direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
    u = _randn(like, generator, uniform=True, shape=(like.shape[0], *([1] * (like.dim() - 1))))  # one per sample
    return direction * radius * u.pow(1.0 / like[0].numel())


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    if norm == "l2":  # a random direction on the sphere of radius eps (as ``robustness``'s L2Step)
        noise = _randn(x, generator)
        noise = noise * eps / _per_sample_norm(noise).clamp_min(1e-12)
    else:  # uniform in the cube
        noise = (_randn(x, generator, uniform=True) * 2 - 1) * eps
    return (x + noise).clamp(0, 1)


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent direction of unit ``norm``: the gradient's sign (L∞) or ``grad / ||grad||_2`` (L2).

    Shape:
        - grad: (B, ...); output: same.

    Example:
        >>> ascent_direction(torch.tensor([[3.0, -4.0]]), "l2"), ascent_direction(torch.tensor([[3.0, -4.0]]), "linf")
        (tensor([[ 0.6000, -0.8000]]), tensor([[ 1., -1.]]))
    """
    if norm == "l2":
        return grad / _per_sample_norm(grad).clamp_min(1e-12)
    return grad.sign()


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


def pgd(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    norm: str = "l2",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Tensor:
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
    check_norm(norm)
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
        grad = input_gradient(model_fn, x_adv.requires_grad_(True), y, precision)
        with torch.no_grad():
            x_adv = _project(x_adv + step_size * ascent_direction(grad, norm), x, eps, norm)
    return x_adv.detach().to(dtype)


def fgsm_rs(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "l2",
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Tensor:
    """FGSM with a random start (Wong, Rice & Kolter 2020): one ascent step from a uniform point of the ε-ball.

    The start is drawn uniformly in the ε-ball (:func:`uniform_in_ball`) and clamped to
    [0, 1]; one step of ``step_size`` along :func:`ascent_direction`; then projection onto
    the ε-ball and onto [0, 1], as in PGD. The caller chooses the model's mode (see :func:`pgd`).

    Args:
        model_fn: maps images in [0, 1] to logits.
        x: clean images in [0, 1].
        y: integer labels.
        eps: radius of the ball (>= 0; 0 returns ``x``).
        norm: ``"l2"`` or ``"linf"``.
        step_size: the step α; default ``1.25 * eps`` (the paper's recommendation; larger
            steps bring catastrophic overfitting sooner).
        generator: random generator for the start (default: torch's global one).
        precision: autocast for the model's forward only (see the module docstring).

    Returns:
        Adversarial images, detached, values in [0, 1], within ``eps`` of ``x``.

    Shape:
        - x: (B, C, H, W); y: (B,); output: (B, C, H, W).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(5, 3, 2, 2), torch.randint(0, 3, (5,))
        >>> x_adv = fgsm_rs(model, x, y, eps=8 / 255, norm="linf")
        >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6)
        True
    """
    check_norm(norm)
    check_attack(eps, 1, step_size)
    check_precision(precision, key="attack precision")
    dtype, x = x.dtype, x.detach()
    if eps == 0:
        return x.clone()
    if precision != "fp32":  # the perturbation lives in fp32 (see the module docstring)
        x = x.float()
    step_size = 1.25 * eps if step_size is None else step_size
    x_start = (x + uniform_in_ball(x, eps, norm, generator)).clamp(0, 1)
    grad = input_gradient(model_fn, x_start.requires_grad_(True), y, precision)
    with torch.no_grad():
        x_adv = _project(x_start + step_size * ascent_direction(grad, norm), x, eps, norm)
    return x_adv.to(dtype)


def n_fgsm(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "l2",
    step_size: float | None = None,
    noise: float | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Tensor:
    """N-FGSM (de Jorge et al. 2022): one ascent step from strong noise, *not* projected back onto the ε-ball.

    Noise is drawn uniformly in the ball of radius ``noise`` (default ``2 * eps``, the
    paper's ``k = 2``) and the noisy image clamped to [0, 1]; one step of ``step_size``
    (default ``eps``) along :func:`ascent_direction`; the result is clamped to [0, 1] only.
    The perturbation is therefore bounded by ``noise + step_size`` (``3 eps`` by default),
    not by ``eps``: the paper shows that this larger, noisier perturbation, and not the
    projection, is what keeps single-step training clear of catastrophic overfitting.

    Args:
        model_fn: maps images in [0, 1] to logits.
        x: clean images in [0, 1].
        y: integer labels.
        eps: the training radius ε (>= 0) the defaults are relative to.
        norm: ``"l2"`` or ``"linf"``.
        step_size: the step α; default ``eps``.
        noise: radius of the noise ``k ε``; default ``2 * eps``.
        generator: random generator for the noise (default: torch's global one).
        precision: autocast for the model's forward only (see the module docstring).

    Returns:
        Perturbed images, detached, values in [0, 1], within ``noise + step_size`` of ``x``.

    Shape:
        - x: (B, C, H, W); y: (B,); output: (B, C, H, W).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(5, 3, 2, 2), torch.randint(0, 3, (5,))
        >>> x_adv = n_fgsm(model, x, y, eps=8 / 255, norm="linf")
        >>> bool((x_adv - x).abs().max() <= 3 * 8 / 255 + 1e-6)
        True
    """
    check_norm(norm)
    check_attack(eps, 1, step_size)
    check_precision(precision, key="attack precision")
    noise = 2 * eps if noise is None else noise
    if not math.isfinite(noise) or noise < 0:
        raise RFIError(f"N-FGSM noise radius must be a finite number >= 0, got {noise}")
    dtype, x = x.dtype, x.detach()
    if precision != "fp32":  # the perturbation lives in fp32 (see the module docstring)
        x = x.float()
    step_size = eps if step_size is None else step_size
    x_noisy = (x + uniform_in_ball(x, noise, norm, generator)).clamp(0, 1)
    grad = input_gradient(model_fn, x_noisy.requires_grad_(True), y, precision)
    with torch.no_grad():
        x_adv = (x_noisy + step_size * ascent_direction(grad, norm)).clamp(0, 1)
    return x_adv.to(dtype)


def input_gradient(
    model_fn: Callable[[Tensor], Tensor], x_adv: Tensor, y: Tensor, precision: str = "fp32", create_graph: bool = False
) -> Tensor:
    """d(summed cross-entropy)/d(x_adv): the model's forward under autocast, the loss in fp32 (or fp64).

    Under fp16 the loss is scaled by :data:`FP16_LOSS_SCALE` (and the gradient unscaled);
    a gradient that overflows is recomputed in fp32.

    Args:
        model_fn: maps images to logits.
        x_adv: images that require grad.
        y: integer labels.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast for the forward only).
        create_graph: keep the graph of the gradient, so a loss built from it can be
            differentiated again with respect to the parameters (double backprop, as
            :func:`encoders.robust.fast.grad_align_penalty` needs).

    Returns:
        The input gradient, same shape as ``x_adv`` (attached to the graph if ``create_graph``).

    Example:
        >>> x = torch.zeros(1, 3, requires_grad=True)  # the "model" passes its input on as logits
        >>> input_gradient(torch.nn.Identity(), x, torch.tensor([0]))  # softmax - one-hot
        tensor([[-0.6667,  0.3333,  0.3333]])
    """
    with autocast(x_adv.device, precision):
        logits = model_fn(x_adv)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    loss = F.cross_entropy(logits, y, reduction="sum")  # sum: per-sample gradients unscaled
    if precision == "fp16":
        loss = loss * FP16_LOSS_SCALE
    (grad,) = torch.autograd.grad(loss, x_adv, create_graph=create_graph)
    if precision != "fp16":
        return grad
    if not torch.isfinite(grad).all():  # overflow: this gradient in fp32
        return input_gradient(model_fn, x_adv, y, "fp32", create_graph)
    return grad / FP16_LOSS_SCALE
