"""Synthetic natural-like images and the photos + synthetic mixture (``data.source: mixed``)."""

import numpy as np
import pytest
import torch

from encoders import RFIError
from encoders.data.build import DataConfig, build_dataset
from encoders.data.embedded import EmbeddedCrops
from encoders.data.synthetic import (
    SYNTHETIC_CLASSES,
    MixedCrops,
    SyntheticImages,
    dead_leaves,
    power_law_noise,
    power_law_radii,
    synthetic_image,
)


def test_every_class_is_deterministic_in_range_and_seed_dependent():
    for label in range(len(SYNTHETIC_CLASSES)):
        x = synthetic_image(label, 24, seed=1, index=2)
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.01
        assert torch.equal(x, synthetic_image(label, 24, seed=1, index=2))
        assert not torch.equal(x, synthetic_image(label, 24, seed=2, index=2))
        assert not torch.equal(x, synthetic_image(label, 24, seed=1, index=3))
    with pytest.raises(RFIError, match="synthetic label"):
        synthetic_image(len(SYNTHETIC_CLASSES), 8)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 2.5])
def test_noise_power_spectrum_falls_as_one_over_f_alpha(alpha):
    fields = power_law_noise(128, np.random.default_rng(0), alpha, channels=4)
    power = (np.abs(np.fft.fft2(fields)) ** 2).mean(0)
    fy, fx = np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij")
    f = np.hypot(fy, fx)
    band = (f > 2 / 128) & (f < 0.4)
    slope = np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0]
    assert abs(slope + alpha) < 0.1, slope


def test_radii_follow_the_power_law():
    r = power_law_radii(np.random.default_rng(0), 40000, 3.0, 1.0, 100.0)
    assert r.min() >= 1.0 and r.max() <= 100.0
    # P(r > 2) = (2^-2 - 100^-2) / (1 - 100^-2) for p(r) ~ r^-3 on [1, 100]
    expected = (2**-2 - 100**-2) / (1 - 100**-2)
    assert abs((r > 2).mean() - expected) < 0.01


def test_dead_leaves_cover_the_image_and_smaller_leaves_give_more_edges():
    def edges(exponent):
        imgs = [dead_leaves(32, np.random.default_rng(i), exponent) for i in range(4)]
        return np.mean([np.abs(np.diff(im, axis=1)).mean() for im in imgs])

    img = dead_leaves(32, np.random.default_rng(0), 3.0)
    assert img.shape == (32, 32, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert edges(3.8) > 1.5 * edges(2.1)


def test_synthetic_set_balanced_cached_and_split():
    train = SyntheticImages("train", 16, 18, seed=0)
    assert train.num_classes == 9 and torch.bincount(train.labels).tolist() == [2] * 9
    assert SyntheticImages("train", 16, 18, seed=0).images is train.images  # cached per process
    val = SyntheticImages("val", 16, 18, seed=0)
    assert not torch.equal(train.images, val.images)
    x, label = train[3]
    assert x.dtype == torch.float32 and label == 3
    torch.testing.assert_close(x, synthetic_image(3, 16, seed=0, index=3), atol=0.5 / 255, rtol=0)


def test_mixed_ratio_labels_and_photo_items():
    ds = MixedCrops("train", 16, 40, seed=0, ratio=0.25)
    labels = [ds[i][1] for i in range(len(ds))]
    assert ds.num_classes == 17 and all(0 <= y < 17 for y in labels)
    synthetic = [y >= 8 for y in labels]
    assert sum(synthetic) == 10
    assert all(sum(synthetic[:k]) == int(k * 0.25) for k in range(len(ds) + 1))  # every prefix keeps the ratio
    photos = EmbeddedCrops("train", 16, 30, seed=0)
    got = [ds[i] for i in range(len(ds)) if not synthetic[i]]
    assert all(torch.equal(x, photos[j][0]) and y == photos[j][1] for j, (x, y) in enumerate(got))
    with pytest.raises(RFIError, match="synthetic_ratio"):
        MixedCrops("train", 16, 8, ratio=1.5)


def test_build_dataset_photos_unchanged_and_mixed_available():
    cfg = DataConfig(size=16, train_crops=32, val_crops=16)
    ds = build_dataset(cfg, "train")
    ref = EmbeddedCrops("train", 16, 32, 0)
    assert type(ds) is EmbeddedCrops and torch.equal(ds.positions, ref.positions)
    assert all(torch.equal(ds[i][0], ref[i][0]) for i in range(len(ds)))
    cfg.source, cfg.synthetic_ratio = "mixed", 1.0
    val = build_dataset(cfg, "val")
    assert len(val) == 16 and all(val[i][1] >= 8 for i in range(16))
