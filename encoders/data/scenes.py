"""Procedurally labelled scenes for semantic segmentation: the embedded default of ``rfi segment`` (no download).

A scene is a stack of layers painted back to front: a smooth, low-contrast 1/f background,
then 3 to 7 objects (polygons and ellipses of 20-90 % of the side) at random places, each
filled with the texture of one class. Each pixel is labelled with the class of the last
layer that covers it, so occlusions are part of the labels. The classes
(:data:`SCENE_CLASSES`) are told apart by texture, not by shape or place:

- ``background``: a smooth (``alpha`` 2-2.5), low-contrast 1/f noise texture;
- ``brick``, ``grass``, ``gravel``: crops of scikit-image's shipped texture photographs
  (:data:`~encoders.data.embedded.EMBEDDED_TEXTURES`), with brightness and contrast jitter;
- ``dead_leaves``: small occluding discs of flat colours (:func:`~encoders.data.synthetic.dead_leaves`);
- ``noise``: a rough (``alpha`` 1-1.4), full-contrast coloured 1/f texture.

Colours come from the embedded photos' training regions (:func:`~encoders.data.synthetic.photo_palette`);
the texture photographs are split by region like the photos (:func:`~encoders.data.embedded.region`), and
``train`` and ``val`` scenes draw from different random streams, so no validation texture pixel
is seen in training. A scene is a pure function of ``(size, seed, index, split)``.

Example:
    >>> image, labels = scene(32, seed=0, index=3)
    >>> tuple(image.shape), tuple(labels.shape), labels.dtype
    ((3, 32, 32), (32, 32), torch.int64)
    >>> torch.equal(labels, scene(32, seed=0, index=3)[1])
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from skimage import draw
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.data.embedded import EMBEDDED_TEXTURES, LabelledDataset, Split, embedded_image, region
from encoders.data.synthetic import dead_leaves, noise_texture

SCENE_CLASSES = ("background", *EMBEDDED_TEXTURES, "dead_leaves", "noise")
"""The scene classes, in label order (0 is the background)."""
OBJECTS = (3, 7)
"""The range of the number of objects in a scene."""


@dataclass
class SceneLayer:
    """One painted layer of a scene.

    Attributes:
        label: its class (an index of :data:`SCENE_CLASSES`).
        mask: (size, size) bool, the pixels it covers.
        texture: (size, size, 3) float32 in [0, 1], its texture over the whole scene.
    """

    label: int
    mask: np.ndarray
    texture: np.ndarray


def class_texture(label: int, size: int, rng: np.random.Generator, split: Split = "train") -> np.ndarray:
    """A ``size`` x ``size`` texture of class ``label`` (see the module docstring).

    Args:
        label: an index of :data:`SCENE_CLASSES`.
        size: side in pixels.
        rng: the random generator.
        split: the region of the texture photographs to crop from.

    Returns:
        (size, size, 3) float32 in [0, 1].
    """
    name = SCENE_CLASSES[label]
    if name == "background":
        return noise_texture(size, rng, rng.uniform(2.0, 2.5), contrast=0.5)
    if name == "dead_leaves":
        return dead_leaves(size, rng, rng.uniform(2.8, 3.2), rmin=0.05, rmax=0.2)
    if name == "noise":
        return noise_texture(size, rng, rng.uniform(1.0, 1.4))
    photo = region(embedded_image(name), split)
    top = int(rng.integers(0, photo.shape[1] - size + 1))
    left = int(rng.integers(0, photo.shape[2] - size + 1))
    crop = photo[:, top : top + size, left : left + size].permute(1, 2, 0).numpy()
    mean = crop.mean()
    crop = mean + (crop - mean) * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    return np.clip(crop, 0, 1).astype(np.float32)


def object_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A polygon (3-7 vertices) or an ellipse at a random place, as a (size, size) bool mask (may be empty)."""
    mask = np.zeros((size, size), dtype=bool)
    cy, cx = rng.uniform(0, size, 2)
    if rng.random() < 0.5:
        k = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = rng.uniform(0.15, 0.45) * size * rng.uniform(0.6, 1.0, k)
        rr, cc = draw.polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), mask.shape)
    else:
        ry, rx = rng.uniform(0.1, 0.3, 2) * size
        rr, cc = draw.ellipse(cy, cx, ry, rx, mask.shape, rotation=rng.uniform(0, np.pi))
    mask[rr, cc] = True
    return mask


