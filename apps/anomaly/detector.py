"""Anomaly detection by robust feature inversion: ``rfi anomaly fit`` / ``score`` / ``make-benchmark``.

**Fit** trains a decoder for a (robust) encoder on normal images only (through
:func:`inversion.train.train_decoder`); anomalies are what it cannot reconstruct. The
anomaly map of an image combines, with configurable weights,

- the reconstruction error in pixel space (``l1``, ``l2`` or ``ssim``), and
- the error in the encoder's feature space, ``phi_l(x)`` vs ``phi_l(reconstruction)`` at
  one or more layers ``l`` (squared error or cosine distance per location),

each smoothed (``kornia.filters.gaussian_blur2d``), upsampled to the image size and
standardised by its mean and standard deviation on held-out normal images (so the
components add up on one scale). The image score is the mean of the top ``topk`` fraction
of the map (or its max or mean). Fit writes one self-contained model file
(:meth:`inversion.RobustAutoencoder.save`) holding the encoder, the decoder, these
settings and the normal-image statistics, plus a threshold: the highest score of a
held-out normal image.

``method: memory`` (:mod:`apps.anomaly.memory`) needs no decoder: a PatchCore-style
memory bank of the encoder's patch features, the anomaly map being each patch's distance to
its nearest neighbour in the bank; ``method: combined`` sums the standardised
reconstruction and memory maps with the weights of the ``combined:`` section.

**Score** writes ``scores.csv`` (one row per image), ``maps/<name>.png`` (heat-map overlays)
and ``metrics.json`` (image AUROC, pixel AUROC where masks exist, F1 at the best
threshold, per defect type), and prints a table.

Example:
    >>> det = AnomalyDetector.load("runs/anomaly/brick.pt")      # doctest: +SKIP
    >>> maps = det.maps(torch.rand(2, 3, 64, 64))                 # doctest: +SKIP
    >>> det.image_scores(maps).shape                              # doctest: +SKIP
    torch.Size([2])
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from apps.anomaly.maps import image_scores, smooth
from apps.anomaly.memory import MemoryBank, MemoryConfig, default_memory_layers
from apps.anomaly.data import (AnomalyData, BenchmarkConfig, DecodedImages, NormalCrops, TestImage,
                               embedded_benchmark, load_anomaly_data, prepare_image, read_mask)
from encoders.core.config import config_to_dict, load_config, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.files import check_finite
from encoders.core.imageio import read_image, write_image
from encoders.core.runtime import progress, resolve_device
from encoders.weights.checkpoints import encoder_checkpoint, encoder_from_checkpoint, load_encoder
from encoders.nets.models import Encoder
from encoders.core.serialization import atomic_write, load_checkpoint, save_checkpoint, write_json
from inversion.autoencoder import RobustAutoencoder
from inversion.tiling import tiled_apply
from inversion.train import TrainDecoderConfig, train_decoder

log = logging.getLogger("rfi")
logging.getLogger("numexpr.utils").setLevel(logging.WARNING)  # scikit-learn -> pandas -> numexpr logs its threads

MODEL_FORMAT = "rfi-anomaly"
PIXEL_METRICS = ("l1", "l2", "ssim")
FEATURE_METRICS = ("l2", "cosine")
IMAGE_SCORES = ("topk", "max", "mean")
METHODS = ("reconstruction", "memory", "combined")
DEFAULT_CONFIG = "configs/apps/anomaly.yaml"
T = TypeVar("T")


# ----------------------------------------------------------------------------- configuration
@yaml_dataclass("apps/anomaly.yaml", "score")
class ScoreConfig:
    """How anomaly maps and image scores are computed (the ``score:`` section; stored in the model).

    ``pixel_weight`` / ``feature_weight``: weights of the pixel and feature components
    (the feature weight is shared equally by ``feature_layers``). ``pixel_metric``:
    ``l1``, ``l2`` or ``ssim``; ``feature_metric``: ``l2`` or ``cosine``. ``sigma``: Gaussian
    smoothing of the maps in pixels (0: none). ``image_score``: ``topk`` (mean of the top
    ``topk`` fraction of the map), ``max`` or ``mean``. ``overlay_cmap``: a matplotlib
    colormap for the heat maps.
    """

    pixel_weight: float
    pixel_metric: str
    feature_weight: float
    feature_layers: list[str]
    feature_metric: str
    sigma: float
    image_score: str
    topk: float
    overlay_cmap: str

    def check(self) -> None:
        problems = []
        if self.pixel_metric not in PIXEL_METRICS:
            problems.append(f"unknown score.pixel_metric '{self.pixel_metric}' (valid: {', '.join(PIXEL_METRICS)})")
        if self.feature_metric not in FEATURE_METRICS:
            problems.append(f"unknown score.feature_metric '{self.feature_metric}' "
                            f"(valid: {', '.join(FEATURE_METRICS)})")
        if self.image_score not in IMAGE_SCORES:
            problems.append(f"unknown score.image_score '{self.image_score}' (valid: {', '.join(IMAGE_SCORES)})")
        if self.pixel_weight < 0 or self.feature_weight < 0 or self.pixel_weight + self.feature_weight <= 0:
            problems.append("score.pixel_weight and score.feature_weight must be >= 0, not both 0")
        if self.feature_weight > 0 and not self.feature_layers:
            problems.append("score.feature_layers is empty but score.feature_weight > 0")
        if not 0 < self.topk <= 1:
            problems.append(f"score.topk must be in (0, 1], got {self.topk}")
        if self.sigma < 0:
            problems.append(f"score.sigma must be >= 0, got {self.sigma}")
        import matplotlib

        if self.overlay_cmap not in matplotlib.colormaps:
            problems.append(f"unknown score.overlay_cmap '{self.overlay_cmap}' (any matplotlib colormap, e.g. jet)")
        if problems:
            raise RFIError("; ".join(problems))


@yaml_dataclass("apps/anomaly.yaml", "combined")
class CombinedConfig:
    """``method: combined``: weights of the standardised reconstruction and memory maps in their sum."""

    reconstruction: float
    memory: float

    def check(self) -> None:
        if self.reconstruction < 0 or self.memory < 0 or self.reconstruction + self.memory <= 0:
            raise RFIError(f"combined.reconstruction and combined.memory must be >= 0, not both 0, got "
                           f"{self.reconstruction:g}, {self.memory:g}")


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`METHODS`, else raise a one-line :class:`RFIError`."""
    if method not in METHODS:
        raise RFIError(f"unknown method '{method}' (method / --method; valid: {', '.join(METHODS)})")
    return method


