"""``rfi anomaly fit``: normal images in, one anomaly model file out.

:func:`fit` decodes the normal images once (:class:`~apps.anomaly.decoded.DecodedImages`),
holds every ``holdout``-th one out (:func:`split_normal`), trains a decoder on crops of the
others (``method`` ``reconstruction`` / ``combined``) and/or builds a memory bank from them
(``memory`` / ``combined``), measures the score statistics and the threshold on the held-out
images (:meth:`~apps.anomaly.detector.AnomalyDetector.calibrate`) and writes the model file.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

from apps.anomaly.config import AnomalyConfig
from apps.anomaly.data import resolve_data
from apps.anomaly.decoded import DecodedImages, NormalCrops, decoding_folder
from apps.anomaly.detector import BATCH_PIXELS, AnomalyDetector
from apps.anomaly.memory import MemoryBank, default_memory_layers
from encoders.core.config import check_config, config_to_dict
from encoders.core.errors import RFIError
from encoders.core.runtime import resolve_device
from encoders.nets.models import Encoder
from encoders.weights.checkpoints import load_encoder
from encoders.weights.shipped import resolve_checkpoint
from inversion.autoencoder import RobustAutoencoder
from inversion.train import train_decoder

log = logging.getLogger("rfi")
T = TypeVar("T")


def split_normal(normal: Sequence[T], holdout: int) -> tuple[list[T], list[T]]:
    """``(train, held)``: every ``holdout``-th normal image is held out (at least the last one).

    Example:
        >>> split_normal([Path(str(i)) for i in range(6)], 5)[1]
        [PosixPath('4')]
    """
    is_held = [i % holdout == holdout - 1 for i in range(len(normal))]
    if not any(is_held):
        is_held[-1] = True
    return [p for p, h in zip(normal, is_held) if not h], [p for p, h in zip(normal, is_held) if h]


def fit(cfg: AnomalyConfig, data: str, out: str | os.PathLike, resume: bool = False) -> Path:
    """Train an anomaly model on the normal images of ``data`` and write it to ``out``.

    Every ``cfg.holdout``-th normal image is held out of decoder training (and of the
    memory bank); the score statistics and the threshold are measured on those. Each normal
    image is decoded once, into a memory-mapped file next to ``out`` (:class:`DecodedImages` in a
    :func:`~apps.anomaly.decoded.decoding_folder`, removed however the fit ends): the decoder's
    random training crops, its validation crops (fixed crops of the held-out images at the same
    scale, :class:`NormalCrops`), the memory bank and the statistics all read from it. Decoder
    training (``method`` ``reconstruction`` or ``combined``) runs in ``<out without suffix>_fit/``
    (metrics log, sample grids, its checkpoint), so a killed fit continues with ``resume=True``;
    ``memory`` builds the bank from the other normal images. The model file is written atomically: a fit killed mid-way
    leaves no half-written ``out``.

    Returns:
        ``out``: the model file (load with :meth:`AnomalyDetector.load`).

    Raises:
        RFIError: bad config (the key named), no (readable) normal images, a missing encoder checkpoint.
    """
    cfg = check_config(cfg)
    cfg.encoder = str(resolve_checkpoint(cfg.encoder, flag="encoder=PATH", kind="encoder"))
    if not Path(cfg.encoder).is_file():
        raise RFIError(
            f"encoder checkpoint not found: {cfg.encoder} (train it with: rfi train-encoder --config "
            f"configs/encoder/resnet18_robust.yaml, or set encoder=PATH)"
        )
    if cfg.arch is None:  # a robustness-library / torchvision file needs arch=NAME: say so before training
        load_encoder(cfg.encoder, arch_key="arch")
    found = resolve_data(data, cfg.category, cfg.benchmark, "train")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with decoding_folder(out) as tmp:
        normal = DecodedImages(found.train, tmp / "normal.u8", cfg.image_size)
        if len(normal) < 2:
            raise RFIError(f"{found.root}: need at least 2 readable normal training images, found {len(normal)}")
        train, held = split_normal(range(len(normal)), cfg.holdout)
        info = {
            "category": found.category,
            "layout": found.layout,
            "data": str(data),
            "benchmark": asdict(cfg.benchmark) if str(data) == "embedded" else None,
            "fit": config_to_dict(cfg),
            "train_images": len(train),
        }
        device = resolve_device(cfg.device)
        if cfg.method == "memory":
            encoder = load_encoder(cfg.encoder, cfg.arch, arch_key="arch").to(device).eval().requires_grad_(False)
            log.info(
                "building a memory bank from %d normal images of %s (%d held out for the score statistics)",
                len(train),
                found.category or found.root,
                len(held),
            )
            return _finish(cfg, None, encoder, normal, train, held, info, out)
        dcfg = copy.deepcopy(cfg.train)
        dcfg.data.source, dcfg.data.root = "folder", str(found.root)  # a record: the crops come from `normal`
        dcfg.data.resize, dcfg.data.crop = cfg.image_size, "random"
        dcfg.encoder.checkpoint = cfg.encoder
        dcfg.encoder.arch = cfg.arch or dcfg.encoder.arch
        dcfg.out = str(out.with_name(out.stem + "_fit") / "decoder")
        crops = (
            NormalCrops(normal, train, "train", dcfg.data.size, dcfg.data.repeat),
            NormalCrops(normal, held, "val", dcfg.data.size, dcfg.data.repeat, seed=dcfg.seed),
        )
        log.info(
            "fitting on %d normal images of %s (%d held out for the score statistics)",
            len(train),
            found.category or found.root,
            len(held),
        )
        decoder_path = train_decoder(dcfg, resume=resume, datasets=crops).path
        ae = RobustAutoencoder.from_checkpoints(
            cfg.encoder, decoder_path, device=device, arch=cfg.arch, arch_key="arch"
        )
        return _finish(cfg, ae, ae.encoder, normal, train, held, info, out)


class _Subset(Sequence[Tensor]):
    """Images ``indices`` of a :class:`DecodedImages`, read from the mapped file on access (nothing held)."""

    def __init__(self, images: DecodedImages, indices: Sequence[int]):
        self.images, self.indices = images, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        return self.images.image(self.indices[i])


def _finish(
    cfg: AnomalyConfig,
    ae: RobustAutoencoder | None,
    encoder: Encoder,
    normal: DecodedImages,
    train: Sequence[int],
    held: Sequence[int],
    info: dict[str, Any],
    out: Path,
) -> Path:
    """Build the memory bank (if the method uses one), calibrate on the held-out images, save."""
    if cfg.method == "reconstruction":
        layers = [*ae.decoders[ae.layer].input_layers, *(cfg.score.feature_layers if cfg.score.feature_weight else [])]
    else:
        layers = cfg.memory.layers if cfg.memory.layers else default_memory_layers(encoder)
    strides = encoder.feature_info()
    min_side = max(strides[k][1] for k in encoder.check_layers(layers))
    for i in (*train, *held):
        _, h, w = normal.shape(i)
        if min(h, w) < min_side:
            raise RFIError(
                f"{normal.paths[i]}: {h}x{w} px is smaller than the encoder allows "
                f"({min_side} px per side for {', '.join(layers)}): use larger images or image_size"
            )
    memory = None
    if cfg.method != "reconstruction":
        memory = MemoryBank.fit(
            encoder, _Subset(normal, train), cfg.memory, cfg.batch_size, count=len(train), max_pixels=BATCH_PIXELS
        )
        info["memory_bank"] = {
            "patches": memory.patches,
            "kept": int(memory.bank.shape[0]),
            "dims": memory.dims,
            "layers": memory.layers,
            "mib": memory.bank.numel() * 4 / 2**20,
        }
        log.info(
            "memory bank: %d of %d patches (%d dims, %.1f MiB)",
            memory.bank.shape[0],
            memory.patches,
            memory.dims,
            info["memory_bank"]["mib"],
        )
    det = AnomalyDetector(
        ae,
        cfg.score,
        cfg.image_size,
        info=info,
        memory=memory,
        method=cfg.method,
        encoder=encoder,
        combined=cfg.combined,
    )
    cal = det.calibrate(_Subset(normal, held), cfg.batch_size)
    det.info["normal_scores"] = cal["normal_scores"]
    det.save(out)
    log.info("wrote %s (threshold %.3g = highest score of %d held-out normal images)", out, det.threshold, len(held))
    return out
