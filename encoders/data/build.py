"""The ``data:`` section of a config and the dataset it names (embedded, mixed, folder, CIFAR-10)."""
from __future__ import annotations

from torch.utils.data import Dataset

from encoders.core.config import bounded, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.data.embedded import EmbeddedCrops, Split
from encoders.data.folders import ImageFiles, cifar10
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

    source: str
    root: str | None
    size: int
    train_crops: int
    val_crops: int
    seed: int
    download: bool
    resize: int | None
    crop: str
    repeat: int
    transforms: str
    decode: str | None
    synthetic_ratio: float = bounded(low=0, high=1)


def build_dataset(cfg: DataConfig, split: Split = "train", size: int | None = None) -> Dataset:
    """The dataset a :class:`DataConfig` names, for one split (``size`` overrides ``cfg.size``)."""
    size = size or cfg.size
    if size < 1 or cfg.train_crops < 1 or cfg.val_crops < 1 or cfg.repeat < 1:
        raise RFIError(f"data.size, data.train_crops, data.val_crops and data.repeat must be >= 1, got "
                       f"{size}, {cfg.train_crops}, {cfg.val_crops}, {cfg.repeat}")
    if cfg.source == "embedded":
        return EmbeddedCrops(split, size, cfg.train_crops if split == "train" else cfg.val_crops, cfg.seed)
    if cfg.source == "mixed":
        return MixedCrops(split, size, cfg.train_crops if split == "train" else cfg.val_crops, cfg.seed,
                          cfg.synthetic_ratio)
    if cfg.source in ("folder", "cifar10") and not cfg.root:
        raise RFIError(f"data.source={cfg.source} needs data.root (the folder)")
    if cfg.source == "folder":
        return ImageFiles(cfg.root, split, size, resize=cfg.resize, crop=cfg.crop, repeat=cfg.repeat,
                          transforms=cfg.transforms, decode=cfg.decode)
    if cfg.source == "cifar10":
        return cifar10(cfg.root, split, cfg.download)
    raise RFIError(f"unknown data.source '{cfg.source}' (valid: embedded, mixed, folder, cifar10)")
