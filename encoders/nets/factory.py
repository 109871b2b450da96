"""``create_encoder``: the one entry that builds an encoder by name, or loads one from a checkpoint file.

Names are those of the registry (:func:`encoders.nets.registry.list_encoders`); files are
RFI encoder checkpoints, ``robustness``-library checkpoints or torchvision state dicts
(:mod:`encoders.weights.checkpoints`); ``shipped:NAME`` loads one of RFI's shipped encoders
(:mod:`encoders.weights.shipped`, ``rfi weights list``), e.g.
``create_encoder(checkpoint="shipped:rfi_resnet18_robust")``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from encoders.core.budget import FLOAT_BYTES, check_memory, meta_parameters
from encoders.core.errors import RFIError
from encoders.nets.models import Encoder
from encoders.weights.checkpoints import load_encoder


def create_encoder(
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    layers: Sequence[str] | None = None,
    **options: Any,
) -> Encoder:
    """Build an encoder, optionally loading weights from a checkpoint file.

    Args:
        name: a registered architecture (``alexnet, vgg16, vgg19, resnet18, resnet50, swin_t,
            swin_v2_t``, see :func:`~encoders.nets.registry.list_encoders`); may be ``None`` when
            ``checkpoint`` is an RFI checkpoint, which records its architecture.
        checkpoint: an RFI encoder checkpoint, a ``robustness`` library checkpoint, a
            plain torchvision state dict (loaded with ``weights_only=True``), or ``shipped:NAME``,
            one of RFI's shipped encoders (hash-checked; ``rfi weights list``).
        layers: feature taps returned by the encoder's forward (default: all).
        **options: ``num_classes``, ``width``, ``small_input``, ``downsample`` and the family's
            options (VGG: ``batch_norm``; Swin: ``equivariant``, ``selection``, ``embed_dim``,
            ``depths``, ``num_heads``, ``window_size``, ``patch_size``, ``stochastic_depth``; see
            :class:`~encoders.nets.models.Encoder`). With a foreign ``checkpoint``, those not given
            are read off its weights.

    Raises:
        RFIError: neither a name nor a checkpoint, an unknown name (listing the valid ones), an
            option the architecture does not take, a model larger than memory (:func:`check_encoder_size`),
            a file that does not fit, or a shipped encoder not in this build or damaged.

    Example:
        >>> import torch
        >>> enc = create_encoder("vgg16", width=0.125, small_input=True, num_classes=8, layers=["relu3_1"])
        >>> tuple(enc(torch.rand(1, 3, 32, 32))["relu3_1"].shape)
        (1, 32, 8, 8)
    """
    if checkpoint is None:
        if name is None:
            raise RFIError("create_encoder needs an architecture name or a checkpoint")
        check_encoder_size(name, **options)
        return Encoder(name, layers=layers, **options)
    return load_encoder(checkpoint, name=name, layers=layers, **options)


def check_encoder_size(name: str, **options: Any) -> int:
    """Count the parameters of ``Encoder(name, **options)`` on the ``meta`` device and refuse what memory cannot hold.

    Args:
        name: the architecture.
        **options: as :func:`create_encoder` takes them.

    Returns:
        The number of parameters.

    Raises:
        RFIError: ``num_classes`` below 1, or weights larger than the machine's memory, naming the
            options to lower (:func:`~encoders.core.budget.check_memory`).

    Example:
        >>> check_encoder_size("resnet18", width=0.125, small_input=True, num_classes=8)
        176272
    """
    if options.get("num_classes") is not None and options["num_classes"] < 1:
        raise RFIError(f"num_classes must be >= 1, got {options['num_classes']}")
    size = meta_parameters(lambda: Encoder(name, **options))
    given = ", ".join(f"{k}={v!r}" for k, v in options.items())
    sizes = [k for k in ("width", "embed_dim", "depths", "num_classes") if k in options]
    check_memory(
        size * FLOAT_BYTES,
        f"create_encoder({name!r}{', ' + given if given else ''}) with {size / 1e9:,.1f} G parameters",
        f"lower {' or '.join(sizes)}" if sizes else "choose a smaller architecture",
    )
    return size
