"""The PASCAL VOC layout: a dummy tree of palette PNGs loads; each bad input gives its one line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import RFIError
from encoders.data.voc import IGNORE_INDEX, VOC_CLASSES, VOCSegmentation, read_label_png, voc_palette, write_label_png

SPLITS = {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2008_000001", "2008_000002"]}


def write_dummy_voc(root: Path, num_classes: int = 4, size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """A small VOC tree (the anomalib dummy-dataset idea): random photos and palette masks of rectangles of
    classes 1..num_classes-1 on background, with a 255 border around each, for the ids of :data:`SPLITS`."""
    rng = np.random.default_rng(seed)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    w, h = size
    for split, ids in SPLITS.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for name in ids:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
            mask = np.zeros((h, w), dtype=np.uint8)
            top, left = rng.integers(2, h // 2), rng.integers(2, w // 2)
            mask[top - 1 : top + 11, left - 1 : left + 11] = IGNORE_INDEX
            mask[top : top + 10, left : left + 10] = rng.integers(1, num_classes)
            write_label_png(torch.from_numpy(mask.astype(np.int64)), root / "SegmentationClass" / f"{name}.png")
    return root


@pytest.fixture
def voc(tmp_path) -> Path:
    return write_dummy_voc(tmp_path / "VOC2012")


def test_dummy_tree_loads_with_its_palette(voc):
    mask_file = voc / "SegmentationClass" / f"{SPLITS['train'][0]}.png"
    with Image.open(mask_file) as img:
        assert img.mode == "P" and img.getpalette()[:9] == voc_palette()[:9]
    labels = read_label_png(mask_file)
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    train = VOCSegmentation(voc, "train", size=24, num_classes=4)
    val = VOCSegmentation(voc, "val", size=48, num_classes=4)  # larger than the images: padded with 255
    assert len(train) == 3 and len(val) == 2 and train.classes == list(VOC_CLASSES[:4])
    image, labels = train[0]
    assert image.shape == (3, 24, 24) and labels.shape == (24, 24) and labels.dtype == torch.int64
    image, labels = val[0]
    assert image.shape == (3, 48, 48) and (labels[30:] == IGNORE_INDEX).all() and (image[:, 30:] == 0).all()
    assert torch.equal(val[1][1], val[1][1])  # validation crops are fixed
    resized = VOCSegmentation(voc, "val", size=16, num_classes=4, resize=20)
    assert resized[0][0].shape == (3, 16, 16)


def test_mask_with_too_many_classes_is_named_and_skipped(voc, caplog):
    bad = voc / "SegmentationClass" / f"{SPLITS['train'][1]}.png"
    write_label_png(torch.full((30, 40), 30), bad)
    with caplog.at_level(logging.WARNING, logger="rfi"):
        ds = VOCSegmentation(voc, "train", size=16, num_classes=21)
    assert len(ds) == 2
    assert f"{bad} has class 30, but data.num_classes is 21" in caplog.text
    for name in SPLITS["train"]:
        write_label_png(torch.full((30, 40), 30), voc / "SegmentationClass" / f"{name}.png")
    with pytest.raises(RFIError, match=r"no usable image in .*train.txt \(3 skipped, first: .* has class 30"):
        VOCSegmentation(voc, "train", size=16, num_classes=21)


def test_image_without_mask_and_rgb_mask_are_named_and_skipped(voc, caplog):
    missing = voc / "SegmentationClass" / f"{SPLITS['train'][0]}.png"
    missing.unlink()
    rgb = voc / "SegmentationClass" / f"{SPLITS['train'][2]}.png"
    Image.open(rgb).convert("RGB").save(rgb)
    with caplog.at_level(logging.WARNING, logger="rfi"):
        ds = VOCSegmentation(voc, "train", size=16, num_classes=4)
    assert len(ds) == 1
    assert f"its mask {missing} is missing" in caplog.text
    assert f"{rgb} is not a class-index PNG" in caplog.text


def test_tree_without_its_split_file_says_which_file(voc):
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(RFIError, match=r"ImageSets/Segmentation/val.txt is missing"):
        VOCSegmentation(voc, "val", size=16)
    with pytest.raises(RFIError, match="VOC folder not found"):
        VOCSegmentation(voc / "nope", "train", size=16)
