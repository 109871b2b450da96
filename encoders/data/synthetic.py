"""Procedurally generated natural-like images, and the photos + synthetic training mixture.

Nothing is downloaded: every image is drawn from a seeded random generator, and colours are
sampled from the pixels of the embedded photos' *training* regions (so no validation pixel
leaks into the synthetic set). Three families, each known to train networks that transfer
to real photographs (dead leaves: Lee, Mumford & Huang 2001, used to train denoisers by
Achddou et al. 2021; 1/f noise and random shapes: Baradad et al., "Learning to see by
looking at noise", NeurIPS 2021):

- **dead leaves** (:func:`dead_leaves`): opaque discs falling on each other (occlusion), radii
  drawn from a power law ``p(r) ~ r^-exponent`` between ``rmin`` and ``rmax`` (``exponent = 3``
  gives the scale invariance of natural images), flat colours from the photos' palette.
- **1/f noise textures** (:func:`noise_texture`): Gaussian fields whose power spectrum falls
  as ``1 / f^alpha`` (``alpha`` about 1 to 2.5; natural images are near 2), coloured by mixing
  palette colours.
- **random shapes** (:func:`random_shapes`): polygons, ellipses or thick lines, each filled
  with a linear colour gradient, over a low-contrast 1/f texture background.

The training mixture (:class:`MixedCrops`, ``data.source: mixed``) interleaves the embedded
photo crops with synthetic images in the ratio ``data.synthetic_ratio``. **Its encoder task**
has ``8 + 9`` classes: the eight photos (as before) plus one class per synthetic family and
parameter bin (:data:`SYNTHETIC_CLASSES`): dead leaves with large / medium / small size
exponent bins, 1/f noise with rough / medium / smooth slope bins, and shapes that are
polygons / ellipses / lines. Telling the photos apart rewards memorising eight scenes; the
synthetic classes cannot be memorised (every image is new) and need the features a decoder
needs on any image: the spectral slope (texture statistics across scales), the size
distribution of occluding regions (edges, T-junctions, region statistics) and the geometry
of contours (straight vs curved edges, corners, thin structures).

Example:
    >>> x = synthetic_image(0, size=32, seed=0)      # class 0: dead leaves, large-disc bin
    >>> tuple(x.shape), x.dtype, bool(x.min() >= 0) and bool(x.max() <= 1)
    ((3, 32, 32), torch.float32, True)
    >>> torch.equal(x, synthetic_image(0, size=32, seed=0))
    True
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from skimage import draw
from skimage.transform import downscale_local_mean
from torch import Tensor

from encoders.core.errors import RFIError
from encoders.data.embedded import EMBEDDED_PHOTOS, EmbeddedCrops, LabelledDataset, embedded_image, region

DEAD_LEAVES_EXPONENTS = ((2.0, 2.6), (2.6, 3.3), (3.3, 4.0))
"""Bins of the dead-leaves radius exponent (one class each): large, medium (natural, 3), small discs."""
NOISE_ALPHAS = ((1.0, 1.5), (1.5, 2.0), (2.0, 2.5))
"""Bins of the 1/f power-spectrum exponent ``alpha`` (one class each): rough, medium, smooth."""
SHAPE_KINDS = ("polygons", "ellipses", "lines")
SYNTHETIC_CLASSES = (
    *(f"dead_leaves_{b}" for b in ("large", "medium", "small")),
    *(f"noise_{b}" for b in ("rough", "medium", "smooth")),
    *(f"shapes_{k}" for k in SHAPE_KINDS),
)
"""The synthetic classes, in label order (labels 0-8; :class:`MixedCrops` adds 8)."""
SUPERSAMPLE = 2  # shapes are drawn at 2x and area-averaged: anti-aliased edges


@functools.lru_cache(maxsize=1)
def photo_palette(num: int = 8192) -> np.ndarray:
    """``num`` RGB colours (float32, (num, 3) in [0, 1]) sampled from the embedded photos' training regions."""

    pixels = torch.cat([region(embedded_image(p), "train").reshape(3, -1) for p in EMBEDDED_PHOTOS], dim=1)
    idx = np.random.default_rng(0).integers(0, pixels.shape[1], num)
    return pixels[:, torch.from_numpy(idx)].T.numpy().astype(np.float32)


