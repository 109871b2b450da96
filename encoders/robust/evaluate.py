"""Accuracy of an encoder under attack, and the checks that tell real robustness from gradient masking.

- :func:`evaluate_encoder`: clean and PGD accuracy (the command ``rfi eval-encoder`` is
  :mod:`apps.commands.eval_encoder`).
- :func:`masking_checks`: what a reviewer asks before believing a (fast-trained) model:
  PGD-10 and PGD-50 with random restarts, accuracy as ε grows, and a transfer attack from a
  twin model, with the reasons to doubt the figures (``masking_flags``).
- :func:`overfitting_probe` and :func:`overfitting_warning`: a cheap watch for catastrophic
  overfitting during single-step training (:mod:`encoders.robust.fast`).

Example:
    >>> from encoders import create_encoder
    >>> from encoders.data.embedded import EmbeddedCrops
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
    >>> r = evaluate_encoder(enc, EmbeddedCrops("val", 16, num=16), eps=0.5, steps=2, norm="l2")
    >>> sorted(r)[:3], r["images"]
    (['clean_acc', 'clean_loss', 'eps'], 16)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from encoders.core.errors import RFIError
from encoders.core.runtime import progress
from encoders.nets.models import Encoder
from encoders.robust.attacks import check_attack, check_norm, default_step_size, pgd
from encoders.robust.fast import AdvMethod


def _evenly_spaced(dataset: Dataset, batch_size: int, max_images: int | None) -> tuple[Dataset, int]:
    """``max_images`` items evenly spread over ``dataset`` (all by default), so class-sorted datasets keep every
    class; refuses empty datasets and sizes < 1."""
    if batch_size < 1 or (max_images is not None and max_images < 1):
        raise RFIError(f"batch size and max images must be >= 1, got {batch_size} and {max_images}")
    if len(dataset) == 0:
        raise RFIError("the evaluation dataset is empty")
    n = len(dataset) if max_images is None else max(1, min(max_images, len(dataset)))
    if n < len(dataset):
        dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, n).round().long().tolist())
    return dataset, n


def evaluate_encoder(
    encoder: Encoder,
    dataset: Dataset,
    eps: float,
    steps: int,
    norm: str = "l2",
    step_size: float | None = None,
    batch_size: int = 256,
    max_images: int | None = None,
    random_start: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Clean accuracy and accuracy under an untargeted PGD attack (see :func:`encoders.robust.attacks.pgd`).

    The encoder is evaluated in ``eval()`` mode (its previous mode is restored).

    Args:
        encoder: the model (its ``logits`` are attacked).
        dataset: items ``(image (3, H, W) in [0, 1], label)``.
        eps: attack radius (0: no attack, PGD accuracy = clean accuracy).
        steps: PGD steps.
        norm: ``"l2"`` or ``"linf"``.
        step_size: default ``2.5 * eps / steps``.
        batch_size: images per batch.
        max_images: evaluate on this many images, evenly spread over the dataset (default: all).
        random_start: start each attack at a random point of the ε-ball.
        seed: seed of the random starts (the result is reproducible).
        device: default: the encoder's.

    Returns:
        ``clean_acc``, ``pgd_acc`` (fractions in [0, 1]), ``clean_loss``, ``pgd_loss``
        (mean cross-entropy), ``eps``, ``norm``, ``steps``, ``step_size`` (resolved),
        ``random_start`` and ``images``.
    """
    check_norm(norm)
    check_attack(eps, steps, step_size)
    dataset, n = _evenly_spaced(dataset, batch_size, max_images)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    attack = eps > 0 and (steps > 0 or random_start)
    generator = torch.Generator().manual_seed(seed)
    was_training = encoder.training
    encoder.eval()
    totals = {"clean_correct": 0, "pgd_correct": 0, "clean_loss": 0.0, "pgd_loss": 0.0}
    bar = progress(DataLoader(dataset, batch_size=batch_size), desc=f"PGD-{steps} {norm} eps={eps:g}")
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            clean = encoder.logits(x)
        if attack:
            x_adv = pgd(encoder.logits, x, y, eps, steps, step_size, norm, random_start, generator)
            with torch.no_grad():
                adv = encoder.logits(x_adv)
        else:
            adv = clean
        totals["clean_correct"] += (clean.argmax(1) == y).sum().item()
        totals["pgd_correct"] += (adv.argmax(1) == y).sum().item()
        totals["clean_loss"] += F.cross_entropy(clean, y, reduction="sum").item()
        totals["pgd_loss"] += F.cross_entropy(adv, y, reduction="sum").item()
    encoder.train(was_training)
    return {
        "clean_acc": totals["clean_correct"] / n,
        "pgd_acc": totals["pgd_correct"] / n,
        "clean_loss": totals["clean_loss"] / n,
        "pgd_loss": totals["pgd_loss"] / n,
        "eps": float(eps),
        "norm": norm,
        "steps": int(steps),
        "step_size": float(step_size),
        "random_start": bool(random_start),
        "images": n,
    }


