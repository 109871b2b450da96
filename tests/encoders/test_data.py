import pytest
import torch

from encoders import RFIError
from encoders.data import EMBEDDED_PHOTOS, DataConfig, EmbeddedCrops, ImageFiles, build_dataset, embedded_image, region
from encoders.imageio import write_image


def test_embedded_crops_are_deterministic_balanced_and_in_range():
    a, b = EmbeddedCrops("train", 16, num=64, seed=3), EmbeddedCrops("train", 16, num=64, seed=3)
    assert a.num_classes == len(EMBEDDED_PHOTOS) == 8
    x, y = a[5]
    assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1 and y == 5
    assert torch.equal(x, b[5][0]) and not torch.equal(x, EmbeddedCrops("train", 16, num=64, seed=4)[5][0])
    assert torch.bincount(a.labels).tolist() == [8] * 8


def test_train_and_validation_regions_are_disjoint():
    img = embedded_image("astronaut")
    train, val = region(img, "train"), region(img, "val")
    axis = 2 if img.shape[2] >= img.shape[1] else 1
    assert train.shape[axis] + val.shape[axis] == img.shape[axis]
    assert torch.equal(torch.cat([train, val], dim=axis), img)
    with pytest.raises(RFIError, match="larger than the val region"):
        EmbeddedCrops("val", 200, num=8)


def test_image_folder_with_classes_and_holdout(tmp_path):
    for c in ("cats", "dogs"):
        for i in range(5):
            write_image(torch.rand(3, 20, 24), tmp_path / c / f"{i}.png")
    train, val = build_dataset(DataConfig(source="folder", root=str(tmp_path), size=16), "train"), \
        ImageFiles(tmp_path, "val", 16)
    assert train.classes == ["cats", "dogs"] and len(train) == 8 and len(val) == 2
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == 0
    with pytest.raises(RFIError, match="unknown data.source 'imagenet'"):
        build_dataset(DataConfig(source="imagenet"), "train")
