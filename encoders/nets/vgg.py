"""VGG-16 and VGG-19 (torchvision's definitions, optionally with batch norm), registered as the ``vgg`` family.

Taps ``relu<block>_<conv>`` (``relu1_1`` ... ``relu5_3`` / ``relu5_4``); ``width`` scales the
convolutions and the classifier's hidden layers; ``small_input`` pools globally before a
classifier of the last conv's width. Options: ``batch_norm`` (the ``vgg*_bn`` variants).
Takes ``downsample='blurpool'|'lps'`` (LPS with ``small_input=True`` only).

Example:
    >>> import torch
    >>> from encoders import create_encoder
    >>> enc = create_encoder("vgg16", width=0.125, small_input=True, batch_norm=True, layers=["relu3_1"])
    >>> tuple(enc(torch.rand(1, 3, 32, 32))["relu3_1"].shape)
    (1, 32, 8, 8)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torchvision.models import VGG
from torchvision.models import vgg as tv_vgg

from encoders.nets.alexnet import classifier_head
from encoders.nets.downsample import Downsampler
from encoders.nets.registry import Built, EncoderFamily, register_encoder, scaled

VGG_LAYERS = {"vgg16": tv_vgg.cfgs["D"], "vgg19": tv_vgg.cfgs["E"]}
"""Architecture -> torchvision's layer list (output channels of each 3x3 conv, ``"M"`` for a max-pool)."""


@register_encoder
class VGGFamily(EncoderFamily):
    """VGGs: torchvision's model, or rebuilt at another width / with the small-input head."""

    architectures = tuple(VGG_LAYERS)
    options = {"batch_norm": False}
    classifier = "classifier.6"

    def build(
        self, arch: str, num_classes: int, width: float, small_input: bool, batch_norm: bool = False, **options: Any
    ) -> Built:
        cfg = [v if v == "M" else scaled(v, width) for v in VGG_LAYERS[arch]]
        model = VGG(tv_vgg.make_layers(cfg, batch_norm=batch_norm), num_classes=num_classes)
        last = [v for v in cfg if v != "M"][-1]
        if small_input or width != 1.0:
            hidden = scaled(4096, width)
            if small_input:
                model.avgpool = nn.AdaptiveAvgPool2d(1)
                model.classifier = classifier_head(last, hidden, num_classes)
            else:
                model.classifier = classifier_head(last * 49, hidden, num_classes)
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
        return Built(model, taps, {"batch_norm": bool(batch_norm)})

    def infer_kwargs(self, state: Mapping[str, Tensor]) -> dict[str, Any]:
        stem = state.get("model.features.0.weight")
        if stem is None or stem.dim() != 4:
            return {}
        kwargs: dict[str, Any] = {"width": stem.shape[0] / 64, "batch_norm": "model.features.1.running_mean" in state}
        convs = [k for k in state if k.startswith("model.features.") and k.endswith(".weight") and state[k].dim() == 4]
        hidden = state.get("model.classifier.0.weight", state.get("model.classifier.1.weight"))
        if convs and hidden is not None:  # small-input VGGs pool to 1x1 before the classifier
            kwargs["small_input"] = hidden.shape[1] == state[convs[-1]].shape[0]
        return kwargs

    def downsample_layers(self, down: Downsampler, model: nn.Module, small_input: bool) -> None:
        """The max-pools of ``model.features``."""
        down.sequential(model, small_input)