def _worst_case_correct(
    model_fn, x: Tensor, y: Tensor, eps: float, steps: int, norm: str, restarts: int, generator: torch.Generator
) -> Tensor:
    """Which images stay correctly classified under every one of ``restarts`` randomly started PGD runs."""
    correct = torch.ones_like(y, dtype=torch.bool)
    for _ in range(restarts):
        x_adv = pgd(model_fn, x, y, eps, steps, norm=norm, random_start=True, generator=generator)
        with torch.no_grad():
            correct &= model_fn(x_adv).argmax(1) == y
    return correct


def masking_checks(
    encoder: Encoder,
    dataset: Dataset,
    eps: float,
    norm: str = "l2",
    twin: Encoder | None = None,
    restarts: int = 5,
    sweep: Sequence[float] = (0.5, 1, 2, 4, 8),
    sweep_steps: int = 20,
    near_zero: float = 0.05,
    tolerance: float | None = None,
    batch_size: int = 256,
    max_images: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The checks a reviewer asks for before believing an encoder's PGD accuracy (Athalye, Carlini & Wagner 2018).

    Gradient masking (a loss surface whose gradients mislead the attack, as single-step
    training can produce) makes white-box PGD fail without the model being robust. Measured
    on the same images, in ``eval()`` mode (modes are restored):

    - ``pgd10_acc``, ``pgd50_acc``: PGD-10 and PGD-50 at ``eps``, each with ``restarts``
      random starts; an image counts as correct only if it survives every restart.
    - ``sweep``: ``{"eps", "acc"}`` for PGD-``sweep_steps`` at each multiple of ``eps`` in
      ``sweep`` (increasing).
    - ``transfer_acc``: accuracy on PGD-50 examples crafted on ``twin`` (a model trained
      apart, e.g. the same recipe with another seed; ``None`` without a twin).

    ``masking_flags`` lists one human-readable reason per failed check (empty: nothing
    suspicious), with ``tolerance`` (default ``1 / sqrt(images)``, about the half-width of a
    95 % interval of an accuracy near 50 %) as the noise allowance:

    1. PGD-50 more than ``tolerance`` below PGD-10: the short attack had not converged.
    2. Accuracy at the largest ε of the sweep above ``near_zero``: a large enough ball
       defeats any classifier, so it is the attack that fails.
    3. Accuracy rising by more than ``tolerance`` from one ε of the sweep to the next.
    4. Transfer accuracy more than ``tolerance`` below the white-box accuracy (the lower of
       PGD-10 and PGD-50): a black-box attack should never beat a white-box one.

    Args:
        encoder: the model checked (its ``logits`` are attacked).
        dataset: items ``(image (3, H, W) in [0, 1], label)``.
        eps: the radius the robustness is claimed at (> 0).
        norm: ``"l2"`` or ``"linf"``.
        twin: a second model of the same task for the transfer attack (optional).
        restarts: random restarts of PGD-10 and PGD-50 (>= 1).
        sweep: multiples of ``eps`` for the sweep (> 0, increasing; the largest should be
            big enough to reach ~0 accuracy on any model).
        sweep_steps: PGD steps at each ε of the sweep.
        near_zero: the accuracy the sweep's largest ε must reach (a fraction).
        tolerance: the noise allowance (a fraction); default ``1 / sqrt(images)``.
        batch_size: images per batch.
        max_images: check this many images, evenly spread over the dataset (default: all).
        seed: seed of the random starts (the result is reproducible).
        device: default: the encoder's.

    Returns:
        ``clean_acc``, ``pgd10_acc``, ``pgd50_acc``, ``sweep``, ``transfer_acc``,
        ``masking_flags`` (list of str), and the settings ``eps``, ``norm``, ``restarts``,
        ``tolerance``, ``images``.

    Raises:
        RFIError: bad settings (``eps`` <= 0, ``restarts`` < 1, a sweep not positive and
        increasing, ``near_zero`` outside [0, 1]), or an empty dataset.
    """
    check_norm(norm)
    check_attack(eps, sweep_steps)
    sweep = [float(f) for f in sweep]
    if eps <= 0 or restarts < 1 or not sweep or sweep[0] <= 0 or any(a >= b for a, b in zip(sweep, sweep[1:])):
        raise RFIError(
            f"masking checks need eps > 0, restarts >= 1 and a positive, increasing sweep, got eps={eps}, "
            f"restarts={restarts}, sweep={sweep}"
        )
    if not 0 <= near_zero <= 1:
        raise RFIError(f"near_zero is an accuracy in [0, 1], got {near_zero}")
    dataset, n = _evenly_spaced(dataset, batch_size, max_images)
    tolerance = 1 / math.sqrt(n) if tolerance is None else tolerance
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    models = [m for m in (encoder, twin) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    counts = {"clean": 0, "pgd10": 0, "pgd50": 0, "transfer": 0, "sweep": [0] * len(sweep)}
    for x, y in progress(DataLoader(dataset, batch_size=batch_size), desc=f"masking checks {norm} eps={eps:g}"):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            counts["clean"] += (encoder.logits(x).argmax(1) == y).sum().item()
        for steps in (10, 50):
            counts[f"pgd{steps}"] += (
                _worst_case_correct(encoder.logits, x, y, eps, steps, norm, restarts, generator).sum().item()
            )
        for i, factor in enumerate(sweep):
            counts["sweep"][i] += (
                _worst_case_correct(encoder.logits, x, y, factor * eps, sweep_steps, norm, 1, generator).sum().item()
            )
        if twin is not None:
            x_twin = pgd(twin.logits, x, y, eps, 50, norm=norm, generator=generator)
            with torch.no_grad():
                counts["transfer"] += (encoder.logits(x_twin).argmax(1) == y).sum().item()
    for m, mode in zip(models, modes):
        m.train(mode)
    result = {
        "clean_acc": counts["clean"] / n,
        "pgd10_acc": counts["pgd10"] / n,
        "pgd50_acc": counts["pgd50"] / n,
        "sweep": [{"eps": f * eps, "acc": c / n} for f, c in zip(sweep, counts["sweep"])],
        "transfer_acc": counts["transfer"] / n if twin is not None else None,
        "eps": float(eps),
        "norm": norm,
        "restarts": restarts,
        "tolerance": tolerance,
        "images": n,
    }
    result["masking_flags"] = _masking_flags(result, near_zero)
    return result


def _masking_flags(r: dict[str, Any], near_zero: float) -> list[str]:
    """The reasons to doubt the figures of :func:`masking_checks` (its rules 1-4)."""
    flags, tol = [], r["tolerance"]
    if r["pgd50_acc"] < r["pgd10_acc"] - tol:
        flags.append(
            f"PGD-50 accuracy ({r['pgd50_acc']:.1%}) is below PGD-10's ({r['pgd10_acc']:.1%}) by more than "
            f"the {tol:.1%} noise: 10 steps had not converged; report PGD-50"
        )
    last = r["sweep"][-1]
    if last["acc"] > near_zero:
        flags.append(
            f"accuracy at the sweep's largest eps ({last['eps']:g}) is {last['acc']:.1%}, not near zero "
            f"(<= {near_zero:.1%}): a ball that large defeats any classifier, so the attack is failing "
            "(gradient masking)"
        )
    for a, b in zip(r["sweep"], r["sweep"][1:]):
        if b["acc"] > a["acc"] + tol:
            flags.append(
                f"accuracy rises with eps, from {a['acc']:.1%} at eps={a['eps']:g} to {b['acc']:.1%} at "
                f"eps={b['eps']:g} (beyond the {tol:.1%} noise): a larger ball cannot make a model more "
                "robust, so the attack is failing"
            )
    white_box = min(r["pgd10_acc"], r["pgd50_acc"])
    if r["transfer_acc"] is not None and r["transfer_acc"] < white_box - tol:
        flags.append(
            f"a transfer attack from the twin model leaves {r['transfer_acc']:.1%} accuracy, below the "
            f"white-box {white_box:.1%} by more than the {tol:.1%} noise: the model's own gradients "
            "mislead PGD (gradient masking)"
        )
    return flags


def overfitting_probe(
    encoder: Encoder,
    x: Tensor,
    y: Tensor,
    method: AdvMethod,
    pgd_steps: int = 10,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, float]:
    """Accuracy on one fixed batch, clean, under the training attack and under PGD: a cheap overfitting watch.

    Call it on the same held-out batch at regular points of a run (e.g. every epoch) and
    pass the records to :func:`overfitting_warning`. The encoder runs in ``eval()`` mode
    (its mode is restored); the random starts are seeded, so two probes of the same model
    agree exactly.

    Args:
        encoder: the model being trained (not a DDP wrapper).
        x: a fixed validation batch, images in [0, 1].
        y: its labels.
        method: the training method (its attack: :meth:`~encoders.robust.fast.AdvMethod.examples`).
        pgd_steps: steps of the reference PGD at ``method.eps`` (step ``2.5 eps / steps``,
            random start).
        seed: seed of the random starts and noise.
        precision: autocast for the forward passes.

    Returns:
        ``clean_acc``, ``train_attack_acc`` and ``pgd_acc`` (fractions).

    Shape:
        - x: (B, C, H, W); y: (B,).
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = encoder.training
    encoder.eval()
    x, y = x.to(next(encoder.parameters()).device), y.to(next(encoder.parameters()).device)
    batches = {
        "clean_acc": x,
        "train_attack_acc": method.examples(encoder.logits, x, y, generator, precision),
        "pgd_acc": pgd(
            encoder.logits, x, y, method.eps, pgd_steps, norm=method.norm, generator=generator, precision=precision
        ),
    }
    with torch.no_grad():
        result = {key: (encoder.logits(batch).argmax(1) == y).float().mean().item() for key, batch in batches.items()}
    encoder.train(was_training)
    return result


def overfitting_warning(
    history: Sequence[Mapping[str, float]], drop: float = 0.2, tolerance: float = 0.05
) -> str | None:
    """One line warning of catastrophic overfitting in a run's :func:`overfitting_probe` records, or ``None``.

    The rule: let ``best`` be the (first) record with the highest ``pgd_acc`` and ``last``
    the newest. It fires when PGD accuracy has fallen by more than ``drop`` from its best,
    ``pgd_acc[best] - pgd_acc[last] > drop``, while the training attack's accuracy has not
    fallen with it, ``train_attack_acc[last] >= train_attack_acc[best] - tolerance``: the
    model has learnt to beat its own (single-step) attack and nothing else. A run whose
    accuracies fall together (a harder ε schedule, a diverging learning rate) is not
    flagged: that is not this failure.

    Args:
        history: the probe records, oldest first (``pgd_acc`` and ``train_attack_acc``).
        drop: the fall of PGD accuracy that counts (a fraction: 0.2 is 20 points).
        tolerance: how far the training attack's accuracy may fall and still count as "not falling".

    Returns:
        The warning, or ``None`` (fewer than two records, or no divergence).

    Example:
        >>> healthy = [{"pgd_acc": 0.20, "train_attack_acc": 0.30}, {"pgd_acc": 0.35, "train_attack_acc": 0.45}]
        >>> overfitting_warning(healthy) is None
        True
        >>> overfitting_warning([*healthy, {"pgd_acc": 0.02, "train_attack_acc": 0.70}]).split(" while")[0]
        'catastrophic overfitting: PGD accuracy fell from 35.0% (probe 2) to 2.0% (probe 3)'
    """
    if len(history) < 2:
        return None
    best = max(range(len(history)), key=lambda i: (history[i]["pgd_acc"], -i))
    first, last = history[best], history[-1]
    if first["pgd_acc"] - last["pgd_acc"] > drop and last["train_attack_acc"] >= first["train_attack_acc"] - tolerance:
        return (
            f"catastrophic overfitting: PGD accuracy fell from {first['pgd_acc']:.1%} (probe {best + 1}) to "
            f"{last['pgd_acc']:.1%} (probe {len(history)}) while the training attack's accuracy went from "
            f"{first['train_attack_acc']:.1%} to {last['train_attack_acc']:.1%}; the model beats only its own "
            f"attack: train with n_fgsm or grad_align, or a smaller step, or keep probe {best + 1}'s weights"
        )
    return None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Results of :func:`evaluate_encoder` as a text table (accuracies in %)."""
    head = f"{'norm':<5} {'eps':>8} {'steps':>5} {'step size':>9} {'images':>6} {'clean acc':>9} {'PGD acc':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['norm']:<5} {r['eps']:>8.4g} {r['steps']:>5d} {r['step_size']:>9.3g} {r['images']:>6d} "
            f"{100 * r['clean_acc']:>8.1f}% {100 * r['pgd_acc']:>7.1f}%"
        )
    return "\n".join(lines)
