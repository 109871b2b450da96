"""``create_encoder``: the one entry that builds an encoder by name, or loads one from a checkpoint file.

Names are those of the registry (:func:`encoders.nets.registry.list_encoders`); files are
RFI encoder checkpoints, ``robustness``-library checkpoints or torchvision state dicts
(:mod:`encoders.weights.checkpoints`).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from encoders.core.errors import RFIError
from encoders.nets.models import Encoder
from encoders.weights.checkpoints import load_encoder


def create_encoder(name: str | None = None, checkpoint: str | os.PathLike | None = None,
                   layers: Sequence[str] | None = None, **options: Any) -> Encoder:
    """Build an encoder, optionally loading weights from a checkpoint file.

    Args:
        name: a registered architecture (``alexnet, vgg16, vgg19, resnet18, resnet50, swin_t,
            swin_v2_t``, see :func:`~encoders.nets.registry.list_encoders`); may be ``None`` when
            ``checkpoint`` is an RFI checkpoint, which records its architecture.
        checkpoint: an RFI encoder checkpoint, a ``robustness`` library checkpoint, or a
            plain torchvision state dict (loaded with ``weights_only=True``).
        layers: feature taps returned by the encoder's forward (default: all).
        **options: ``num_classes``, ``width``, ``small_input``, ``downsample`` and the family's
            options (VGG: ``batch_norm``; Swin: ``equivariant``, ``selection``, ``embed_dim``,
            ``depths``, ``num_heads``, ``window_size``, ``patch_size``, ``stochastic_depth``; see
            :class:`~encoders.nets.models.Encoder`). With a foreign ``checkpoint``, those not given
            are read off its weights.

    Raises:
        RFIError: neither a name nor a checkpoint, an unknown name (listing the valid ones), an
            option the architecture does not take, or a file that does not fit.

    Example:
        >>> import torch
        >>> enc = create_encoder("vgg16", width=0.125, small_input=True, num_classes=8, layers=["relu3_1"])
        >>> tuple(enc(torch.rand(1, 3, 32, 32))["relu3_1"].shape)
        (1, 32, 8, 8)
    """
    if checkpoint is None:
        if name is None:
            raise RFIError("create_encoder needs an architecture name or a checkpoint")
        return Encoder(name, layers=layers, **options)
    return load_encoder(checkpoint, name=name, layers=layers, **options)
