"""MViTv2 (timm's definition), plain or truly shift-equivariant: the ``mvit`` family.

Builds :class:`timm.models.mvitv2.MultiScaleVit` with the options of timm's ``mvitv2_tiny``
(or CPU-sized ones: ``embed_dim``, ``depths``, ``num_heads``, ``patch_size``, ``img_size``,
``stochastic_depth``; ``width`` scales ``embed_dim``). As in timm, there is no class token and
no absolute position embedding (``use_abs_pos=False``): attention carries decomposed relative
positions, whose tables are sized for ``img_size`` (larger images are refused in one line).
Stages are tapped as ``stage1`` ... ``stage<len(depths)>``, (B, C, H, W) maps.

With ``equivariant=True`` (Rojas-Gomez et al., CVPR 2024, adaptive MViTv2):

- the patch embedding (7x7, stride 4, padding 3 at ``patch_size`` 4) becomes
  :class:`AdaptivePatchEmbed` (the :class:`~encoders.nets.equivariant_vit.AdaptiveTokenizer`
  with timm's output: tokens and grid size);
- every block becomes an :class:`AdaptiveMultiScaleBlock`: it picks one anchor from its input
  (:func:`~encoders.nets.equivariant_vit.polyphase_anchor` of the tokens' L1 energy, modulo the
  largest pooling stride of the block), and its pooling attention
  (:class:`AdaptivePoolingAttention`) pools Q, K and V at stride 1 (circular padding) and keeps,
  of each, the polyphase component at that anchor, so the query and key/value grids stay
  aligned. The max-pooled residual keeps the query's phase; residual pooling (``x + q``) uses the
  kept query;
- relative positions are measured between the pixels the kept tokens sit at (phases included)
  and circularly (modulo the grid), which is what makes them move with the content under a
  circular shift.

The query phase of each stage's first block (stride 2) and the tokenizer's phase (as stride-2
levels) travel with the features, so decoders up-sample at them (``inversion.upsample.LPU``).

Example:
    >>> import torch
    >>> from encoders import create_encoder
    >>> enc = create_encoder("mvit_v2_t", num_classes=8, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
    ...                      patch_size=4, img_size=64, equivariant=True)
    >>> {k: tuple(v.shape) for k, v in enc(torch.rand(1, 3, 32, 32)).items()}
    {'stage1': (1, 16, 8, 8), 'stage2': (1, 32, 4, 4)}
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.core.errors import RFIError
from encoders.nets import equivariant_vit as ev
from encoders.nets.downsample import CircularConv2d
from encoders.nets.registry import Built, EncoderFamily, register_encoder, scaled

if TYPE_CHECKING:
    from timm.models.mvitv2 import MultiScaleAttention, MultiScaleBlock

# timm's mvitv2_tiny (depths 1-2-5-2, embed 96, heads doubling from 1, kv pooled at stride 4 in
# stage 1, 224-px relative-position tables); stochastic depth 0.1 as the MViTv2 paper trains it.
MVIT_DEFAULTS: dict[str, Any] = {
    "embed_dim": 96,
    "depths": [1, 2, 5, 2],
    "num_heads": [1, 2, 4, 8],
    "patch_size": 4,
    "img_size": 224,
    "stochastic_depth": 0.1,
}
MVIT_OPTIONS = tuple(MVIT_DEFAULTS)
KV_STRIDE = 4  # timm's stride_kv_adaptive: K/V pooled at stride 4 in stage 1, halved with every query pooling


def resolve_options(options: Mapping[str, Any], width: float = 1.0) -> dict[str, Any]:
    """``options`` with timm's ``mvitv2_tiny`` values filled in (``None`` = default), checked.

    Raises:
        RFIError: inconsistent options (naming the option).
    """
    opts = {k: (MVIT_DEFAULTS[k] if options.get(k) is None else options[k]) for k in MVIT_OPTIONS}
    opts["depths"], opts["num_heads"] = [int(d) for d in opts["depths"]], [int(h) for h in opts["num_heads"]]
    dim = scaled(opts["embed_dim"], width)
    if len(opts["depths"]) != len(opts["num_heads"]) or not opts["depths"]:
        raise RFIError(
            f"mvit_v2_t: depths {opts['depths']} and num_heads {opts['num_heads']} must have the same, "
            f"non-zero length (one entry per stage)"
        )
    if min(opts["depths"]) < 1 or opts["patch_size"] < 1:
        raise RFIError("mvit_v2_t: depths and patch_size must be >= 1")
    for i, heads in enumerate(opts["num_heads"]):
        if heads < 1 or (dim * 2**i) % heads:
            raise RFIError(
                f"mvit_v2_t: stage {i + 1} has {dim * 2**i} channels (embed_dim {dim} x 2^{i}), not "
                f"divisible by num_heads[{i}]={heads}"
            )
    if opts["img_size"] < total_stride(opts):
        raise RFIError(
            f"mvit_v2_t: img_size {opts['img_size']} is smaller than the total stride "
            f"{total_stride(opts)}; its relative-position tables need at least one token per stage"
        )
    return opts


def strides(opts: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(query stride, key/value stride) of each stage, as timm derives them (query pooled in
    every stage but the first)."""
    out, kv = [], KV_STRIDE
    for i in range(len(opts["depths"])):
        q = 1 if i == 0 else 2
        kv = max(kv // q, 1)
        out.append((q, kv))
    return out


def total_stride(opts: Mapping[str, Any]) -> int:
    """The down-sampling factor of the last stage: patch size x 2^(stages - 1)."""
    return int(opts["patch_size"]) * 2 ** (len(opts["depths"]) - 1)


def size_multiple(opts: Mapping[str, Any]) -> int:
    """Image sizes an equivariant MViTv2 takes are multiples of this: the largest stride any pooling reaches."""
    multiple, reached = int(opts["patch_size"]), int(opts["patch_size"])
    for (q, kv), depth in zip(strides(opts), opts["depths"]):
        multiple = max(multiple, reached * max(q, kv))  # the first block pools at both
        reached *= q
        if depth > 1:
            multiple = max(multiple, reached * kv)
    return multiple


def check_image_size(h: int, w: int, arch: str, opts: Mapping[str, Any]) -> None:
    """Refuse (one line) an image size that an equivariant MViTv2 cannot take."""
    m = size_multiple(opts)
    if h % m or w % m:
        up = lambda v: math.ceil(v / m) * m  # noqa: E731
        raise RFIError(
            f"image size {h}x{w} does not fit the equivariant {arch}: height and width must be "
            f"multiples of {m} (the largest pooling stride it reaches), e.g. {up(h)}x{up(w)}"
        )
    check_table_size(h, w, arch, opts["img_size"])


def check_table_size(h: int, w: int, arch: str, img_size: int) -> None:
    """Refuse (one line) an image larger than the ``img_size`` the relative-position tables were built for."""
    if max(h, w) > img_size:
        raise RFIError(
            f"image size {h}x{w} is larger than the img_size {img_size} the relative-position tables of "
            f"this {arch} were built for: build it with img_size >= {max(h, w)} (model.options.img_size)"
        )


def to_map(tokens: Tensor, size: Sequence[int]) -> Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *size)