def _colours(rng: np.random.Generator, n: int, palette: np.ndarray | None) -> np.ndarray:
    palette = photo_palette() if palette is None else palette
    return palette[rng.integers(0, len(palette), n)]


def power_law_radii(rng: np.random.Generator, n: int, exponent: float, rmin: float, rmax: float) -> np.ndarray:
    """``n`` radii with density ``p(r) ~ r^-exponent`` on ``[rmin, rmax]``, by inverting the CDF.

    Example:
        >>> r = power_law_radii(np.random.default_rng(0), 1000, 3.0, 1.0, 10.0)
        >>> bool(r.min() >= 1.0) and bool(r.max() <= 10.0) and bool(np.median(r) < 2)
        True
    """
    u = rng.random(n)
    if abs(exponent - 1) < 1e-9:  # p ~ 1/r: log-uniform
        return rmin * (rmax / rmin) ** u
    a, b = rmin ** (1 - exponent), rmax ** (1 - exponent)
    return (a + u * (b - a)) ** (1 / (1 - exponent))


def dead_leaves(
    size: int,
    rng: np.random.Generator,
    exponent: float = 3.0,
    rmin: float = 0.03,
    rmax: float = 0.5,
    palette: np.ndarray | None = None,
    batch: int = 64,
    max_discs: int = 4096,
) -> np.ndarray:
    """A dead-leaves image: opaque discs stacked front to back until the plane is covered.

    The first disc drawn lies on top (the classic "dead leaves" order). Edges are
    anti-aliased analytically (a disc covers ``clip(r - d + 1/2, 0, 1)`` of a pixel whose
    centre lies at distance ``d``) and composited front to back; discs come in batches,
    each only tested against the pixels still visible through the discs above, so an image
    costs about as much as covering it once. No library draws dead leaves, hence this code.

    Args:
        size: side in pixels.
        rng: the random generator (the image is a pure function of its state).
        exponent: radii follow ``p(r) ~ r^-exponent`` (3: scale invariant, as natural images).
        rmin, rmax: radius range, as fractions of ``size``.
        palette: (N, 3) colours to draw from (default :func:`photo_palette`).
        batch: discs in the first batch (doubling, up to 1024); max_discs: stop there (what
            still shows through takes one more colour).

    Returns:
        (size, size, 3) float32 in [0, 1].

    Example:
        >>> img = dead_leaves(32, np.random.default_rng(0))
        >>> img.shape, img.dtype
        ((32, 32, 3), dtype('float32'))
    """
    n = size
    yy, xx = np.divmod(np.arange(n * n, dtype=np.float32), n)
    yy, xx = yy + 0.5, xx + 0.5  # pixel centres
    img = np.zeros((n * n, 3), dtype=np.float32)
    through = np.ones(n * n, dtype=np.float32)  # how much of each pixel the discs so far leave visible
    free = np.arange(n * n)  # pixels still visible (through > 1e-3)
    drawn = 0
    while free.size and drawn < max_discs:
        # Only discs that touch the image matter. A disc of radius r lands on it with probability
        # ~ (n + 2r)^2, so draw r from p(r), keep it with that relative probability, and place
        # it uniformly where it touches the image: the same visible discs, none drawn in vain.
        r = power_law_radii(rng, 4 * batch, exponent, rmin * n, rmax * n)
        r = r[rng.random(r.size) < ((n + 2 * r) / (n + 2 * rmax * n)) ** 2][:batch].astype(np.float32)
        c = (rng.random((r.size, 2)) * (n + 2 * r[:, None]) - r[:, None]).astype(np.float32)
        rgb = _colours(rng, r.size, palette)
        d = np.sqrt((yy[free][None] - c[:, :1]) ** 2 + (xx[free][None] - c[:, 1:]) ** 2)
        cover = np.clip(r[:, None] - d + 0.5, 0, 1)  # (discs, pixels)
        behind = np.cumprod(1 - cover, axis=0)  # visible fraction below each disc
        above = np.empty_like(behind)  # visible fraction above each disc
        above[0], above[1:] = 1, behind[:-1]
        above *= through[free]
        img[free] += (rgb.T @ (cover * above)).T
        through[free] *= behind[-1]
        free = free[through[free] > 1e-3]
        drawn += len(r)
        batch = min(2 * batch, 1024)  # fewer pixels left: larger batches cost the same
    img += through[:, None] * _colours(rng, 1, palette)  # what still shows through: one last colour
    return img.reshape(n, n, 3).clip(0, 1)


