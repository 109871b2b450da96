"""The embedded anomaly benchmark: textures with synthetic defects, written in the MVTec AD layout.

Generated deterministically from scikit-image's shipped textures (``brick``, ``grass``,
``gravel``; :class:`~apps.anomaly.config.BenchmarkConfig`): normal training images are crops
of the first two thirds of each texture, test images crops of the last third (so no test
pixel was seen in training), and two thirds of the test images carry one synthetic defect, a
``scratch``, a ``color_blob`` or a ``cut_paste`` patch, with its mask. ``rfi anomaly
make-benchmark`` writes it (:func:`make_benchmark`); ``--data embedded`` generates it into the
cache on first use (:func:`embedded_benchmark`).

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
from encoders.core.imageio import write_image
from encoders.data.embedded import EMBEDDED_TEXTURES, embedded_image, region

log = logging.getLogger("rfi")

DEFECTS = ("scratch", "color_blob", "cut_paste")
BENCHMARK_VERSION = 1
MANIFEST = "benchmark.json"


def _manifest(cfg: BenchmarkConfig) -> dict:
    return {"format": "rfi-anomaly-benchmark", "version": BENCHMARK_VERSION, **asdict(cfg)}


def _rng(cfg: BenchmarkConfig, texture: str, *key: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, EMBEDDED_TEXTURES.index(texture), *key])


def _crop(area: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top = int(rng.integers(0, area.shape[0] - size + 1))
    left = int(rng.integers(0, area.shape[1] - size + 1))
    return area[top : top + size, left : left + size].copy()


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


def _save(img: np.ndarray, path: Path) -> None:
    write_image((img * 255).round().clip(0, 255).astype(np.uint8), path)


def make_benchmark(out: str | os.PathLike, cfg: BenchmarkConfig | None = None) -> Path:
    """Write the embedded benchmark in the MVTec AD layout (deterministic: same config, same files).

    The tree is built in a temporary folder and renamed into place, so a killed run leaves
    nothing half-written. A folder already holding the same benchmark is reused as is.

    Args:
        out: destination folder; gets one category folder per texture and ``benchmark.json``.
        cfg: sizes, counts and seed (default :class:`BenchmarkConfig`).

    Returns:
        ``out``, an MVTec AD root (categories ``brick``, ``grass``, ``gravel``).

    Raises:
        RFIError: bad settings, ``out`` holds something else (never overwritten), or cannot be
            written (checked first; a full disk midway is one line too, nothing left behind).
    """
    cfg = check_config(cfg or BenchmarkConfig(), "the benchmark settings")
    if not cfg.textures:
        raise RFIError(f"benchmark.textures is empty: name one or more of {', '.join(EMBEDDED_TEXTURES)}")
    out = Path(out)
    manifest = _manifest(cfg)
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old == manifest:
            return out
        diff = sorted(k for k in manifest if not isinstance(old, dict) or old.get(k) != manifest[k])
        raise RFIError(
            f"{out} holds an embedded benchmark made with other settings ({', '.join(diff)}): "
            f"choose another folder or delete it"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RFIError(f"{out} exists and is not an embedded benchmark folder: choose another folder")
    check_output_folder(out, flag="benchmark folder")  # read-only, too long a name...: one line, before any work
    with reported_writes(out, "benchmark folder"):  # a full disk: one line, the temporary tree removed
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            for texture in cfg.textures:
                _write_texture(tmp, texture, cfg)
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
    log.info("wrote the embedded anomaly benchmark (%s) to %s", ", ".join(cfg.textures), out)
    return out


def cache_dir() -> Path:
    """Where generated data is cached: ``$RFI_CACHE_DIR``, else ``~/.cache/rfi``."""
    return Path(os.environ.get("RFI_CACHE_DIR") or Path.home() / ".cache" / "rfi")


def embedded_benchmark(cfg: BenchmarkConfig | None = None) -> Path:
    """The embedded benchmark for ``cfg``, generated into the cache on first use (see :func:`make_benchmark`)."""
    cfg = cfg or BenchmarkConfig()
    key = hashlib.sha1(json.dumps(_manifest(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return make_benchmark(cache_dir() / "anomaly_benchmark" / f"embedded_mvtec_{cfg.size}px_{key}", cfg)
