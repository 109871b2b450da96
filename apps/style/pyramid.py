"""Decoder pyramids for style transfer: train one, load one (``rfi style train``).

A *decoder pyramid* is a :class:`~inversion.autoencoder.RobustAutoencoder` with decoders for
several layers of one (robust) encoder, saved as one model file
(``RobustAutoencoder.save``). :func:`train_pyramid` trains it by calling
:func:`inversion.train.train_decoder` once per layer (same encoder, same data, same losses;
``per_layer`` overrides for single layers), then writes the file; :func:`load_pyramid`
reads it back for :func:`apps.style.transfer.stylize`. The settings are
:class:`~apps.style.config.StyleConfig` (``configs/apps/style.yaml``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from apps.style.config import DEFAULT_CONFIG, StyleConfig
from encoders.core.config import config_to_dict, load_config, merge
from encoders.core.errors import RFIError
from encoders.core.rundir import RunDir, TrainResult
from encoders.weights.checkpoints import load_encoder
from encoders.weights.shipped import resolve_checkpoint
from inversion.autoencoder import RobustAutoencoder
from inversion.train import TRAIN_ENCODER_HINT, TrainDecoderConfig, train_decoder

log = logging.getLogger("rfi")

STYLE_APP = "style"
"""The ``app`` a pyramid file records (its kind, see :func:`inversion.autoencoder.model_kind`)."""


def layer_config(cfg: StyleConfig, layer: str) -> TrainDecoderConfig:
    """The ``rfi train-decoder`` config of one layer: ``cfg.train`` + ``cfg.per_layer[layer]``.

    Raises:
        RFIError: an unknown or mistyped key in ``per_layer`` (named with its layer).
    """
    extra = cfg.per_layer.get(layer) or {}
    if not isinstance(extra, Mapping):
        raise RFIError(f"per_layer.{layer} must be a mapping of train-decoder keys, got {extra!r}")
    fixed = {"encoder.layer": layer, "out": str(_runs_dir(cfg) / layer)}
    try:
        return load_config(TrainDecoderConfig, None, merge(config_to_dict(cfg.train), extra, fixed))
    except RFIError as e:
        raise RFIError(f"per_layer.{layer}: {e}") from None


def _runs_dir(cfg: StyleConfig) -> Path:
    out = Path(cfg.out)
    return Path(cfg.runs) if cfg.runs else out.with_name(out.stem + "_decoders")


def check_pyramid_config(cfg: StyleConfig) -> list[str]:
    """Validate the layers against the encoder (loaded once); returns them shallow to deep.

    ``per_layer`` may hold entries for layers not in ``layers`` (they are ready for when the
    layer is added), but each must name a layer of the encoder.

    Raises:
        RFIError: no layers, duplicates, unknown layers in ``layers`` or ``per_layer`` (lists
            the valid ones), or a missing encoder checkpoint.
    """
    if not cfg.layers:
        raise RFIError("layers: give at least one encoder layer for the pyramid")
    dup = sorted({k for k in cfg.layers if cfg.layers.count(k) > 1})
    if dup:
        raise RFIError(f"layers: {', '.join(dup)} listed twice")
    path = Path(resolve_checkpoint(cfg.train.encoder.checkpoint, flag="train.encoder.checkpoint", kind="encoder"))
    if not path.is_file():
        raise RFIError(
            f"encoder checkpoint not found: {path} (train.encoder.checkpoint); train one with "
            f"`{TRAIN_ENCODER_HINT}` or set train.encoder.checkpoint=PATH"
        )
    encoder = load_encoder(path, cfg.train.encoder.arch, arch_key="train.encoder.arch")
    bad = [k for k in cfg.layers if k not in encoder.layer_names]
    if bad:
        raise RFIError(
            f"layers: {encoder.arch} in {cfg.train.encoder.checkpoint} has no layer "
            f"{', '.join(bad)} (valid: {', '.join(encoder.layer_names)})"
        )
    stray = sorted(set(cfg.per_layer) - set(encoder.layer_names))
    if stray:
        raise RFIError(
            f"per_layer: {encoder.arch} has no layer {', '.join(stray)} (valid: {', '.join(encoder.layer_names)})"
        )
    return [k for k in encoder.layer_names if k in cfg.layers]


def train_pyramid(cfg: StyleConfig, resume: bool = False) -> TrainResult:
    """Train one decoder per layer with :func:`inversion.train.train_decoder`; write the pyramid.

    Args:
        cfg: the run's config (its ``apply`` section is not used here).
        resume: continue the per-layer runs in ``runs`` (finished layers are kept as they are).

    Returns:
        A :class:`~encoders.core.rundir.TrainResult`: ``path`` is ``cfg.out`` (the result stands for it
        where a path is expected), one model file, loadable with ``RobustAutoencoder.load`` and
        used by ``rfi style apply``; ``model`` the pyramid (a ``RobustAutoencoder``, eval
        mode); ``metrics`` ``{layer: that decoder's metrics}`` (see :func:`inversion.train.train_decoder`).

    Raises:
        RFIError: bad config, missing encoder, or an existing model/run without ``resume``.
    """
    layers = check_pyramid_config(cfg)
    out = Path(cfg.out)
    if out.exists() or not resume:  # an existing model needs --resume (its runs are reused); each layer says
        RunDir(out.parent, out.name).has_checkpoint(resume)  # whether it resumes (not "nothing to resume" here)
    configs = {layer: layer_config(cfg, layer) for layer in layers}  # every layer checked before training
    runs = {}
    for i, (layer, layer_cfg) in enumerate(configs.items()):
        log.info(
            "pyramid decoder %d/%d: %s (%s steps) -> %s",
            i + 1,
            len(configs),
            layer,
            layer_cfg.steps or f"{layer_cfg.epochs} epochs of",
            layer_cfg.out,
        )
        runs[layer] = train_decoder(layer_cfg, resume=resume)
    model = RobustAutoencoder.from_checkpoints(
        cfg.train.encoder.checkpoint,
        [r.path for r in runs.values()],
        arch=cfg.train.encoder.arch,
        arch_key="train.encoder.arch",
    )
    psnrs = {layer: model.metadata["decoders"][layer].get("val_psnr") for layer in runs}
    model.save(out, app=STYLE_APP, layers=layers, val_psnr=psnrs, config=config_to_dict(cfg))
    log.info(
        "decoder pyramid (%s) written to %s; validation PSNR %s",
        ", ".join(layers),
        out,
        ", ".join(f"{k} {v:.2f} dB" for k, v in psnrs.items() if v is not None),
    )
    return TrainResult(out, model.eval(), {layer: r.metrics for layer, r in runs.items()})


def load_pyramid(path: str | os.PathLike, device: str | torch.device = "cpu") -> RobustAutoencoder:
    """Load a decoder pyramid written by ``rfi style train`` (a plain autoencoder file works too), in eval mode.

    Raises:
        RFIError: the file is missing (says how to train one), not an autoencoder file, or one
            written for another app (a denoiser, an anomaly model), naming both kinds.
    """
    path = Path(path)
    if not path.is_file():
        raise RFIError(
            f"style model not found: {path} (train one with `rfi style train --config "
            f"{DEFAULT_CONFIG}` or pass --model PATH)"
        )
    return RobustAutoencoder.load(path, device=device, kind=STYLE_APP).eval()
