"""The anomaly detector: an encoder with a decoder and/or a memory bank, and how it turns images into maps.

:class:`AnomalyDetector` computes the anomaly map of an image from, with configurable weights
(:class:`~apps.anomaly.config.ScoreConfig`),

- the reconstruction error in pixel space (``l1``, ``l2`` or ``ssim``), and
- the error in the encoder's feature space, ``phi_l(x)`` vs ``phi_l(reconstruction)`` at
  one or more layers ``l`` (squared error or cosine distance per location),
- the distance of each patch to a memory bank of normal patch features
  (:mod:`apps.anomaly.memory`; ``method: memory`` or ``combined``),

each smoothed, brought to the image size and standardised by its mean and standard deviation
on held-out normal images (:meth:`~AnomalyDetector.calibrate`), so the components add up on one
scale. The image score is the mean of the top ``topk`` fraction of the map (or its max or mean);
the threshold is the highest score of a held-out normal image. A detector is one self-contained
model file (:meth:`~AnomalyDetector.save` / :meth:`~AnomalyDetector.load`); ``rfi anomaly fit``
(:mod:`apps.anomaly.fitting`) writes it and ``rfi anomaly score`` (:mod:`apps.anomaly.scoring`)
uses it.

Example:
    >>> det = AnomalyDetector.load("runs/anomaly/brick.pt")      # doctest: +SKIP
    >>> maps = det.maps(torch.rand(2, 3, 64, 64))                 # doctest: +SKIP
    >>> det.image_scores(maps).shape                              # doctest: +SKIP
    torch.Size([2])
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from apps.anomaly.config import CombinedConfig, Method, ScoreConfig
from apps.anomaly.decoded import prepare_image
from apps.anomaly.maps import feature_error, image_scores, overlay, pixel_error, smooth
from apps.anomaly.memory import MemoryBank
from encoders.core.config import check_config
from encoders.core.errors import RFIError
from encoders.core.serialization import FORMAT_VERSIONS, load_checkpoint, save_checkpoint
from encoders.nets.models import Encoder
from encoders.weights.checkpoints import encoder_checkpoint, encoder_from_checkpoint
from inversion.autoencoder import RobustAutoencoder
from inversion.tiling import tiled_apply

MODEL_FORMAT = "rfi-anomaly"
MAP_PIXELS = 1 << 21
"""Pixels per forward pass of the map computation (2 Mpx): bounds memory for any batch or image size."""
BATCH_PIXELS = 1 << 20
"""Pixels of the images batched at once by :func:`score`, :meth:`AnomalyDetector.calibrate` and the memory
bank (1 Mpx: one 1024-px MVTec AD image; :func:`batch_limit`)."""
TILE_MARGIN = 64
"""Context (px) around each tile of an image larger than :data:`MAP_PIXELS`, cropped away after."""


def batch_limit(batch_size: int, shape: Sequence[int]) -> int:
    """Images of ``shape`` (..., H, W) per batch: at most ``batch_size`` and :data:`BATCH_PIXELS` pixels, at least 1.

    Example:
        >>> batch_limit(16, (3, 1024, 1024)), batch_limit(16, (3, 512, 512)), batch_limit(16, (3, 64, 64))
        (1, 4, 16)
    """
    return max(1, min(batch_size, BATCH_PIXELS // (shape[-2] * shape[-1])))


class AnomalyDetector:
    """A :class:`~inversion.RobustAutoencoder` trained on normal images and/or a memory bank, plus how to score.

    Args:
        autoencoder: encoder + decoder (trained on normal images); ``None`` for ``method="memory"``.
        score: :class:`ScoreConfig`.
        image_size: working resolution (short side) images are resized to; ``None``: as given.
        stats: ``{component: [mean, std]}`` of each map component on normal images
            (from :meth:`calibrate`).
        threshold: image scores above it are flagged anomalous.
        info: anything else stored in the model file (category, benchmark settings, fit config).
        memory: a :class:`~apps.anomaly.memory.MemoryBank` of normal patch features.
        method: ``reconstruction``, ``memory`` or ``combined`` (default: what is given).
        encoder: the encoder when there is no ``autoencoder``.
        combined: :class:`CombinedConfig` (``method="combined"``).

    Shape:
        - :meth:`maps`: (B, 3, H, W) in [0, 1] -> (B, 1, H, W) standardised anomaly maps
          (0 = typical of normal images, in units of their standard deviation).
        - :meth:`image_scores`: (B, 1, H, W) -> (B,).
    """

    def __init__(
        self,
        autoencoder: RobustAutoencoder | None,
        score: ScoreConfig,
        image_size: int | None = None,
        stats: dict[str, list[float]] | None = None,
        threshold: float | None = None,
        info: dict[str, Any] | None = None,
        memory: MemoryBank | None = None,
        method: Method | None = None,
        encoder: Encoder | None = None,
        combined: CombinedConfig | None = None,
    ):
        method = method or ("reconstruction" if memory is None else "memory" if autoencoder is None else "combined")
        if method not in typing.get_args(Method):
            raise RFIError(f"unknown method '{method}' (valid: {', '.join(typing.get_args(Method))})")
        if method != "memory" and autoencoder is None:
            raise RFIError(f"method '{method}' needs an autoencoder (encoder + decoder)")
        if method != "reconstruction" and memory is None:
            raise RFIError(f"method '{method}' needs a memory bank")
        self.encoder = autoencoder.encoder if autoencoder is not None else encoder
        if self.encoder is None:
            raise RFIError("an anomaly detector needs an encoder")
        self.score = check_config(score, "the score settings")
        self.combined = check_config(combined or CombinedConfig(), "the combined settings")
        if self.score.feature_weight > 0 and method != "memory":
            self.encoder.check_layers(self.score.feature_layers)
        self.ae, self.image_size = autoencoder, image_size
        self.memory, self.method = memory, method
        self.stats, self.threshold, self.info = stats, threshold, dict(info or {})
        self._min_side: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def components(self) -> dict[str, float]:
        """Map components and their weights: ``pixel``, ``feature:<layer>`` and ``memory``.

        For ``combined``, the reconstruction components share ``combined.reconstruction``
        in proportion to their own weights, and ``memory`` gets ``combined.memory``.
        """
        s = self.score
        out: dict[str, float] = {}
        if self.method != "memory":
            out = {"pixel": s.pixel_weight} if s.pixel_weight > 0 else {}
            if s.feature_weight > 0:
                layers = self.encoder.check_layers(s.feature_layers)
                out.update({f"feature:{layer}": s.feature_weight / len(layers) for layer in layers})
        if self.method == "combined":
            total = sum(out.values())
            out = {
                k: self.combined.reconstruction * w / total for k, w in out.items() if self.combined.reconstruction > 0
            }
            if self.combined.memory > 0:
                out["memory"] = self.combined.memory
        elif self.method == "memory":
            out["memory"] = 1.0
        return out

    def min_side(self) -> int:
        """The smallest image side (px) the layers in use allow: their largest stride."""
        if self._min_side is None:
            layers = set(self.memory.layers if self.memory is not None else [])
            if self.method != "memory":
                layers |= set(self.ae.decoders[self.ae.layer].input_layers) | set(self.score.feature_layers)
            info = self.encoder.feature_info()
            self._min_side = max([info[k][1] for k in layers if k in info] or [1])
        return self._min_side

    def check_size(self, x: Tensor, name: str = "image") -> None:
        """Refuse images smaller than :meth:`min_side` with a one-line :class:`RFIError`."""
        h, w = x.shape[-2:]
        if min(h, w) < self.min_side():
            raise RFIError(
                f"{name} is {h}x{w} px, smaller than the encoder allows ({self.min_side()} px per side "
                f"for its layers at the working resolution): use larger images or a larger image_size"
            )

    def prepare(self, image: Tensor) -> Tensor:
        """Resize a (3, H, W) image to the working resolution (short side ``image_size``)."""
        return prepare_image(image, self.image_size)

    @torch.no_grad()
    def component_maps(self, x: Tensor) -> dict[str, Tensor]:
        """Raw (un-standardised) error maps of each component, smoothed, at the size of ``x``.

        Memory is bounded whatever the batch and image size: a batch of more than
        :data:`MAP_PIXELS` pixels is processed image by image, and an image of more than that
        in overlapping tiles whose :data:`TILE_MARGIN`-px borders are cropped away (so each
        map pixel sees at least that much context; close to, not bit-equal with, a whole pass).

        Args:
            x: images (B, 3, H, W) in [0, 1].

        Returns:
            ``{component: (B, 1, H, W)}`` (see :meth:`components`).
        """
        self.check_size(x)
        b, _, h, w = x.shape
        if b * h * w <= MAP_PIXELS:
            return self._component_maps(x)
        if b > 1:
            parts = [self.component_maps(x[i : i + 1]) for i in range(b)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        multiple = self.encoder.size_multiple() if hasattr(self.encoder, "size_multiple") else 1
        tile = max(
            (2 * math.ceil(TILE_MARGIN / multiple) + 1) * multiple, math.isqrt(MAP_PIXELS) // multiple * multiple
        )
        return tiled_apply(self._component_maps, x, tile, TILE_MARGIN, align=multiple, batch_pixels=MAP_PIXELS)

    def _component_maps(self, x: Tensor) -> dict[str, Tensor]:
        x = x.to(self.device)
        s = self.score
        out: dict[str, Tensor] = {}
        if self.memory is not None and self.method != "reconstruction":
            out["memory"] = self.memory.maps(self.encoder, x)  # already smoothed (memory.sigma)
        if self.method == "memory":
            return out
        rec = self.ae.reconstruct(x)
        if s.pixel_weight > 0:
            out["pixel"] = pixel_error(x, rec, s.pixel_metric)
        if s.feature_weight > 0:
            for layer, f in self.ae.features(torch.cat([x, rec]), s.feature_layers).items():
                err = feature_error(*f.chunk(2), s.feature_metric)
                out[f"feature:{layer}"] = F.interpolate(err, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {k: v if k == "memory" else smooth(v, s.sigma) for k, v in out.items()}

    def maps(self, x: Tensor) -> Tensor:
        """Anomaly maps: the weighted mean of the standardised components. (B, 3, H, W) -> (B, 1, H, W)."""
        if self.stats is None:
            raise RFIError("this anomaly detector has no normal-image statistics: call calibrate() first")
        weights = self.components()
        comps = self.component_maps(x)
        total = sum(weights.values())
        return sum(w * (comps[k] - self.stats[k][0]) / self.stats[k][1] for k, w in weights.items()) / total

    def image_scores(self, maps: Tensor) -> Tensor:
        """Image scores from :meth:`maps` (``score.image_score``). Returns (B,)."""
        return image_scores(maps, self.score.image_score, self.score.topk)

    def batches(self, images: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
        """Group prepared images of equal size into batches of at most :func:`batch_limit` images."""
        batch: list[Tensor] = []
        for img in images:
            img = self.prepare(img)
            if batch and (len(batch) == batch_limit(batch_size, img.shape) or batch[0].shape != img.shape):
                yield torch.stack(batch)
                batch = []
            batch.append(img)
        if batch:
            yield torch.stack(batch)

    def calibrate(self, images: Sequence[Tensor], batch_size: int = 16) -> dict[str, Any]:
        """Measure the statistics of each component and of the image scores on normal images.

        Sets :attr:`stats` and :attr:`threshold` (the highest normal image score).

        Args:
            images: (3, H, W) normal images in [0, 1], not used to train the decoder.
            batch_size: images per forward pass.

        Returns:
            ``{"stats": ..., "normal_scores": {mean, std, max}, "threshold": ...}``.
        """
        if not images:
            raise RFIError("no held-out normal images to measure the score statistics on")
        acc: dict[str, list[float]] = {k: [0.0, 0.0, 0.0] for k in self.components()}
        for x in self.batches(images, batch_size):
            for k, m in self.component_maps(x).items():
                m = m.double()
                acc[k][0] += m.numel()
                acc[k][1] += m.sum().item()
                acc[k][2] += m.pow(2).sum().item()
        stats = {}
        for k, (n, s1, s2) in acc.items():
            mean = s1 / n
            std = max(s2 / n - mean * mean, 0.0) ** 0.5
            stats[k] = [mean, max(std, 1e-8 + 1e-6 * abs(mean))]
        self.stats = stats
        scores = torch.cat([self.image_scores(self.maps(x)) for x in self.batches(images, batch_size)])
        self.threshold = float(scores.max())
        return {
            "stats": stats,
            "threshold": self.threshold,
            "normal_scores": {
                "mean": float(scores.mean()),
                "std": float(scores.std()) if len(scores) > 1 else 0.0,
                "max": float(scores.max()),
                "images": len(scores),
            },
        }

    def overlay(self, image: Tensor, amap: Tensor, alpha: float = 0.5) -> Tensor:
        """Heat-map overlay (:func:`apps.anomaly.maps.overlay`): ``amap`` coloured from 0 to 2 x the threshold.

        Args:
            image: (3, H, W) in [0, 1].
            amap: (H', W') or (1, H', W') anomaly map; upsampled to (H, W).
            alpha: weight of the colours.

        Returns:
            (3, H, W) in [0, 1].
        """
        vmax = 2 * self.threshold if self.threshold and self.threshold > 0 else max(float(amap.max()), 1e-8)
        return overlay(image, amap, vmax, self.score.overlay_cmap, alpha)

    # ------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file (atomic): the autoencoder (or the encoder alone for ``method="memory"``),
        the memory bank, the score settings and statistics."""
        meta = {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSIONS[MODEL_FORMAT],
            "score": asdict(self.score),
            "image_size": self.image_size,
            "stats": self.stats,
            "threshold": self.threshold,
            **self.info,
            "method": self.method,
            "combined": asdict(self.combined),
        }
        extra = {"memory": self.memory.state()} if self.memory is not None else {}
        if self.ae is not None:
            return self.ae.save(path, anomaly=meta, **extra)
        return save_checkpoint(
            {
                "format": MODEL_FORMAT,
                "version": FORMAT_VERSIONS[MODEL_FORMAT],
                "encoder": encoder_checkpoint(self.encoder),
                "anomaly": meta,
                **extra,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> AnomalyDetector:
        """Load a model file written by ``rfi anomaly fit`` / :meth:`save`."""
        ckpt = load_checkpoint(path)
        meta = ckpt.get("anomaly")
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise RFIError(f"{path} is not an anomaly model (write one with: rfi anomaly fit --data ... --out {path})")
        ae, encoder = None, None
        if "decoders" in ckpt:  # the dict already read: the file is not read a second time
            ae = RobustAutoencoder.from_checkpoint(ckpt, str(path), device)
        else:
            encoder = encoder_from_checkpoint(ckpt.get("encoder") or {}, f"{path} (encoder)")
            encoder = encoder.requires_grad_(False).to(device)
        memory = MemoryBank.from_state(ckpt["memory"]) if "memory" in ckpt else None
        meta = dict(meta)
        score = ScoreConfig(**meta.pop("score"))
        keys = ("format", "version", "image_size", "stats", "threshold")
        fixed = {k: meta.pop(k) for k in keys}
        method = meta.pop("method", "reconstruction")
        combined = CombinedConfig(**meta.pop("combined", {}))
        return cls(
            ae,
            score,
            fixed["image_size"],
            fixed["stats"],
            fixed["threshold"],
            info=meta,
            memory=memory,
            method=method,
            encoder=encoder,
            combined=combined,
        )
