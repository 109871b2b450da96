"""Optimisers and schedules (encoders.core.optim)."""

from __future__ import annotations

import pytest
import torch

from encoders.core.optim import OptimConfig, build_optimizer


@pytest.mark.parametrize("total", [1, 2, 4, 5, 10, 20])
def test_onecycle_runs_for_any_length(total):
    """5 steps at warmup 0.2 (a one-step warm-up phase) used to divide by zero inside torch."""
    opt, sched = build_optimizer(
        OptimConfig(schedule="onecycle", warmup=0.2), [torch.zeros(1, requires_grad=True)], total
    )
    lrs = []
    for _ in range(total):
        opt.step()
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert all(0 <= lr <= OptimConfig().lr * (1 + 1e-9) for lr in lrs)
    if total >= 5:
        assert max(lrs) > lrs[0] and lrs[-1] < max(lrs)  # warms up, then decays
