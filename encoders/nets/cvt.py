"""CvT-13 (Wu et al., ICCV 2021, "CvT: Introducing Convolutions to Vision Transformers"), plain or truly
shift-equivariant: the ``cvt`` family.

Neither torchvision nor timm defines CvT (timm 1.0 has no ``cvt``; the reference code is
Microsoft's research repository), so this is a compact definition from the paper: three
stages, each a *convolutional token embedding* (strided convolution, then LayerNorm: 7x7 stride
4 padding 2, then 3x3 stride 2 padding 1) followed by transformer blocks whose attention takes
its queries, keys and values from a *convolutional projection* (depthwise 3x3 convolution and
BatchNorm, stride 1 for Q and stride 2 for K and V, then a linear layer). There are no position
embeddings (the convolutions carry position). One change: CvT-13 adds a class token in its last
stage; here there is none, and the head averages the last stage's tokens (after a LayerNorm).
Options as for CvT-13 (or CPU-sized: ``embed_dim`` = the first stage's width, later stages x3 and
x6 as in CvT-13; ``depths``, ``num_heads``, ``patch_size`` = the first embedding's stride,
``stochastic_depth``; ``width`` scales ``embed_dim``). Stages are tapped as ``stage1`` ...
``stage<len(depths)>``, (B, C, H, W) maps.

With ``equivariant=True`` (Rojas-Gomez et al., CVPR 2024, adaptive CvT) every strided
convolution keeps a polyphase component chosen from its input: each token embedding becomes an
:class:`~encoders.nets.equivariant_vit.AdaptiveTokenizer` (stride-1 circular convolution, then
:class:`~encoders.nets.equivariant_vit.PhaseSelector`), and the stride-2 depthwise projection of
K and V becomes :class:`AdaptiveKVProjection` (K and V keep the same phase, chosen on K). All
padding is circular. Attention has no positional term, so the key set only has to move with
the content.

Example:
    >>> import torch
    >>> from encoders import create_encoder
    >>> enc = create_encoder("cvt_13", num_classes=8, embed_dim=16, depths=[1, 1], num_heads=[1, 3],
    ...                      patch_size=4, equivariant=True)
    >>> {k: tuple(v.shape) for k, v in enc(torch.rand(1, 3, 32, 32)).items()}
    {'stage1': (1, 16, 8, 8), 'stage2': (1, 48, 4, 4)}
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from encoders.core.errors import RFIError
from encoders.nets import equivariant_vit as ev
from encoders.nets.downsample import CircularConv2d, polyphase, select_phase
from encoders.nets.registry import Built, EncoderFamily, register_encoder, scaled

# CvT-13: widths 64-192-384, depths 1-2-10, heads 1-3-6, MLP ratio 4, stochastic depth 0.1.
CVT_DEFAULTS: dict[str, Any] = {
    "embed_dim": 64,
    "depths": [1, 2, 10],
    "num_heads": [1, 3, 6],
    "patch_size": 4,
    "stochastic_depth": 0.1,
}
CVT_OPTIONS = tuple(CVT_DEFAULTS)
STAGE_WIDTHS = (1, 3, 6)  # CvT-13's stage widths relative to the first (64, 192, 384)
KV_STRIDE = 2
MLP_RATIO = 4


def resolve_options(options: Mapping[str, Any], width: float = 1.0) -> dict[str, Any]:
    """``options`` with CvT-13's values filled in (``None`` = default), checked.

    Raises:
        RFIError: inconsistent options (naming the option).
    """
    opts = {k: (CVT_DEFAULTS[k] if options.get(k) is None else options[k]) for k in CVT_OPTIONS}
    opts["depths"], opts["num_heads"] = [int(d) for d in opts["depths"]], [int(h) for h in opts["num_heads"]]
    if len(opts["depths"]) != len(opts["num_heads"]) or not 1 <= len(opts["depths"]) <= len(STAGE_WIDTHS):
        raise RFIError(
            f"cvt_13: depths {opts['depths']} and num_heads {opts['num_heads']} must have the same "
            f"length, 1 to {len(STAGE_WIDTHS)} (one entry per stage)"
        )
    if min(opts["depths"]) < 1 or opts["patch_size"] < 1:
        raise RFIError("cvt_13: depths and patch_size must be >= 1")
    for i, (dim, heads) in enumerate(zip(stage_widths(opts, width), opts["num_heads"])):
        if heads < 1 or dim % heads:
            raise RFIError(
                f"cvt_13: stage {i + 1} has {dim} channels (embed_dim x {STAGE_WIDTHS[i]}), not "
                f"divisible by num_heads[{i}]={heads}"
            )
    return opts


def stage_widths(opts: Mapping[str, Any], width: float = 1.0) -> list[int]:
    """The channels of each stage: ``embed_dim`` (times ``width``) times CvT-13's ratios."""
    dim = scaled(int(opts["embed_dim"]), width)
    return [dim * r for r in STAGE_WIDTHS[: len(opts["depths"])]]


