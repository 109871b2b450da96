"""``rfi anomaly score``: a model file and test images in; scores, heat maps and metrics out.

:func:`score` maps every test image with an :class:`~apps.anomaly.detector.AnomalyDetector` and
writes ``scores.csv`` (one row per image), ``maps/<name>.png`` (heat-map overlays) and
``metrics.json`` (image AUROC, pixel AUROC where masks exist, F1 at the best threshold, per
defect type; :mod:`apps.anomaly.metrics`). Unreadable images are skipped and named.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apps.anomaly.data import AnomalyData, TestImage, ground_truth_mask
from apps.anomaly.detector import AnomalyDetector, batch_limit
from apps.anomaly.metrics import PIXEL_METHOD, PixelMetrics, image_metrics
from encoders.core.errors import RFIError
from encoders.core.files import check_finite
from encoders.core.imageio import read_image, write_image
from encoders.core.runtime import progress
from encoders.core.serialization import atomic_write, write_json

log = logging.getLogger("rfi")


def score(
    det: AnomalyDetector, data: AnomalyData, out: str | os.PathLike, batch_size: int = 16, write_maps: bool = True
) -> dict[str, Any]:
    """Score every test image of ``data``; write ``scores.csv``, ``maps/`` and ``metrics.json`` to ``out``.

    An image that cannot be read, holds NaN/Inf, is too small for the encoder or gets a map that
    is not finite is skipped (the others are scored), named in the log, in ``metrics["skipped"]``
    (names) and ``metrics["failed"]`` (``"<path>: <why>"``, one per image; the command exits 1
    when it is not empty, :func:`encoders.core.files.partial_exit`). Pixel metrics are computed at
    the working resolution (masks resized, nearest), map by map into :class:`PixelMetrics`
    (memory independent of the number of images; the method is ``metrics["pixel_method"]``).
    Images are batched by at most ``batch_size`` and :data:`~apps.anomaly.detector.BATCH_PIXELS`
    pixels (:func:`~apps.anomaly.detector.batch_limit`): at 1024 px, one image at a time.

    Returns:
        The metrics dict (also in ``<out>/metrics.json``).
    """
    out = Path(out)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    failed: list[str] = []
    pixels = PixelMetrics()
    pixel_maps = 0

    def fail(item: TestImage, error: RFIError) -> None:
        msg = str(error)
        failed.append(msg if str(item.path) in msg else f"{item.path}: {msg}")
        skipped.append(item.name)
        log.error("skipped %s", failed[-1])

    def flush(batch: list[tuple[TestImage, Tensor, Tensor]]) -> None:
        nonlocal pixel_maps
        maps = det.maps(torch.stack([x for _, _, x in batch])).cpu()
        scores = det.image_scores(maps)
        for (item, img, _), amap, s in zip(batch, maps, scores):
            if not (torch.isfinite(amap).all() and torch.isfinite(s)):
                fail(
                    item,
                    RFIError(f"the anomaly map of {item.path} holds NaN or Inf values (is the model file corrupt?)"),
                )
                continue
            rel = f"maps/{item.name}.png"
            if write_maps:
                write_image(det.overlay(img, amap), out / rel)
            rows.append(
                {
                    "name": item.name,
                    "defect": item.defect,
                    "label": "" if item.label is None else item.label,
                    "score": f"{float(s):.6g}",
                    "anomalous": int(det.threshold is not None and float(s) > det.threshold),
                    "map": rel if write_maps else "",
                }
            )
            if data.has_masks and item.label is not None:
                try:
                    pixels.update(ground_truth_mask(item, tuple(amap.shape[-2:])), amap[0])
                    pixel_maps += 1
                except RFIError as e:
                    log.warning("pixel metrics without %s: %s", item.name, e)

    batch: list[tuple[TestImage, Tensor, Tensor]] = []  # (item, image as read, image at working size)
    for item in progress(data.test, desc="scoring", unit="img"):
        try:
            img = check_finite(read_image(item.path), str(item.path))
            x = det.prepare(img)
            det.check_size(x, str(item.path))
        except RFIError as e:
            fail(item, e)
            continue
        if batch and (len(batch) == batch_limit(batch_size, x.shape) or batch[0][2].shape != x.shape):
            flush(batch)
            batch = []
        batch.append((item, img, x))
    if batch:
        flush(batch)
    if not rows:
        raise RFIError(f"no test image of {data.root} could be scored: " + "; ".join(failed))

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "scores.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))

    labelled = [r for r in rows if r["label"] != ""]
    labels = [int(r["label"]) for r in labelled]
    scores = [float(r["score"]) for r in labelled]
    notes: list[str] = []
    metrics: dict[str, Any] = {
        "category": data.category,
        "data": str(data.root),
        "images": len(rows),
        "skipped": skipped,
        "failed": failed,
        "normal": labels.count(0),
        "anomalous": labels.count(1),
        "unlabelled": len(rows) - len(labelled),
        "model_threshold": det.threshold,
    }
    if labelled:
        im = image_metrics(labels, scores)
        metrics.update(image_auroc=im["auroc"], image_f1=im["f1"], image_f1_threshold=im["threshold"])
        if "note" in im:
            notes.append("image " + im["note"])
        defects = sorted({r["defect"] for r in labelled if r["label"] == 1})
        if labels.count(0) and len(defects) > 1:
            metrics["per_defect"] = {
                d: image_metrics(
                    *zip(
                        *[(int(r["label"]), float(r["score"])) for r in labelled if r["label"] == 0 or r["defect"] == d]
                    )
                )["auroc"]
                for d in defects
            }
    else:
        metrics.update(image_auroc=None, image_f1=None)
        notes.append("no labels: image metrics not computed (give a labels CSV or test/good + test/<defect> folders)")
    if data.has_masks and pixel_maps:
        pm = pixels.result()
        metrics.update(pixel_auroc=pm["auroc"], pixel_f1=pm["f1"], pixel_method=PIXEL_METHOD)
        if "note" in pm:
            notes.append("pixel " + pm["note"])
    else:
        metrics.update(pixel_auroc=None, pixel_f1=None)
        if labelled:
            notes.append("no ground-truth masks: pixel metrics not computed")
    if skipped:
        notes.append(f"{len(skipped)} image(s) skipped (see failed): {', '.join(skipped[:5])}")
    metrics["notes"] = notes
    write_json(metrics, out / "metrics.json")
    return metrics
