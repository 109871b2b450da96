"""Clean and PGD accuracy of an encoder (the command ``rfi eval-encoder`` is :mod:`apps.commands.eval_encoder`).

Example:
    >>> from encoders import create_encoder
    >>> from encoders.data.embedded import EmbeddedCrops
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
    >>> r = evaluate_encoder(enc, EmbeddedCrops("val", 16, num=16), eps=0.5, steps=2, norm="l2")
    >>> sorted(r)[:3], r["images"]
    (['clean_acc', 'clean_loss', 'eps'], 16)
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from encoders.robust.attacks import NORMS, check_attack, default_step_size, pgd
from encoders.core.errors import RFIError
from encoders.nets.models import Encoder
from encoders.core.runtime import progress


def evaluate_encoder(encoder: Encoder, dataset: Dataset, eps: float, steps: int, norm: str = "l2",
                     step_size: float | None = None, batch_size: int = 256, max_images: int | None = None,
                     random_start: bool = True, seed: int = 0,
                     device: torch.device | str | None = None) -> dict[str, Any]:
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
    if norm not in NORMS:
        raise RFIError(f"unknown attack norm '{norm}' (valid: {', '.join(NORMS)})")
    check_attack(eps, steps, step_size)
    if batch_size < 1 or (max_images is not None and max_images < 1):
        raise RFIError(f"batch size and max images must be >= 1, got {batch_size} and {max_images}")
    if len(dataset) == 0:
        raise RFIError("the evaluation dataset is empty")
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    n = len(dataset) if max_images is None else max(1, min(max_images, len(dataset)))
    if n < len(dataset):  # evenly spaced, so class-sorted datasets keep every class
        dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, n).round().long().tolist())
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
    return {"clean_acc": totals["clean_correct"] / n, "pgd_acc": totals["pgd_correct"] / n,
            "clean_loss": totals["clean_loss"] / n, "pgd_loss": totals["pgd_loss"] / n,
            "eps": float(eps), "norm": norm, "steps": int(steps), "step_size": float(step_size),
            "random_start": bool(random_start), "images": n}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Results of :func:`evaluate_encoder` as a text table (accuracies in %)."""
    head = f"{'norm':<5} {'eps':>8} {'steps':>5} {'step size':>9} {'images':>6} {'clean acc':>9} {'PGD acc':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['norm']:<5} {r['eps']:>8.4g} {r['steps']:>5d} {r['step_size']:>9.3g} {r['images']:>6d} "
                     f"{100 * r['clean_acc']:>8.1f}% {100 * r['pgd_acc']:>7.1f}%")
    return "\n".join(lines)