def power_law_noise(size: int, rng: np.random.Generator, alpha: float, channels: int = 1) -> np.ndarray:
    """Gaussian random fields with power spectrum ``1 / f^alpha``, each of zero mean and unit std.

    White noise is shaped in the Fourier domain (``numpy.fft``) by the amplitude ``f^(-alpha/2)``
    (the DC term is set to 0). Periodic: the field wraps around.

    Args:
        size: side in pixels.
        rng: the random generator.
        alpha: exponent of the power spectrum (1: pink, 2: brown / natural images).
        channels: independent fields to return.

    Returns:
        (channels, size, size) float32.

    Example:
        >>> f = power_law_noise(64, np.random.default_rng(0), 2.0)
        >>> f.shape, round(float(f.std()), 3)
        ((1, 64, 64), 1.0)
    """
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = np.inf  # no DC
    amp = f ** (-alpha / 2)
    spec = np.fft.rfft2(rng.standard_normal((channels, size, size)))
    field = np.fft.irfft2(spec * amp, s=(size, size))
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-12
    return field.astype(np.float32)


def noise_texture(
    size: int, rng: np.random.Generator, alpha: float, palette: np.ndarray | None = None, contrast: float = 1.0
) -> np.ndarray:
    """A coloured 1/f^alpha texture: one luminance field blends two palette colours, two weaker fields add chroma.

    Args:
        size: side in pixels.
        rng: the random generator.
        alpha: power-spectrum exponent of all three fields.
        palette: (N, 3) colours (default :func:`photo_palette`).
        contrast: scale of the fields (below 1: a flatter texture, e.g. a background).

    Returns:
        (size, size, 3) float32 in [0, 1].

    Example:
        >>> noise_texture(16, np.random.default_rng(0), 1.5).shape
        (16, 16, 3)
    """
    lum, chroma = power_law_noise(size, rng, alpha, 2)[0], power_law_noise(size, rng, alpha, 3)
    c0, c1 = _colours(rng, 2, palette)
    t = 0.5 + contrast * 0.22 * lum  # mostly within [0, 1]: about +-2.3 std
    img = c0 + t[..., None] * (c1 - c0) + contrast * 0.04 * np.moveaxis(chroma, 0, -1)
    return np.clip(img, 0, 1).astype(np.float32)


def _gradient(rr: np.ndarray, cc: np.ndarray, rng: np.random.Generator, palette: np.ndarray | None) -> np.ndarray:
    """Colours (len(rr), 3) at pixels (rr, cc) of a linear gradient between two palette colours,
    along a random direction."""
    theta = rng.uniform(0, 2 * np.pi)
    t = np.cos(theta) * cc + np.sin(theta) * rr
    t = (t - t.min()) / (np.ptp(t) + 1e-12) if t.size else t
    c0, c1 = _colours(rng, 2, palette)
    return (c0 + t[:, None].astype(np.float32) * (c1 - c0)).astype(np.float32)