def scene_layers(size: int, seed: int = 0, index: int = 0, split: Split = "train") -> list[SceneLayer]:
    """The layers of scene ``index``, back to front: the background, then the objects.

    Args:
        size: side in pixels.
        seed, index: with ``split``, seed the scene's own generator.
        split: ``train`` or ``val`` (different random streams and texture regions).

    Raises:
        RFIError: a bad split.
    """
    if split not in ("train", "val"):
        raise RFIError(f"split must be 'train' or 'val', got {split!r}")
    rng = np.random.default_rng([seed, index, split == "val"])
    layers = [SceneLayer(0, np.ones((size, size), dtype=bool), class_texture(0, size, rng, split))]
    for _ in range(int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))):
        label = int(rng.integers(1, len(SCENE_CLASSES)))
        mask = object_mask(size, rng)
        if mask.any():
            layers.append(SceneLayer(label, mask, class_texture(label, size, rng, split)))
    return layers


def compose(layers: list[SceneLayer]) -> tuple[Tensor, Tensor]:
    """Paint ``layers`` back to front; each pixel takes the texture and the label of the last layer covering it.

    Returns:
        ``(image (3, H, W) float32 in [0, 1], labels (H, W) int64)``.
    """
    image = np.zeros_like(layers[0].texture)
    labels = np.zeros(layers[0].mask.shape, dtype=np.int64)
    for layer in layers:
        image[layer.mask] = layer.texture[layer.mask]
        labels[layer.mask] = layer.label
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(labels)


def scene(size: int, seed: int = 0, index: int = 0, split: Split = "train") -> tuple[Tensor, Tensor]:
    """Scene ``index``: ``(image (3, size, size) in [0, 1], labels (size, size) int64)``, a pure function of the
    arguments."""
    return compose(scene_layers(size, seed, index, split))


@functools.lru_cache(maxsize=8)
def _scene_stack(split: Split, size: int, num: int, seed: int) -> tuple[Tensor, Tensor]:
    """All scenes of a :class:`SceneSegmentation` set: uint8 images (num, 3, size, size), uint8 labels (cached)."""
    images = torch.empty(num, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(num, size, size, dtype=torch.uint8)
    for i in range(num):
        image, label = scene(size, seed, i, split)
        images[i] = image.mul(255).round_().to(torch.uint8)
        labels[i] = label.to(torch.uint8)
    return images, labels


class SceneSegmentation(LabelledDataset):
    """``num`` labelled scenes (:func:`scene`), generated once per process and cached as 8-bit images.

    Args:
        split: ``train`` or ``val`` (no scene, and no texture region, in both).
        size: side in pixels.
        num: number of scenes.
        seed: the set is a pure function of (split, size, num, seed).

    Shape: items are ``(image (3, size, size) float32 in [0, 1], labels (size, size) int64)``.

    Example:
        >>> ds = SceneSegmentation("val", 16, 4)
        >>> len(ds), ds.num_classes, tuple(ds[0][1].shape)
        (4, 6, (16, 16))
    """

    def __init__(self, split: Split = "train", size: int = 64, num: int = 1000, seed: int = 0):
        if size < 8:
            raise RFIError(f"scene size must be >= 8 px, got {size}")
        self.classes = list(SCENE_CLASSES)
        self.images, self.labels = _scene_stack(split, size, num, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i].float().div(255), self.labels[i].long()
