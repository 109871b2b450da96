"""Foreign checkpoints: the MadryLab ``robustness`` library's layout and plain torchvision state dicts.

``checkpoint_filter_fn`` adapts a foreign checkpoint's keys to an :class:`~encoders.nets.models.Encoder`
(timm-style: the layout here, the architecture's own renames in its family's
``checkpoint_filter_fn``, :mod:`encoders.nets.registry`), ``infer_encoder_kwargs`` reads the
constructor arguments off the weights, and ``export_robustness`` writes ours back in the
``robustness`` layout. None of this imports the ``robustness`` library (see
:mod:`encoders.weights.robustness_compat`).

Example:
    >>> from encoders import create_encoder
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
    >>> state = checkpoint_filter_fn({"model": robustness_state_dict(enc), "epoch": 1}, "resnet18")
    >>> infer_encoder_kwargs(state, "resnet18")
    {'num_classes': 8, 'width': 0.125, 'small_input': True}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from encoders.core.errors import RFIError
from encoders.core.serialization import save_checkpoint
from encoders.nets.models import Encoder
from encoders.nets.registry import encoder_family, rename_prefix

_ROBUSTNESS_MODEL = "module.model."
_ROBUSTNESS_ATTACKER = "module.attacker."
_ROBUSTNESS_NORMALIZER = "module.normalizer."


def checkpoint_filter_fn(ckpt: Mapping[str, Any], arch: str, source: str = "checkpoint") -> dict[str, Tensor]:
    """Map a ``robustness`` checkpoint or a torchvision state dict onto the keys of an ``arch`` encoder.

    ``robustness`` files are ``{'model': {'module.model.X': ..., 'module.attacker.model.X': ...,
    'module.normalizer.new_mean': ...}, 'epoch': ...}``; the attacker's copy of the weights is
    dropped. torchvision files are plain ``{'conv1.weight': ...}`` dicts (also under
    ``'state_dict'``). The family of ``arch`` then renames what it names otherwise.

    Returns:
        The tensors under keys ``model.*`` and ``normalizer.*``.

    Raises:
        RFIError: an unknown architecture, or a file without a state dict of tensors.
    """
    family = encoder_family(arch)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise RFIError(f"{source} holds no state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise RFIError(f"{source} holds no tensors")
    if any(k.startswith(_ROBUSTNESS_MODEL) for k in tensors):
        ours = {}
        for k, v in tensors.items():
            if k.startswith(_ROBUSTNESS_MODEL):
                ours["model." + k[len(_ROBUSTNESS_MODEL) :]] = v
            elif k.startswith(_ROBUSTNESS_NORMALIZER):
                ours["normalizer." + k[len(_ROBUSTNESS_NORMALIZER) :]] = v
            elif not k.startswith(_ROBUSTNESS_ATTACKER):
                ours[k] = v  # left as is: reported as unexpected when loaded
    else:
        tensors = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in tensors.items()}
        ours = {k if k.startswith(("model.", "normalizer.")) else "model." + k: v for k, v in tensors.items()}
    return family.checkpoint_filter_fn(ours)


def infer_encoder_kwargs(state: Mapping[str, Tensor], arch: str) -> dict[str, Any]:
    """Constructor arguments of an ``arch`` encoder read off an adapted state dict (:func:`checkpoint_filter_fn`).

    ``num_classes`` from the classifier, then what the family reads (CNNs: ``width`` and
    ``small_input`` from the first layer, VGG ``batch_norm``; plain Swin: ``embed_dim``,
    ``patch_size``, ``depths``, ``num_heads``, ``window_size``). Full-size files
    (``robustness`` and torchvision checkpoints) give ``width=1.0, small_input=False``. Only
    what the weights say is returned.
    """
    family = encoder_family(arch)
    classifier = state.get(f"model.{family.classifier}.weight")
    kwargs = {"num_classes": int(classifier.shape[0])} if classifier is not None else {}
    return {**kwargs, **family.infer_kwargs(state)}


def robustness_state_dict(encoder: Encoder) -> dict[str, Tensor]:
    """Our weights in the ``robustness`` AttackerModel layout (model, attacker copy, normalizer)."""
    out: dict[str, Tensor] = {}
    for k, v in encoder.normalizer.state_dict().items():
        out[_ROBUSTNESS_NORMALIZER + k] = v
        out[_ROBUSTNESS_ATTACKER + "normalize." + k] = v
    for k, v in encoder.model.state_dict().items():
        k = rename_prefix(k, encoder.family.robustness_names)
        out[_ROBUSTNESS_MODEL + k] = v
        out[_ROBUSTNESS_ATTACKER + "model." + k] = v
    return out


def export_robustness(encoder: Encoder, path: str | os.PathLike, epoch: int = 0) -> Path:
    """Write ``{'model': ..., 'epoch': ...}`` as the ``robustness`` library saves it (atomically)."""
    return save_checkpoint({"model": robustness_state_dict(encoder), "epoch": epoch}, path)
