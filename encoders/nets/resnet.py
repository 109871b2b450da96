"""ResNet-18 and ResNet-50 (torchvision's definitions), registered as the ``resnet`` family.

Taps ``layer1`` ... ``layer4``; ``width`` scales the stage widths (64, 128, 256, 512);
``small_input`` is the CIFAR-style stem (3x3 stride-1 convolution, no max-pool). Takes
``downsample='blurpool'|'lps'`` (the shortcut keeps the residual branch's phase) and the option
``padding='zeros'|'circular'``: every padded convolution pads circularly (as LPS does), e.g. to
separate the padding from the down-sampling in a shift ablation.

Example:
    >>> import torch
    >>> from encoders import create_encoder
    >>> enc = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
    >>> {k: tuple(v.shape) for k, v in enc(torch.rand(1, 3, 32, 32)).items()}["layer4"]
    (1, 128, 4, 4)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torchvision.models import ResNet
from torchvision.models import resnet as tv_resnet

from encoders.core.errors import RFIError
from encoders.nets.downsample import Downsampler, SamePhase, circular_convs
from encoders.nets.registry import Built, EncoderFamily, register_encoder, scaled

RESNETS = {"resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]), "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3])}
"""Architecture -> (torchvision block, blocks per stage)."""


@register_encoder
class ResNetFamily(EncoderFamily):
    """ResNets: torchvision's model, or rebuilt at another width / with the small-input stem."""

    architectures = tuple(RESNETS)
    classifier = "fc"
    options = {"padding": "zeros"}

    def build(self, arch: str, num_classes: int, width: float, small_input: bool, **options: Any) -> Built:
        if options["padding"] not in ("zeros", "circular"):
            raise RFIError(f"model.options.padding: '{options['padding']}' is not one of zeros, circular")
        block, depths = RESNETS[arch]
        model = ResNet(block, depths, num_classes=num_classes)
        if width != 1.0 or small_input:
            w = [scaled(c, width) for c in (64, 128, 256, 512)]
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
        stored = {}  # the default stays out of the config, so configs and checkpoints of zero padding are unchanged
        if options["padding"] == "circular":
            circular_convs(model, all_padded=True)
            stored["padding"] = "circular"
        return Built(model, OrderedDict((f"layer{i}", f"layer{i}") for i in range(1, 5)), stored)

    def infer_kwargs(self, state: Mapping[str, Tensor]) -> dict[str, Any]:
        stem = state.get("model.conv1.weight")
        if stem is None or stem.dim() != 4:
            return {}
        return {"width": stem.shape[0] / 64, "small_input": stem.shape[-1] == 3}

    def downsample_layers(self, down: Downsampler, model: nn.Module, small_input: bool) -> None:
        """The stem, its max-pool and the first block of each stage; the shortcut reuses the block's phase."""
        if down.stride(model.conv1) > 1:
            model.conv1 = down.conv(model.conv1, "conv1")
        if isinstance(model.maxpool, nn.MaxPool2d):
            model.maxpool = down.pool(model.maxpool, model.bn1.num_features)
        for li in range(1, 5):
            for bi, block in enumerate(getattr(model, f"layer{li}")):
                attr = "conv2" if hasattr(block, "conv3") else "conv1"  # Bottleneck: stride on conv2 (v1.5)
                main = getattr(block, attr)
                if down.stride(main) == 1:
                    continue
                setattr(block, attr, down.conv(main, f"layer{li}.{bi}.{attr}"))
                lpd = getattr(block, attr)[1]
                if block.downsample is not None:
                    short_conv, short_bn = block.downsample
                    short_conv.stride = (1, 1)  # 1x1: selecting before or after it is the same
                    first = SamePhase(lpd) if down.mode == "lps" else down.down(short_conv.in_channels, lpd.stride)
                    block.downsample = nn.Sequential(first, short_conv, short_bn)
