"""RFI encoder checkpoints: save, and load (ours, or foreign ones adapted by ``encoders.interop``).

An RFI encoder checkpoint is a plain dict (loadable with ``weights_only=True``)::

    {"format": "rfi-encoder", "version": 1,
     "encoder": {"arch": ..., "num_classes": ..., "width": ..., "small_input": ..., "batch_norm": ...},
     "state_dict": {...}, ...extra metadata (training state, metrics)}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from encoders.errors import RFIError
from encoders.models import Encoder
from encoders.serialization import load_checkpoint, save_checkpoint

ENCODER_FORMAT = "rfi-encoder"


def encoder_checkpoint(encoder: Encoder, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of ``encoder`` (weights + constructor arguments) plus ``extra``."""
    return {"format": ENCODER_FORMAT, "version": 1, "encoder": encoder.config(),
            "state_dict": encoder.state_dict(), **extra}


def save_encoder(encoder: Encoder, path: str | os.PathLike, **extra: Any) -> Path:
    """Atomically write an RFI encoder checkpoint."""
    return save_checkpoint(encoder_checkpoint(encoder, **extra), path)


def _names(keys: Sequence[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming missing, unexpected and misshapen keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshapen = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if misshapen:
            parts.append(f"shape mismatch: {_names(misshapen, 3)}")
        raise RFIError(f"{source} does not fit {type(module).__name__}"
                       f"{' ' + module.arch if hasattr(module, 'arch') else ''}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def load_encoder(path: str | os.PathLike, name: str | None = None,
                 layers: Sequence[str] | None = None, **kwargs: Any) -> Encoder:
    """Load an encoder from an RFI, ``robustness``-library or torchvision checkpoint.

    Args:
        path: the checkpoint file.
        name: the architecture; required for foreign checkpoints, checked for RFI ones.
        layers: feature taps the encoder returns.
        **kwargs: constructor arguments for foreign checkpoints (``num_classes``, ``width``,
            ``small_input`` and ``batch_norm`` are inferred from the weights when not given).

    Raises:
        RFIError: unreadable file, or weights that do not fit the architecture.
    """
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == ENCODER_FORMAT:
        cfg = dict(ckpt["encoder"])
        if name is not None and name != cfg["arch"]:
            raise RFIError(f"{path} holds a {cfg['arch']} encoder, not {name}")
        encoder = Encoder(**cfg, layers=layers)
        load_state_dict_checked(encoder, ckpt["state_dict"], str(path))
    else:
        from encoders.interop import checkpoint_filter_fn, infer_encoder_kwargs, infer_num_classes

        if name is None:
            raise RFIError(f"{path} is not an RFI encoder checkpoint: name its architecture "
                           f"(e.g. --arch resnet50) to import it")
        state = checkpoint_filter_fn(ckpt, str(path))
        kwargs.setdefault("num_classes", infer_num_classes(state, name) or 1000)
        for key, value in infer_encoder_kwargs(state, name).items():  # width, small_input, batch_norm
            kwargs.setdefault(key, value)
        encoder = Encoder(name, layers=layers, **kwargs)
        for key, value in encoder.normalizer.state_dict().items():  # torchvision files carry none
            state.setdefault(f"normalizer.{key}", value)
        load_state_dict_checked(encoder, state, str(path))
    return encoder.eval()
