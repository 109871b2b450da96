"""Swin and SwinV2 (torchvision's definitions), plain or truly shift-equivariant: the ``swin`` family.

Builds :class:`torchvision.models.swin_transformer.SwinTransformer` with the options of
``swin_t`` / ``swin_v2_t`` (or CPU-sized ones: ``embed_dim``, ``depths``, ``num_heads``,
``window_size``, ``patch_size``, ``stochastic_depth``; ``width`` scales ``embed_dim``), and
with ``equivariant=True`` swaps in the adaptive modules of :mod:`encoders.nets.equivariant_vit`
(``selection``: ``norm`` or ``learned`` phase choice). Stages are tapped as ``stage1`` ...
``stage<len(depths)>``; :func:`swin_features` returns them as (B, C, H, W) maps (torchvision's
Swin works in (B, H, W, C)). Plain Swin weights say their options (:func:`infer_swin_options`).

Example:
    >>> import torch
    >>> from encoders import create_encoder
    >>> enc = create_encoder("swin_t", num_classes=8, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
    ...                      window_size=4, patch_size=2, equivariant=True)
    >>> {k: tuple(v.shape) for k, v in enc(torch.rand(1, 3, 16, 16)).items()}
    {'stage1': (1, 16, 8, 8), 'stage2': (1, 32, 4, 4)}
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models import swin_transformer as tv_swin

from encoders.core.errors import RFIError
from encoders.nets import equivariant_vit as ev
from encoders.nets.registry import Built, EncoderFamily, register_encoder, scaled


class SwinVariant(NamedTuple):
    """The modules of one Swin version: torchvision's block and patch merging, and their adaptive forms."""

    block: type[nn.Module]
    merge: type[nn.Module]
    adaptive_attention: type[nn.Module]
    adaptive_merge: type[nn.Module]


SWIN_VARIANTS = {
    "swin_t": SwinVariant(
        tv_swin.SwinTransformerBlock, tv_swin.PatchMerging, ev.AdaptiveShiftedWindowAttention, ev.AdaptivePatchMerging
    ),
    "swin_v2_t": SwinVariant(
        tv_swin.SwinTransformerBlockV2,
        tv_swin.PatchMergingV2,
        ev.AdaptiveShiftedWindowAttentionV2,
        ev.AdaptivePatchMergingV2,
    ),
}
# torchvision's swin_t / swin_v2_t hyper-parameters (stochastic depth as there).
SWIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "swin_t": {
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 7,
        "patch_size": 4,
        "stochastic_depth": 0.2,
    },
    "swin_v2_t": {
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 8,
        "patch_size": 4,
        "stochastic_depth": 0.2,
    },
}
SWIN_OPTIONS = ("embed_dim", "depths", "num_heads", "window_size", "patch_size", "stochastic_depth")


def resolve_options(arch: str, options: Mapping[str, Any], width: float = 1.0) -> dict[str, Any]:
    """``options`` with torchvision's defaults filled in (``None`` = default), checked.

    ``width`` multiplies ``embed_dim`` (as it multiplies CNN widths).

    Raises:
        RFIError: inconsistent options (naming the option).
    """
    opts = {k: (SWIN_DEFAULTS[arch][k] if options.get(k) is None else options[k]) for k in SWIN_OPTIONS}
    opts["depths"], opts["num_heads"] = [int(d) for d in opts["depths"]], [int(h) for h in opts["num_heads"]]
    dim = scaled(opts["embed_dim"], width)
    if len(opts["depths"]) != len(opts["num_heads"]) or not opts["depths"]:
        raise RFIError(
            f"{arch}: depths {opts['depths']} and num_heads {opts['num_heads']} must have the same, "
            f"non-zero length (one entry per stage)"
        )
    if min(opts["depths"]) < 1 or opts["window_size"] < 1 or opts["patch_size"] < 1:
        raise RFIError(f"{arch}: depths, window_size and patch_size must be >= 1")
    for i, heads in enumerate(opts["num_heads"]):
        if heads < 1 or (dim * 2**i) % heads:
            raise RFIError(
                f"{arch}: stage {i + 1} has {dim * 2**i} channels (embed_dim {dim} x 2^{i}), not "
                f"divisible by num_heads[{i}]={heads}"
            )
    return opts


def total_stride(opts: Mapping[str, Any]) -> int:
    """The down-sampling factor of the last stage: patch size x 2^(stages - 1)."""
    return int(opts["patch_size"]) * 2 ** (len(opts["depths"]) - 1)


def size_multiple(opts: Mapping[str, Any]) -> int:
    """Image sizes an equivariant Swin takes are multiples of this: total stride x window size."""
    return total_stride(opts) * int(opts["window_size"])


def swin_features(
    model: nn.Module, x: Tensor, taps: Mapping[str, str], names: Sequence[str] | None = None
) -> OrderedDict[str, Tensor]:
    """Run ``model.features`` up to the deepest requested stage; the stages as (B, C, H, W) maps.

    Args:
        model: a torchvision SwinTransformer.
        x: normalised images (B, 3, H, W).
        taps: ``{name: "features.<n>"}``.
        names: which taps (default: all), returned in the order given.
    """
    names = list(taps) if names is None else list(names)
    index = {name: int(taps[name].split(".")[1]) for name in names}
    feats: dict[str, Tensor] = {}
    last = max(index.values())
    for i, module in enumerate(model.features):
        x = module(x)
        for name, n in index.items():
            if n == i:
                feats[name] = x.permute(0, 3, 1, 2)
        if i == last:
            break
    return OrderedDict((name, feats[name]) for name in names)