def random_shapes(
    size: int,
    rng: np.random.Generator,
    kind: str = "polygons",
    palette: np.ndarray | None = None,
    count: tuple[int, int] = (3, 9),
) -> np.ndarray:
    """Shapes of one ``kind`` with gradient fills over a low-contrast 1/f texture.

    Rasterised by :mod:`skimage.draw` (``polygon``, ``ellipse``; lines are thin rotated
    rectangles drawn as polygons), at 2x and area-averaged (anti-aliased edges).
    ``skimage.draw.random_shapes`` is not used: it fills flat colours on a white background.

    Args:
        size: side in pixels.
        rng: the random generator.
        kind: ``polygons`` (3-6 vertices), ``ellipses`` or ``lines`` (1-3 px thick).
        palette: (N, 3) colours (default :func:`photo_palette`).
        count: range of the number of shapes (lines: twice as many).

    Returns:
        (size, size, 3) float32 in [0, 1].

    Example:
        >>> random_shapes(16, np.random.default_rng(0), "ellipses").shape
        (16, 16, 3)
    """
    if kind not in SHAPE_KINDS:
        raise RFIError(f"unknown shape kind '{kind}' (valid: {', '.join(SHAPE_KINDS)})")
    n = size * SUPERSAMPLE
    img = noise_texture(size, rng, rng.uniform(1.5, 2.5), palette, contrast=0.4)
    img = img.repeat(SUPERSAMPLE, 0).repeat(SUPERSAMPLE, 1)  # background at the output resolution
    shape = (n, n)
    for _ in range(int(rng.integers(count[0], count[1] + 1)) * (2 if kind == "lines" else 1)):
        cy, cx = rng.uniform(0, n, 2)
        if kind == "polygons":
            k = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = rng.uniform(0.08, 0.35) * n * rng.uniform(0.6, 1.0, k)
            rr, cc = draw.polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), shape)
        elif kind == "ellipses":
            ry, rx = rng.uniform(0.04, 0.3, 2) * n
            rr, cc = draw.ellipse(cy, cx, ry, rx, shape, rotation=rng.uniform(0, np.pi))
        else:
            half, width = rng.uniform(0.15, 0.6) * n, rng.uniform(0.5, 1.5) * SUPERSAMPLE
            theta = rng.uniform(0, np.pi)
            d, p = np.array([np.sin(theta), np.cos(theta)]), np.array([np.cos(theta), -np.sin(theta)])
            corners = np.array(
                [(cy, cx) + s * half * d + t * width * p for s, t in ((-1, -1), (-1, 1), (1, 1), (1, -1))]
            )
            rr, cc = draw.polygon(corners[:, 0], corners[:, 1], shape)
        img[rr, cc] = _gradient(rr, cc, rng, palette)
    return downscale_local_mean(img, (SUPERSAMPLE, SUPERSAMPLE, 1)).astype(np.float32)


def _bin_value(rng: np.random.Generator, bins: tuple[tuple[float, float], ...], k: int) -> float:
    return float(rng.uniform(*bins[k]))


def synthetic_image(
    label: int, size: int = 32, seed: int = 0, index: int = 0, palette: np.ndarray | None = None
) -> Tensor:
    """The synthetic image of class ``label`` (see :data:`SYNTHETIC_CLASSES`), a pure function of its arguments.

    Args:
        label: 0-2 dead leaves (exponent bin), 3-5 1/f noise (alpha bin), 6-8 shapes (kind).
        size: side in pixels.
        seed, index: together seed the image's own generator.
        palette: (N, 3) colours (default :func:`photo_palette`).

    Returns:
        (3, size, size) float32 in [0, 1].
    """
    if not 0 <= label < len(SYNTHETIC_CLASSES):
        raise RFIError(f"synthetic label must be in 0..{len(SYNTHETIC_CLASSES) - 1}, got {label}")
    rng = np.random.default_rng([seed, index, label])
    family, k = divmod(label, 3)
    if family == 0:
        img = dead_leaves(size, rng, _bin_value(rng, DEAD_LEAVES_EXPONENTS, k), palette=palette)
    elif family == 1:
        img = noise_texture(size, rng, _bin_value(rng, NOISE_ALPHAS, k), palette)
    else:
        img = random_shapes(size, rng, SHAPE_KINDS[k], palette)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


