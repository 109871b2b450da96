"""Anomaly benchmarks with synthetic defects, written in the MVTec AD layout: embedded textures or any photos.

Two sources, one layout (:func:`make_benchmark`, ``rfi anomaly make-benchmark``), generated
deterministically from :class:`~apps.anomaly.config.BenchmarkConfig`:

- **Embedded** (default): scikit-image's shipped textures (``brick``, ``grass``, ``gravel``), one
  category each, with the defects :data:`DEFECTS` (a ``scratch``, a ``color_blob``, a ``cut_paste``
  patch of the same texture). ``--data embedded`` generates it into the cache on first use
  (:func:`embedded_benchmark`).
- **A folder of photos** (``--from FOLDER``): one category per photo (named after its file), with
  the defects :data:`PHOTO_DEFECTS` (a ``pasted_patch`` of another photo of the folder, a
  ``blurred_disk``, a ``tinted_disk``).

No test pixel was seen in training: for a texture, normal training images are crops of the first two
thirds of the image along its longer axis and test images crops of the last third
(:func:`encoders.data.embedded.region`); a photo is a scene whose parts differ (sky, a face, a coat),
so its split is a grid of tiles, every third one a test tile along the diagonals (:func:`photo_tiles`),
and test crops show the same kinds of content as training crops. ``test_defect`` test images per
defect type carry one defect, with its mask; a photo's defect is drawn until a person can see it
(:data:`VISIBLE`).

Example:
    >>> from apps.anomaly.data import load_anomaly_data
    >>> root = make_benchmark("/tmp/rfi-doc-bench", BenchmarkConfig(train=4, test_good=2, test_defect=1))
    >>> data = load_anomaly_data(root, category="brick")
    >>> len(data.train), len(data.test), data.has_masks
    (4, 5, True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apps.anomaly.config import BenchmarkConfig
from encoders.core.config import check_config
from encoders.core.errors import RFIError
from encoders.core.files import check_output_folder, reported_writes
from encoders.core.imageio import IMAGE_EXTENSIONS, read_image, write_image
from encoders.data.embedded import EMBEDDED_TEXTURES, embedded_image, region

log = logging.getLogger("rfi")

DEFECTS = ("scratch", "color_blob", "cut_paste")
"""The defect types of the embedded benchmark (test folders ``test/<defect>``)."""
PHOTO_DEFECTS = ("pasted_patch", "blurred_disk", "tinted_disk")
"""The defect types of a benchmark made from a folder of photos."""
VISIBLE = 8 / 255
"""A photo defect must change the pixels inside its mask by this much on average (8 grey levels): a blurred disk
on flat sky or a smooth microscopy background changes them by about 1 and cannot be seen."""
DRAWS = 32
"""A photo defect is drawn (crop and placement) up to this many times; the first visible draw is kept, else the
most visible one, with a warning naming the photo."""
BENCHMARK_VERSION = {"embedded": 1, "photos": 2}
"""Per source; photos 2: split into tiles, visible defects (1: a 2/3 | 1/3 split, defects on any crop)."""
MANIFEST = "benchmark.json"


def _manifest(cfg: BenchmarkConfig, photos: dict[str, str] | None = None, source: Path | None = None) -> dict:
    """What identifies a benchmark: its settings, and for a folder of photos the folder and each photo's SHA-256."""
    settings = asdict(cfg)
    if photos is None:
        settings.pop("photo_side")  # embedded: the textures' scale is fixed
        return {"format": "rfi-anomaly-benchmark", "version": BENCHMARK_VERSION["embedded"], **settings}
    settings.pop("textures")
    return {
        "format": "rfi-anomaly-benchmark",
        "version": BENCHMARK_VERSION["photos"],
        **settings,
        "source": str(source),
        "photos": photos,
    }


def _rng(cfg: BenchmarkConfig, texture: str, *key: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, EMBEDDED_TEXTURES.index(texture), *key])


def _photo_rng(cfg: BenchmarkConfig, category: str, *key: int) -> np.random.Generator:
    """Seeded by the category's name, so adding a photo to the folder leaves the others' images as they were."""
    return np.random.default_rng([cfg.seed, int(hashlib.sha1(category.encode()).hexdigest()[:8], 16), *key])