@yaml_dataclass("apps/anomaly.yaml")
class AnomalyConfig:
    """``rfi anomaly fit`` (YAML: ``configs/apps/anomaly.yaml``).

    ``encoder``: encoder checkpoint (default: the robust one; a ``robustness``-library or
    torchvision file needs ``arch``, e.g. ``arch=resnet50``). ``category``: the category of
    an MVTec root with several. ``image_size``: working resolution, short side in pixels
    (``null``: as stored). ``holdout``: every n-th normal image is held out of decoder
    training to measure the score statistics. ``decoder``: the decoder training run
    (:class:`inversion.train.TrainDecoderConfig`; ``decoder.data.size`` is the crop side,
    ``fit`` sets the data folder, encoder and output folder). ``score``: :class:`ScoreConfig`.
    ``benchmark``: the embedded benchmark (``--data embedded``). ``batch_size`` / ``device``:
    for computing maps. ``method``: ``reconstruction`` (the decoder), ``memory`` (a
    patch-feature memory bank, :class:`~apps.anomaly.memory.MemoryConfig` in ``memory``) or
    ``combined`` (both, weighted by ``combined``).
    """

    encoder: str
    arch: str | None
    category: str | None
    image_size: int | None
    holdout: int
    decoder: TrainDecoderConfig
    score: ScoreConfig
    benchmark: BenchmarkConfig
    batch_size: int
    device: str
    method: str
    memory: MemoryConfig
    combined: CombinedConfig


