"""Optimisers and schedules (encoders.core.optim)."""

from __future__ import annotations

import pytest
import torch

from encoders.core.optim import OptimConfig, build_optimizer, lr_scheduler


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


def test_lr_scheduler_without_a_peak_schedules_each_group_from_its_own_lr():
    w, v = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [v], "lr": 0.1}])
    sched = lr_scheduler(opt, None, lambda: 4, step=2)  # cosine at step 2 of 4: half the peak
    assert sched.get_last_lr() == pytest.approx([0.5, 0.05])
    resumed = torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [v], "lr": 0.1}])
    resumed.load_state_dict(opt.state_dict())  # groups now hold the step-2 rates and their peaks
    assert lr_scheduler(resumed, None, lambda: 4, step=2).get_last_lr() == pytest.approx([0.5, 0.05])
    assert lr_scheduler(opt, 2.0, lambda: 4, step=2).get_last_lr() == pytest.approx([1.0, 1.0])  # one peak for all
