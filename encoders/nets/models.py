"""Encoders: torchvision architectures with normalisation inside and named feature taps.

An :class:`Encoder` takes images in [0, 1] and normalises them itself (as the
``robustness`` library's models do), so every caller passes plain images. Calling it
returns an ordered dict of feature maps at named layers, built on
``torchvision.models.feature_extraction``; :meth:`Encoder.logits` gives class scores
(for training and attacks).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import AlexNet, ResNet, VGG
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg
from torchvision.models.feature_extraction import create_feature_extractor

from encoders.core.errors import RFIError
from encoders.core.imageio import check_images

ARCHITECTURES = ("alexnet", "vgg16", "vgg19", "resnet18", "resnet50", "swin_t", "swin_v2_t")
SWIN = ("swin_t", "swin_v2_t")  # transformers: built by encoders.nets.swin
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESNET = {"resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
           "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3])}
_VGG_CFG = {"vgg16": tv_vgg.cfgs["D"], "vgg19": tv_vgg.cfgs["E"]}


class InputNormalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the same buffer names as the ``robustness`` library.

    Shape: (B, 3, H, W) -> (B, 3, H, W); input in [0, 1].
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean).view(3, 1, 1))
        self.register_buffer("new_std", torch.tensor(std).view(3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.new_mean) / self.new_std


def _scale(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _build_resnet(arch: str, num_classes: int, width: float, small_input: bool):
    block, depths = _RESNET[arch]
    model = ResNet(block, depths, num_classes=num_classes)
    if width != 1.0 or small_input:
        w = [_scale(c, width) for c in (64, 128, 256, 512)]
        model.inplanes = w[0]
        if small_input:  # CIFAR-style stem: 3x3 stride-1 conv, no max-pool
            model.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        else:
            model.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        model.bn1 = nn.BatchNorm2d(w[0])
        model.layer1 = model._make_layer(block, w[0], depths[0])
        model.layer2 = model._make_layer(block, w[1], depths[1], stride=2)
        model.layer3 = model._make_layer(block, w[2], depths[2], stride=2)
        model.layer4 = model._make_layer(block, w[3], depths[3], stride=2)
        model.fc = nn.Linear(w[3] * block.expansion, num_classes)
        for m in model.modules():  # torchvision's own initialisation, re-applied to the rebuilt layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    taps = OrderedDict((f"layer{i}", f"layer{i}") for i in range(1, 5))
    return model, taps


def _classifier(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    # Same structure (and state-dict keys) as torchvision's VGG/AlexNet heads.
    return nn.Sequential(nn.Dropout(), nn.Linear(in_features, hidden), nn.ReLU(True),
                         nn.Dropout(), nn.Linear(hidden, hidden), nn.ReLU(True),
                         nn.Linear(hidden, num_classes))


def _build_vgg(arch: str, num_classes: int, width: float, small_input: bool, batch_norm: bool):
    cfg = [v if v == "M" else _scale(v, width) for v in _VGG_CFG[arch]]
    model = VGG(tv_vgg.make_layers(cfg, batch_norm=batch_norm), num_classes=num_classes)
    last = [v for v in cfg if v != "M"][-1]
    if small_input or width != 1.0:
        hidden = _scale(4096, width)
        if small_input:
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = _classifier(last, hidden, num_classes)
        else:
            model.classifier = _classifier(last * 49, hidden, num_classes)
    taps: OrderedDict[str, str] = OrderedDict()
    block, conv, idx = 1, 0, 0
    for v in cfg:
        if v == "M":
            block, conv, idx = block + 1, 0, idx + 1
            continue
        conv += 1
        idx += 2 if batch_norm else 1
        taps[f"relu{block}_{conv}"] = f"features.{idx}"
        idx += 1
    return model, taps


def _build_alexnet(num_classes: int, width: float, small_input: bool):
    model = AlexNet(num_classes=num_classes)
    if small_input or width != 1.0:
        c = [_scale(v, width) for v in (64, 192, 384, 256, 256)]
        if small_input:  # 3x3 stride-1 stem, 2x2 pools: 32 -> 16 -> 8 -> 4
            stem, pool = nn.Conv2d(3, c[0], 3, 1, 1), (lambda: nn.MaxPool2d(2, 2))
        else:
            stem, pool = nn.Conv2d(3, c[0], 11, 4, 2), (lambda: nn.MaxPool2d(3, 2))
        model.features = nn.Sequential(
            stem, nn.ReLU(True), pool(),
            nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(True), pool(),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(True),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(True),
            nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(True), pool())
        hidden = _scale(4096, width)
        if small_input:
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = _classifier(c[4], hidden, num_classes)
        else:
            model.classifier = _classifier(c[4] * 36, hidden, num_classes)
    taps = OrderedDict((f"conv{i + 1}", f"features.{j}") for i, j in enumerate((1, 4, 7, 9, 11)))
    return model, taps


INPUT_TAP = "input"
"""A pseudo-layer every encoder accepts: the input image itself, in [0, 1] (3 channels, stride 1).