@functools.cache
def mvit_class() -> type[nn.Module]:
    """``MViT``: timm's ``MultiScaleVit``, refusing (one line) images larger than its relative-position
    tables' ``img_size``. timm is imported here, on the first MViTv2 built, not with ``encoders``
    (importing it costs about a second, which every ``rfi`` command would pay)."""
    from timm.models.mvitv2 import MultiScaleVit

    class MViT(MultiScaleVit):
        def __init__(self, cfg: Any, img_size: int, **kwargs: Any):
            super().__init__(cfg, img_size=img_size, **kwargs)
            self.img_size = img_size

        def forward_features(self, x: Tensor) -> Tensor:
            check_table_size(x.shape[-2], x.shape[-1], "mvit_v2_t", self.img_size)
            return super().forward_features(x)

    return MViT


class AdaptivePatchEmbed(ev.AdaptiveTokenizer):
    """MViTv2's patch embedding as an adaptive tokenizer, with timm's ``PatchEmbed`` output and keys (``proj``).

    Shape: (B, 3, H, W) -> tokens (B, H/p * W/p, C) and the grid size [H/p, W/p].
    """

    def forward(self, x: Tensor) -> tuple[Tensor, list[int]]:
        x = super().forward(x)
        return x.flatten(2).transpose(1, 2), list(x.shape[-2:])


