"""The labelled images a segmenter trains and is measured on: the ``train.data`` section's dataset."""

from __future__ import annotations

from torch.utils.data import Dataset

from apps.segment.config import SegmentDataConfig
from encoders.core.errors import RFIError
from encoders.data.embedded import Split
from encoders.data.scenes import SCENE_CLASSES, SceneSegmentation
from encoders.data.voc import VOC_CLASSES, VOCSegmentation


def segmentation_dataset(cfg: SegmentDataConfig, split: Split) -> Dataset:
    """The dataset of ``cfg`` for one split: items ``(image (3, size, size), labels (size, size) int64)``,
    with a ``classes`` list.

    Raises:
        RFIError: ``num_classes`` below the scenes' classes, a missing VOC tree or split file, or no usable image.

    Example:
        >>> ds = segmentation_dataset(SegmentDataConfig(size=16, val_items=2), "val")
        >>> len(ds), ds.classes[:2]
        (2, ['background', 'brick'])
    """
    if cfg.source == "scenes":
        if cfg.num_classes not in (None, len(SCENE_CLASSES)):
            raise RFIError(
                f"train.data.num_classes={cfg.num_classes}: the scenes have {len(SCENE_CLASSES)} "
                f"classes (set it to null)"
            )
        return SceneSegmentation(split, cfg.size, cfg.train_items if split == "train" else cfg.val_items, cfg.seed)
    return VOCSegmentation(cfg.root, split, cfg.size, cfg.num_classes or len(VOC_CLASSES), cfg.resize)