It is not in :attr:`Encoder.layer_names` (so "all layers" stays the network's layers); a
decoder takes it as an image-level skip link (e.g. the denoiser: ``decoder.skips: [input]``).
"""


class Encoder(nn.Module):
    """A torchvision classifier with input normalisation and named feature taps.

    Args:
        arch: one of ``alexnet, vgg16, vgg19, resnet18, resnet50, swin_t, swin_v2_t``.
        num_classes: size of the classification head.
        width: channel multiplier (0.25 gives a CPU-sized ResNet-18 with widths 16-128).
        small_input: 3x3 stride-1 stem without the stem max-pool (for 32-64 px images).
        batch_norm: VGG only: use the ``vgg*_bn`` variant.
        layers: the layers :meth:`forward` returns (default: all of :attr:`layer_names`), and
            optionally :data:`INPUT_TAP` (the input image itself).
        downsample: ``stride`` (the architecture as is), ``blurpool`` (anti-aliased) or
            ``lps`` (learnable polyphase sampling, exactly shift-invariant in eval mode; its
            forward returns :class:`~encoders.nets.downsample.PhasedFeatures`). See
            :mod:`encoders.nets.downsample`.
        equivariant: Swin only: the truly shift-equivariant form (adaptive tokenization,
            window attention and patch merging; :mod:`encoders.nets.equivariant_vit`); its forward
            returns :class:`~encoders.nets.downsample.PhasedFeatures`.
        selection: equivariant Swin only: ``norm`` (largest-norm phase) or ``learned``.
        embed_dim, depths, num_heads, window_size, patch_size, stochastic_depth: Swin only
            (default: torchvision's ``swin_t`` / ``swin_v2_t``; ``width`` scales ``embed_dim``).
            Stages are tapped as ``stage1`` ... ``stage<len(depths)>``, (B, C, H, W) maps.

    Shape:
        - Input: (B, 3, H, W), values in [0, 1].
        - Output: ordered dict ``{layer: (B, C_l, H_l, W_l)}``.

    Example:
        >>> enc = Encoder("resnet18", num_classes=8, width=0.25, small_input=True, layers=["layer3"])
        >>> {k: tuple(v.shape) for k, v in enc(torch.rand(2, 3, 32, 32)).items()}
        {'layer3': (2, 64, 8, 8)}
    """

    def __init__(self, arch: str, num_classes: int = 1000, width: float = 1.0,
                 small_input: bool = False, batch_norm: bool = False,
                 layers: Sequence[str] | None = None, downsample: str = "stride", equivariant: bool = False,
                 selection: str = "norm", embed_dim: int | None = None, depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None, window_size: int | None = None,
                 patch_size: int | None = None, stochastic_depth: float | None = None):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise RFIError(f"unknown architecture '{arch}' (valid: {', '.join(ARCHITECTURES)})")
        if width <= 0:
            raise RFIError(f"width must be positive, got {width}")
        swin_opts = {"embed_dim": embed_dim, "depths": depths, "num_heads": num_heads, "window_size": window_size,
                     "patch_size": patch_size, "stochastic_depth": stochastic_depth}
        self.equivariant, self.selection, self.swin_options = bool(equivariant), selection, None
        if arch not in SWIN and (equivariant or any(v is not None for v in swin_opts.values())):
            given = "equivariant=True" if equivariant else ", ".join(k for k, v in swin_opts.items() if v is not None)
            raise RFIError(f"{given}: only for swin_t / swin_v2_t, not {arch} (for CNNs use downsample='lps')")
        if arch in SWIN:
            from encoders.nets.swin import build_swin

            if downsample != "stride":
                raise RFIError(f"downsample='{downsample}' is for CNNs, not {arch}: use equivariant=True")
            model, taps, self.swin_options = build_swin(arch, num_classes, width, equivariant, selection, **swin_opts)
        elif arch.startswith("resnet"):
            model, taps = _build_resnet(arch, num_classes, width, small_input)
        elif arch.startswith("vgg"):
            model, taps = _build_vgg(arch, num_classes, width, small_input, batch_norm)
        else:
            model, taps = _build_alexnet(num_classes, width, small_input)
        if downsample != "stride":
            from encoders.nets.downsample import convert_downsampling

            convert_downsampling(model, arch, downsample, small_input)
        self.downsample = downsample
        self.arch, self.num_classes, self.width = arch, num_classes, width
        self.small_input, self.batch_norm = small_input, batch_norm
        self.normalizer = InputNormalize()
        self.model = model
        self.taps = taps
        self._extractors: dict[tuple[str, ...], nn.Module] = {}
        self.layers = self.check_layers(layers) if layers is not None else list(taps)

    @property
    def layer_names(self) -> list[str]:
        """All layers this architecture can tap, shallow to deep."""
        return list(self.taps)

    def check_layers(self, layers: Sequence[str]) -> list[str]:
        """Validate layer names, returned in shallow-to-deep order (:data:`INPUT_TAP` first)."""
        if isinstance(layers, str):
            layers = [layers]
        bad = [name for name in layers if name not in self.taps and name != INPUT_TAP]
        if bad or not layers:
            raise RFIError(f"unknown layer {', '.join(map(repr, bad)) or '(none given)'} for {self.arch} "
                           f"(valid: {', '.join(self.taps)}, {INPUT_TAP})")
        return [INPUT_TAP] * (INPUT_TAP in layers) + [name for name in self.taps if name in layers]

    def config(self) -> dict:
        """The constructor arguments (without ``layers``), as stored in checkpoints."""
        cfg = {"arch": self.arch, "num_classes": self.num_classes, "width": self.width,
               "small_input": self.small_input, "batch_norm": self.batch_norm}
        if self.downsample != "stride":  # only then, so default configs stay as they were
            cfg["downsample"] = self.downsample
        if self.swin_options is not None:
            cfg.update(self.swin_options, equivariant=self.equivariant)
            if self.equivariant:
                cfg["selection"] = self.selection
        return cfg

    def size_multiple(self, layer: str | None = None) -> int:
        """Image height and width must be multiples of this (1: any size; equivariant Swin: total stride x window)."""
        if not self.equivariant:
            return 1
        from encoders.nets.swin import size_multiple

        return size_multiple(self.swin_options)

    def phase_names(self, layer: str) -> list[str] | None:
        """Names of the phase choices before ``layer`` (shallow to deep) that the forward's
        ``phases`` carry (LPS and equivariant Swin; one per stride-2 step), else ``None``."""
        if self.equivariant:
            from encoders.nets.equivariant_vit import phase_names

            return phase_names(self.model, self.taps[layer])
        if self.downsample == "lps":
            from encoders.nets.downsample import phase_path

            return phase_path(self.model, self.taps[layer])
        return None

    def _extractor(self, layers: tuple[str, ...]) -> nn.Module:
        if layers not in self._extractors:
            # The extractor shares parameters and buffers with ``self.model``; it is kept out
            # of the module tree so the state dict holds each tensor once.
            kwargs = {}
            if self.downsample != "stride":  # LPD/BlurPool run as opaque leaves (LPD records its phase)
                from encoders.nets.downsample import leaf_modules

                kwargs["tracer_kwargs"] = {"leaf_modules": leaf_modules(self.downsample)}
            self._extractors[layers] = create_feature_extractor(
                self.model, return_nodes={self.taps[name]: name for name in layers}, **kwargs)
        extractor = self._extractors[layers]
        extractor.train(self.training)
        return extractor

    def reset_extractors(self) -> None:
        """Forget cached feature extractors (call after replacing submodules of ``model``)."""
        self._extractors.clear()

    def forward(self, x: Tensor, layers: Sequence[str] | None = None) -> "OrderedDict[str, Tensor]":
        check_images(x, "encoder input")  # one line for NaN, 0-255 values, (3, H, W), grey or RGBA batches
        names = tuple(self.check_layers(layers)) if layers is not None else tuple(self.layers)
        deep = tuple(name for name in names if name != INPUT_TAP)
        feats = OrderedDict([(INPUT_TAP, x)] * (INPUT_TAP in names))
        if deep and self.swin_options is not None:
            from encoders.nets.swin import swin_features

            self._check_size(x)
            feats.update(swin_features(self.model, self.normalizer(x), self.taps, deep))
            if self.equivariant:
                from encoders.nets.downsample import PhasedFeatures
                from encoders.nets.equivariant_vit import swin_phases

                return PhasedFeatures(feats, swin_phases(self.model, self.taps[deep[-1]]))
            return feats
        if deep:
            feats.update(self._extractor(deep)(self.normalizer(x)))
        if self.downsample == "lps" and deep:  # the phases travel with the features (for LPS decoders)
            from encoders.nets.downsample import PhasedFeatures, encoder_phases

            return PhasedFeatures(feats, encoder_phases(self.model, self.taps[deep[-1]]))
        return feats

    def logits(self, x: Tensor) -> Tensor:
        """Class scores for images in [0, 1]. Shape: (B, 3, H, W) -> (B, num_classes)."""
        self._check_size(x)
        return self.model(self.normalizer(x))

    def _check_size(self, x: Tensor) -> None:
        if self.equivariant:
            from encoders.nets.swin import check_image_size

            check_image_size(x.shape[-2], x.shape[-1], self.arch, self.swin_options)

    @torch.no_grad()
    def feature_info(self, size: int | None = None) -> "OrderedDict[str, tuple[int, int]]":
        """``{layer: (channels, stride)}`` measured with one probe forward pass at ``size`` px."""
        size = size or (64 if self.small_input else 224)
        size = -(-size // self.size_multiple()) * self.size_multiple()
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        feats = self(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype),
                     layers=[INPUT_TAP, *self.layer_names])
        self.train(was_training)
        return OrderedDict((k, (v.shape[1], size // v.shape[-1])) for k, v in feats.items())

    @torch.no_grad()
    def check_input_size(self, size: int, key: str = "data.size") -> None:
        """Refuse a square input side the network cannot take, naming ``key`` (one probe forward pass).

        Raises:
            RFIError: too small for the network's down-sampling (or not the multiple it needs).
        """
        if size < 1:
            raise RFIError(f"{key} must be >= 1 pixel, got {size}")
        multiple = self.size_multiple()
        if size % multiple:
            raise RFIError(f"{key}={size} is not a multiple of {multiple}, which this {self.arch} needs")
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        try:
            self(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype), layers=self.layer_names)
        except RuntimeError as e:
            raise RFIError(f"{key}={size} px is too small for this {self.arch} ({str(e).splitlines()[0]})") from None
        finally:
            self.train(was_training)

    def __getstate__(self):  # cached FX modules are rebuilt on demand, never pickled/deep-copied
        state = self.__dict__.copy()
        state["_extractors"] = {}
        return state
