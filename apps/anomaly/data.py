"""Finding anomaly-detection data: normal training images, test images, their labels and masks.

Layouts read by :func:`load_anomaly_data`:

- **MVTec AD**: ``<category>/train/good/*.png`` (normal training images),
  ``<category>/test/<defect>/*.png`` (``good`` = normal) and
  ``<category>/ground_truth/<defect>/<name>_mask.png`` (``test/good`` has no masks). The
  path may be a category folder or the dataset root (then ``category`` picks one).
- **Plain folders**: a folder with ``normal/`` (training images) and ``test/``; the test
  labels come from a CSV ``name,label`` (``labels.csv`` next to ``test/`` or inside it, or
  given explicitly), or from sub-folders of ``test/`` (``good`` = normal, anything else =
  anomalous). A flat folder of images is also accepted: as the normal images when fitting,
  as (unlabelled unless a CSV is given) test images when scoring.
- ``embedded`` (:func:`resolve_data`): the generated benchmark (:mod:`apps.anomaly.benchmark`).

Example:
    >>> from apps.anomaly.benchmark import make_benchmark
    >>> root = make_benchmark("/tmp/rfi-doc-bench", BenchmarkConfig(train=4, test_good=2, test_defect=1))
    >>> data = load_anomaly_data(root, category="grass")
    >>> data.layout, len(data.train), sorted({t.defect for t in data.test})
    ('mvtec', 4, ['color_blob', 'cut_paste', 'good', 'scratch'])
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from apps.anomaly.benchmark import embedded_benchmark
from apps.anomaly.config import BenchmarkConfig
from encoders.core.errors import RFIError
from encoders.core.imageio import IMAGE_EXTENSIONS, open_image, read_image
from encoders.core.runtime import progress

log = logging.getLogger("rfi")

NORMAL_NAMES = ("good", "normal", "ok", "0", "false")
ANOMALOUS_NAMES = ("anomaly", "anomalous", "bad", "defect", "defective", "1", "true")


@dataclass(frozen=True)
class TestImage:
    """One test image.

    ``name``: its path relative to the test folder without extension (``scratch/003``),
    used in every output. ``label``: 0 normal, 1 anomalous, ``None`` unknown.
    ``defect``: ``good``, a defect type, or ``""`` when unknown. ``mask``: the ground-truth
    mask file (``None`` for normal images and where a layout has no masks).
    """

    path: Path
    name: str
    label: int | None
    defect: str = ""
    mask: Path | None = None


@dataclass
class AnomalyData:
    """What :func:`load_anomaly_data` found: normal training images and labelled test images."""

    root: Path
    layout: str  # "mvtec" or "folders"
    category: str | None
    train: list[Path] = field(default_factory=list)
    test: list[TestImage] = field(default_factory=list)
    has_masks: bool = False


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
    )


def _is_category(path: Path) -> bool:
    return (
        (path / "train" / "good").is_dir()
        or (path / "ground_truth").is_dir()
        or ((path / "test").is_dir() and (path / "test" / "good").is_dir() and not (path / "normal").is_dir())
    )


def mvtec_categories(root: str | os.PathLike) -> list[str]:
    """Category folders (those with ``train/good``, ``test/good`` or ``ground_truth``) under an MVTec root."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _is_category(d))


def _listing(problems: list[str], limit: int = 5) -> str:
    more = f"; (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _size(path: Path) -> tuple[int, int] | None:
    """(width, height) as read, or ``None`` when unreadable (reported when scored)."""
    try:
        with open_image(path) as im:
            return im.size
    except RFIError:
        return None


def read_mask(path: str | os.PathLike) -> Tensor:
    """A ground-truth mask file as a boolean (H, W) tensor (pixels > 127 in grey levels are anomalous).

    Raises:
        RFIError: missing or unreadable file (named; :func:`~encoders.core.imageio.open_image`).
    """
    with open_image(path) as im:
        return torch.from_numpy(np.asarray(im.convert("L")) > 127)