def check_image_size(h: int, w: int, arch: str, opts: Mapping[str, Any]) -> None:
    """Refuse (one line) an image size that an equivariant Swin cannot take."""
    m = size_multiple(opts)
    if h % m or w % m:
        up = lambda v: math.ceil(v / m) * m  # noqa: E731
        raise RFIError(
            f"image size {h}x{w} does not fit the equivariant {arch}: height and width must be "
            f"multiples of {m} (total stride {total_stride(opts)} x window {opts['window_size']}), "
            f"e.g. {up(h)}x{up(w)}"
        )


def infer_swin_options(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Read ``embed_dim``, ``patch_size``, ``depths``, ``num_heads``, ``window_size`` off plain Swin weights.

    ``state`` has our keys (``model.features...``, as ``encoders.weights.interop.checkpoint_filter_fn``
    returns). Works for torchvision's Swin (bias table ``((2M-1)**2, heads)``) and SwinV2
    (``cpb_mlp`` output ``heads``, coordinate table ``(1, 2M-1, 2M-1, 2)``). Empty if the
    patch embedding is not found.
    """
    patch = state.get("model.features.0.0.weight")
    if patch is None or patch.dim() != 4:
        return {}
    opts: dict[str, Any] = {"embed_dim": int(patch.shape[0]), "patch_size": int(patch.shape[-1])}
    depths, heads, window = [], [], None
    stage = 1
    while any(k.startswith(f"model.features.{stage}.") for k in state):
        blocks = {int(k.split(".")[3]) for k in state if k.startswith(f"model.features.{stage}.")}
        depths.append(len(blocks))
        table = state.get(f"model.features.{stage}.0.attn.relative_position_bias_table")
        mlp = state.get(f"model.features.{stage}.0.attn.cpb_mlp.2.weight")
        coords = state.get(f"model.features.{stage}.0.attn.relative_coords_table")
        if table is not None:
            heads.append(int(table.shape[1]))
            window = (math.isqrt(int(table.shape[0])) + 1) // 2
        elif mlp is not None:
            heads.append(int(mlp.shape[0]))
            if coords is not None:
                window = (int(coords.shape[1]) + 1) // 2
        stage += 2  # patch merging layers sit between the stages
    if depths:
        opts["depths"] = depths
    if len(heads) == len(depths) and depths:
        opts["num_heads"] = heads
    if window is not None:
        opts["window_size"] = window
    return opts


@register_encoder
class SwinFamily(EncoderFamily):
    """Swin / SwinV2, plain or equivariant (adaptive tokenizer, window attention and patch merging)."""

    architectures = tuple(SWIN_VARIANTS)
    options = {"equivariant": False, "selection": "norm", **dict.fromkeys(SWIN_OPTIONS)}
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
        """``small_input`` changes nothing (``patch_size`` sets the stem's stride)."""
        opts = resolve_options(arch, options, width)
        variant = SWIN_VARIANTS[arch]
        dim = scaled(opts["embed_dim"], width)
        block, merge = variant.block, variant.merge
        if equivariant:
            block = partial(block, attn_layer=variant.adaptive_attention)
            merge = partial(variant.adaptive_merge, selection=selection)
        elif selection != "norm":
            raise RFIError(f"selection='{selection}' needs equivariant=True")
        p, w = opts["patch_size"], opts["window_size"]
        model = tv_swin.SwinTransformer(
            patch_size=[p, p],
            embed_dim=dim,
            depths=opts["depths"],
            num_heads=opts["num_heads"],
            window_size=[w, w],
            stochastic_depth_prob=opts["stochastic_depth"],
            num_classes=num_classes,
            block=block,
            downsample_layer=merge,
        )
        if equivariant:
            tok = ev.AdaptiveTokenizer(3, dim, p, selection)
            plain = model.features[0][0]
            with torch.no_grad():  # torchvision's initialisation of the patch convolution
                tok.proj.weight.copy_(plain.weight)
                tok.proj.bias.copy_(plain.bias)
            tok.multiple = total_stride(opts) * w
            tok.model_name = f"equivariant {arch} (total stride {total_stride(opts)} x window {w})"
            model.features[0][0] = tok
            ev.share_stage_anchors(model)
        taps = OrderedDict((f"stage{k + 1}", f"features.{2 * k + 1}") for k in range(len(opts["depths"])))
        stored = {**opts, "equivariant": bool(equivariant), **({"selection": selection} if equivariant else {})}
        return Built(model, taps, stored)

    infer_kwargs = staticmethod(infer_swin_options)
    features = staticmethod(swin_features)
    size_multiple = staticmethod(size_multiple)
    check_image_size = staticmethod(check_image_size)
    phase_names = staticmethod(ev.phase_names)
    phases = staticmethod(ev.swin_phases)
