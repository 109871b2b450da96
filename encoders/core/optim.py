"""Optimisers and learning-rate schedules of the trainers (one place for every trainer and app).

- :class:`OptimConfig` + :func:`build_optimizer`: SGD (Nesterov) or AdamW with a per-step
  ``onecycle``, ``cosine`` or ``constant`` schedule (``rfi train-encoder``, ``rfi ssl``).
- :func:`lr_scheduler` (:func:`lr_factor`): linear warm-up, then cosine decay to 0 or constant,
  re-read at every step so that a resumed run may be extended (``rfi train-decoder``).

Example:
    >>> params = [torch.zeros(1, requires_grad=True)]
    >>> opt, sched = build_optimizer(OptimConfig(name="adamw", schedule="constant"), params, total_steps=10)
    >>> type(opt).__name__, sched.get_last_lr() == [OptimConfig().lr]
    ('AdamW', True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch

from encoders.core.config import yaml_dataclass


@yaml_dataclass("encoder/defaults.yaml", "optim")
class OptimConfig:
    """Optimizer (``sgd`` with Nesterov momentum, or ``adamw``) and learning-rate schedule.

    ``schedule``: ``onecycle`` (warm-up for ``warmup`` of the steps, then cosine decay),
    ``cosine`` or ``constant``; ``lr`` is the peak learning rate.
    """

    name: Literal["sgd", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    schedule: Literal["onecycle", "cosine", "constant"]
    warmup: float


def build_optimizer(
    cfg: OptimConfig, params: Iterable[torch.nn.Parameter], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer of ``cfg`` over ``params`` and its per-step scheduler spanning ``total_steps``."""
    if cfg.name == "sgd":
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        # torch's OneCycleLR divides by zero when its warm-up phase ends at step 0, i.e. when
        # warmup * total_steps == 1 (e.g. 5 steps at warmup 0.2): warm up for 1.5 steps instead.
        warmup = cfg.warmup if cfg.warmup * total_steps != 1 else 1.5 / total_steps
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=warmup, cycle_momentum=False
        )
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    return opt, sched


def lr_factor(
    step: int, total: int, warmup_steps: int = 0, schedule: Literal["cosine", "constant"] = "cosine"
) -> float:
    """The learning rate at ``step`` of ``total`` as a fraction of the peak: linear warm-up over
    ``warmup_steps``, then cosine decay to 0 at ``total`` (or ``constant``); see :func:`lr_scheduler`.

    Example:
        >>> [round(lr_factor(s, 6, warmup_steps=2), 3) for s in range(7)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    t = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    lr: float | None,
    total: Callable[[], int],
    warmup_steps: int = 0,
    schedule: Literal["cosine", "constant"] = "cosine",
    step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a ``torch.optim.lr_scheduler.LambdaLR`` stepped once per training step.

    Args:
        optimizer: the optimizer whose learning rates it sets.
        lr: the peak learning rate of every parameter group; ``None``: each group's own ``lr`` is its
            peak (kept from a loaded optimizer state on resume).
        total: the run's number of steps (read at every step: a resumed run may be extended).
        warmup_steps, schedule: see :func:`lr_factor`.
        step: the step the run is at (a resumed run's); the learning rates are set for it.

    Example:
        >>> opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        >>> sched = lr_scheduler(opt, 1.0, lambda: 6, warmup_steps=2, step=4)
        >>> sched.get_last_lr(), sched.last_epoch
        ([0.5], 4)
    """
    for group in optimizer.param_groups:
        if lr is None:
            group.setdefault("initial_lr", group["lr"])
        else:
            group["initial_lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total(), warmup_steps, schedule), last_epoch=step - 1
    )
