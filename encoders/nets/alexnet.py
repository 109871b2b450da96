"""AlexNet (torchvision's definition), registered as the ``alexnet`` family.

Taps ``conv1`` ... ``conv5`` (after each ReLU); ``width`` scales the convolutions and the
classifier's hidden layers; ``small_input`` is a 3x3 stride-1 stem with 2x2 pools
(32 -> 16 -> 8 -> 4) and a globally pooled classifier. Takes ``downsample='blurpool'|'lps'``
with ``small_input=True`` (the full-size 11x11 stride-4 stem has no stride-1 form). The
``robustness`` library calls the last classifier layer ``last_layer``.

Example:
    >>> import torch
    >>> from encoders import create_encoder
    >>> enc = create_encoder("alexnet", width=0.125, small_input=True, layers=["conv5"])
    >>> tuple(enc(torch.rand(1, 3, 32, 32))["conv5"].shape)
    (1, 32, 8, 8)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torchvision.models import AlexNet

from encoders.nets.downsample import Downsampler
from encoders.nets.registry import Built, EncoderFamily, register_encoder, scaled


def classifier_head(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """The AlexNet / VGG classifier with torchvision's structure (and state-dict keys)."""
    return nn.Sequential(
        nn.Dropout(),
        nn.Linear(in_features, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Linear(hidden, num_classes),
    )


@register_encoder
class AlexNetFamily(EncoderFamily):
    """AlexNet: torchvision's model, or rebuilt at another width / with the small-input stem."""

    architectures = ("alexnet",)
    classifier = "classifier.6"
    robustness_names = {"classifier.6.": "last_layer."}

    def build(self, arch: str, num_classes: int, width: float, small_input: bool, **options: Any) -> Built:
        model = AlexNet(num_classes=num_classes)
        if small_input or width != 1.0:
            c = [scaled(v, width) for v in (64, 192, 384, 256, 256)]
            if small_input:  # 3x3 stride-1 stem, 2x2 pools: 32 -> 16 -> 8 -> 4
                stem, pool = nn.Conv2d(3, c[0], 3, 1, 1), (lambda: nn.MaxPool2d(2, 2))
            else:
                stem, pool = nn.Conv2d(3, c[0], 11, 4, 2), (lambda: nn.MaxPool2d(3, 2))
            model.features = nn.Sequential(
                stem,
                nn.ReLU(True),
                pool(),
                nn.Conv2d(c[0], c[1], 5, padding=2),
                nn.ReLU(True),
                pool(),
                nn.Conv2d(c[1], c[2], 3, padding=1),
                nn.ReLU(True),
                nn.Conv2d(c[2], c[3], 3, padding=1),
                nn.ReLU(True),
                nn.Conv2d(c[3], c[4], 3, padding=1),
                nn.ReLU(True),
                pool(),
            )
            hidden = scaled(4096, width)
            if small_input:
                model.avgpool = nn.AdaptiveAvgPool2d(1)
                model.classifier = classifier_head(c[4], hidden, num_classes)
            else:
                model.classifier = classifier_head(c[4] * 36, hidden, num_classes)
        taps = OrderedDict((f"conv{i + 1}", f"features.{j}") for i, j in enumerate((1, 4, 7, 9, 11)))
        return Built(model, taps)

    def infer_kwargs(self, state: Mapping[str, Tensor]) -> dict[str, Any]:
        stem = state.get("model.features.0.weight")
        if stem is None or stem.dim() != 4:
            return {}
        return {"width": stem.shape[0] / 64, "small_input": stem.shape[-1] == 3}

    def downsample_layers(self, down: Downsampler, model: nn.Module, small_input: bool) -> None:
        """The stem and the max-pools of ``model.features``."""
        down.sequential(model, small_input)
