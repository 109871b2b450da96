"""The ``data:`` section of a config and the dataset it names (embedded, mixed, folder, CIFAR-10)."""

from __future__ import annotations

from typing import Literal

from torch.utils.data import Dataset

from encoders.core.config import bounded, check_config, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.data.embedded import EmbeddedCrops, Split
from encoders.data.folders import Crop, Decode, ImageFiles, Transforms, cifar10
from encoders.data.synthetic import MixedCrops


@yaml_dataclass("encoder/defaults.yaml", "data")
class DataConfig:
    """Where a job's images come from (the ``data:`` section of a config).

    ``source``: ``embedded`` (default, no download), ``mixed`` (the embedded crops and
    procedurally generated images, a fraction ``synthetic_ratio`` of the items; no download;
    :class:`encoders.data.synthetic.MixedCrops`), ``folder`` (``root`` = image folder)
    or ``cifar10`` (``root`` = its folder). ``size``: crop side. ``train_crops`` /
    ``val_crops``: number of embedded (or mixed) crops. ``seed``: embedded crop positions
    (and synthetic images).
    ``resize`` / ``crop`` / ``repeat`` / ``transforms`` (``rfi`` or ``imagenet``) /
    ``decode`` (``uint8`` or ``float``; default by ``transforms``) (``folder`` only): see
    :class:`ImageFiles`.
    """

    source: Literal["embedded", "mixed", "folder", "cifar10"]
    root: str | None
    size: int = bounded(low=1)
    train_crops: int = bounded(low=1)
    val_crops: int = bounded(low=1)
    seed: int
    download: bool
    resize: int | None = bounded(low=1)
    crop: Crop
    repeat: int = bounded(low=1)
    transforms: Transforms
    decode: Decode | None
    synthetic_ratio: float = bounded(low=0, high=1)

    def check(self) -> None:
        if self.source in ("folder", "cifar10") and not self.root:
            raise RFIError(f"data.source={self.source} needs data.root (the folder)")


def build_dataset(cfg: DataConfig, split: Split = "train", size: int | None = None) -> Dataset:
    """The dataset a :class:`DataConfig` names, for one split (``size`` overrides ``cfg.size``).

    Raises:
        RFIError: a config that breaks the rules of :class:`DataConfig` (it is checked here too, as a
            config built in code skips :func:`~encoders.core.config.load_config`'s checks).
    """
    cfg = check_config(cfg)
    size = size or cfg.size
    if cfg.source == "embedded":
        return EmbeddedCrops(split, size, cfg.train_crops if split == "train" else cfg.val_crops, cfg.seed)
    if cfg.source == "mixed":
        return MixedCrops(
            split, size, cfg.train_crops if split == "train" else cfg.val_crops, cfg.seed, cfg.synthetic_ratio
        )
    if cfg.source == "folder":
        return ImageFiles(
            cfg.root,
            split,
            size,
            resize=cfg.resize,
            crop=cfg.crop,
            repeat=cfg.repeat,
            transforms=cfg.transforms,
            decode=cfg.decode,
        )
    return cifar10(cfg.root, split, cfg.download)
