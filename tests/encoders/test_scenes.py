"""The procedurally labelled scenes: deterministic, and each pixel labelled by the layer that covers it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders import RFIError
from encoders.data.scenes import SCENE_CLASSES, SceneSegmentation, compose, scene, scene_layers


def test_scenes_are_deterministic_and_splits_differ():
    a, b = scene(32, seed=3, index=7), scene(32, seed=3, index=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], scene(32, seed=3, index=7, split="val")[0])
    assert not torch.equal(a[0], scene(32, seed=4, index=7)[0])
    image, labels = a
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) <= set(range(len(SCENE_CLASSES)))
    ds = SceneSegmentation("train", 32, 5, seed=3)
    assert ds.num_classes == len(SCENE_CLASSES) and torch.equal(ds[2][1], scene(32, 3, 2)[1])
    assert (ds[2][0] - scene(32, 3, 2)[0]).abs().max() <= 0.5 / 255 + 1e-6  # stored as 8 bits


def test_each_pixel_takes_the_label_and_texture_of_the_last_layer_covering_it():
    occluded = 0
    for index in range(6):
        layers = scene_layers(24, seed=0, index=index)
        image, labels = compose(layers)
        masks = np.stack([layer.mask for layer in layers])
        top = len(layers) - 1 - np.argmax(masks[::-1], axis=0)  # the last layer covering each pixel
        assert masks[0].all() and layers[0].label == 0  # the background covers everything
        expected_labels = np.array([layer.label for layer in layers])[top]
        expected_image = np.take_along_axis(
            np.stack([layer.texture for layer in layers]), top[None, ..., None], axis=0
        )[0]
        assert np.array_equal(labels.numpy(), expected_labels)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected_image)
        # occlusion: an object partly hidden behind a later one keeps only its visible pixels
        occluded += sum(bool((layer.mask & (top != i)).any()) for i, layer in enumerate(layers[1:], 1))
    assert occluded > 0


def test_bad_split_is_named():
    with pytest.raises(RFIError, match="split must be 'train' or 'val'"):
        scene(16, split="test")
