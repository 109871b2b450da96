"""Datasets: the embedded crops, and image folders streamed through DataLoader workers."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from encoders import RFIError
from encoders.core.imageio import read_image, write_image
from encoders.data.build import DataConfig, build_dataset
from encoders.data.embedded import EMBEDDED_PHOTOS, EmbeddedCrops, embedded_image, region
from encoders.data.folders import ImageFiles, default_num_workers, read_image_uint8, resolve_num_workers, scan_images


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
        assert torch.equal(crop, src[:, top : top + 16, left : left + 16])


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
    with pytest.raises(RFIError, match=r"config key 'source' in the config: 'imagenet21k' is not one of \['embedded'"):
        build_dataset(DataConfig(source="imagenet21k", root=str(tmp_path)))
    with pytest.raises(RFIError, match="CIFAR-10 not found"):
        build_dataset(DataConfig(source="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize(
    "override, message",
    [
        ("size=0", "config key 'size' in the command-line overrides must be >= 1, got 0"),
        ("repeat=0", "config key 'repeat' in the command-line overrides must be >= 1, got 0"),
        ("crop=centre", "'centre' is not one of ['resized', 'random']"),
        ("transforms=tf", "'tf' is not one of ['rfi', 'imagenet']"),
        ("decode=int8", "'int8' is not one of ['float', 'uint8'] (or null)"),
        ("synthetic_ratio=2", "must be in [0, 1], got 2.0"),
        ("source=folder", "data.source=folder needs data.root (the folder)"),
    ],
)
def test_data_config_rules_are_declared_and_named(override, message):
    from encoders.core.config import load_config

    with pytest.raises(RFIError) as error:
        load_config(DataConfig, None, [override])
    assert message in str(error.value)
    assert load_config(DataConfig, None, ["source=folder", "root=imgs"]).root == "imgs"


# ----------------------------------------------------------------------------- streamed folders
def _folder(root, classes=("cat", "dog"), n=5, hw=(40, 52), ext="png"):
    g = torch.Generator().manual_seed(0)
    for c in classes:
        for i in range(n):
            write_image(torch.rand(3, *hw, generator=g), root / c / f"{i}.{ext}")
    return root


def test_scan_matches_sorted_path_order(tmp_path):
    for rel in ("b/1.png", "a/x.png", "a-b.png", "a/sub/2.jpg", "A.PNG", "notes.txt", "a.png/inner.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    expected = [
        str(p.relative_to(tmp_path))
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file() and p.suffix.lower() in (".png", ".jpg")
    ]
    assert scan_images(tmp_path) == expected
    assert scan_images(tmp_path, recursive=False) == ["A.PNG", "a-b.png"]


def test_uint8_decode_is_exactly_the_float_decode(tmp_path):
    for ext in ("png", "jpg"):
        write_image(torch.rand(3, 30, 41), tmp_path / f"x.{ext}")
        u8 = read_image_uint8(tmp_path / f"x.{ext}")
        assert u8.dtype == torch.uint8 and u8.shape == (3, 30, 41)
        assert torch.equal(u8.float().div(255), read_image(tmp_path / f"x.{ext}"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(RFIError, match="bad.png is not a readable image"):
        read_image_uint8(tmp_path / "bad.png")
    with pytest.raises(RFIError, match="image not found: .*missing.png"):
        read_image_uint8(tmp_path / "missing.png")


def test_uint8_pipeline_crops_before_converting_and_matches_float_where_exact(tmp_path):
    root = _folder(tmp_path / "imgs")
    kw = {"crop": "random", "repeat": 2}  # random crops + flips: exact in uint8
    f32 = ImageFiles(root, "train", 24, decode="float", **kw)
    u8 = ImageFiles(root, "train", 24, decode="uint8", **kw)
    assert len(f32) == len(u8) == 16
    for i in range(len(u8)):
        torch.manual_seed(i)
        a = f32[i]
        torch.manual_seed(i)
        b = u8[i]
        assert b[0].dtype == torch.float32 and torch.equal(a[0], b[0]) and a[1] == b[1]
    # with resizing the uint8 pipeline rounds to 8 bits: within one grey level of the float one
    a = ImageFiles(root, "val", 24, decode="float")[0][0]
    b = ImageFiles(root, "val", 24, decode="uint8")[0][0]
    assert (a - b).abs().max() <= 1 / 255 + 1e-6 and torch.equal(b, (b * 255).round() / 255)
    # the uint8 path hands the transforms uint8 images (so cropping/resizing happens before the float conversion)
    seen = []
    u8.transform = v2.Compose([v2.Lambda(lambda x: seen.append(x.dtype) or x), u8.transform])
    u8[0]
    assert seen == [torch.uint8]


def test_imagenet_transforms(tmp_path):
    root = _folder(tmp_path / "imgs", hw=(300, 400), ext="jpg")
    train = ImageFiles(root, "train", 224, transforms="imagenet")
    val = ImageFiles(root, "val", 224, transforms="imagenet")
    assert train.decode == "uint8" and [type(t) for t in train.transform.transforms] == [
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
    ]
    assert train.transform.transforms[0].scale == (0.08, 1.0)
    x, _ = train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    # val: short side to 256, centre crop 224 -- the standard evaluation transform
    expected = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(read_image_uint8(val.path(0)))).float() / 255
    assert torch.equal(val[0][0], expected)
    with pytest.raises(RFIError, match="unknown data.transforms 'inception'"):
        ImageFiles(root, "train", 224, transforms="inception")
    with pytest.raises(RFIError, match="unknown data.decode 'uint16'"):
        ImageFiles(root, "train", 224, decode="uint16")
    cfg = DataConfig(source="folder", root=str(root), size=64, transforms="imagenet")
    assert build_dataset(cfg, "val")[0][0].shape == (3, 64, 64)


def test_folder_streams_through_worker_processes_without_holding_images(tmp_path):
    root = _folder(tmp_path / "imgs", n=6)
    ds = ImageFiles(root, "val", 16, transforms="imagenet")
    assert ds.streamed and len(pickle.dumps(ds)) < 8000  # the file list and transforms only, no pixels
    assert isinstance(ds._paths, np.ndarray) and ds._paths.dtype.kind == "S"  # one buffer, shared by workers
    serial = list(DataLoader(ds, batch_size=1, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=1, num_workers=2))
    assert len(serial) == len(parallel) == 2
    for (a, ya), (b, yb) in zip(serial, parallel):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_default_num_workers(monkeypatch):
    monkeypatch.delenv("RFI_NUM_WORKERS", raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_num_workers() == max(0, min(8, cpus - 1))
    assert default_num_workers(streamed=False) == 0
    assert resolve_num_workers(None, EmbeddedCrops("val", 16, 8)) == 0  # in memory: no workers
    assert resolve_num_workers(3, EmbeddedCrops("val", 16, 8)) == 3
    monkeypatch.setenv("RFI_NUM_WORKERS", "0")
    assert default_num_workers() == 0
    monkeypatch.setenv("RFI_NUM_WORKERS", "many")
    with pytest.raises(RFIError, match="RFI_NUM_WORKERS must be an integer"):
        default_num_workers()


@pytest.mark.parametrize("name", ["imagenet_resnet50_robust", "imagenet_alexnet_robust"])
def test_imagenet_configs_are_full_size_at_224(name):
    from encoders.core.config import load_config
    from encoders.robust.train import TrainEncoderConfig

    cfg = load_config(TrainEncoderConfig, Path(__file__).resolve().parents[2] / "configs" / "encoder" / f"{name}.yaml")
    assert (cfg.model.width, cfg.model.small_input, cfg.data.size) == (1.0, False, 224)
    assert (cfg.data.source, cfg.data.transforms, cfg.data.decode) == ("folder", "imagenet", "uint8")
    assert cfg.adv.enabled and not cfg.flip  # the flip is in the transforms