def _crop(area: np.ndarray, size: int, rng: np.random.Generator, width: int | None = None) -> np.ndarray:
    """A random ``size`` x ``width`` (default: square) crop of an (H, W, 3) array."""
    width = width or size
    top = int(rng.integers(0, area.shape[0] - size + 1))
    left = int(rng.integers(0, area.shape[1] - width + 1))
    return area[top : top + size, left : left + width].copy()


def _scratch(img: np.ndarray, rng: np.random.Generator, area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved line, much brighter or darker than the texture around it."""
    from skimage.draw import bezier_curve
    from skimage.morphology import dilation, disk

    s = img.shape[0]
    m = np.zeros((s, s), bool)
    length = rng.uniform(0.35, 0.7) * s
    cy, cx = rng.uniform(0.3, 0.7, 2) * s
    angle = rng.uniform(0, np.pi)
    dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    bend = rng.uniform(-0.25, 0.25) * length
    pts = [(cy - dy, cx - dx), (cy + bend * np.cos(angle), cx - bend * np.sin(angle)), (cy + dy, cx + dx)]
    (r0, c0), (r1, c1), (r2, c2) = [
        (int(round(np.clip(r, 0, s - 1))), int(round(np.clip(c, 0, s - 1)))) for r, c in pts
    ]
    rr, cc = bezier_curve(r0, c0, r1, c1, r2, c2, weight=1.0, shape=(s, s))
    m[rr, cc] = True
    m = dilation(m, disk(max(1, int(round(s / 48 * rng.uniform(0.8, 1.3)))))).astype(bool)
    value = rng.uniform(0.9, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.1)
    out = img.copy()
    out[m] = 0.15 * out[m] + 0.85 * value
    return out, m


def _color_blob(img: np.ndarray, rng: np.random.Generator, area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A tinted ellipse (a stain): the texture shows through, its colour is off."""
    import colorsys

    from skimage.draw import ellipse

    s = img.shape[0]
    r, c = rng.uniform(0.25, 0.75, 2) * s
    ry, rx = rng.uniform(0.07, 0.16, 2) * s
    rr, cc = ellipse(r, c, ry, rx, shape=(s, s), rotation=rng.uniform(0, np.pi))
    m = np.zeros((s, s), bool)
    m[rr, cc] = True
    color = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), 1.0))
    alpha = rng.uniform(0.5, 0.7)
    out = img.copy()
    out[m] = (1 - alpha) * out[m] + alpha * out[m].mean(-1, keepdims=True) * color * 1.4
    return out.clip(0, 1), m


