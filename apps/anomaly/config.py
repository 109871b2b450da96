"""The anomaly app's settings: ``configs/apps/anomaly.yaml`` as typed classes, one per section.

:class:`AnomalyConfig` is the whole file (``rfi anomaly fit``); :class:`ScoreConfig`,
:class:`CombinedConfig`, :class:`MemoryConfig` and :class:`BenchmarkConfig` are its ``score:``,
``combined:``, ``memory:`` and ``benchmark:`` sections, and ``train:`` is an ``rfi train-decoder``
config (:class:`inversion.train.TrainDecoderConfig`), as in the denoise and style configs. The
defaults are the shipped YAML's; choices are ``Literal`` types, ranges :func:`bounded` fields, and a
``check()`` holds the rules across keys. :func:`load_anomaly_config` also refuses the old spelling
of a renamed key, naming the new one.

Example:
    >>> cfg = load_anomaly_config(DEFAULT_CONFIG, ["train.steps=20", "score.sigma=4"])
    >>> cfg.train.steps, cfg.score.sigma, cfg.method
    (20, 4.0, 'reconstruction')
    >>> load_anomaly_config(DEFAULT_CONFIG, ["decoder.steps=20"])
    Traceback (most recent call last):
    encoders.core.errors.RFIError: config key 'decoder.steps' in the command-line overrides is now 'train.steps'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from encoders.core.config import bounded, config_path, load_config, parse_overrides, read_yaml, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.data.embedded import EMBEDDED_TEXTURES
from inversion.train import TrainDecoderConfig

DEFAULT_CONFIG = "configs/apps/anomaly.yaml"
RENAMED_KEYS = {"decoder": "train"}
"""Top-level keys of earlier versions of the file -> their name now (an old key fails, naming the new one)."""

Method = Literal["reconstruction", "memory", "combined"]
PixelMetric = Literal["l1", "l2", "ssim"]
FeatureMetric = Literal["l2", "cosine"]
ImageScore = Literal["topk", "max", "mean"]
Colormap = Literal["jet", "turbo", "viridis", "plasma", "inferno", "magma", "hot", "gray"]
Texture = Literal[EMBEDDED_TEXTURES]


@yaml_dataclass("apps/anomaly.yaml", "score")
class ScoreConfig:
    """How anomaly maps and image scores are computed (the ``score:`` section; stored in the model).

    ``pixel_weight`` / ``feature_weight``: weights of the pixel and feature components
    (the feature weight is shared equally by ``feature_layers``). ``pixel_metric``:
    ``l1``, ``l2`` or ``ssim``; ``feature_metric``: ``l2`` or ``cosine``. ``sigma``: Gaussian
    smoothing of the maps in pixels (0: none). ``image_score``: ``topk`` (mean of the top
    ``topk`` fraction of the map), ``max`` or ``mean``. ``overlay_cmap``: the matplotlib
    colormap of the heat maps.
    """

    pixel_weight: float = bounded(low=0)
    pixel_metric: PixelMetric
    feature_weight: float = bounded(low=0)
    feature_layers: list[str]
    feature_metric: FeatureMetric
    sigma: float = bounded(low=0)
    image_score: ImageScore
    topk: float = bounded(low=0, high=1, low_open=True)
    overlay_cmap: Colormap

    def check(self) -> None:
        """The rules across keys: some weight, and layers for a feature weight."""
        if self.pixel_weight + self.feature_weight <= 0:
            raise RFIError("score.pixel_weight and score.feature_weight are both 0: give one a weight > 0")
        if self.feature_weight > 0 and not self.feature_layers:
            raise RFIError(
                "score.feature_layers is empty but score.feature_weight > 0: name layers or set the weight to 0"
            )


@yaml_dataclass("apps/anomaly.yaml", "combined")
class CombinedConfig:
    """``method: combined``: weights of the standardised reconstruction and memory maps in their sum."""

    reconstruction: float = bounded(low=0)
    memory: float = bounded(low=0)

    def check(self) -> None:
        """The rule across keys: some weight."""
        if self.reconstruction + self.memory <= 0:
            raise RFIError("combined.reconstruction and combined.memory are both 0: give one a weight > 0")


@yaml_dataclass("apps/anomaly.yaml", "memory")
class MemoryConfig:
    """The memory bank of ``method: memory`` / ``combined`` (the ``memory:`` section; stored in the model file).

    ``layers``: encoder taps whose patch features fill the bank (``null`` or ``[]``: see
    :func:`apps.anomaly.memory.default_memory_layers`). ``pool``: side of the local average
    (1: none). ``coreset``: fraction of the training patches kept, in (0, 1]. ``projection``:
    dimension of the random projection used by the coreset search (0: none). ``neighbours``:
    the map is the mean distance to this many nearest bank entries. ``sigma``: Gaussian
    smoothing of the map in pixels (0: none). ``patches_per_image``: keep only this many random
    patches of each training image before the coreset (``null``: all), for large training sets.
    ``max_mb``: refuse a bank whose patch features would exceed this many MiB before the
    coreset. ``chunk_mb``: largest distance matrix computed at once. ``seed``: seeds the
    patch sampling, the projection and the coreset's first centre.
    """

    layers: list[str] | None
    pool: Literal[1, 3, 5, 7]
    coreset: float = bounded(low=0, high=1, low_open=True)
    projection: int = bounded(low=0)
    neighbours: int = bounded(low=1)
    sigma: float = bounded(low=0)
    patches_per_image: int | None = bounded(low=1)
    max_mb: float = bounded(low=0, low_open=True)
    chunk_mb: float = bounded(low=0, low_open=True)
    seed: int


@yaml_dataclass("apps/anomaly.yaml", "benchmark")
class BenchmarkConfig:
    """A generated benchmark (the ``benchmark:`` section; :mod:`apps.anomaly.benchmark`).

    ``size``: image side in pixels, 16 to 1024. For the embedded textures, up to 128 (the width
    of a texture's test region) images are crops at the textures' own scale; above, the textures
    are first upsampled by the smallest integer factor that fits (bilinear: blurrier textures, for
    measuring time and memory at MVTec AD's 1024 px, e.g. ``benchmark.size=1024``).
    ``train``: normal training images per category; ``test_good``: normal test images;
    ``test_defect``: test images per defect type (embedded: ``scratch``, ``color_blob``,
    ``cut_paste``; from photos: ``pasted_patch``, ``blurred_disk``, ``tinted_disk``).
    ``seed``: every position, shape and colour is a pure function of it. ``textures``: which of
    scikit-image's textures (``brick``, ``grass``, ``gravel``) become categories (embedded only).
    ``photo_side``: ``make-benchmark --from FOLDER`` only: each photo is first resized to this
    short side in pixels (``null``: as stored).
    """

    size: int = bounded(low=16, high=1024)
    train: int = bounded(low=1)
    test_good: int = bounded(low=1)
    test_defect: int = bounded(low=1)
    seed: int
    textures: list[Texture]
    photo_side: int | None = bounded(low=16)

    def check(self) -> None:
        """The rule across keys: resized photos are at least one crop high."""
        if self.photo_side is not None and self.photo_side < self.size:
            raise RFIError(
                f"benchmark.photo_side={self.photo_side} is smaller than benchmark.size={self.size}: "
                f"raise photo_side or lower size"
            )


@yaml_dataclass("apps/anomaly.yaml")
class AnomalyConfig:
    """``rfi anomaly fit`` (YAML: ``configs/apps/anomaly.yaml``).

    ``encoder``: encoder checkpoint (default: the robust one; a ``robustness``-library or
    torchvision file needs ``arch``, e.g. ``arch=resnet50``). ``category``: the category of
    an MVTec root with several. ``image_size``: working resolution, short side in pixels
    (``null``: as stored). ``holdout``: every n-th normal image is held out of decoder
    training to measure the score statistics. ``method``: ``reconstruction`` (a decoder),
    ``memory`` (a patch-feature memory bank, ``memory``) or ``combined`` (both, weighted by
    ``combined``). ``train``: the decoder training run (:class:`inversion.train.TrainDecoderConfig`;
    ``train.data.size`` is the crop side; fit sets the data folder, encoder and output folder).
    ``score``: :class:`ScoreConfig`. ``benchmark``: the generated benchmarks (``--data embedded``,
    ``make-benchmark [--from FOLDER]``).
    ``batch_size`` / ``device``: for computing maps (also the defaults of ``rfi anomaly score``).
    """

    encoder: str
    arch: str | None
    method: Method
    category: str | None
    image_size: int | None = bounded(low=1)
    holdout: int = bounded(low=2)
    train: TrainDecoderConfig
    score: ScoreConfig
    benchmark: BenchmarkConfig
    memory: MemoryConfig
    combined: CombinedConfig
    batch_size: int = bounded(low=1)
    device: str


def _check_renamed(data: Mapping[str, Any], source: str) -> None:
    """Refuse a key of :data:`RENAMED_KEYS` (dotted, or a section) with one line naming its new spelling."""
    for key, value in data.items():
        head, _, rest = str(key).partition(".")
        if head not in RENAMED_KEYS:
            continue
        if not rest and isinstance(value, Mapping) and value:
            rest = str(next(iter(value)))
        old, new = (".".join(filter(None, (name, rest))) for name in (head, RENAMED_KEYS[head]))
        raise RFIError(f"config key '{old}' in {source} is now '{new}'")


def load_anomaly_config(
    path: str | os.PathLike | None = DEFAULT_CONFIG, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> AnomalyConfig:
    """The config of ``rfi anomaly``: the shipped defaults, then ``path``, then ``key=value`` overrides.

    Raises:
        RFIError: as :func:`encoders.core.config.load_config`; also a key spelt as in an earlier
            version (``decoder.steps``, now ``train.steps``), naming the new spelling.
    """
    over = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    if path is not None:
        _check_renamed(read_yaml(path), str(config_path(path)))
    _check_renamed(over, "the command-line overrides")
    return load_config(AnomalyConfig, path, over)
