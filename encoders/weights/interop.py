"""Foreign checkpoints: the MadryLab ``robustness`` library's layout and plain torchvision state dicts.

``checkpoint_filter_fn`` adapts a foreign checkpoint's keys to an :class:`~encoders.nets.models.Encoder`
(timm-style), ``infer_num_classes`` / ``infer_encoder_kwargs`` read the constructor arguments
off the weights, and ``export_robustness`` writes ours back in the ``robustness`` layout.
None of this imports the ``robustness`` library (see :mod:`encoders.weights.robustness_compat`).

Example:
    >>> from encoders import create_encoder
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
    >>> state = checkpoint_filter_fn({"model": robustness_state_dict(enc), "epoch": 1})
    >>> infer_num_classes(state, "resnet18"), infer_encoder_kwargs(state, "resnet18")
    (8, {'width': 0.125, 'small_input': True})
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from encoders.core.errors import RFIError
from encoders.nets.models import Encoder
from encoders.core.serialization import save_checkpoint

_ROBUSTNESS_MODEL = "module.model."
_ROBUSTNESS_ATTACKER = "module.attacker."
_ROBUSTNESS_NORMALIZER = "module.normalizer."
# The library's AlexNet names torchvision's last classifier layer ``last_layer``.
_ALEXNET_LAST = ("model.last_layer.", "model.classifier.6.")


def checkpoint_filter_fn(ckpt: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Tensor]:
    """Map a ``robustness`` checkpoint or a torchvision state dict onto our encoder keys.

    ``robustness`` files are ``{'model': {'module.model.X': ..., 'module.attacker.model.X': ...,
    'module.normalizer.new_mean': ...}, 'epoch': ...}``; the attacker's copy of the weights is
    dropped. torchvision files are plain ``{'conv1.weight': ...}`` dicts (also under
    ``'state_dict'``). Returns keys ``model.*`` and ``normalizer.*``.
    """
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise RFIError(f"{source} holds no state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise RFIError(f"{source} holds no tensors")
    if any(k.startswith(_ROBUSTNESS_MODEL) for k in tensors):
        out = {}
        for k, v in tensors.items():
            if k.startswith(_ROBUSTNESS_MODEL):
                out["model." + k[len(_ROBUSTNESS_MODEL):]] = v
            elif k.startswith(_ROBUSTNESS_NORMALIZER):
                out["normalizer." + k[len(_ROBUSTNESS_NORMALIZER):]] = v
            elif not k.startswith(_ROBUSTNESS_ATTACKER):
                out[k] = v  # left as is: reported as unexpected when loaded
        return {_ALEXNET_LAST[1] + k[len(_ALEXNET_LAST[0]):] if k.startswith(_ALEXNET_LAST[0]) else k: v
                for k, v in out.items()}
    tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
    return {k if k.startswith(("model.", "normalizer.")) else "model." + k: v for k, v in tensors.items()}


def infer_num_classes(state: Mapping[str, Tensor], arch: str) -> int | None:
    """The classifier's output size read from an adapted state dict, if present."""
    key = ("model.fc.weight" if arch.startswith("resnet") else "model.head.weight" if arch.startswith("swin")
           else "model.classifier.6.weight")
    return int(state[key].shape[0]) if key in state else None


def infer_encoder_kwargs(state: Mapping[str, Tensor], arch: str) -> dict[str, Any]:
    """``width``, ``small_input`` (and ``batch_norm`` for VGG) read off the first layers' weights.

    Full-size files (``robustness`` and torchvision checkpoints) give ``width=1.0,
    small_input=False``; files exported from small RFI encoders give their own settings.
    Returns an empty dict when the weights do not say. Swin / SwinV2 (plain) files give
    ``embed_dim``, ``patch_size``, ``depths``, ``num_heads`` and ``window_size``.
    """
    if arch.startswith("swin"):
        from encoders.nets.swin import infer_swin_options

        return infer_swin_options(state)
    first = "model.conv1.weight" if arch.startswith("resnet") else "model.features.0.weight"
    if first not in state or state[first].dim() != 4:
        return {}
    channels, kernel = state[first].shape[0], state[first].shape[-1]
    kwargs: dict[str, Any] = {"width": channels / 64}
    if arch.startswith("resnet"):
        kwargs["small_input"] = kernel == 3
    elif arch == "alexnet":
        kwargs["small_input"] = kernel == 3
    else:
        kwargs["batch_norm"] = "model.features.1.running_mean" in state
        convs = [k for k in state if k.startswith("model.features.") and k.endswith(".weight") and state[k].dim() == 4]
        hidden = state.get("model.classifier.0.weight", state.get("model.classifier.1.weight"))
        if convs and hidden is not None:  # small-input VGGs pool to 1x1 before the classifier
            kwargs["small_input"] = hidden.shape[1] == state[convs[-1]].shape[0]
    return kwargs


def robustness_state_dict(encoder: Encoder) -> dict[str, Tensor]:
    """Our weights in the ``robustness`` AttackerModel layout (model, attacker copy, normalizer)."""
    out: dict[str, Tensor] = {}
    for k, v in encoder.normalizer.state_dict().items():
        out[_ROBUSTNESS_NORMALIZER + k] = v
        out[_ROBUSTNESS_ATTACKER + "normalize." + k] = v
    for k, v in encoder.model.state_dict().items():
        if encoder.arch == "alexnet" and k.startswith("classifier.6."):
            k = "last_layer." + k[len("classifier.6."):]
        out[_ROBUSTNESS_MODEL + k] = v
        out[_ROBUSTNESS_ATTACKER + "model." + k] = v
    return out


def export_robustness(encoder: Encoder, path: str | os.PathLike, epoch: int = 0) -> Path:
    """Write ``{'model': ..., 'epoch': ...}`` as the ``robustness`` library saves it (atomically)."""
    return save_checkpoint({"model": robustness_state_dict(encoder), "epoch": epoch}, path)
