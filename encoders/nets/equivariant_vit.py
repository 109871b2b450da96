"""Truly shift-equivariant vision transformers: the adaptive modules of Rojas-Gomez et al. (CVPR 2024).

A Swin transformer is not shift-invariant because three of its grids are anchored at pixel
(0, 0): the tokenizer's patch grid, the (shifted-)window grid of window attention and the
2x2 grid of patch merging. Each module below re-anchors its grid on the input itself, so
that a circular shift of the image moves the grids with the content:

- :class:`AdaptiveTokenizer`: the stride-``p`` patch-embedding convolution is computed at
  stride 1 (circularly), and one of its ``p**2`` polyphase components is kept
  (:class:`PhaseSelector`: largest norm, the paper's choice, or a learned scorer as in LPS).
- :class:`AdaptiveShiftedWindowAttention` (and ``...V2``): the tokens are circularly rolled so
  that a content-chosen anchor (:func:`window_anchor`) sits at (0, 0), torchvision's
  (shifted-)window attention runs, and the tokens are rolled back. The window grid, the
  cyclic shift of the shifted windows and their attention masks therefore follow the anchor.
- :class:`AdaptivePatchMerging` (and ``...V2``): the 2x2 merge is computed at all four offsets
  and the polyphase component chosen as for the tokenizer is kept.
- Position: torchvision's Swin has no absolute position embedding; attention uses only the
  relative position bias (Swin: the bias table; SwinV2: the continuous, log-spaced bias), and
  relative positions inside a window do not change when the window moves with the content.

With all three, an equivariant Swin in eval mode gives the same logits for every circular
shift of its input (by any offset, not only multiples of the patch size), and each stage's
feature map is a circular shift of the unshifted one: a shift by ``t`` pixels moves the
stage-``k`` map by ``r`` tokens and changes the recorded phases so that ``stride * r +
phase_offset == t + old_phase_offset`` (mod the image size). Decoders put their up-sampled
pixels back at those phases (:class:`inversion.upsample.LPU`), which makes a whole
autoencoder exactly equivariant. Ties between candidate scores (e.g. a constant image) are
the one exception: then the first candidate wins in both copies.

Example:
    >>> tok = AdaptiveTokenizer(3, 8, patch_size=4).eval()
    >>> x = torch.rand(1, 3, 16, 16)
    >>> y, y_shift = tok(x), tok(x.roll((5, 2), (2, 3)))   # not multiples of the patch size
    >>> any(torch.allclose(y_shift, y.roll((a, b), (2, 3)), atol=1e-6) for a in range(4) for b in range(4))
    True
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import (
    PatchMerging,
    PatchMergingV2,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    _patch_merging_pad,
)

from encoders.core.errors import RFIError
from encoders.nets.downsample import LPD, polyphase, select_phase

SELECTIONS = ("norm", "learned")


def roll_tokens(x: Tensor, shifts: Tensor) -> Tensor:
    """Circularly roll each item's token map by its own (dy, dx), as ``torch.roll`` does.

    Differentiable (a gather). Shape: x (B, H, W, C), shifts (B, 2) integers -> (B, H, W, C).
    """
    b, h, w = x.shape[:3]
    rows = (torch.arange(h, device=x.device)[None] - shifts[:, :1]) % h  # (B, H)
    cols = (torch.arange(w, device=x.device)[None] - shifts[:, 1:]) % w  # (B, W)
    return x[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


class PhaseSelector(nn.Module):
    """Keep one of ``stride**2`` polyphase candidates: the one of largest norm, or a learned choice.

    ``selection="norm"`` (the paper's choice, no parameters) keeps the candidate with the
    largest L2 norm, in training and eval mode alike (the gradient flows through the kept
    values, not through the choice). ``selection="learned"`` scores the candidates with the
    scoring network of an :class:`encoders.nets.downsample.LPD` (held as ``scorer``; its ``tau``
    is annealed by ``set_temperature``): Gumbel-softmax mixture in training, argmax in eval.
    Both scores permute with the candidates under circular shifts, so the same content is kept.
    The weights of the last call stay in :attr:`weights` (``(B, stride**2)``, one-hot in eval).

    Args:
        channels: channels of each candidate.
        stride: the down-sampling factor (``stride**2`` candidates).
        selection: ``norm`` or ``learned``.

    Shape:
        - Input: (B, stride**2, C, h, w); candidate ``i * stride + j`` is the one anchored at (i, j).
        - Output: (B, C, h, w).

    Example:
        >>> sel = PhaseSelector(2, 2)
        >>> c = torch.rand(1, 4, 2, 3, 3); c[0, 2] *= 10
        >>> torch.equal(sel(c), c[:, 2]), sel.weights.tolist()
        (True, [[0.0, 0.0, 1.0, 0.0]])
    """

    def __init__(self, channels: int, stride: int, selection: str = "norm"):
        super().__init__()
        if selection not in SELECTIONS:
            raise RFIError(f"unknown selection '{selection}' (valid: {', '.join(SELECTIONS)})")
        self.stride, self.selection = stride, selection
        self.scorer = LPD(channels, stride) if selection == "learned" else None
        self.weights: Tensor | None = None

    def forward(self, candidates: Tensor) -> Tensor:
        p = candidates.shape[1]
        if self.scorer is None:
            scores = candidates.detach().flatten(2).norm(dim=2)
            weights = F.one_hot(scores.argmax(1), p).to(candidates.dtype)
        else:
            scores = self.scorer.logits(candidates)
            if self.training:
                weights = F.gumbel_softmax(scores, tau=self.scorer.tau, dim=1)
            else:
                weights = F.one_hot(scores.argmax(1), p).to(candidates.dtype)
        self.weights = weights
        return select_phase(candidates, weights)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, selection={self.selection!r}"

    def __getstate__(self):  # the last choice is transient
        state = self.__dict__.copy()
        state["weights"] = None
        return state


def _check_multiple(h: int, w: int, multiple: int, where: str) -> None:
    if h % multiple or w % multiple:
        raise RFIError(
            f"{where}: got a {h}x{w} input, whose height and width must be multiples of {multiple} "
            f"(padding or cropping would break the exact shift equivariance)"
        )


class AdaptiveTokenizer(nn.Module):
    """Adaptive patch embedding: the stride-``p`` patch convolution at every offset, one offset kept.

    The convolution runs at stride 1 with circular wrap-around and its ``p**2`` polyphase
    components, the patch grids anchored at each offset, are the candidates; :class:`PhaseSelector`
    keeps one. By default the kernel is ``p x p`` without padding (Swin's patch embedding: output
    pixel (u, v) embeds the patch whose top-left corner is (u, v)); ``kernel_size`` and ``padding``
    give the overlapping strided embeddings of MViTv2 (7x7, stride 4, padding 3) and CvT (7x7,
    stride 4, padding 2; 3x3, stride 2, padding 1), whose padding wraps around here. Same weights
    as ``nn.Conv2d(in_channels, embed_dim, kernel_size, p, padding)`` (held as :attr:`proj`).

    Args:
        in_channels: image channels.
        embed_dim: token width.
        patch_size: ``p``, the stride.
        selection: ``norm`` or ``learned`` (see :class:`PhaseSelector`).
        kernel_size: the convolution's kernel (default ``p``).
        padding: zeros the strided convolution would pad at the top and left (wrapped around here).

    Shape:
        - Input: (B, in_channels, H, W), H and W multiples of ``p`` (and of :attr:`multiple`).
        - Output: (B, embed_dim, H / p, W / p).

    Example:
        >>> tok = AdaptiveTokenizer(3, 8, patch_size=2, kernel_size=3, padding=1).eval()
        >>> x = torch.rand(1, 3, 8, 8)
        >>> plain = F.conv2d(x, tok.proj.weight, tok.proj.bias, stride=2, padding=1)  # zero padding
        >>> torch.allclose(tok.candidates(x)[:, 0, :, 1:-1, 1:-1], plain[..., 1:-1, 1:-1], atol=1e-6)
        True
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        patch_size: int,
        selection: str = "norm",
        kernel_size: int | None = None,
        padding: int = 0,
    ):
        super().__init__()
        self.patch_size, self.kernel_size, self.padding = patch_size, kernel_size or patch_size, padding
        if not 0 <= padding < self.kernel_size:
            raise RFIError(f"adaptive tokenizer: padding {padding} must be in [0, kernel_size {self.kernel_size})")
        self.proj = nn.Conv2d(in_channels, embed_dim, self.kernel_size, patch_size, padding)
        self.selector = PhaseSelector(embed_dim, patch_size, selection)
        self.multiple = patch_size  # the model's required multiple (set by the model's builder)
        self.model_name = "adaptive tokenizer"

    def candidates(self, x: Tensor) -> Tensor:
        """The embeddings of all ``p**2`` patch grids; grid ``i * p + j`` is the strided convolution of
        the image circularly shifted by (-i, -j).

        Shape: (B, in_channels, H, W) -> (B, p**2, embed_dim, H / p, W / p).
        """
        before, after = self.padding, self.kernel_size - 1 - self.padding
        if before or after:  # circular wrap: pixel (u, v) sees rows/columns u - padding ... u - padding + kernel - 1
            h, w = x.shape[-2:]
            x = torch.cat([x[..., h - before :, :]] * bool(before) + [x, x[..., :after, :]], dim=-2)
            x = torch.cat([x[..., w - before :]] * bool(before) + [x, x[..., :after]], dim=-1)
        return polyphase(F.conv2d(x, self.proj.weight, self.proj.bias), self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _check_multiple(x.shape[-2], x.shape[-1], self.multiple, self.model_name)
        return self.selector(self.candidates(x))

    @property
    def weights(self) -> Tensor | None:
        """The (B, p**2) selection weights of the last forward pass."""
        return self.selector.weights


def polyphase_anchor(energy: Tensor, period: int) -> Tensor:
    """The offset of the polyphase component (stride ``period``) of an energy map with the largest sum.

    A circular shift of the map by ``t`` moves the offset by ``t`` (mod ``period``), ties aside.

    Shape: energy (B, H, W), H and W multiples of ``period`` -> (B, 2) integer (row, col) in [0, period).

    Example:
        >>> e = torch.zeros(1, 8, 8); e[0, 5, 2] = 1.0
        >>> polyphase_anchor(e, 4).tolist(), polyphase_anchor(e.roll((1, 3), (1, 2)), 4).tolist()
        ([[1, 2]], [[2, 1]])
    """
    b, h, w = energy.shape
    best = energy.view(b, h // period, period, w // period, period).sum((1, 3)).flatten(1).argmax(1)
    return torch.stack([best // period, best % period], dim=1)


def take_phase(x: Tensor, stride: int, offset: Tensor) -> Tensor:
    """Each item's polyphase component at its own offset: ``x[b, :, oy::stride, ox::stride]`` (a gather).

    Shape: x (B, C, H, W), H and W multiples of ``stride``; offset (B, 2) integers in [0, stride)
    -> (B, C, H / stride, W / stride).
    """
    if stride == 1:
        return x
    index = offset[:, 0] * stride + offset[:, 1]
    return select_phase(polyphase(x, stride), F.one_hot(index, stride * stride).to(x.dtype))


def window_anchor(x: Tensor, window: Sequence[int]) -> Tensor:
    """The token that the window grid is anchored at, chosen from the tokens' energy.

    A token's energy is its L1 norm (not L2: Swin normalises tokens with LayerNorm before
    attention, which makes every token's L2 norm almost the same, and the choice a matter
    of rounding). First the window-grid offset: the polyphase component (stride = window
    size) of the energy map with the largest sum; then, among the windows of that grid, the
    one of largest energy, whose top-left token is the anchor. Both choices permute with a
    circular shift of the tokens, so the anchor moves with the content.

    Shape: x (B, H, W, C), H and W multiples of the window -> (B, 2) integer (row, col).
    """
    b, h, w = x.shape[:3]
    wh, ww = window
    energy = x.detach().float().abs().sum(-1)  # (B, H, W)
    grid = energy.view(b, h // wh, wh, w // ww, ww).sum((1, 3)).flatten(1).argmax(1)  # offset in the window
    offset = torch.stack([grid // ww, grid % ww], dim=1)
    per_window = roll_tokens(energy[..., None], -offset)[..., 0].view(b, h // wh, wh, w // ww, ww).sum((2, 4))
    best = per_window.flatten(1).argmax(1)
    return offset + torch.stack([best // (w // ww) * wh, best % (w // ww) * ww], dim=1)


class _AdaptiveWindows:
    """Mix-in for torchvision's window attention: anchor the windows at :func:`window_anchor`.

    The first attention of a Swin stage chooses the anchor; the later ones of the stage reuse
    it (``share_anchor``), so shifted windows stay offset by half a window from the regular
    ones, as in Swin.
    """

    def _adaptive_init(self) -> None:
        self._source: tuple[nn.Module, ...] = ()
        self.anchor: Tensor | None = None
        self.model_name = "adaptive window attention"

    def share_anchor(self, source: nn.Module) -> None:
        """Reuse the anchor ``source`` chose in the same forward pass (held by reference)."""
        self._source = (source,)

    def forward(self, x: Tensor) -> Tensor:
        _check_multiple(x.shape[1], x.shape[2], math.lcm(*self.window_size), self.model_name)
        if self._source:
            anchor = self._source[0].anchor
            if anchor is None or anchor.shape[0] != x.shape[0]:
                raise RFIError("window attention ran before the attention whose anchor it shares")
        else:
            anchor = window_anchor(x, self.window_size)
        self.anchor = anchor
        return roll_tokens(super().forward(roll_tokens(x, -anchor)), anchor)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["anchor"] = None
        return state


class AdaptiveShiftedWindowAttention(_AdaptiveWindows, ShiftedWindowAttention):
    """torchvision's :class:`~torchvision.models.swin_transformer.ShiftedWindowAttention` with
    windows anchored on the content (see :class:`_AdaptiveWindows`); same parameters and keys.

    Shape: (B, H, W, C) -> (B, H, W, C), H and W multiples of the window size.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._adaptive_init()


class AdaptiveShiftedWindowAttentionV2(_AdaptiveWindows, ShiftedWindowAttentionV2):
    """SwinV2's cosine window attention with continuous position bias, windows anchored on the content.

    Shape: (B, H, W, C) -> (B, H, W, C), H and W multiples of the window size.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._adaptive_init()


class _AdaptiveMerge:
    """Mix-in for torchvision's patch merging: merge 2x2 blocks at all four offsets, keep one.

    The candidates are compared before any LayerNorm that ends the merge (SwinV2 normalises
    after the linear reduction, which would make all norms nearly equal); that per-token
    norm is applied to the kept candidate (it commutes with the choice).
    """

    def _adaptive_init(self, selection: str) -> None:
        self.selector = PhaseSelector(2 * self.dim, 2, selection)
        self.model_name = "adaptive patch merging"

    def _merge(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H/2, W/2, 2C) before the final norm
        return self.reduction(self.norm(_patch_merging_pad(x)))

    def _finish(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor) -> Tensor:
        _check_multiple(x.shape[-3], x.shape[-2], 2, self.model_name)
        candidates = torch.stack(
            [self._merge(x.roll((-i, -j), (1, 2)) if i or j else x) for i in (0, 1) for j in (0, 1)], dim=1
        )  # (B, 4, H/2, W/2, 2C), at (i, j)
        return self._finish(self.selector(candidates.permute(0, 1, 4, 2, 3)).permute(0, 2, 3, 1))

    @property
    def weights(self) -> Tensor | None:
        """The (B, 4) selection weights of the last forward pass."""
        return self.selector.weights


class AdaptivePatchMerging(_AdaptiveMerge, PatchMerging):
    """Swin patch merging (concatenate 2x2, LayerNorm, linear) with an adaptive 2x2 grid.

    Args:
        dim: input channels. norm_layer: as torchvision. selection: ``norm`` or ``learned``.

    Shape: (B, H, W, C) -> (B, H / 2, W / 2, 2C), H and W even.
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, selection: str = "norm"):
        super().__init__(dim, norm_layer)
        self._adaptive_init(selection)


class AdaptivePatchMergingV2(_AdaptiveMerge, PatchMergingV2):
    """SwinV2 patch merging (concatenate 2x2, linear, LayerNorm) with an adaptive 2x2 grid.

    Shape: (B, H, W, C) -> (B, H / 2, W / 2, 2C), H and W even.
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, selection: str = "norm"):
        super().__init__(dim, norm_layer)
        self._adaptive_init(selection)

    def _merge(self, x: Tensor) -> Tensor:
        return self.reduction(_patch_merging_pad(x))

    def _finish(self, x: Tensor) -> Tensor:
        return self.norm(x)


def share_stage_anchors(model: nn.Module) -> None:
    """In every Swin stage of ``model.features``, let the first adaptive attention choose the anchor."""
    for stage in model.features:
        attns = [m for m in stage.modules() if isinstance(m, _AdaptiveWindows)]
        for attn in attns[1:]:
            attn.share_anchor(attns[0])


def _binary_levels(weights: Tensor, stride: int) -> list[Tensor]:
    """Split (B, stride**2) phase weights of a power-of-two stride into log2(stride) stride-2 choices.

    Offset (i, j) at stride ``2**L`` is the stride-2 choice (bit l of i, bit l of j) at level l,
    finest first: ``x[i::4, j::4] == x[i%2::2, j%2::2][i//2::2, j//2::2]``. One-hot weights
    give one-hot levels (soft weights give their marginals).
    """
    idx = torch.arange(stride * stride, device=weights.device)
    rows, cols = idx // stride, idx % stride
    levels = []
    for level in range(int(math.log2(stride))):
        target = ((rows >> level) & 1) * 2 + ((cols >> level) & 1)  # (P,)
        levels.append(weights @ F.one_hot(target, 4).to(weights.dtype))
    return levels


def phase_names(model: nn.Module, node: str) -> list[str]:
    """Names of the stride-2 phase choices made before the output of ``node`` (``features.<n>``), shallow first.

    The tokenizer of patch size ``2**L`` contributes ``L`` names (``features.0.0.level<l>``),
    each patch merging one (its module name). Raises RFIError for a patch size that is not a
    power of two (no stride-2 decomposition, so no LPU decoder).
    """
    n = int(node.split(".")[1])
    names = []
    tok = model.features[0][0]
    if isinstance(tok, AdaptiveTokenizer) and tok.patch_size > 1:
        p = tok.patch_size
        if p & (p - 1):
            raise RFIError(
                f"patch_size {p} is not a power of two: its phases cannot drive stride-2 decoder "
                f"up-sampling (use patch_size 1, 2, 4 or 8)"
            )
        names += [f"features.0.0.level{level}" for level in range(int(math.log2(p)))]
    names += [f"features.{i}" for i in range(1, n) if isinstance(model.features[i], _AdaptiveMerge)]
    return names


def swin_phases(model: nn.Module, node: str) -> OrderedDict[str, Tensor]:
    """The phases the adaptive modules before ``node`` chose in the last forward pass (see :func:`phase_names`)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    names = phase_names(model, node)
    tok = model.features[0][0]
    if isinstance(tok, AdaptiveTokenizer) and tok.weights is not None and tok.patch_size > 1:
        for level, w in enumerate(_binary_levels(tok.weights, tok.patch_size)):
            out[f"features.0.0.level{level}"] = w
    for name in names:
        if not name.startswith("features.0.0."):
            w = model.get_submodule(name).weights
            if w is not None:
                out[name] = w
    return out


def tokenizer_phase_names(name: str, tok: AdaptiveTokenizer) -> list[str]:
    """The stride-2 choices the tokenizer ``name`` stands for (``<name>.level<l>``, finest first; none at stride 1).

    Raises:
        RFIError: a stride that is not a power of two (no stride-2 decomposition, so no LPU decoder).
    """
    p = tok.patch_size
    if p & (p - 1):
        raise RFIError(
            f"patch_size {p} is not a power of two: its phases cannot drive stride-2 decoder "
            f"up-sampling (use patch_size 1, 2, 4 or 8)"
        )
    return [f"{name}.level{level}" for level in range(int(math.log2(p)))]


def tokenizer_phases(name: str, tok: AdaptiveTokenizer) -> OrderedDict[str, Tensor]:
    """The tokenizer's last choice as stride-2 choices ``{<name>.level<l>: (B, 4) weights}``
    (see :func:`_binary_levels`)."""
    if tok.weights is None or tok.patch_size == 1:
        return OrderedDict()
    return OrderedDict(
        (f"{name}.level{level}", w) for level, w in enumerate(_binary_levels(tok.weights, tok.patch_size))
    )