def stride_of(conv: nn.Module | None) -> int:
    """The stride of a timm pooling convolution (1 when the block does not pool)."""
    return 1 if conv is None else int(conv.stride[0])


def circular_stride1(conv: nn.Conv2d | None) -> nn.Module | None:
    """A stride-1, circularly padded copy of a pooling convolution (same weights and key)."""
    if conv is None:
        return None
    new = CircularConv2d.from_conv(conv)
    new.stride = (1, 1)
    return new


def circular_distances(
    q_len: int, k_len: int, q_stride: int, k_stride: int, q_offset: Tensor, k_offset: Tensor, size: int, table: int
) -> Tensor:
    """Indices into a relative-position table: circular displacements between query and key pixels.

    Query ``n`` sits at ``q_stride * n + q_offset``, key ``m`` at ``k_stride * m + k_offset`` (in
    block-input tokens); their displacement, in units of the finer grid and taken modulo the grid
    (``size`` tokens), indexes the table around its centre.

    Shape: offsets (B,) integers -> (B, q_len, k_len) long.
    """
    unit = min(q_stride, k_stride)
    n = q_stride * torch.arange(q_len, device=q_offset.device)
    m = k_stride * torch.arange(k_len, device=q_offset.device)
    d = (n[None, :, None] + q_offset[:, None, None] - m[None, None, :] - k_offset[:, None, None]) // unit
    period = size // unit
    d = (d + period // 2) % period - period // 2
    centre = (table - 1) // 2
    return (d + centre).clamp(0, table - 1)


class AdaptivePoolingAttention(nn.Module):
    """timm's MViTv2 pooling attention with its strided poolings of Q, K and V anchored on the content.

    Takes over the parameters (and keys) of a :class:`timm.models.mvitv2.MultiScaleAttention`
    (``mode="conv"``, no class token): ``qkv``, ``proj``, the depthwise pooling convolutions
    ``pool_q``/``pool_k``/``pool_v`` (run at stride 1 with circular padding) with their norms, and
    the decomposed relative-position tables ``rel_pos_h``/``rel_pos_w``. Of each pooled map the
    polyphase component at ``anchor mod stride`` is kept; relative positions are the circular
    displacements between the pixels the kept tokens sit at (:func:`circular_distances`).

    Args:
        attn: the timm module to adapt.

    Shape:
        - Input: tokens (B, H*W, C), grid size (H, W), anchor (B, 2) integers; H and W multiples of
          the query and key/value strides.
        - Output: tokens (B, H/s_q * W/s_q, C_out) and the grid size [H/s_q, W/s_q].
    """

    def __init__(self, attn: MultiScaleAttention):
        super().__init__()
        if attn.mode != "conv" or attn.has_cls_token or attn.rel_pos_type != "spatial":
            raise RFIError(
                "adaptive pooling attention needs timm's mode='conv', no class token and spatial relative positions"
            )
        self.num_heads, self.dim_out, self.scale = attn.num_heads, attn.dim_out, attn.scale
        self.residual_pooling = attn.residual_pooling
        self.stride_q, self.stride_kv = stride_of(attn.pool_q), stride_of(attn.pool_k)
        if max(self.stride_q, self.stride_kv) % min(self.stride_q, self.stride_kv):
            raise RFIError(
                f"adaptive pooling attention: query stride {self.stride_q} and key/value stride "
                f"{self.stride_kv} must divide one another"
            )
        self.qkv, self.proj = attn.qkv, attn.proj
        self.pool_q, self.pool_k, self.pool_v = (circular_stride1(c) for c in (attn.pool_q, attn.pool_k, attn.pool_v))
        self.norm_q, self.norm_k, self.norm_v = attn.norm_q, attn.norm_k, attn.norm_v
        self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w

    def _pool(
        self,
        t: Tensor,
        pool: nn.Module | None,
        norm: nn.Module | None,
        stride: int,
        size: Sequence[int],
        offset: Tensor,
    ) -> tuple[Tensor, list[int]]:
        """(B, heads, N, d) -> pooled (B, heads, N', d) at ``offset`` (B, 2), and its grid size."""
        if pool is None:
            return t, list(size)
        b, heads, _, d = t.shape
        x = pool(t.reshape(b * heads, size[0], size[1], d).permute(0, 3, 1, 2))
        x = ev.take_phase(x, stride, offset.repeat_interleave(heads, 0))
        pooled = list(x.shape[-2:])
        x = x.reshape(b, heads, d, -1).transpose(2, 3)
        return (norm(x) if norm is not None else x), pooled

    def forward(self, x: Tensor, feat_size: Sequence[int], anchor: Tensor) -> tuple[Tensor, list[int]]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q_off, kv_off = anchor % self.stride_q, anchor % self.stride_kv
        q, q_size = self._pool(q, self.pool_q, self.norm_q, self.stride_q, feat_size, q_off)
        k, k_size = self._pool(k, self.pool_k, self.norm_k, self.stride_kv, feat_size, kv_off)
        v, _ = self._pool(v, self.pool_v, self.norm_v, self.stride_kv, feat_size, kv_off)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        (qh, qw), (kh, kw) = q_size, k_size
        idx_h = circular_distances(
            qh, kh, self.stride_q, self.stride_kv, q_off[:, 0], kv_off[:, 0], feat_size[0], self.rel_pos_h.shape[0]
        )
        idx_w = circular_distances(
            qw, kw, self.stride_q, self.stride_kv, q_off[:, 1], kv_off[:, 1], feat_size[1], self.rel_pos_w.shape[0]
        )
        r_q = q.reshape(b, self.num_heads, qh, qw, -1)
        rel_h = torch.einsum("byhwc,bhkc->byhwk", r_q, self.rel_pos_h[idx_h])
        rel_w = torch.einsum("byhwc,bwkc->byhwk", r_q, self.rel_pos_w[idx_w])
        attn = (attn.view(b, -1, qh, qw, kh, kw) + rel_h[..., None] + rel_w[..., None, :]).view(b, -1, qh * qw, kh * kw)
        x = attn.softmax(dim=-1) @ v
        if self.residual_pooling:
            x = x + q
        return self.proj(x.transpose(1, 2).reshape(b, -1, self.dim_out)), q_size


class AdaptiveMultiScaleBlock(nn.Module):
    """timm's MViTv2 block whose poolings keep the phase of one anchor chosen from the block's input.

    Takes over the modules (and keys) of a :class:`timm.models.mvitv2.MultiScaleBlock`; the
    attention becomes :class:`AdaptivePoolingAttention`, and the max-pooled shortcut of a
    query-pooling block runs at stride 1 (circular) and keeps the query's phase. The anchor is
    :func:`~encoders.nets.equivariant_vit.polyphase_anchor` of the input tokens' L1 energy,
    modulo the block's largest stride. :attr:`weights` is the query phase of the last call
    ((B, s_q**2) one-hot; ``None`` when the block does not pool the query).

    Args:
        block: the timm block to adapt.

    Shape:
        - Input: tokens (B, H*W, C) and the grid size (H, W), multiples of the block's largest stride.
        - Output: tokens (B, H/s_q * W/s_q, C_out) and the grid size [H/s_q, W/s_q].
    """

    def __init__(self, block: MultiScaleBlock):
        super().__init__()
        for name in ("norm1", "shortcut_proj_attn", "drop_path1", "norm2", "shortcut_proj_mlp", "mlp", "drop_path2"):
            setattr(self, name, getattr(block, name))  # timm's modules and keys (the projections may be None)
        self.attn = AdaptivePoolingAttention(block.attn)
        pool = block.shortcut_pool_attn
        if pool is not None:  # MaxPool2d(s + 1, s, (s + 1) // 2) -> the same window at stride 1, wrapped
            k, pad = pool.kernel_size[0], pool.padding[0]
            self.shortcut_pool_attn = nn.Sequential(
                nn.CircularPad2d((pad, k - 1 - pad, pad, k - 1 - pad)), nn.MaxPool2d(k, 1)
            )
        else:
            self.shortcut_pool_attn = None
        self.period = max(self.attn.stride_q, self.attn.stride_kv)
        self.weights: Tensor | None = None
        self.model_name = "adaptive MViTv2 block"

    def forward(self, x: Tensor, feat_size: Sequence[int]) -> tuple[Tensor, list[int]]:
        h, w = feat_size
        ev._check_multiple(h, w, self.period, self.model_name)
        if self.period > 1:
            anchor = ev.polyphase_anchor(x.detach().float().abs().sum(-1).view(-1, h, w), self.period)
        else:
            anchor = torch.zeros(x.shape[0], 2, dtype=torch.long, device=x.device)
        s = self.attn.stride_q
        self.weights = F.one_hot((anchor % s)[:, 0] * s + (anchor % s)[:, 1], s * s).to(x.dtype) if s > 1 else None
        x_norm = self.norm1(x)
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        if self.shortcut_pool_attn is not None:
            pooled = ev.take_phase(self.shortcut_pool_attn(to_map(shortcut, feat_size)), s, anchor % s)
            shortcut = pooled.flatten(2).transpose(1, 2)
        y, new_size = self.attn(x_norm, feat_size, anchor)
        x = shortcut + self.drop_path1(y)
        x_norm = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path2(self.mlp(x_norm)), new_size

    def __getstate__(self):  # the last choice is transient
        state = self.__dict__.copy()
        state["weights"] = None
        return state


def mvit_features(
    model: nn.Module, x: Tensor, taps: Mapping[str, str], names: Sequence[str] | None = None
) -> OrderedDict[str, Tensor]:
    """Run the patch embedding and the stages up to the deepest requested one; the stages as (B, C, H, W) maps.

    Args:
        model: an ``MViT`` (:func:`mvit_class`).
        x: normalised images (B, 3, H, W).
        taps: ``{name: "stages.<n>"}``.
        names: which taps (default: all), returned in the order given.
    """
    names = list(taps) if names is None else list(names)
    check_table_size(x.shape[-2], x.shape[-1], "mvit_v2_t", model.img_size)
    index = {name: int(taps[name].split(".")[1]) for name in names}
    feats: dict[str, Tensor] = {}
    x, size = model.patch_embed(x)
    for i, stage in enumerate(model.stages[: max(index.values()) + 1]):
        x, size = stage(x, size)
        feats.update({name: to_map(x, size) for name, n in index.items() if n == i})
    return OrderedDict((name, feats[name]) for name in names)


def phase_names(model: nn.Module, node: str) -> list[str]:
    """Names of the stride-2 phase choices made before the output of ``node`` (``stages.<n>``), shallow first:
    the tokenizer's levels (``patch_embed.level<l>``), then each query-pooling block (``stages.<i>.blocks.0``)."""
    n = int(node.split(".")[1])
    names = ev.tokenizer_phase_names("patch_embed", model.patch_embed)
    for i in range(n + 1):
        names += [
            f"stages.{i}.blocks.{j}"
            for j, blk in enumerate(model.stages[i].blocks)
            if isinstance(blk, AdaptiveMultiScaleBlock) and blk.attn.stride_q > 1
        ]
    return names


def mvit_phases(model: nn.Module, node: str) -> OrderedDict[str, Tensor]:
    """The phases the adaptive modules before ``node`` chose in the last forward pass (see :func:`phase_names`)."""
    out = ev.tokenizer_phases("patch_embed", model.patch_embed)
    for name in phase_names(model, node):
        if not name.startswith("patch_embed."):
            w = model.get_submodule(name).weights
            if w is not None:
                out[name] = w
    return out


def infer_mvit_options(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Read ``embed_dim``, ``patch_size``, ``depths``, ``num_heads`` and ``img_size`` off MViTv2 weights (our keys).

    Works for timm's layout (``model.patch_embed.proj``, ``model.stages.<i>.blocks.<j>``); empty if the
    patch embedding is not found.
    """
    patch = state.get("model.patch_embed.proj.weight")
    if patch is None or patch.dim() != 4:
        return {}
    p = (int(patch.shape[-1]) + 1) // 2  # kernel 2p - 1
    opts: dict[str, Any] = {"embed_dim": int(patch.shape[0]), "patch_size": p}
    depths, heads, stage = [], [], 0
    while f"model.stages.{stage}.blocks.0.norm1.weight" in state:
        depths.append(len({k.split(".")[4] for k in state if k.startswith(f"model.stages.{stage}.blocks.")}))
        rel = state.get(f"model.stages.{stage}.blocks.0.attn.rel_pos_h")
        proj = state.get(f"model.stages.{stage}.blocks.0.attn.proj.weight")
        if rel is not None and proj is not None:
            heads.append(int(proj.shape[0]) // int(rel.shape[1]))
        if stage == 0 and rel is not None:
            opts["img_size"] = (int(rel.shape[0]) + 1) // 2 * p  # 2 * (img_size / p) - 1 entries
        stage += 1
    if depths:
        opts["depths"] = depths
    if len(heads) == len(depths) and depths:
        opts["num_heads"] = heads
    return opts


@register_encoder
class MViTFamily(EncoderFamily):
    """MViTv2 (timm's), plain or equivariant (adaptive tokenizer, adaptive pooling attention)."""

    architectures = ("mvit_v2_t",)
    options = {"equivariant": False, "selection": "norm", **dict.fromkeys(MVIT_OPTIONS)}
    classifier = "head.fc"
    convolutional = False

    def build(
        self,
        arch: str,
        num_classes: int,
        width: float,
        small_input: bool,
        equivariant: bool = False,
        selection: Literal["norm", "learned"] = "norm",
        **options: Any,
    ) -> Built:
        """``small_input`` changes nothing (``patch_size`` sets the stem's stride); ``selection`` is the tokenizer's
        (the pooling anchors are energy-based, as Swin's window anchors)."""
        opts = resolve_options(options, width)
        if selection != "norm" and not equivariant:
            raise RFIError(f"selection='{selection}' needs equivariant=True")
        from timm.models.mvitv2 import MultiScaleVitCfg

        dim, p, n = scaled(opts["embed_dim"], width), opts["patch_size"], len(opts["depths"])
        cfg = MultiScaleVitCfg(
            depths=tuple(opts["depths"]),
            embed_dim=dim,
            num_heads=tuple(opts["num_heads"]),
            stride_q=tuple((q, q) for q, _ in strides(opts)),
            stride_kv_adaptive=None,
            stride_kv=tuple((kv, kv) for _, kv in strides(opts)),
            patch_kernel=(2 * p - 1,) * 2,
            patch_stride=(p, p),
            patch_padding=(p - 1,) * 2,
        )
        model = mvit_class()(
            cfg, img_size=opts["img_size"], num_classes=num_classes, drop_path_rate=opts["stochastic_depth"]
        )
        if equivariant:
            tok = AdaptivePatchEmbed(3, dim, p, selection, kernel_size=2 * p - 1, padding=p - 1)
            with torch.no_grad():  # timm's initialisation of the patch convolution
                tok.proj.weight.copy_(model.patch_embed.proj.weight)
                tok.proj.bias.copy_(model.patch_embed.proj.bias)
            tok.multiple = size_multiple(opts)
            tok.model_name = f"equivariant {arch} (largest pooling stride {tok.multiple})"
            model.patch_embed = tok
            for stage in model.stages:
                for j, blk in enumerate(stage.blocks):
                    stage.blocks[j] = AdaptiveMultiScaleBlock(blk)
        taps = OrderedDict((f"stage{k + 1}", f"stages.{k}") for k in range(n))
        stored = {**opts, "equivariant": bool(equivariant), **({"selection": selection} if equivariant else {})}
        return Built(model, taps, stored)

    def max_image_size(self, options: Mapping[str, Any]) -> int:
        """Its relative-position tables are built for images up to ``img_size``."""
        return options["img_size"]

    infer_kwargs = staticmethod(infer_mvit_options)
    features = staticmethod(mvit_features)
    size_multiple = staticmethod(size_multiple)
    check_image_size = staticmethod(check_image_size)
    phase_names = staticmethod(phase_names)
    phases = staticmethod(mvit_phases)