def size_multiple(opts: Mapping[str, Any]) -> int:
    """Image sizes an equivariant CvT takes are multiples of this: the last stage's stride x the K/V stride."""
    return int(opts["patch_size"]) * 2 ** (len(opts["depths"]) - 1) * KV_STRIDE


def check_image_size(h: int, w: int, arch: str, opts: Mapping[str, Any]) -> None:
    """Refuse (one line) an image size that an equivariant CvT cannot take."""
    m = size_multiple(opts)
    if h % m or w % m:
        up = lambda v: math.ceil(v / m) * m  # noqa: E731
        raise RFIError(
            f"image size {h}x{w} does not fit the equivariant {arch}: height and width must be "
            f"multiples of {m} (last stage stride {m // KV_STRIDE} x key/value stride {KV_STRIDE}), "
            f"e.g. {up(h)}x{up(w)}"
        )


def depthwise(dim: int, stride: int, circular: bool) -> nn.Conv2d:
    """CvT's 3x3 depthwise projection convolution (no bias); circularly padded in the equivariant form."""
    return (CircularConv2d if circular else nn.Conv2d)(dim, dim, 3, stride, 1, groups=dim, bias=False)


class ConvEmbed(nn.Module):
    """Convolutional token embedding: a strided convolution (or its adaptive form), then LayerNorm over channels.

    Shape: (B, C_in, H, W) -> (B, C, H / stride, W / stride).
    """

    def __init__(self, proj: nn.Module, dim: int):
        super().__init__()
        self.proj, self.norm = proj, nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class KVProjection(nn.Module):
    """CvT's key and value projections: stride-2 depthwise convolution and BatchNorm each.

    Shape: (B, C, H, W) -> keys and values, each (B, C, H / 2, W / 2).
    """

    def __init__(self, dim: int, stride: int = KV_STRIDE):
        super().__init__()
        self.conv_k, self.bn_k = depthwise(dim, stride, False), nn.BatchNorm2d(dim)
        self.conv_v, self.bn_v = depthwise(dim, stride, False), nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.bn_k(self.conv_k(x)), self.bn_v(self.conv_v(x))


class AdaptiveKVProjection(KVProjection):
    """The key and value projections with an adaptive stride-2 grid (same keys as :class:`KVProjection`).

    Both depthwise convolutions run at stride 1 with circular padding; :class:`PhaseSelector`
    picks one of the four polyphase components of the keys (largest norm, or learned), and the
    values keep the same component, so each key stays paired with its value. BatchNorm follows
    the selection, as it follows the strided convolution in CvT. :attr:`weights`: the (B, 4) choice.

    Args:
        dim: channels.
        selection: ``norm`` or ``learned``.

    Shape: (B, C, H, W), H and W even -> keys and values, each (B, C, H / 2, W / 2).

    Example:
        >>> import torch
        >>> kv = AdaptiveKVProjection(4).eval()
        >>> x = torch.rand(1, 4, 8, 8)
        >>> (k, v), (ks, vs) = kv(x), kv(x.roll(1, 3))
        >>> any(torch.allclose(ks, k.roll(r, 3), atol=1e-6) and torch.allclose(vs, v.roll(r, 3), atol=1e-6)
        ...     for r in range(4))
        True
    """

    def __init__(self, dim: int, selection: str = "norm"):
        nn.Module.__init__(self)
        self.conv_k, self.bn_k = depthwise(dim, 1, True), nn.BatchNorm2d(dim)
        self.conv_v, self.bn_v = depthwise(dim, 1, True), nn.BatchNorm2d(dim)
        self.selector = ev.PhaseSelector(dim, KV_STRIDE, selection)
        self.model_name = "adaptive key/value projection"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ev._check_multiple(x.shape[-2], x.shape[-1], KV_STRIDE, self.model_name)
        k = self.selector(polyphase(self.conv_k(x), KV_STRIDE))
        v = select_phase(polyphase(self.conv_v(x), KV_STRIDE), self.selector.weights)
        return self.bn_k(k), self.bn_v(v)

    @property
    def weights(self) -> Tensor | None:
        """The (B, 4) selection weights of the last forward pass."""
        return self.selector.weights


class ConvAttention(nn.Module):
    """CvT's multi-head attention with convolutional projections (no positional term).

    Args:
        dim: channels. heads: attention heads. kv: the key/value projection
        (:class:`KVProjection` or :class:`AdaptiveKVProjection`). circular: circular padding
        in the query's depthwise convolution.

    Shape: (B, C, H, W) -> (B, H * W, C) tokens.
    """

    def __init__(self, dim: int, heads: int, kv: nn.Module, circular: bool):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.conv_q, self.bn_q = depthwise(dim, 1, circular), nn.BatchNorm2d(dim)
        self.kv = kv
        self.proj_q, self.proj_k, self.proj_v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        k, v = self.kv(x)
        split = lambda t, lin: lin(t.flatten(2).transpose(1, 2)).view(b, -1, self.heads, t.shape[1] // self.heads)  # noqa: E731
        q = split(self.bn_q(self.conv_q(x)), self.proj_q).transpose(1, 2)
        k, v = split(k, self.proj_k).transpose(1, 2), split(v, self.proj_v).transpose(1, 2)
        out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, -1, x.shape[1]))


class CvTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (stochastic depth on both).

    Shape: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, attn: ConvAttention, drop: float):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), attn, nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(), nn.Linear(MLP_RATIO * dim, dim))
        self.drop = StochasticDepth(drop, "row")

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        normed = self.norm1(tokens).transpose(1, 2).view(b, c, h, w)
        tokens = tokens + self.drop(self.attn(normed))
        tokens = tokens + self.drop(self.mlp(self.norm2(tokens)))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class CvT(nn.Module):
    """CvT: stages of (token embedding, blocks) on (B, C, H, W) maps, LayerNorm, token average, linear head.

    Shape: (B, 3, H, W) normalised images -> (B, num_classes).
    """

    def __init__(self, stages: Sequence[nn.Module], dim: int, num_classes: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # CvT's initialisation (truncated normal, std 0.02)
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(self.norm(x.flatten(2).transpose(1, 2)).mean(1))


def cvt_features(
    model: nn.Module, x: Tensor, taps: Mapping[str, str], names: Sequence[str] | None = None
) -> OrderedDict[str, Tensor]:
    """Run the stages up to the deepest requested one; the stage outputs (B, C, H, W), in the order of ``names``."""
    names = list(taps) if names is None else list(names)
    index = {name: int(taps[name].split(".")[1]) for name in names}
    feats: dict[str, Tensor] = {}
    for i, stage in enumerate(model.stages[: max(index.values()) + 1]):
        x = stage(x)
        feats.update({name: x for name, n in index.items() if n == i})
    return OrderedDict((name, feats[name]) for name in names)


def phase_names(model: nn.Module, node: str) -> list[str]:
    """Names of the stride-2 phase choices before the output of ``node`` (``stages.<n>``), shallow first:
    the first embedding's levels (``stages.0.0.proj.level<l>``), then each later embedding (``stages.<i>.0.proj``)."""
    n = int(node.split(".")[1])
    names = ev.tokenizer_phase_names("stages.0.0.proj", model.stages[0][0].proj)
    return names + [f"stages.{i}.0.proj" for i in range(1, n + 1)]


def cvt_phases(model: nn.Module, node: str) -> OrderedDict[str, Tensor]:
    """The phases the adaptive token embeddings before ``node`` chose in the last forward pass."""
    out = ev.tokenizer_phases("stages.0.0.proj", model.stages[0][0].proj)
    for name in phase_names(model, node):
        if not name.startswith("stages.0."):
            w = model.get_submodule(name).weights
            if w is not None:
                out[name] = w
    return out


@register_encoder
class CvTFamily(EncoderFamily):
    """CvT-13 (written here from the paper), plain or equivariant (adaptive token embeddings and K/V projections)."""

    architectures = ("cvt_13",)
    options = {"equivariant": False, "selection": "norm", **dict.fromkeys(CVT_OPTIONS)}
    classifier = "head"
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
        """``small_input`` changes nothing (``patch_size`` sets the first embedding's stride)."""
        opts = resolve_options(options, width)
        if selection != "norm" and not equivariant:
            raise RFIError(f"selection='{selection}' needs equivariant=True")
        widths, p = stage_widths(opts, width), opts["patch_size"]
        n = sum(opts["depths"])  # stochastic depth rising linearly over the blocks
        drops = [opts["stochastic_depth"] * i / max(n - 1, 1) for i in range(n)]
        stages, c_in = [], 3
        for i, (dim, depth, heads) in enumerate(zip(widths, opts["depths"], opts["num_heads"])):
            stride, kernel, pad = (p, 2 * p - 1, p // 2) if i == 0 else (2, 3, 1)  # CvT: 7/4/2, then 3/2/1
            if equivariant:
                proj = ev.AdaptiveTokenizer(c_in, dim, stride, selection, kernel_size=kernel, padding=pad)
                proj.multiple, proj.model_name = (
                    (size_multiple(opts), f"equivariant {arch}") if i == 0 else (stride, proj.model_name)
                )
            else:
                proj = nn.Conv2d(c_in, dim, kernel, stride, pad)
            blocks = []
            for _ in range(depth):
                kv = AdaptiveKVProjection(dim, selection) if equivariant else KVProjection(dim)
                blocks.append(CvTBlock(dim, ConvAttention(dim, heads, kv, equivariant), drops.pop(0)))
            stages.append(nn.Sequential(ConvEmbed(proj, dim), *blocks))
            c_in = dim
        model = CvT(stages, widths[-1], num_classes)
        taps = OrderedDict((f"stage{k + 1}", f"stages.{k}") for k in range(len(widths)))
        stored = {**opts, "equivariant": bool(equivariant), **({"selection": selection} if equivariant else {})}
        return Built(model, taps, stored)

    features = staticmethod(cvt_features)
    size_multiple = staticmethod(size_multiple)
    check_image_size = staticmethod(check_image_size)
    phase_names = staticmethod(phase_names)
    phases = staticmethod(cvt_phases)
