import pytest
import torch

from encoders import RFIError
from encoders.data import (EMBEDDED_PHOTOS, DataConfig, EmbeddedCrops, ImageFiles, build_dataset,
                           embedded_image, region)
from encoders.imageio import write_image


def test_regions_partition_the_photo():
    img = embedded_image("chelsea")
    train, val = region(img, "train"), region(img, "val")
    assert train.shape[1] == val.shape[1] == img.shape[1]  # landscape: split along the width
    assert train.shape[2] + val.shape[2] == img.shape[2]
    torch.testing.assert_close(torch.cat([train, val], dim=2), img)


def test_embedded_crops_deterministic_balanced_and_from_their_region():
    a, b = EmbeddedCrops("train", 16, 64, seed=3), EmbeddedCrops("train", 16, 64, seed=3)
    assert torch.equal(a[5][0], b[5][0]) and a.num_classes == len(EMBEDDED_PHOTOS)
    assert torch.bincount(a.labels).tolist() == [8] * 8
    c = EmbeddedCrops("train", 16, 64, seed=4)
    assert not torch.equal(a.positions, c.positions)
    val = EmbeddedCrops("val", 16, 16)
    for i in range(len(val)):
        crop, label = val[i]
        src = region(embedded_image(EMBEDDED_PHOTOS[label]), "val")
        top, left = val.positions[i].tolist()
        assert torch.equal(crop, src[:, top:top + 16, left:left + 16])


def test_exception_crop_larger_than_region():
    with pytest.raises(RFIError, match="larger than the val region"):
        EmbeddedCrops("val", 200, 8)


def test_image_folder_flat_and_classes(tmp_path):
    flat = tmp_path / "flat"
    for i in range(10):
        write_image(torch.rand(3, 20, 24), flat / f"{i}.png")
    train, val = ImageFiles(flat, "train", 16), ImageFiles(flat, "val", 16)
    assert len(train) == 8 and len(val) == 2 and train[0][0].shape == (3, 16, 16)
    cls = tmp_path / "cls"
    for c in ("cat", "dog"):
        for i in range(5):
            write_image(torch.rand(3, 20, 20), cls / c / f"{i}.png")
    ds = ImageFiles(cls, "train", 16)
    assert ds.classes == ["cat", "dog"] and {label for _, label in ds.items} == {0, 1}


def test_exception_empty_folder_and_bad_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RFIError, match="no image files"):
        ImageFiles(tmp_path / "empty")
    with pytest.raises(RFIError, match="valid: embedded"):
        build_dataset(DataConfig(source="imagenet21k", root=str(tmp_path)))
    with pytest.raises(RFIError, match="CIFAR-10 not found"):
        build_dataset(DataConfig(source="cifar10", root=str(tmp_path)))
