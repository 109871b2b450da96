"""Learnable polyphase up-sampling (LPU): gradients of its hand-written phase placement (float64 gradcheck)."""

from __future__ import annotations

import pytest
import torch

from inversion.upsample import LPU

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcheck_lpu_soft_weights():
    """Training-mode (soft) phase weights: the output is a mixture of rolled copies; gradients w.r.t. both."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.rand(2, 4, dtype=torch.float64, generator=g).softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(LPU(2), (x, weights))


def test_gradcheck_lpu_one_hot_weights():
    """Eval-mode (constant one-hot) weights take the per-phase roll path; each image a different phase."""
    x = torch.rand(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.eye(4, dtype=torch.float64)[torch.tensor([3, 0, 2, 3])]
    assert torch.autograd.gradcheck(lambda x: LPU(2)(x, weights), (x,))
