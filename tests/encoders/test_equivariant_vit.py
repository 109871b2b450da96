"""Each adaptive module of the truly shift-equivariant ViT, on its own (encoders/nets/equivariant_vit.py)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.swin_transformer import (
    PatchMerging,
    PatchMergingV2,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
)

from encoders import RFIError
from encoders.nets.downsample import polyphase, set_temperature
from encoders.nets.equivariant_vit import (
    AdaptivePatchMerging,
    AdaptivePatchMergingV2,
    AdaptiveShiftedWindowAttention,
    AdaptiveShiftedWindowAttentionV2,
    AdaptiveTokenizer,
    PhaseSelector,
    _binary_levels,
    roll_tokens,
    window_anchor,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Offsets in pixels (tokenizer) or tokens (attention, merging): odd ones, and ones that are not
# multiples of the patch (4) or window (4) size.
SHIFTS = [(1, 0), (0, 3), (5, 7), (-3, 2), (9, 13), (6, 10)]


def phase_of(weights: torch.Tensor, stride: int) -> list[tuple[int, int]]:
    return [(int(i) // stride, int(i) % stride) for i in weights.argmax(1)]


def check_shift(y, y_shift, phase, phase_shift, t, stride, size):
    """``y_shift`` is ``y`` rolled by r tokens with ``stride * r + phase_shift == t + phase`` (mod size)."""
    for axis in range(2):
        moved = t[axis] + phase[axis] - phase_shift[axis]
        assert moved % stride == 0
    r = [((t[a] + phase[a] - phase_shift[a]) // stride) % (size // stride) for a in range(2)]
    assert torch.allclose(y_shift, y.roll(tuple(r), (-2, -1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("selection", ["norm", "learned"])
def test_adaptive_tokenizer_shifts_with_any_pixel_offset(selection):
    torch.manual_seed(0)
    tok = AdaptiveTokenizer(3, 8, patch_size=4, selection=selection).eval()
    x = torch.rand(2, 3, 16, 16)
    y = tok(x)
    w = tok.weights
    assert y.shape == (2, 8, 4, 4) and torch.equal(w.sum(1), torch.ones(2))
    for t in SHIFTS:
        ys = tok(x.roll(t, (2, 3)))
        for b in range(2):
            check_shift(y[b], ys[b], phase_of(w, 4)[b], phase_of(tok.weights, 4)[b], t, 4, 16)


def test_plain_patch_embedding_is_not_shift_equivariant():
    torch.manual_seed(0)
    tok = AdaptiveTokenizer(3, 8, patch_size=4).eval()
    x = torch.rand(1, 3, 16, 16)
    plain = lambda v: torch.nn.functional.conv2d(v, tok.proj.weight, tok.proj.bias, stride=4)  # noqa: E731
    y, ys = plain(x), plain(x.roll((1, 2), (2, 3)))
    assert min((ys - y.roll((a, b), (2, 3))).abs().max() for a in range(4) for b in range(4)) > 1e-2


def test_tokenizer_grid_zero_is_torchvision_patch_embedding():
    tok = AdaptiveTokenizer(3, 4, patch_size=2)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        comps = tok.candidates(x)
        plain = torch.nn.functional.conv2d(x, tok.proj.weight, tok.proj.bias, stride=2)
        assert torch.allclose(comps[:, 0], plain, atol=1e-6)  # grid (0, 0) is torchvision's
        at_11 = torch.nn.functional.conv2d(x.roll((-1, -1), (2, 3)), tok.proj.weight, tok.proj.bias, stride=2)
        assert torch.allclose(comps[:, 3], at_11, atol=1e-6)  # grid (1, 1): patches starting at pixel (1, 1)


@pytest.mark.parametrize(
    "cls,plain_cls",
    [
        (AdaptiveShiftedWindowAttention, ShiftedWindowAttention),
        (AdaptiveShiftedWindowAttentionV2, ShiftedWindowAttentionV2),
    ],
)
@pytest.mark.parametrize("shift", [0, 2])
def test_adaptive_window_attention_is_equivariant(cls, plain_cls, shift):
    torch.manual_seed(0)
    attn = cls(16, [4, 4], [shift, shift], num_heads=2).eval()
    plain = plain_cls(16, [4, 4], [shift, shift], num_heads=2).eval()
    plain.load_state_dict(attn.state_dict())  # same parameters and keys as torchvision's
    x = torch.randn(2, 8, 12, 16)
    with torch.no_grad():
        y, p = attn(x), plain(x)
        worst_plain = 0.0
        for t in SHIFTS:
            ys = attn(x.roll(t, (1, 2)))
            assert (ys - y.roll(t, (1, 2))).abs().max() <= 1e-5
            worst_plain = max(worst_plain, (plain(x.roll(t, (1, 2))) - p.roll(t, (1, 2))).abs().max().item())
    assert worst_plain > 1e-3  # torchvision's windows stay put: the failure being fixed


def test_window_anchor_moves_with_the_content_and_size_is_checked():
    x = torch.randn(3, 8, 8, 5)
    a = window_anchor(x, [4, 4])
    for t in SHIFTS:
        expect = (a + torch.tensor(t)) % 8
        assert torch.equal(window_anchor(x.roll(t, (1, 2)), [4, 4]), expect)
    with pytest.raises(RFIError, match="6x8 input.*multiples of 4"):
        AdaptiveShiftedWindowAttention(5, [4, 4], [0, 0], num_heads=1)(torch.randn(1, 6, 8, 5))


@pytest.mark.parametrize(
    "cls,plain_cls", [(AdaptivePatchMerging, PatchMerging), (AdaptivePatchMergingV2, PatchMergingV2)]
)
def test_adaptive_patch_merging_is_equivariant(cls, plain_cls):
    torch.manual_seed(0)
    merge = cls(6).eval()
    plain = plain_cls(6)
    plain.load_state_dict(merge.state_dict())  # norm selection adds no parameters
    x = torch.randn(2, 8, 8, 6)
    y = merge(x)
    w = merge.weights
    if w[0].argmax() == 0:  # offset (0, 0) is torchvision's merge
        assert torch.allclose(y[0], plain(x)[0], atol=1e-6)
    to_maps = lambda v: v.permute(0, 3, 1, 2)  # noqa: E731
    for t in SHIFTS:
        ys = merge(x.roll(t, (1, 2)))
        for b in range(2):
            check_shift(to_maps(y)[b], to_maps(ys)[b], phase_of(w, 2)[b], phase_of(merge.weights, 2)[b], t, 2, 8)
    with pytest.raises(RFIError, match="multiples of 2"):
        merge(torch.randn(1, 7, 8, 6))


def test_learned_selector_trains_and_anneals():
    torch.manual_seed(0)
    sel = PhaseSelector(3, 2, "learned").train()
    c = torch.randn(4, 4, 3, 5, 5, requires_grad=True)
    out = sel(c)
    assert not torch.equal(sel.weights, sel.weights.round())  # a soft Gumbel mixture in training
    out.square().sum().backward()
    assert c.grad.abs().sum() > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in sel.parameters())
    set_temperature(sel, 0.1)
    assert sel.scorer.tau == 0.1
    sel.eval()
    sel(c.detach())
    assert torch.equal(sel.weights.sum(1), torch.ones(4)) and set(sel.weights.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(RFIError, match="unknown selection 'best'"):
        PhaseSelector(3, 2, "best")


def test_roll_tokens_and_binary_levels():
    x = torch.randn(3, 5, 6, 2)
    shifts = torch.tensor([[1, -2], [0, 0], [7, 3]])
    for b in range(3):
        assert torch.equal(roll_tokens(x, shifts)[b], x[b].roll(tuple(shifts[b].tolist()), (0, 1)))
    y = torch.randn(1, 2, 8, 8)
    comps4 = polyphase(y, 4)
    for index in range(16):
        w = torch.nn.functional.one_hot(torch.tensor([index]), 16).float()
        fine, coarse = _binary_levels(w, 4)
        once = polyphase(y, 2)[0, fine.argmax()]
        assert torch.equal(polyphase(once[None], 2)[0, coarse.argmax()], comps4[0, index])
