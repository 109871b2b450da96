"""Image and pixel metrics of anomaly scores: AUROC and F1 at the best threshold, and their table.

:func:`image_metrics` scores images with scikit-learn; pixel metrics stream map by map into a
histogram (:class:`PixelMetrics`), so their memory does not grow with the number of images.
An undefined metric (a test set of one class) is ``None`` with a note saying why, never NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from encoders.core.errors import RFIError


def image_metrics(labels: Sequence[int], scores: Sequence[float]) -> dict[str, Any]:
    """Image AUROC and the F1 score at its best threshold (scikit-learn).

    Args:
        labels: 0 (normal) / 1 (anomalous) per image.
        scores: higher = more anomalous.

    Returns:
        ``{"auroc", "f1", "threshold"}``; when only one class is present the values are
        ``None`` and ``"note"`` says why (AUROC is undefined), never NaN.

    Example:
        >>> image_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["auroc"]
        1.0
    """
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n0 == 0 or n1 == 0:
        what = (
            "no images" if len(y) == 0 else (f"all {len(y)} are normal" if n1 == 0 else f"all {len(y)} are anomalous")
        )
        return {
            "auroc": None,
            "f1": None,
            "threshold": None,
            "note": f"AUROC undefined: the labelled test set has a single class ({what}); "
            f"it needs both normal and anomalous images",
        }
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return {"auroc": float(roc_auc_score(y, s)), "f1": float(f1[best]), "threshold": float(thresholds[best])}


PIXEL_BINS = 1 << 20
"""Bins of the streaming pixel metrics (:class:`PixelMetrics`): float32 scores cut to their top 20 bits."""
PIXEL_METHOD = (
    "streaming histogram: 2^20 bins, float32 scores truncated to sign, exponent and 11 mantissa "
    "bits (bin width at most 2^-11 of the value); AUROC (Mann-Whitney) and best F1 exact for the "
    "binned scores, pixels sharing a bin counted as ties"
)
"""How :func:`apps.anomaly.scoring.score` computes pixel AUROC and F1 (``metrics.json`` key ``pixel_method``)."""


def _score_bins(scores: np.ndarray) -> np.ndarray:
    """Monotone bin in [0, PIXEL_BINS) of float32 scores: the bit pattern in number order, top 20 bits."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.int32)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # sign-magnitude -> two's complement: float order
    return (ordered >> 12) + PIXEL_BINS // 2


def _bin_floor(b: int) -> float:
    """The smallest float32 in bin ``b`` of :func:`_score_bins`."""
    ordered = np.int32((b - PIXEL_BINS // 2) << 12)
    return float((ordered ^ np.int32(0x7FFFFFFF) if ordered < 0 else ordered).view(np.float32))


class PixelMetrics:
    """Pixel AUROC and F1 at the best threshold over any number of maps, in memory that does not grow.

    Each :meth:`update` adds a map's pixels to per-bin counts of normal and anomalous pixels
    (:data:`PIXEL_BINS` bins, 16 MiB in all); :meth:`result` computes the metrics from the
    counts (:data:`PIXEL_METHOD`): exact for the scores rounded to their bins, so close to
    scikit-learn's on all pixels (docs/anomaly.md gives the difference and the time per map).

    Example:
        >>> import torch
        >>> pm = PixelMetrics()
        >>> pm.update(torch.tensor([[True, False]]), torch.tensor([[2.0, 1.0]]))
        >>> pm.result()["auroc"]
        1.0
    """

    def __init__(self) -> None:
        self.counts = np.zeros(2 * PIXEL_BINS, np.int64)  # [normal pixels per bin | anomalous pixels per bin]

    def update(self, mask: Tensor, amap: Tensor) -> None:
        """Add one map: ``mask`` boolean ground truth and ``amap`` scores, same shape."""
        if mask.shape != amap.shape:
            raise RFIError(f"mask {tuple(mask.shape)} and map {tuple(amap.shape)} differ in shape")
        bins = _score_bins(amap.detach().float().cpu().numpy().ravel())
        bins += mask.cpu().numpy().ravel().astype(bool) * PIXEL_BINS
        self.counts += np.bincount(bins, minlength=2 * PIXEL_BINS)

    def result(self) -> dict[str, Any]:
        """As :func:`image_metrics`, per pixel (``threshold``: the lower edge of the best bin)."""
        neg, pos = self.counts[:PIXEL_BINS].astype(np.float64), self.counts[PIXEL_BINS:].astype(np.float64)
        n0, n1 = neg.sum(), pos.sum()
        if n0 == 0 or n1 == 0:
            what = (
                "no pixels"
                if n0 + n1 == 0
                else (f"all {n0 + n1:.0f} are normal" if n1 == 0 else f"all {n0 + n1:.0f} are anomalous")
            )
            return {
                "auroc": None,
                "f1": None,
                "threshold": None,
                "note": f"AUROC undefined: the ground truth has a single class ({what}); "
                f"it needs both normal and anomalous pixels",
            }
        below = np.cumsum(neg) - neg  # normal pixels in lower bins
        auroc = float((pos * (below + 0.5 * neg)).sum() / (n0 * n1))
        tp, fp = np.cumsum(pos[::-1])[::-1], np.cumsum(neg[::-1])[::-1]  # flagged when in bin >= b
        f1 = 2 * tp / np.maximum(tp + fp + n1, 1e-12)
        best = int(np.argmax(f1))
        return {"auroc": auroc, "f1": float(f1[best]), "threshold": _bin_floor(best)}


def pixel_metrics(masks: Iterable[Tensor], maps: Iterable[Tensor]) -> dict[str, Any]:
    """Pixel AUROC and pixel F1 at the best threshold over all pixels of all images (:class:`PixelMetrics`).

    Args:
        masks: boolean (h, w) ground truth per image (all False for normal images).
        maps: (h, w) anomaly maps of the same sizes.

    Returns:
        As :func:`image_metrics`, per pixel; ``threshold`` is a bin edge (:data:`PIXEL_METHOD`).
    """
    pm = PixelMetrics()
    for mask, amap in zip(masks, maps):
        pm.update(mask, amap)
    return pm.result()


def format_metrics(m: dict[str, Any]) -> str:
    """The metrics of :func:`apps.anomaly.scoring.score` as a text table (AUROC / F1 in %; ``n/a`` where undefined)."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    head = (
        f"{'category':<12} {'images':>6} {'normal':>6} {'anomalous':>9} {'image AUROC':>11} "
        f"{'pixel AUROC':>11} {'image F1':>8} {'pixel F1':>8}"
    )
    lines = [
        head,
        "-" * len(head),
        f"{str(m.get('category') or '-'):<12} {m['images']:>6} {m['normal']:>6} {m['anomalous']:>9} "
        f"{pct(m['image_auroc']):>11} {pct(m['pixel_auroc']):>11} {pct(m['image_f1']):>8} {pct(m['pixel_f1']):>8}",
    ]
    for d, v in (m.get("per_defect") or {}).items():
        lines.append(f"  {d:<20} image AUROC {pct(v):>6}")
    lines += [f"note: {n}" for n in m.get("notes", [])]
    return "\n".join(lines)
