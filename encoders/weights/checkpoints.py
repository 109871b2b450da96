"""RFI encoder checkpoints: save, and load (ours, or foreign ones adapted by ``encoders.weights.interop``).

An RFI encoder checkpoint is a plain dict (loadable with ``weights_only=True``)::

    {"format": "rfi-encoder", "version": 1,
     "encoder": {"arch": ..., "num_classes": ..., "width": ..., "small_input": ..., <family options>},
     "state_dict": {...}, ...extra metadata (training state, metrics)}

Where an encoder file is taken, ``shipped:NAME`` names one of RFI's shipped encoders
(:mod:`encoders.weights.shipped`); inside a shipped decoder or app file, the encoder is a reference
``{"shipped": NAME, "sha256": ...}`` to that file, followed by :func:`encoder_from_checkpoint`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from encoders.core.errors import RFIError
from encoders.core.serialization import FORMAT_VERSIONS, check_format, content_hash, load_checkpoint, save_checkpoint
from encoders.nets.models import Encoder
from encoders.weights.interop import checkpoint_filter_fn, infer_encoder_kwargs
from encoders.weights.shipped import referenced_encoder, resolve_checkpoint

ENCODER_FORMAT = "rfi-encoder"


def encoder_checkpoint(encoder: Encoder, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of ``encoder`` (weights + constructor arguments) plus ``extra``."""
    return {
        "format": ENCODER_FORMAT,
        "version": FORMAT_VERSIONS[ENCODER_FORMAT],
        "encoder": encoder.config(),
        "state_dict": encoder.state_dict(),
        **extra,
    }


def encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 of an encoder's weights (its state dict): what a decoder records of the encoder it was
    trained on (``encoder_sha256``), so that another encoder of the same architecture is noticed.

    Example:
        >>> a = Encoder("resnet18", width=0.125, small_input=True, num_classes=4)
        >>> encoder_fingerprint(a) == encoder_fingerprint(a) != encoder_fingerprint(Encoder(**a.config()))
        True
    """
    return content_hash(encoder.state_dict())


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
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if misshapen:
            parts.append(f"shape mismatch: {_names(misshapen, 3)}")
        raise RFIError(
            f"{source} does not fit {type(module).__name__}"
            f"{' ' + module.arch if hasattr(module, 'arch') else ''}: " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True)


MAX_PARAMETERS = 2_000_000_000
"""Largest model (in parameters, 8 GB in fp32) a checkpoint's stored config may ask for."""


def build_from_config(cls: Callable[..., nn.Module], config: Any, source: str, **extra: Any) -> nn.Module:
    """``cls(**config, **extra)`` for a config read from a file, checked before anything is allocated.

    The config must be a mapping of ``cls``'s constructor arguments (a constructor with
    ``**options`` checks those itself, as :class:`~encoders.nets.models.Encoder` does); the model is first built
    on the ``meta`` device (no memory) and refused if it has more than :data:`MAX_PARAMETERS`
    parameters, so a damaged or hostile file cannot make RFI allocate gigabytes.

    Raises:
        RFIError: not a mapping, unknown keys, values the constructor refuses, or too large.
    """
    name = getattr(cls, "__name__", "model")
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise RFIError(f"{source} holds no valid {name} settings (found {type(config).__name__})")
    params = inspect.signature(cls).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in config if k in extra or (k not in params and not open_ended))
    if unknown:
        raise RFIError(f"{source}: unknown {name} settings {_names(unknown)} (a file from a newer RFI, or damaged)")
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in cls(**config, **extra).parameters())
    except RFIError as e:
        raise RFIError(f"{source}: {e}") from None
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as e:
        raise RFIError(f"{source}: invalid {name} settings ({type(e).__name__}: {e})") from None
    if size > MAX_PARAMETERS:
        raise RFIError(
            f"{source}: its {name} settings ask for {size / 1e9:.1f} G parameters (more than "
            f"{MAX_PARAMETERS / 1e9:.0f} G): a damaged file?"
        )
    return cls(**config, **extra)


