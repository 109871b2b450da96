"""Fast adversarial training: the training methods' settings, free training's replayed perturbation and GradAlign.

PGD-k training runs k + 1 forward/backward passes per step. The field's cheaper methods
(their attacks live in :mod:`encoders.robust.attacks`), with the papers' settings (L∞):

- ``pgd``: ``steps`` projected steps from a random start (:func:`~encoders.robust.attacks.pgd`).
  Madry et al. 2018: ε = 8/255, 7-10 steps of 2/255 on CIFAR-10 (RFI's default: L2, 3 steps).
- ``fgsm_rs``: one step of α from a uniform start in the ε-ball, projected
  (:func:`~encoders.robust.attacks.fgsm_rs`). Wong, Rice & Kolter 2020: α = 1.25 ε (α = 10/255 at
  ε = 8/255 on CIFAR-10; ε = 2/255 and 4/255 on ImageNet); α = 2 ε overfits catastrophically.
- ``free``: each minibatch replayed ``replays`` (m) times; the one backward pass of each
  replay trains the parameters *and* steps the perturbation δ, which persists across
  replays and minibatches (:class:`FreeReplay`). Shafahi et al. 2019: step ε, m = 8 at
  ε = 8/255 (CIFAR-10), m = 4 at ε = 2/255 and 4/255 (ImageNet), for ``epochs / m`` epochs so
  that the cost is that of standard training.
- ``n_fgsm``: one step of α from noise of radius ``noise`` (k ε), *not* projected onto the
  ε-ball, only onto [0, 1] (:func:`~encoders.robust.attacks.n_fgsm`). de Jorge et al. 2022:
  k = 2 (noise 2 ε), α = ε, on CIFAR-10/100 and SVHN up to ε = 16/255.

``grad_align`` (λ > 0, with ``fgsm_rs`` or ``n_fgsm``) adds GradAlign (Andriushchenko &
Flammarion 2020), ``λ (1 - cos(∇x ℓ(x), ∇x ℓ(x + η)))`` with η uniform in the ε-ball
(:func:`grad_align_penalty`): it keeps the loss locally linear, which is what single-step
training loses when it overfits catastrophically. The paper pairs it with plain FGSM
(α = ε) and uses λ = 0.2 at ε = 8/255 on CIFAR-10, raising λ for larger ε (a grid per ε);
its double backprop makes a step about 3x an FGSM step.

Catastrophic overfitting (Wong et al. 2020): within a few steps a single-step-trained model
becomes robust to its own training attack while its PGD accuracy collapses to ~0. Watch for
it with :func:`encoders.robust.evaluate.overfitting_probe` and
:func:`~encoders.robust.evaluate.overfitting_warning`; judge the result with
:func:`~encoders.robust.evaluate.masking_checks`.

L2 (RFI's default norm; the papers above are L∞ only): uniform draws are uniform in the L2
ball, steps follow the normalised gradient ``α g / ||g||_2`` instead of ``α sign(g)``, and
projections shrink onto the L2 ball, as :func:`~encoders.robust.attacks.pgd` does. The
defaults keep the papers' ratios to ε (α = 1.25 ε for FGSM-RS; step ε for free training;
noise 2 ε and α = ε for N-FGSM); no paper has validated them under L2, so check a run with
:func:`~encoders.robust.evaluate.masking_checks`.

How a trainer uses this module (``method = AdvMethod(...)`` once, from its config):

- ``pgd``, ``fgsm_rs``, ``n_fgsm``: ``x_adv = method.examples(encoder.logits, x, y)`` (the
  encoder in eval mode, as for PGD), then the usual training step on ``x_adv``; with
  ``method.grad_align > 0`` the loss gains ``method.grad_align * grad_align_penalty(encoder.logits,
  x, y, method.eps, method.norm)`` (train mode, before the one ``backward``).
- ``free``: ``replay = method.replay()`` once per run; for each minibatch, ``method.replays``
  times: ``x_adv = replay.perturb(x)``, forward (train mode) and ``loss.backward()``,
  ``replay.update(x_adv)``, optimizer step. ``replay.state_dict()`` belongs in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.robust.attacks import (
    Norm,
    ascent_direction,
    check_norm,
    default_step_size,
    fgsm_rs,
    input_gradient,
    n_fgsm,
    pgd,
    project_to_ball,
    uniform_in_ball,
)

Method = Literal["pgd", "fgsm_rs", "free", "n_fgsm"]
METHODS = typing.get_args(Method)
GRAD_ALIGN_METHODS = ("fgsm_rs", "n_fgsm")
"""The methods ``grad_align`` applies to (single-step attacks; free training has no separate attack step)."""


def check_method(
    method: str,
    norm: str,
    eps: float,
    step_size: float | None = None,
    noise: float | None = None,
    replays: int = 1,
    grad_align: float = 0.0,
    steps: int | None = None,
    section: str = "adv",
) -> None:
    """Refuse adversarial-training settings no run could use, in one line naming the config key.

    ``noise`` (N-FGSM only), ``replays`` (free only) and ``grad_align`` (FGSM-RS and N-FGSM
    only) are refused for the other methods unless they hold their neutral value (``None``,
    1, 0), so a misplaced key never goes silently unused. ``steps`` and PGD's random start
    are PGD's own keys; the single-step methods ignore them (configs always hold them).

    Args:
        method: one of :data:`METHODS`.
        norm: ``"l2"`` or ``"linf"``.
        eps: the training radius ε (finite, >= 0).
        step_size: the step; ``None`` for the method's default (see :class:`AdvMethod`).
        noise: N-FGSM's noise radius ``k ε``, in ``[0, 2 ε]``; ``None`` for ``2 ε``.
        replays: free training's replays of each minibatch (>= 1).
        grad_align: GradAlign's weight λ (finite, >= 0; 0 is off).
        steps: PGD's steps (>= 1 for ``pgd``; ignored otherwise).
        section: the config section the keys are named in (``adv`` gives ``adv.replays``).

    Raises:
        RFIError: the first bad setting, naming its key and the valid values.

    Example:
        >>> check_method("free", "linf", 8 / 255, replays=0)
        Traceback (most recent call last):
        encoders.core.errors.RFIError: adv.replays (free training's replays of each minibatch) must be >= 1, got 0
        >>> check_method("fgsm_rs", "linf", 8 / 255, replays=8)
        Traceback (most recent call last):
        encoders.core.errors.RFIError: adv.replays is for adv.method=free, not adv.method=fgsm_rs
    """
    key = f"{section}." if section else ""
    if method not in METHODS:
        raise RFIError(f"unknown {key}method '{method}' (valid: {', '.join(METHODS)})")
    check_norm(norm, key=f"{key}norm")
    misplaced = {
        "noise": (noise is not None, ("n_fgsm",)),
        "replays": (replays != 1, ("free",)),
        "grad_align": (grad_align != 0, GRAD_ALIGN_METHODS),
    }
    for name, (given, owners) in misplaced.items():
        if given and method not in owners:
            raise RFIError(
                f"{key}{name} is for {' or '.join(f'{key}method={m}' for m in owners)}, not {key}method={method}"
            )
    if not math.isfinite(eps) or eps < 0:
        raise RFIError(f"{key}eps (attack radius) must be a finite number >= 0, got {eps}")
    if step_size is not None and (not math.isfinite(step_size) or step_size <= 0):
        raise RFIError(f"{key}step_size must be a finite number > 0 (null: the method's default), got {step_size}")
    if method == "pgd" and (steps is None or steps < 1):
        raise RFIError(f"{key}steps (PGD steps) must be >= 1 for {key}method=pgd, got {steps}")
    if replays < 1:
        raise RFIError(f"{key}replays (free training's replays of each minibatch) must be >= 1, got {replays}")
    if noise is not None and not (math.isfinite(noise) and 0 <= noise <= 2 * eps):
        raise RFIError(
            f"{key}noise (N-FGSM's noise radius k*eps) must be in [0, 2 * {key}eps] = [0, {2 * eps:.4g}], got {noise}"
        )
    if not math.isfinite(grad_align) or grad_align < 0:
        raise RFIError(f"{key}grad_align (GradAlign's weight) must be a finite number >= 0, got {grad_align}")


@dataclasses.dataclass(frozen=True)
class AdvMethod:
    """A checked adversarial-training method and its settings (see the module docstring for each method).

    ``step_size`` ``None`` resolves (:attr:`step`) to the method's default: ``2.5 ε / steps``
    (``pgd``), ``1.25 ε`` (``fgsm_rs``), ``ε`` (``free``, ``n_fgsm``). Construction runs
    :func:`check_method`.

    Example:
        >>> AdvMethod("fgsm_rs", "linf", eps=8 / 255).step * 255
        10.0
        >>> AdvMethod("n_fgsm", "l2", eps=0.5, replays=4)
        Traceback (most recent call last):
        encoders.core.errors.RFIError: adv.replays is for adv.method=free, not adv.method=n_fgsm
    """

    method: Method
    norm: Norm
    eps: float
    steps: int | None = None
    step_size: float | None = None
    random_start: bool = True
    noise: float | None = None
    replays: int = 1
    grad_align: float = 0.0

    def __post_init__(self) -> None:
        check_method(
            self.method, self.norm, self.eps, self.step_size, self.noise, self.replays, self.grad_align, self.steps
        )

    @property
    def step(self) -> float:
        """The step size, resolved."""
        if self.step_size is not None:
            return self.step_size
        if self.method == "pgd":
            return default_step_size(self.eps, self.steps)
        return 1.25 * self.eps if self.method == "fgsm_rs" else self.eps

    def examples(
        self,
        model_fn: Callable[[Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        precision: str = "fp32",
    ) -> Tensor:
        """The method's adversarial examples for a batch (the model's mode is the caller's: eval for training).

        For ``free`` (whose training perturbs through :meth:`replay` instead) this is what
        its replays build on a batch from δ = 0 in one replay: one projected step of
        :attr:`step` from ``x`` (FGSM), the attack :func:`~encoders.robust.evaluate.overfitting_probe` watches.

        Args:
            model_fn: maps images in [0, 1] to logits, e.g. ``encoder.logits``.
            x: clean images in [0, 1].
            y: integer labels.
            generator: random generator for starts and noise (default: torch's global one).
            precision: autocast for the model's forward passes (the perturbation stays fp32).

        Returns:
            Perturbed images, detached, in [0, 1]: within ``eps`` of ``x`` (``n_fgsm``: within
            ``noise + step``).

        Shape:
            - x: (B, C, H, W); y: (B,); output: (B, C, H, W).
        """
        if self.method == "pgd":
            return pgd(
                model_fn, x, y, self.eps, self.steps, self.step, self.norm, self.random_start, generator, precision
            )
        if self.method == "fgsm_rs":
            return fgsm_rs(model_fn, x, y, self.eps, self.norm, self.step, generator, precision)
        if self.method == "n_fgsm":
            return n_fgsm(model_fn, x, y, self.eps, self.norm, self.step, self.noise, generator, precision)
        return pgd(model_fn, x, y, self.eps, 1, self.step, self.norm, random_start=False, precision=precision)

    def replay(self) -> FreeReplay:
        """A fresh :class:`FreeReplay` (δ = 0) with this method's ε, norm and step."""
        return FreeReplay(self.eps, self.norm, self.step)


class FreeReplay:
    """The perturbation δ of free adversarial training (Shafahi et al. 2019), kept across replays and minibatches.

    Each minibatch is replayed ``replays`` times; every replay is one ordinary training step
    on ``x + δ`` whose single ``backward`` pass also leaves the input gradient ``g`` on the
    perturbed batch. :meth:`update` then moves δ by ``step`` along
    :func:`~encoders.robust.attacks.ascent_direction` (``sign(g)`` for L∞, ``g / ||g||_2``
    for L2) and projects it onto the ε-ball. δ is not reset between minibatches: the next
    batch starts from the last one's δ (row ``i`` of δ goes with row ``i`` of every batch).
    A smaller batch (the last of an epoch) uses and updates the first rows only; a larger
    one gets zero rows appended; images of another size reset δ to zero.

    The perturbed batch is ``clamp(x + δ, 0, 1)``, so it lies within ε of ``x``. An input
    gradient that is not finite (an fp16 step the grad scaler skips) leaves δ unchanged.

    Args:
        eps: the ball's radius.
        norm: ``"l2"`` or ``"linf"``.
        step: δ's step (the paper: ``eps``).

    Example:
        >>> replay = FreeReplay(eps=0.1, norm="linf", step=0.1)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.full((2, 3, 2, 2), 0.5), torch.tensor([0, 1])
        >>> for _ in range(2):  # two replays of one minibatch
        ...     x_adv = replay.perturb(x)
        ...     torch.nn.functional.cross_entropy(model(x_adv), y).backward()
        ...     replay.update(x_adv)
        >>> bool((replay.perturb(x) - x).abs().max() <= 0.1 + 1e-6)
        True
    """

    def __init__(self, eps: float, norm: str, step: float):
        check_norm(norm)
        self.eps, self.norm, self.step = eps, norm, step
        self.delta: Tensor | None = None

    def perturb(self, x: Tensor) -> Tensor:
        """The batch to train on, ``clamp(x + δ, 0, 1)``: a leaf that requires grad, for :meth:`update` to read.

        Shape:
            - x: (B, C, H, W); output: same.
        """
        delta = None if self.delta is None else self.delta.to(x.device)
        if delta is None or delta.shape[1:] != x.shape[1:]:
            delta = torch.zeros(x.shape, device=x.device)
        elif delta.shape[0] < x.shape[0]:
            delta = torch.cat([delta, delta.new_zeros((x.shape[0] - delta.shape[0], *x.shape[1:]))])
        self.delta = delta
        return (x.detach() + delta[: x.shape[0]]).clamp(0, 1).to(x.dtype).requires_grad_(True)

    def update(self, x_adv: Tensor) -> None:
        """Step δ along the input gradient that ``loss.backward()`` left on ``x_adv`` (from :meth:`perturb`).

        Raises:
            ValueError: ``x_adv`` has no gradient (``backward`` was not called on a loss of it).
        """
        if x_adv.grad is None or self.delta is None:
            raise ValueError("FreeReplay.update needs the batch from perturb() after loss.backward() on it")
        grad = x_adv.grad.float()
        if not torch.isfinite(grad).all():
            return
        n = grad.shape[0]
        with torch.no_grad():
            self.delta[:n] = project_to_ball(
                self.delta[:n] + self.step * ascent_direction(grad, self.norm), self.eps, self.norm
            )

    def state_dict(self) -> dict[str, Any]:
        """δ, for a checkpoint (resuming without it restarts free training's perturbation from zero)."""
        return {"delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore δ from :meth:`state_dict` (it moves to the batches' device on the next :meth:`perturb`)."""
        self.delta = state["delta"]


def grad_align_penalty(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "l2",
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Tensor:
    """GradAlign's regulariser (Andriushchenko & Flammarion 2020): batch mean of ``1 - cos(∇x ℓ(x), ∇x ℓ(x + η))``.

    ``η`` is drawn uniformly in the ε-ball (:func:`~encoders.robust.attacks.uniform_in_ball`;
    ``x + η`` clamped to [0, 1]) and ``ℓ`` is the cross-entropy. Both input gradients keep
    their graphs, so the penalty's gradient with respect to the parameters is exact
    (double backprop; ``torch.autograd.gradcheck`` holds). The authors' code detaches the
    gradient at ``x`` to save one double backprop; that is a cheaper, biased gradient, not
    this function's. Samples where either gradient is zero (the cosine is undefined) are
    left out of the mean; with none left the penalty is 0. The trainer adds
    ``λ * penalty`` to the loss before its one ``backward`` (see the module docstring).

    Args:
        model_fn: maps images in [0, 1] to logits (in the training step's mode).
        x: clean images in [0, 1].
        y: integer labels.
        eps: the radius of η's ball.
        norm: ``"l2"`` or ``"linf"``.
        generator: random generator for η (default: torch's global one).
        precision: autocast for the model's forward passes.

    Returns:
        A scalar in [0, 2], differentiable with respect to the parameters of ``model_fn``.

    Shape:
        - x: (B, C, H, W); y: (B,); output: ().

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.randint(0, 3, (4,))
        >>> penalty = grad_align_penalty(model, x, y, eps=0.1)
        >>> penalty.backward()  # reaches the parameters through both input gradients
        >>> 0 <= penalty.item() <= 2, model[1].weight.grad.shape
        (True, torch.Size([3, 12]))
    """
    check_norm(norm)
    x = x.detach()
    x_noisy = (x + uniform_in_ball(x, eps, norm, generator)).clamp(0, 1)
    grads = [
        input_gradient(model_fn, point.clone().requires_grad_(True), y, precision, create_graph=True).flatten(1)
        for point in (x, x_noisy)
    ]
    defined = (grads[0].norm(dim=1) > 0) & (grads[1].norm(dim=1) > 0)
    if not defined.any():
        return grads[0].sum() * 0
    cos = F.cosine_similarity(grads[0][defined], grads[1][defined], dim=1)
    return 1 - cos.mean()