@functools.lru_cache(maxsize=8)
def _synthetic_stack(split: str, size: int, num: int, seed: int) -> tuple[Tensor, Tensor]:
    """All images of a :class:`SyntheticImages` set, as uint8 (num, 3, size, size), and their labels (cached)."""
    labels = torch.arange(num) % len(SYNTHETIC_CLASSES)
    stream = seed * 2 + (split == "val")  # train and val draw different images
    images = torch.empty(num, 3, size, size, dtype=torch.uint8)
    for i in range(num):
        images[i] = synthetic_image(int(labels[i]), size, stream, i).mul(255).round_().to(torch.uint8)
    return images, labels


class SyntheticImages(LabelledDataset):
    """Synthetic images, balanced over :data:`SYNTHETIC_CLASSES`, generated once per process and cached.

    Images are stored as 8 bits (like a photo file) in an in-memory cache keyed by
    ``(split, size, num, seed)``, so the jobs of one process (an encoder, then its
    decoders) generate them once.

    Args:
        split: ``train`` or ``val`` (different random streams: no image is in both).
        size: side in pixels.
        num: number of images.
        seed: the set is a pure function of (split, size, num, seed).

    Shape: items are ``(image (3, size, size) float32 in [0, 1], label int in 0..8)``.

    Example:
        >>> ds = SyntheticImages("train", 16, 18)
        >>> len(ds), ds.num_classes, ds[4][1], tuple(ds[4][0].shape)
        (18, 9, 4, (3, 16, 16))
    """

    def __init__(self, split: str = "train", size: int = 32, num: int = 1000, seed: int = 0):
        if split not in ("train", "val"):
            raise RFIError(f"split must be 'train' or 'val', got {split!r}")
        self.classes = list(SYNTHETIC_CLASSES)
        self.images, self.labels = _synthetic_stack(split, size, num, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].float().div(255), int(self.labels[i])


class MixedCrops(LabelledDataset):
    """The embedded photo crops and synthetic images, interleaved in a fixed ratio (``data.source: mixed``).

    Item ``i`` is synthetic when ``floor((i + 1) * ratio) > floor(i * ratio)``, so every
    prefix holds the ratio (a validation subset of the first N items too). Labels: 0-7 the
    photos (:class:`encoders.data.embedded.EmbeddedCrops`, unchanged), 8-16 the synthetic classes.

    Args:
        split: ``train`` or ``val`` (photo regions and synthetic streams are disjoint).
        size: crop side in pixels.
        num: total items.
        seed: photo crop positions and synthetic images.
        ratio: fraction of synthetic items, in [0, 1].

    Shape: items are ``(image (3, size, size) float32 in [0, 1], label int in 0..16)``.

    Example:
        >>> ds = MixedCrops("train", 16, 20, ratio=0.25)
        >>> len(ds), ds.num_classes, sum(int(label) >= 8 for _, label in ds)
        (20, 17, 5)
    """

    def __init__(self, split: str = "train", size: int = 32, num: int = 12000, seed: int = 0, ratio: float = 0.5):
        if not 0 <= ratio <= 1:
            raise RFIError(f"data.synthetic_ratio must be in [0, 1], got {ratio}")
        i = torch.arange(num, dtype=torch.float64)
        self.is_synthetic = torch.floor((i + 1) * ratio) > torch.floor(i * ratio)
        self.index = torch.empty(num, dtype=torch.long)  # position within its source
        n_syn = int(self.is_synthetic.sum())
        self.index[self.is_synthetic] = torch.arange(n_syn)
        self.index[~self.is_synthetic] = torch.arange(num - n_syn)
        self.photos = EmbeddedCrops(split, size, num - n_syn, seed) if num - n_syn else None
        self.synthetic = SyntheticImages(split, size, n_syn, seed) if n_syn else None
        self.classes = [*(self.photos.classes if self.photos else list(EMBEDDED_PHOTOS)), *SYNTHETIC_CLASSES]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        j = int(self.index[i])
        if self.is_synthetic[i]:
            x, label = self.synthetic[j]
            return x, label + len(self.classes) - len(SYNTHETIC_CLASSES)
        return self.photos[j]