def encoder_from_checkpoint(
    ckpt: Mapping[str, Any],
    source: str,
    name: str | None = None,
    layers: Sequence[str] | None = None,
    arch_key: str = "--arch",
    **kwargs: Any,
) -> Encoder:
    """Build the encoder of a checkpoint dict: the one place encoders are built from checkpoints.

    The dict is an RFI encoder checkpoint (see :func:`encoder_checkpoint`), a ``robustness``-library
    checkpoint or a torchvision state dict (the last two adapted by :mod:`encoders.weights.interop`),
    or the reference to a shipped encoder that shipped decoder and app files hold
    (:func:`encoders.weights.shipped.encoder_reference`), whose file is read.
    Callers that need more of the file (training config, metrics) read it once with
    :func:`encoders.core.serialization.load_checkpoint` and pass the dict here.

    Args:
        ckpt: the checkpoint dict.
        source: the file it came from (for messages).
        name: the architecture; required for foreign checkpoints, checked for RFI ones.
        layers: feature taps the encoder returns.
        arch_key: how the user names the architecture in the command at hand (``--arch`` or
            ``encoder.arch``), quoted when a foreign checkpoint comes without ``name``.
        **kwargs: constructor arguments for foreign checkpoints (``num_classes``, ``width``,
            ``small_input`` and family options are read off the weights when not given, see
            :func:`encoders.weights.interop.infer_encoder_kwargs`).

    Raises:
        RFIError: missing or invalid settings, another architecture than ``name``, another RFI file
            (a decoder, autoencoder, anomaly model...), an unknown format or a newer version, a
            foreign file without ``name``, or weights that do not fit.

    Example:
        >>> enc = Encoder("resnet18", width=0.125, small_input=True, num_classes=4)
        >>> encoder_from_checkpoint(encoder_checkpoint(enc), "memory").arch
        'resnet18'
    """
    if "shipped" in ckpt and "format" not in ckpt:  # a shipped file's reference to its shipped encoder
        ckpt = load_checkpoint(referenced_encoder(ckpt, source))
    check_format(ckpt, source)
    fmt = ckpt.get("format")
    if fmt is not None and fmt != ENCODER_FORMAT:  # another RFI file: a foreign file has no format
        what = {
            "rfi-decoder": "a decoder",
            "rfi-autoencoder": "an autoencoder (encoder + decoders)",
            "rfi-anomaly": "an anomaly model",
            "rfi-segmenter": "a segmenter",
        }.get(fmt, fmt)
        raise RFIError(
            f"{source} is {what} file, not an encoder checkpoint: pass it where a "
            f"{'decoder' if fmt == 'rfi-decoder' else 'model'} is asked for"
        )
    if fmt == ENCODER_FORMAT:
        if not isinstance(ckpt.get("state_dict"), Mapping):
            raise RFIError(f"{source} is an RFI encoder checkpoint without weights ('state_dict' missing)")
        cfg = ckpt.get("encoder")
        if isinstance(cfg, Mapping) and name is not None and name != cfg.get("arch"):
            raise RFIError(f"{source} holds a {cfg.get('arch')} encoder, not {name}")
        encoder = build_from_config(Encoder, cfg, source, layers=layers)
        load_state_dict_checked(encoder, ckpt["state_dict"], source)
        return encoder.eval()
    if name is None:
        example = f"{arch_key} resnet50" if arch_key.startswith("-") else f"{arch_key}=resnet50"
        raise RFIError(
            f"{source} is not an RFI encoder checkpoint (a robustness-library or torchvision file?): "
            f"name its architecture with {arch_key} (e.g. {example})"
        )
    state = checkpoint_filter_fn(ckpt, name, source)
    for key, value in infer_encoder_kwargs(state, name).items():  # num_classes, width, small_input, ...
        kwargs.setdefault(key, value)
    encoder = Encoder(name, layers=layers, **kwargs)
    for key, value in encoder.normalizer.state_dict().items():  # torchvision files carry none
        state.setdefault(f"normalizer.{key}", value)
    load_state_dict_checked(encoder, state, source)
    return encoder.eval()


def load_encoder(
    path: str | os.PathLike,
    name: str | None = None,
    layers: Sequence[str] | None = None,
    arch_key: str = "--arch",
    **kwargs: Any,
) -> Encoder:
    """Load an encoder from an RFI, ``robustness``-library or torchvision checkpoint file, or a
    shipped encoder (``shipped:NAME``, see :mod:`encoders.weights.shipped`).

    Reads the file once (:func:`encoders.core.serialization.load_checkpoint`) and builds the encoder
    with :func:`encoder_from_checkpoint` (see there for the arguments).

    Raises:
        RFIError: unreadable file, or weights that do not fit the architecture; a shipped encoder that is
            not in this build or damaged (:func:`~encoders.weights.shipped.shipped_path`), or a shipped
            model of another kind.
    """
    path = resolve_checkpoint(path, kind="encoder")
    return encoder_from_checkpoint(load_checkpoint(path), str(path), name, layers, arch_key, **kwargs)