def ground_truth_mask(item: TestImage, size: tuple[int, int]) -> Tensor:
    """The (H, W) boolean defect mask of a test image at ``size`` (all False for a normal image)."""
    if item.mask is None:
        return torch.zeros(size, dtype=torch.bool)
    mask = read_mask(item.mask)
    if mask.shape != size:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    return mask


def _mvtec_test(cat: Path) -> tuple[list[TestImage], bool]:
    test_dir, gt_dir = cat / "test", cat / "ground_truth"
    has_masks = gt_dir.is_dir()
    items: list[TestImage] = []
    problems: list[str] = []
    defects = (
        sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if test_dir.is_dir()
        else []
    )
    masks_used: set[Path] = set()
    for defect in defects:
        for img in _images(test_dir / defect):
            name = f"{defect}/{img.stem}"
            if defect == "good":
                items.append(TestImage(img, name, 0, defect))
                continue
            mask = gt_dir / defect / f"{img.stem}_mask.png"
            if not has_masks:
                items.append(TestImage(img, name, 1, defect))
                continue
            if not mask.is_file():
                problems.append(f"test/{name}{img.suffix} has no mask ground_truth/{defect}/{img.stem}_mask.png")
                continue
            masks_used.add(mask)
            si, sm = _size(img), _size(mask)
            if si and sm and si != sm:
                problems.append(
                    f"ground_truth/{defect}/{mask.name} is {sm[0]}x{sm[1]} but its image "
                    f"test/{name}{img.suffix} is {si[0]}x{si[1]}"
                )
                continue
            if si and sm is None:
                problems.append(f"ground_truth/{defect}/{mask.name} is not a readable image")
                continue
            items.append(TestImage(img, name, 1, defect, mask))
    if has_masks:
        for mask in sorted(gt_dir.rglob("*")):
            if mask.is_file() and mask.suffix.lower() in IMAGE_EXTENSIONS and mask not in masks_used:
                stem = mask.stem[:-5] if mask.stem.endswith("_mask") else mask.stem
                problems.append(
                    f"{mask.relative_to(cat)} matches no test image (expected test/{mask.parent.name}/{stem}.png)"
                )
    if problems:
        raise RFIError(f"{cat}: {len(problems)} mask(s) do not match their images: {_listing(problems)}")
    return items, has_masks


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """A labels CSV ``name,label`` (header optional; label 0/1 or good/normal vs anomaly/bad/defect).

    Raises:
        RFIError: missing file, or a row that is not ``name,label`` (named by line number).
    """
    path = Path(path)
    if not path.is_file():
        raise RFIError(f"labels file not found: {path}")
    labels: dict[str, int] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise RFIError(f"{path}:{i}: expected 'name,label', got {','.join(row)!r}")
            name, value = row[0].strip(), row[1].strip().lower()
            if i == 1 and value == "label":
                continue  # header
            if value in NORMAL_NAMES:
                labels[name] = 0
            elif value in ANOMALOUS_NAMES:
                labels[name] = 1
            else:
                raise RFIError(
                    f"{path}:{i}: label {row[1].strip()!r} for {name!r} is not 0/1 "
                    f"(or good/normal vs anomaly/bad/defect)"
                )
    if not labels:
        raise RFIError(f"{path} holds no 'name,label' rows")
    return labels