def _cut_paste(img: np.ndarray, rng: np.random.Generator, area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A patch of the same texture taken elsewhere, rescaled, rotated and re-lit, pasted in."""
    s = img.shape[0]
    ph, pw = (rng.uniform(0.18, 0.32, 2) * s).astype(int).clip(4)
    zoom = rng.choice([0.5, 2.0])
    src = _crop(area, int(max(ph, pw) / zoom) + 1, rng)
    patch = (
        np.asarray(
            Image.fromarray((src * 255).astype(np.uint8)).resize((int(max(ph, pw)), int(max(ph, pw))), Image.BILINEAR),
            dtype=np.float32,
        )
        / 255
    )
    patch = np.rot90(patch, k=int(rng.integers(1, 4)))[:ph, :pw]
    gain = rng.uniform(0.65, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.45)
    top, left = int(rng.integers(0, s - ph + 1)), int(rng.integers(0, s - pw + 1))
    out = img.copy()
    out[top : top + ph, left : left + pw] = (patch * gain).clip(0, 1)
    m = np.zeros((s, s), bool)
    m[top : top + ph, left : left + pw] = True
    return out, m


_DEFECT_FNS = {"scratch": _scratch, "color_blob": _color_blob, "cut_paste": _cut_paste}


def _disk(s: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean (s, s) disk of radius 10-20 % of ``s``, wholly inside."""
    from skimage.draw import disk

    radius = rng.uniform(0.1, 0.2) * s
    centre = rng.uniform(radius, s - radius, 2)
    m = np.zeros((s, s), bool)
    m[disk(tuple(centre), radius, shape=(s, s))] = True
    return m


def _pasted_patch(img: np.ndarray, rng: np.random.Generator, donors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle of another photo pasted in (one photo only: of another place of it, turned by 90 degrees)."""
    s = img.shape[0]
    ph, pw = (rng.uniform(0.2, 0.35, 2) * s).astype(int).clip(4)
    if len(donors) > 1:
        patch = _crop(donors[int(rng.integers(1, len(donors)))], ph, rng, pw)  # donors[0] is the photo itself
    else:
        patch = np.rot90(_crop(donors[0], pw, rng, ph))
    top, left = int(rng.integers(0, s - ph + 1)), int(rng.integers(0, s - pw + 1))
    out = img.copy()
    out[top : top + ph, left : left + pw] = patch
    m = np.zeros((s, s), bool)
    m[top : top + ph, left : left + pw] = True
    return out, m


def _blurred_disk(img: np.ndarray, rng: np.random.Generator, donors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A disk of the crop blurred (Gaussian, sigma 25-40 % of the disk's radius, at least 1.5 px): lost detail."""
    from scipy.ndimage import gaussian_filter

    m = _disk(img.shape[0], rng)
    radius = np.sqrt(m.sum() / np.pi)
    sigma = max(1.5, rng.uniform(0.25, 0.4) * radius)
    out = img.copy()
    out[m] = gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect")[m]
    return out, m


def _tinted_disk(img: np.ndarray, rng: np.random.Generator, donors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A disk of the crop tinted with a random saturated colour; the detail shows through, dark areas are tinted too."""
    import colorsys

    m = _disk(img.shape[0], rng)
    color = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), 1.0))
    alpha = rng.uniform(0.4, 0.6)
    out = img.copy()
    out[m] = (1 - alpha) * out[m] + alpha * color * (0.35 + 0.65 * out[m].mean(-1, keepdims=True))
    return out.clip(0, 1), m


_PHOTO_DEFECT_FNS = {"pasted_patch": _pasted_patch, "blurred_disk": _blurred_disk, "tinted_disk": _tinted_disk}


def _texture_areas(texture: str, size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) regions of a texture as (H, W, 3) float32, upsampled by an integer factor when
    ``size`` is larger than the test region."""
    img = embedded_image(texture)
    factor = -(-size // min(region(img, "val").shape[-2:]))
    if factor > 1:
        img = torch.nn.functional.interpolate(img[None], scale_factor=factor, mode="bilinear", align_corners=False)[
            0
        ].clamp(0, 1)
    return tuple(region(img, split).permute(1, 2, 0).numpy().astype(np.float32) for split in ("train", "val"))


def _write_texture(root: Path, texture: str, cfg: BenchmarkConfig) -> None:
    train_area, test_area = _texture_areas(texture, cfg.size)
    cat = root / texture
    for i in range(cfg.train):
        _save(_crop(train_area, cfg.size, _rng(cfg, texture, 0, i)), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(cfg.test_good):
        _save(_crop(test_area, cfg.size, _rng(cfg, texture, 1, i)), cat / "test" / "good" / f"{i:03d}.png")
    for k, defect in enumerate(DEFECTS):
        for i in range(cfg.test_defect):
            rng = _rng(cfg, texture, 2 + k, i)
            img, mask = _DEFECT_FNS[defect](_crop(test_area, cfg.size, rng), rng, test_area)
            _save(img, cat / "test" / defect / f"{i:03d}.png")
            write_image(mask.astype(np.uint8) * 255, cat / "ground_truth" / defect / f"{i:03d}_mask.png")


def _photo_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted (hidden files left out)."""
    if not folder.is_dir():
        raise RFIError(f"--from {folder}: not a folder: give a folder of photos")
    try:
        files = sorted(
            f
            for f in folder.iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
        )
    except OSError as e:
        raise RFIError(f"--from {folder}: cannot be read ({e.strerror}): check its permissions") from None
    if not files:
        raise RFIError(f"--from {folder}: holds no images ({', '.join(IMAGE_EXTENSIONS)}): put photos in it")
    return files


def _category_names(files: list[Path]) -> list[str]:
    """One category per photo: its file name without the extension (with it, ``a_jpg``, where two names clash)."""
    stems = [f.stem for f in files]
    return [f.stem if stems.count(f.stem) == 1 else f.name.replace(".", "_") for f in files]


def _read_photos(folder: Path, cfg: BenchmarkConfig) -> dict[str, tuple[Path, torch.Tensor]]:
    """Category -> (file, (3, H, W) image) of every usable photo; unreadable and too small ones named and skipped.

    Raises:
        RFIError: ``folder`` is missing, unreadable or holds no images; or no photo in it can be used
            (each named with the reason).
    """
    files = _photo_files(folder)
    photos: dict[str, tuple[Path, torch.Tensor]] = {}
    skipped: list[str] = []
    for name, path in zip(_category_names(files), files):
        try:
            img = read_image(path)
        except RFIError as e:
            skipped.append(f"{e}")
            continue
        if cfg.photo_side is not None:
            h, w = img.shape[-2:]
            scale = cfg.photo_side / min(h, w)
            img = torch.nn.functional.interpolate(
                img[None], size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True
            )[0].clamp(0, 1)
        try:
            photo_tiles(*img.shape[-2:], cfg.size)
        except RFIError:
            skipped.append(
                f"{path} is {img.shape[-1]}x{img.shape[-2]} px"
                + (f" (at benchmark.photo_side={cfg.photo_side})" if cfg.photo_side is not None else "")
                + f": too small for benchmark.size={cfg.size} (it must hold three tiles of that side: a train "
                f"and a test part)"
            )
            continue
        photos[name] = (path, img)
    if not photos:
        raise RFIError(
            f"--from {folder}: no photo can be used ({'; '.join(skipped[:3])}"
            + (f"; +{len(skipped) - 3} more" if len(skipped) > 3 else "")
            + "): use larger photos or a smaller benchmark.size"
        )
    for reason in skipped:
        log.warning("skipped %s", reason)
    return photos


def photo_tiles(height: int, width: int, size: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """The train / test split of a photo: a grid of tiles (``top, left, bottom, right``), tile (r, c) a test tile
    when ``(r + c) % 3 == 2``, so both splits spread over the whole scene and a third of it is test.

    Tiles are twice the crop side (``size``) where the grid then has a train and a test tile, else the crop side;
    crops are drawn inside one tile, so no test pixel is seen in training.

    Raises:
        RFIError: the photo has room for fewer than three crop-sized tiles.

    Example:
        >>> split = photo_tiles(128, 384, 64)  # a 1 x 3 grid of 128-px tiles
        >>> split["train"], split["test"]
        ([(0, 0, 128, 128), (0, 128, 128, 256)], [(0, 256, 128, 384)])
    """
    for side in (2 * size, size):
        rows, cols = height // side, width // side
        if rows * cols < 3:
            continue
        ys, xs = np.linspace(0, height, rows + 1).astype(int), np.linspace(0, width, cols + 1).astype(int)
        split: dict[str, list[tuple[int, int, int, int]]] = {"train": [], "test": []}
        for r in range(rows):
            for c in range(cols):
                box = (int(ys[r]), int(xs[c]), int(ys[r + 1]), int(xs[c + 1]))
                split["test" if (r + c) % 3 == 2 else "train"].append(box)
        return split
    raise RFIError(f"{width}x{height} px has room for fewer than three {size}-px tiles")


def _tile_crop(
    image: np.ndarray, tiles: list[tuple[int, int, int, int]], size: int, rng: np.random.Generator
) -> np.ndarray:
    """A random ``size`` crop inside a random tile of ``tiles`` of the (H, W, 3) ``image``."""
    top, left, bottom, right = tiles[int(rng.integers(len(tiles)))]
    return _crop(image[top:bottom, left:right], size, rng)


def photo_defect(
    image: np.ndarray,
    tiles: list[tuple[int, int, int, int]],
    defect: str,
    donors: list[np.ndarray],
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(clean crop, defective crop, mask, visibility) of one test image: drawn (crop and placement) until the mean
    change inside the mask reaches :data:`VISIBLE`, at most :data:`DRAWS` times (then the most visible draw)."""
    best = None
    for _ in range(DRAWS):
        clean = _tile_crop(image, tiles, size, rng)
        img, mask = _PHOTO_DEFECT_FNS[defect](clean, rng, donors)
        visibility = float(np.abs(img - clean).mean(-1)[mask].mean())
        if best is None or visibility > best[3]:
            best = (clean, img, mask, visibility)
        if visibility >= VISIBLE:
            break
    return best


def _write_photo(root: Path, name: str, images: dict[str, np.ndarray], cfg: BenchmarkConfig) -> None:
    """One category: crops of photo ``name`` (``images``: every photo as (H, W, 3), the donors of pasted patches)."""
    image = images[name]
    tiles = photo_tiles(*image.shape[:2], cfg.size)
    donors = [image, *(other for key, other in images.items() if key != name)]
    cat = root / name
    for i in range(cfg.train):
        crop = _tile_crop(image, tiles["train"], cfg.size, _photo_rng(cfg, name, 0, i))
        _save(crop, cat / "train" / "good" / f"{i:03d}.png")
    for i in range(cfg.test_good):
        _save(
            _tile_crop(image, tiles["test"], cfg.size, _photo_rng(cfg, name, 1, i)),
            cat / "test" / "good" / f"{i:03d}.png",
        )
    for k, defect in enumerate(PHOTO_DEFECTS):
        faint = []
        for i in range(cfg.test_defect):
            _, img, mask, visibility = photo_defect(
                image, tiles["test"], defect, donors, cfg.size, _photo_rng(cfg, name, 2 + k, i)
            )
            if visibility < VISIBLE:
                faint.append(visibility)
            _save(img, cat / "test" / defect / f"{i:03d}.png")
            write_image(mask.astype(np.uint8) * 255, cat / "ground_truth" / defect / f"{i:03d}_mask.png")
        if faint:
            log.warning(
                "%s: %d of %d %s images change their mask by less than %d grey levels (at most %.1f): the photo's "
                "test tiles have too little detail for this defect to be seen",
                name, len(faint), cfg.test_defect, defect, round(VISIBLE * 255), max(faint) * 255,
            )  # fmt: skip


def photo_controls(
    photos: str | os.PathLike, category: str, cfg: BenchmarkConfig
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two controls of a photo category that :func:`make_benchmark` builds from ``photos`` with ``cfg``.

    They tell apart the two reasons a detector can miss on such a set: normal test crops that already look
    anomalous (the test tiles show parts of the scene the training crops do not), and defects that do not
    change the score. They are generated again from the same seeds, not written into the set (which keeps
    the MVTec layout).

    Args:
        photos: the folder the benchmark was made from.
        category: one of its categories (a photo's name).
        cfg: the benchmark's settings.

    Returns:
        ``(held_out, clean)``: ``cfg.test_good`` crops of the *training* tiles, drawn with their own seeds
        (not the training images, but from the same part of the scene), and the crop under each defect
        image before its defect was added, in the order of the set's files (``test/<defect>/NNN.png``, the
        defects in :data:`PHOTO_DEFECTS` order). (size, size, 3) float32 arrays in [0, 1], on the 8-bit
        levels of the set's files.

    Raises:
        RFIError: ``category`` is not a usable photo of ``photos``.

    Example:
        >>> from encoders.data.unseen import unseen_folder
        >>> held_out, clean = photo_controls(unseen_folder("/tmp/rfi-doc-unseen"), "coins", BenchmarkConfig(
        ...     size=32, test_good=2, test_defect=1))
        >>> len(held_out), len(clean), clean[0].shape
        (2, 3, (32, 32, 3))
    """
    cfg = check_config(cfg, "the benchmark settings")
    found = _read_photos(Path(photos), cfg)
    if category not in found:
        raise RFIError(f"no usable photo '{category}' in {photos} (photos: {', '.join(found)})")
    images = {name: img.permute(1, 2, 0).numpy().astype(np.float32) for name, (_, img) in found.items()}
    image = images[category]
    tiles = photo_tiles(*image.shape[:2], cfg.size)
    held_out_key = 2 + len(PHOTO_DEFECTS)  # after the keys of train (0), test/good (1) and each defect
    held_out = [
        _tile_crop(image, tiles["train"], cfg.size, _photo_rng(cfg, category, held_out_key, i))
        for i in range(cfg.test_good)
    ]
    donors = [image, *(other for key, other in images.items() if key != category)]
    clean = [
        photo_defect(image, tiles["test"], defect, donors, cfg.size, _photo_rng(cfg, category, 2 + k, i))[0]
        for k, defect in enumerate(PHOTO_DEFECTS)
        for i in range(cfg.test_defect)
    ]
    return [_uint8(x).astype(np.float32) / 255 for x in held_out], [_uint8(x).astype(np.float32) / 255 for x in clean]


def _uint8(img: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] on 8-bit levels, as the set's files store it."""
    return (img * 255).round().clip(0, 255).astype(np.uint8)


def _save(img: np.ndarray, path: Path) -> None:
    write_image(_uint8(img), path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_benchmark(
    out: str | os.PathLike, cfg: BenchmarkConfig | None = None, photos: str | os.PathLike | None = None
) -> Path:
    """Write an anomaly benchmark in the MVTec AD layout (deterministic: same config and photos, same files).

    Each category gets ``train/good`` (``cfg.train`` crops of its training part: a texture's first two thirds,
    a photo's training tiles), ``test/good`` (``cfg.test_good`` crops of its test part: the last third, the
    test tiles), ``test/<defect>`` (``cfg.test_defect`` crops of the test part per defect type, one defect
    each) and ``ground_truth/<defect>/<name>_mask.png``.
    The tree is built in a temporary folder and renamed into place, so a killed run leaves nothing
    half-written. A folder already holding the same benchmark is reused as is.

    Args:
        out: destination folder; gets one category folder per texture or photo and ``benchmark.json``.
        cfg: sizes, counts and seed (default :class:`BenchmarkConfig`).
        photos: a folder of photos (``--from``): one category per photo, named after its file,
            with the defects :data:`PHOTO_DEFECTS`; photos unreadable or too small for ``cfg.size``
            are named in a warning and skipped. ``None``: the embedded textures ``cfg.textures``
            with the defects :data:`DEFECTS`.

    Returns:
        ``out``, an MVTec AD root (for ``rfi anomaly fit/score --data out --category NAME``).

    Raises:
        RFIError: bad settings; ``photos`` missing, unreadable, without images or without a usable
            photo; ``out`` holds something else (never overwritten), or cannot be written (checked
            first; a full disk midway is one line too, nothing left behind).
    """
    cfg = check_config(cfg or BenchmarkConfig(), "the benchmark settings")
    out = Path(out)
    if photos is None:
        if not cfg.textures:
            raise RFIError(f"benchmark.textures is empty: name one or more of {', '.join(EMBEDDED_TEXTURES)}")
        kind, manifest = "an embedded", _manifest(cfg)
        categories = list(cfg.textures)
    else:
        found = _read_photos(Path(photos), cfg)
        kind = "a photo"
        manifest = _manifest(cfg, {name: _sha256(path) for name, (path, _) in found.items()}, Path(photos).resolve())
        categories = list(found)
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old == manifest:
            return out
        diff = sorted(k for k in manifest if not isinstance(old, dict) or old.get(k) != manifest[k])
        raise RFIError(
            f"{out} holds a benchmark made with other settings ({', '.join(diff)}): choose another folder or delete it"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RFIError(f"{out} exists and is not {kind} benchmark folder: choose another folder")
    check_output_folder(out, flag="benchmark folder")  # read-only, too long a name...: one line, before any work
    with reported_writes(out, "benchmark folder"):  # a full disk: one line, the temporary tree removed
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            if photos is None:
                for texture in categories:
                    _write_texture(tmp, texture, cfg)
            else:
                images = {name: img.permute(1, 2, 0).numpy().astype(np.float32) for name, (_, img) in found.items()}
                for name in categories:
                    _write_photo(tmp, name, images, cfg)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            if out.is_dir():
                out.rmdir()  # empty (checked above)
            try:
                os.replace(tmp, out)
            except OSError:  # another process made the same benchmark meanwhile
                if not (out / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the anomaly benchmark (%s) to %s", ", ".join(categories), out)
    return out


def cache_dir() -> Path:
    """Where generated data is cached: ``$RFI_CACHE_DIR``, else ``~/.cache/rfi``."""
    return Path(os.environ.get("RFI_CACHE_DIR") or Path.home() / ".cache" / "rfi")


def embedded_benchmark(cfg: BenchmarkConfig | None = None) -> Path:
    """The embedded benchmark for ``cfg``, generated into the cache on first use (see :func:`make_benchmark`)."""
    cfg = cfg or BenchmarkConfig()
    key = hashlib.sha1(json.dumps(_manifest(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return make_benchmark(cache_dir() / "anomaly_benchmark" / f"embedded_mvtec_{cfg.size}px_{key}", cfg)