# ----------------------------------------------------------------------------- the detector
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

    def __init__(self, autoencoder: RobustAutoencoder, score: ScoreConfig, image_size: int | None = None,
                 stats: dict[str, list[float]] | None = None, threshold: float | None = None,
                 info: dict[str, Any] | None = None, memory: MemoryBank | None = None, method: str | None = None,
                 encoder: Encoder | None = None, combined: CombinedConfig | None = None):
        score.check()
        method = check_method(method or ("reconstruction" if memory is None else
                                         "memory" if autoencoder is None else "combined"))
        if method != "memory" and autoencoder is None:
            raise RFIError(f"method '{method}' needs an autoencoder (encoder + decoder)")
        if method != "reconstruction" and memory is None:
            raise RFIError(f"method '{method}' needs a memory bank")
        self.encoder = autoencoder.encoder if autoencoder is not None else encoder
        if self.encoder is None:
            raise RFIError("an anomaly detector needs an encoder")
        if score.feature_weight > 0 and method != "memory":
            self.encoder.check_layers(score.feature_layers)
        self.combined = combined or CombinedConfig()
        self.combined.check()
        self.ae, self.score, self.image_size = autoencoder, score, image_size
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
            out = {k: self.combined.reconstruction * w / total for k, w in out.items() if self.combined.reconstruction > 0}
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
            raise RFIError(f"{name} is {h}x{w} px, smaller than the encoder allows ({self.min_side()} px per side "
                           f"for its layers at the working resolution): use larger images or a larger image_size")

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
            parts = [self.component_maps(x[i:i + 1]) for i in range(b)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        multiple = self.encoder.size_multiple() if hasattr(self.encoder, "size_multiple") else 1
        tile = max((2 * math.ceil(TILE_MARGIN / multiple) + 1) * multiple, math.isqrt(MAP_PIXELS) // multiple * multiple)
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
            if s.pixel_metric == "ssim":
                import kornia

                err = (1 - kornia.metrics.ssim(x, rec, 11, padding="same")).mean(1, keepdim=True) / 2
            elif s.pixel_metric == "l1":
                err = (x - rec).abs().mean(1, keepdim=True)
            else:
                err = (x - rec).pow(2).mean(1, keepdim=True)
            out["pixel"] = err
        if s.feature_weight > 0:
            feats = self.ae.features(torch.cat([x, rec]), s.feature_layers)
            for layer, f in feats.items():
                a, b = f.chunk(2)
                if s.feature_metric == "cosine":
                    err = 1 - F.cosine_similarity(a, b, dim=1, eps=1e-6).unsqueeze(1)
                else:
                    err = (a - b).pow(2).mean(1, keepdim=True)
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
        return {"stats": stats, "threshold": self.threshold,
                "normal_scores": {"mean": float(scores.mean()), "std": float(scores.std()) if len(scores) > 1 else 0.0,
                                  "max": float(scores.max()), "images": len(scores)}}

    def overlay(self, image: Tensor, amap: Tensor, alpha: float = 0.5) -> Tensor:
        """Heat-map overlay: ``amap`` coloured (0 .. 2 x threshold) and blended onto ``image``.

        Args:
            image: (3, H, W) in [0, 1].
            amap: (H', W') or (1, H', W') anomaly map; upsampled to (H, W).
            alpha: weight of the colours.

        Returns:
            (3, H, W) in [0, 1].
        """
        import matplotlib

        amap = amap.reshape(1, 1, *amap.shape[-2:]).float().cpu()
        if amap.shape[-2:] != image.shape[-2:]:
            amap = F.interpolate(amap, size=image.shape[-2:], mode="bilinear", align_corners=False)
        vmax = 2 * self.threshold if self.threshold and self.threshold > 0 else max(float(amap.max()), 1e-8)
        level = (amap[0, 0] / vmax).clamp(0, 1).numpy()
        colors = torch.from_numpy(matplotlib.colormaps[self.score.overlay_cmap](level)[..., :3]).permute(2, 0, 1)
        return ((1 - alpha) * image.cpu() + alpha * colors.float()).clamp(0, 1)

    # ------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file (atomic): the autoencoder (or the encoder alone for ``method="memory"``),
        the memory bank, the score settings and statistics."""
        meta = {"format": MODEL_FORMAT, "version": 1, "score": asdict(self.score), "image_size": self.image_size,
                "stats": self.stats, "threshold": self.threshold, **self.info,
                "method": self.method, "combined": asdict(self.combined)}
        extra = {"memory": self.memory.state()} if self.memory is not None else {}
        if self.ae is not None:
            return self.ae.save(path, anomaly=meta, **extra)
        return save_checkpoint({"format": MODEL_FORMAT, "version": 1, "encoder": encoder_checkpoint(self.encoder),
                                "anomaly": meta, **extra}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "AnomalyDetector":
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
        return cls(ae, score, fixed["image_size"], fixed["stats"], fixed["threshold"], info=meta, memory=memory,
                   method=method, encoder=encoder, combined=combined)


# ----------------------------------------------------------------------------- metrics
def image_metrics(labels: Sequence[int], scores: Sequence[float]) -> dict[str, Any]:
    """Image AUROC and the F1 score at its best threshold (scikit-learn).

    Args:
        labels: 0 (normal) / 1 (anomalous) per image.
        scores: higher = more anomalous.

    Returns:
        ``{"auroc", "f1", "threshold"}``; when only one class is present the values are
        ``None`` and ``"note"`` says why (AUROC is undefined), never NaN.

    Example:
        >>> image_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["auroc"]
        1.0
    """
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n0 == 0 or n1 == 0:
        what = "no images" if len(y) == 0 else (f"all {len(y)} are normal" if n1 == 0 else f"all {len(y)} are anomalous")
        return {"auroc": None, "f1": None, "threshold": None,
                "note": f"AUROC undefined: the labelled test set has a single class ({what}); "
                        f"it needs both normal and anomalous images"}
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return {"auroc": float(roc_auc_score(y, s)), "f1": float(f1[best]), "threshold": float(thresholds[best])}


PIXEL_BINS = 1 << 20
"""Bins of the streaming pixel metrics (:class:`PixelMetrics`): float32 scores cut to their top 20 bits."""
PIXEL_METHOD = ("streaming histogram: 2^20 bins, float32 scores truncated to sign, exponent and 11 mantissa "
                "bits (bin width at most 2^-11 of the value); AUROC (Mann-Whitney) and best F1 exact for the "
                "binned scores, pixels sharing a bin counted as ties")
"""How :func:`score` computes pixel AUROC and F1 (``metrics.json`` key ``pixel_method``)."""


def _score_bins(scores: np.ndarray) -> np.ndarray:
    """Monotone bin in [0, PIXEL_BINS) of float32 scores: the bit pattern in number order, top 20 bits."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.int32)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # sign-magnitude -> two's complement: float order
    return (ordered >> 12) + PIXEL_BINS // 2


def _bin_floor(b: int) -> float:
    """The smallest float32 in bin ``b`` of :func:`_score_bins`."""
    ordered = np.int32((b - PIXEL_BINS // 2) << 12)
    return float((ordered ^ np.int32(0x7FFFFFFF) if ordered < 0 else ordered).view(np.float32))


class PixelMetrics:
    """Pixel AUROC and F1 at the best threshold over any number of maps, in memory that does not grow.

    Each :meth:`update` adds a map's pixels to per-bin counts of normal and anomalous pixels
    (:data:`PIXEL_BINS` bins, 16 MiB in all); :meth:`result` computes the metrics from the
    counts (:data:`PIXEL_METHOD`): exact for the scores rounded to their bins, so within about
    1e-4 of scikit-learn's on all pixels (1024-px maps: about 20 ms each).

    Example:
        >>> pm = PixelMetrics()
        >>> pm.update(torch.tensor([[True, False]]), torch.tensor([[2.0, 1.0]]))
        >>> pm.result()["auroc"]
        1.0
    """

    def __init__(self) -> None:
        self.counts = np.zeros(2 * PIXEL_BINS, np.int64)  # [normal pixels per bin | anomalous pixels per bin]

    def update(self, mask: Tensor, amap: Tensor) -> None:
        """Add one map: ``mask`` boolean ground truth and ``amap`` scores, same shape."""
        if mask.shape != amap.shape:
            raise RFIError(f"mask {tuple(mask.shape)} and map {tuple(amap.shape)} differ in shape")
        bins = _score_bins(amap.detach().float().cpu().numpy().ravel())
        bins += mask.cpu().numpy().ravel().astype(bool) * PIXEL_BINS
        self.counts += np.bincount(bins, minlength=2 * PIXEL_BINS)

    def result(self) -> dict[str, Any]:
        """As :func:`image_metrics`, per pixel (``threshold``: the lower edge of the best bin)."""
        neg, pos = self.counts[:PIXEL_BINS].astype(np.float64), self.counts[PIXEL_BINS:].astype(np.float64)
        n0, n1 = neg.sum(), pos.sum()
        if n0 == 0 or n1 == 0:
            what = "no pixels" if n0 + n1 == 0 else (f"all {n0 + n1:.0f} are normal" if n1 == 0
                                                     else f"all {n0 + n1:.0f} are anomalous")
            return {"auroc": None, "f1": None, "threshold": None,
                    "note": f"AUROC undefined: the ground truth has a single class ({what}); "
                            f"it needs both normal and anomalous pixels"}
        below = np.cumsum(neg) - neg  # normal pixels in lower bins
        auroc = float((pos * (below + 0.5 * neg)).sum() / (n0 * n1))
        tp, fp = np.cumsum(pos[::-1])[::-1], np.cumsum(neg[::-1])[::-1]  # flagged when in bin >= b
        f1 = 2 * tp / np.maximum(tp + fp + n1, 1e-12)
        best = int(np.argmax(f1))
        return {"auroc": auroc, "f1": float(f1[best]), "threshold": _bin_floor(best)}


def pixel_metrics(masks: Iterable[Tensor], maps: Iterable[Tensor]) -> dict[str, Any]:
    """Pixel AUROC and pixel F1 at the best threshold over all pixels of all images (:class:`PixelMetrics`).

    Args:
        masks: boolean (h, w) ground truth per image (all False for normal images).
        maps: (h, w) anomaly maps of the same sizes.

    Returns:
        As :func:`image_metrics`, per pixel; ``threshold`` is a bin edge (:data:`PIXEL_METHOD`).
    """
    pm = PixelMetrics()
    for mask, amap in zip(masks, maps):
        pm.update(mask, amap)
    return pm.result()


# ----------------------------------------------------------------------------- fit
def resolve_data(path: str, category: str | None, benchmark: BenchmarkConfig, need: str,
                 labels: str | None = None) -> AnomalyData:
    """:func:`~apps.anomaly.data.load_anomaly_data`, with ``embedded`` meaning the generated benchmark."""
    if str(path) == "embedded":
        path = str(embedded_benchmark(benchmark))
    return load_anomaly_data(path, category, labels, need)


def readable_images(paths: Sequence[Path]) -> list[Path]:
    """The images that can be read; unreadable ones are skipped and named."""
    out = []
    for p in progress(paths, desc="checking images", unit="img"):
        try:
            read_image(p)
            out.append(p)
        except RFIError as e:
            log.warning("skipping %s", e)
    return out


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
    image is decoded once, into a memory-mapped file next to ``out`` (:class:`DecodedImages`,
    removed at the end): the decoder's random training crops, its validation crops (fixed
    crops of the held-out images at the same scale, :class:`NormalCrops`), the memory bank and
    the statistics all read from it. Decoder training (``method`` ``reconstruction`` or
    ``combined``) runs in ``<out without suffix>_fit/`` (metrics log, sample grids, its
    checkpoint), so a killed fit continues with ``resume=True``; ``memory`` builds the bank
    from the other normal images. The model file is written atomically: a fit killed mid-way
    leaves no half-written ``out``.

    Returns:
        ``out``: the model file (load with :meth:`AnomalyDetector.load`).

    Raises:
        RFIError: bad config, no (readable) normal images, a missing encoder checkpoint.
    """
    check_method(cfg.method)
    cfg.score.check()
    cfg.memory.check()
    cfg.combined.check()
    if cfg.holdout < 2:
        raise RFIError(f"holdout must be >= 2 (every n-th normal image is held out), got {cfg.holdout}")
    if not Path(cfg.encoder).is_file():
        raise RFIError(f"encoder checkpoint not found: {cfg.encoder} (train it with: rfi train-encoder --config "
                       f"configs/encoder/resnet18_robust.yaml, or set encoder=PATH)")
    if cfg.arch is None:  # a robustness-library / torchvision file needs arch=NAME: say so before training
        load_encoder(cfg.encoder, arch_key="arch")
    found = resolve_data(data, cfg.category, cfg.benchmark, "train")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}_decoded.", dir=out.parent) as tmp:
        normal = DecodedImages(found.train, Path(tmp) / "normal.u8", cfg.image_size)
        if len(normal) < 2:
            raise RFIError(f"{found.root}: need at least 2 readable normal training images, found {len(normal)}")
        train, held = split_normal(range(len(normal)), cfg.holdout)
        info = {"category": found.category, "layout": found.layout, "data": str(data),
                "benchmark": asdict(cfg.benchmark) if str(data) == "embedded" else None,
                "fit": config_to_dict(cfg), "train_images": len(train)}
        device = resolve_device(cfg.device)
        if cfg.method == "memory":
            encoder = load_encoder(cfg.encoder, cfg.arch, arch_key="arch").to(device).eval().requires_grad_(False)
            log.info("building a memory bank from %d normal images of %s (%d held out for the score statistics)",
                     len(train), found.category or found.root, len(held))
            return _finish(cfg, None, encoder, normal, train, held, info, out)
        dcfg = cfg.decoder
        dcfg.data.source, dcfg.data.root = "folder", str(found.root)  # a record: the crops come from `normal`
        dcfg.data.resize, dcfg.data.crop = cfg.image_size, "random"
        dcfg.encoder.checkpoint = cfg.encoder
        dcfg.encoder.arch = cfg.arch or dcfg.encoder.arch
        dcfg.out = str(out.with_name(out.stem + "_fit") / "decoder")
        crops = (NormalCrops(normal, train, "train", dcfg.data.size, dcfg.data.repeat),
                 NormalCrops(normal, held, "val", dcfg.data.size, dcfg.data.repeat, seed=dcfg.seed))
        log.info("fitting on %d normal images of %s (%d held out for the score statistics)", len(train),
                 found.category or found.root, len(held))
        decoder_path = train_decoder(dcfg, resume=resume, datasets=crops).path
        ae = RobustAutoencoder.from_checkpoints(cfg.encoder, decoder_path, device=device, arch=cfg.arch,
                                                arch_key="arch")
        return _finish(cfg, ae, ae.encoder, normal, train, held, info, out)


class _Subset(Sequence[Tensor]):
    """Images ``indices`` of a :class:`DecodedImages`, read from the mapped file on access (nothing held)."""

    def __init__(self, images: DecodedImages, indices: Sequence[int]):
        self.images, self.indices = images, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        return self.images.image(self.indices[i])


def _finish(cfg: AnomalyConfig, ae: RobustAutoencoder | None, encoder: Encoder, normal: DecodedImages,
            train: Sequence[int], held: Sequence[int], info: dict[str, Any], out: Path) -> Path:
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
            raise RFIError(f"{normal.paths[i]}: {h}x{w} px is smaller than the encoder allows "
                           f"({min_side} px per side for {', '.join(layers)}): use larger images or image_size")
    memory = None
    if cfg.method != "reconstruction":
        memory = MemoryBank.fit(encoder, _Subset(normal, train), cfg.memory, cfg.batch_size, count=len(train),
                                max_pixels=BATCH_PIXELS)
        info["memory_bank"] = {"patches": memory.patches, "kept": int(memory.bank.shape[0]), "dims": memory.dims,
                               "layers": memory.layers, "mib": memory.bank.numel() * 4 / 2 ** 20}
        log.info("memory bank: %d of %d patches (%d dims, %.1f MiB)", memory.bank.shape[0], memory.patches,
                 memory.dims, info["memory_bank"]["mib"])
    det = AnomalyDetector(ae, cfg.score, cfg.image_size, info=info, memory=memory, method=cfg.method,
                          encoder=encoder, combined=cfg.combined)
    cal = det.calibrate(_Subset(normal, held), cfg.batch_size)
    det.info["normal_scores"] = cal["normal_scores"]
    det.save(out)
    log.info("wrote %s (threshold %.3g = highest score of %d held-out normal images)", out, det.threshold, len(held))
    return out


# ----------------------------------------------------------------------------- score
def ground_truth_mask(item: TestImage, size: tuple[int, int]) -> Tensor:
    """The (H, W) boolean defect mask of a test image at ``size`` (all False for a normal image)."""
    if item.mask is None:
        return torch.zeros(size, dtype=torch.bool)
    m = read_mask(item.mask)
    if m.shape != size:
        m = F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    return m


def score(det: AnomalyDetector, data: AnomalyData, out: str | os.PathLike, batch_size: int = 16,
          write_maps: bool = True) -> dict[str, Any]:
    """Score every test image of ``data``; write ``scores.csv``, ``maps/`` and ``metrics.json`` to ``out``.

    An image that cannot be read, holds NaN/Inf, is too small for the encoder or gets a map that
    is not finite is skipped (the others are scored), named in the log, in ``metrics["skipped"]``
    (names) and ``metrics["failed"]`` (``"<path>: <why>"``, one per image; the command exits 1
    when it is not empty, :func:`encoders.core.files.partial_exit`). Pixel metrics are computed at
    the working resolution (masks resized, nearest), map by map into :class:`PixelMetrics`
    (memory independent of the number of images; the method is ``metrics["pixel_method"]``).
    Images are batched by at most ``batch_size`` and :data:`BATCH_PIXELS` pixels
    (:func:`batch_limit`): at 1024 px, one image at a time.

    Returns:
        The metrics dict (also in ``<out>/metrics.json``).
    """
    out = Path(out)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    failed: list[str] = []
    pixels = PixelMetrics()
    pixel_maps = 0

    def fail(item: TestImage, error: RFIError) -> None:
        msg = str(error)
        failed.append(msg if str(item.path) in msg else f"{item.path}: {msg}")
        skipped.append(item.name)
        log.error("skipped %s", failed[-1])

    def flush(batch: list[tuple[TestImage, Tensor, Tensor]]) -> None:
        nonlocal pixel_maps
        maps = det.maps(torch.stack([x for _, _, x in batch])).cpu()
        scores = det.image_scores(maps)
        for (item, img, _), amap, s in zip(batch, maps, scores):
            if not (torch.isfinite(amap).all() and torch.isfinite(s)):
                fail(item, RFIError(f"the anomaly map of {item.path} holds NaN or Inf values "
                                    f"(is the model file corrupt?)"))
                continue
            rel = f"maps/{item.name}.png"
            if write_maps:
                write_image(det.overlay(img, amap), out / rel)
            rows.append({"name": item.name, "defect": item.defect, "label": "" if item.label is None else item.label,
                         "score": f"{float(s):.6g}", "anomalous": int(det.threshold is not None and float(s) > det.threshold),
                         "map": rel if write_maps else ""})
            if data.has_masks and item.label is not None:
                try:
                    pixels.update(ground_truth_mask(item, tuple(amap.shape[-2:])), amap[0])
                    pixel_maps += 1
                except RFIError as e:
                    log.warning("pixel metrics without %s: %s", item.name, e)

    batch: list[tuple[TestImage, Tensor, Tensor]] = []  # (item, image as read, image at working size)
    for item in progress(data.test, desc="scoring", unit="img"):
        try:
            img = check_finite(read_image(item.path), str(item.path))
            x = det.prepare(img)
            det.check_size(x, str(item.path))
        except RFIError as e:
            fail(item, e)
            continue
        if batch and (len(batch) == batch_limit(batch_size, x.shape) or batch[0][2].shape != x.shape):
            flush(batch)
            batch = []
        batch.append((item, img, x))
    if batch:
        flush(batch)
    if not rows:
        raise RFIError(f"no test image of {data.root} could be scored: " + "; ".join(failed))

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "scores.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))

    labelled = [r for r in rows if r["label"] != ""]
    labels = [int(r["label"]) for r in labelled]
    scores = [float(r["score"]) for r in labelled]
    notes: list[str] = []
    metrics: dict[str, Any] = {
        "category": data.category, "data": str(data.root), "images": len(rows), "skipped": skipped, "failed": failed,
        "normal": labels.count(0), "anomalous": labels.count(1), "unlabelled": len(rows) - len(labelled),
        "model_threshold": det.threshold}
    if labelled:
        im = image_metrics(labels, scores)
        metrics.update(image_auroc=im["auroc"], image_f1=im["f1"], image_f1_threshold=im["threshold"])
        if "note" in im:
            notes.append("image " + im["note"])
        defects = sorted({r["defect"] for r in labelled if r["label"] == 1})
        if labels.count(0) and len(defects) > 1:
            metrics["per_defect"] = {
                d: image_metrics(*zip(*[(int(r["label"]), float(r["score"])) for r in labelled
                                        if r["label"] == 0 or r["defect"] == d]))["auroc"] for d in defects}
    else:
        metrics.update(image_auroc=None, image_f1=None)
        notes.append("no labels: image metrics not computed (give a labels CSV or test/good + test/<defect> folders)")
    if data.has_masks and pixel_maps:
        pm = pixels.result()
        metrics.update(pixel_auroc=pm["auroc"], pixel_f1=pm["f1"], pixel_method=PIXEL_METHOD)
        if "note" in pm:
            notes.append("pixel " + pm["note"])
    else:
        metrics.update(pixel_auroc=None, pixel_f1=None)
        if labelled:
            notes.append("no ground-truth masks: pixel metrics not computed")
    if skipped:
        notes.append(f"{len(skipped)} image(s) skipped (see failed): {', '.join(skipped[:5])}")
    metrics["notes"] = notes
    write_json(metrics, out / "metrics.json")
    return metrics


def format_metrics(m: dict[str, Any]) -> str:
    """The metrics of :func:`score` as a text table (AUROC / F1 in %; ``n/a`` where undefined)."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    head = f"{'category':<12} {'images':>6} {'normal':>6} {'anomalous':>9} {'image AUROC':>11} " \
           f"{'pixel AUROC':>11} {'image F1':>8} {'pixel F1':>8}"
    lines = [head, "-" * len(head),
             f"{str(m.get('category') or '-'):<12} {m['images']:>6} {m['normal']:>6} {m['anomalous']:>9} "
             f"{pct(m['image_auroc']):>11} {pct(m['pixel_auroc']):>11} {pct(m['image_f1']):>8} {pct(m['pixel_f1']):>8}"]
    for d, v in (m.get("per_defect") or {}).items():
        lines.append(f"  {d:<20} image AUROC {pct(v):>6}")
    lines += [f"note: {n}" for n in m.get("notes", [])]
    return "\n".join(lines)


def load_anomaly_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> AnomalyConfig:
    """The config of ``rfi anomaly``: the shipped defaults, then ``path``, then ``key=value`` overrides."""
    return load_config(AnomalyConfig, path, overrides)