def _folder_test(test_dir: Path, labels_file: Path | None) -> list[TestImage]:
    subdirs = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(f, d.name) for d in subdirs for f in _images(d)] + [(f, "") for f in _images(test_dir)]
    if not files:
        raise RFIError(f"no test images in {test_dir} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    labels = read_labels(labels_file) if labels_file else None
    items, unlabelled = [], []
    for f, sub in sorted(files):
        rel = f.relative_to(test_dir)
        name = rel.with_suffix("").as_posix()
        if labels is not None:
            label = next((labels[k] for k in (rel.as_posix(), f.name, name, f.stem) if k in labels), None)
            if label is None:
                unlabelled.append(rel.as_posix())
            defect = "good" if label == 0 else "anomaly"
        elif sub:
            label = 0 if sub.lower() in NORMAL_NAMES else 1
            defect = sub
        else:
            label, defect = None, ""
        items.append(TestImage(f, name, label, defect))
    if labels is not None:
        known = {
            k for it in items for k in (it.path.relative_to(test_dir).as_posix(), it.path.name, it.name, it.path.stem)
        }
        stray = [k for k in labels if k not in known]
        if unlabelled or stray:
            parts = ([f"no label for {_listing(unlabelled)}"] if unlabelled else []) + (
                [f"labels for missing images {_listing(stray)}"] if stray else []
            )
            raise RFIError(f"{labels_file} does not match {test_dir}: " + "; ".join(parts))
    return items


def load_anomaly_data(
    path: str | os.PathLike, category: str | None = None, labels: str | os.PathLike | None = None, need: str = "both"
) -> AnomalyData:
    """Find normal training images and test images in an MVTec AD tree or plain folders.

    Args:
        path: an MVTec category folder, an MVTec root (with ``category``), a folder with
            ``normal/`` and ``test/``, or a flat image folder (see the module docstring).
        category: the category under an MVTec root (may be omitted when there is only one).
        labels: a ``name,label`` CSV for the test images (plain folders).
        need: ``train``, ``test`` or ``both``: which part must be present.

    Returns:
        The :class:`AnomalyData`; test images are sorted by name.

    Raises:
        RFIError: missing folders, no normal training images, no test images, masks whose
            names or sizes do not match their images (each named), bad labels.
    """
    root = Path(path)
    if not root.is_dir():
        raise RFIError(f"data folder not found: {root}")
    cats = [] if _is_category(root) else mvtec_categories(root)
    if cats:
        if category is None:
            if len(cats) > 1:
                raise RFIError(f"{root} holds several MVTec categories: choose one with --category ({', '.join(cats)})")
            category = cats[0]
        if category not in cats:
            raise RFIError(f"no category '{category}' in {root} (found: {', '.join(cats)})")
        root = root / category
    if cats or _is_category(root):
        category = category or root.name
        data = AnomalyData(root, "mvtec", category)
        if need in ("train", "both"):
            data.train = _images(root / "train" / "good")
            if not data.train:
                raise RFIError(
                    f"category '{category}' has no normal training images "
                    f"(expected image files in {root / 'train' / 'good'})"
                )
        if need in ("test", "both"):
            if labels is not None:
                raise RFIError("--labels is for plain folders; the MVTec layout labels images by test/<defect>/")
            data.test, data.has_masks = _mvtec_test(root)
            if not data.test:
                raise RFIError(f"category '{category}' has no test images (expected {root / 'test'}/<defect>/*.png)")
        return data

    data = AnomalyData(root, "folders", None)
    pair = (root / "normal").is_dir() or (root / "test").is_dir()
    if need in ("train", "both"):
        normal = root / "normal" if pair else root
        data.train = _images(normal)
        if not data.train:
            raise RFIError(f"no normal training images in {normal} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if need in ("test", "both"):
        test_dir = root / "test" if pair else root
        if not test_dir.is_dir():
            raise RFIError(f"no test folder: expected {test_dir}")
        if labels is None:
            labels = next((p for p in (root / "labels.csv", test_dir / "labels.csv") if p.is_file()), None)
        data.test = _folder_test(test_dir, Path(labels) if labels else None)
    return data


def resolve_data(
    path: str | os.PathLike,
    category: str | None,
    benchmark: BenchmarkConfig,
    need: str,
    labels: str | os.PathLike | None = None,
) -> AnomalyData:
    """:func:`load_anomaly_data`, with ``embedded`` meaning the generated benchmark (:func:`embedded_benchmark`)."""
    if str(path) == "embedded":
        path = embedded_benchmark(benchmark)
    return load_anomaly_data(path, category, labels, need)


def readable_images(paths: Sequence[Path]) -> list[Path]:
    """The images that can be read; unreadable ones are skipped and named in the log."""
    out = []
    for p in progress(paths, desc="checking images", unit="img"):
        try:
            read_image(p)
            out.append(p)
        except RFIError as e:
            log.warning("skipping %s", e)
    return out
