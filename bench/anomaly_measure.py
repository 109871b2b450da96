"""What both modes of ``bench/anomaly.py`` measure with: fit a detector (or reuse one an earlier run fitted),
score a set's test images (image and pixel AUROC, overall and per defect type), time it and record its peak
memory; every measurement kept in ``--work`` so a restarted bench measures only what is missing.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from apps.anomaly.config import AnomalyConfig
from apps.anomaly.data import AnomalyData, TestImage, ground_truth_mask, readable_images, resolve_data
from apps.anomaly.detector import AnomalyDetector
from apps.anomaly.fitting import fit, split_normal
from apps.anomaly.metrics import image_metrics, pixel_metrics
from encoders.core.errors import RFIError
from encoders.core.imageio import read_image
from encoders.core.serialization import write_json
from encoders.weights.shipped import resolve_checkpoint

ENCODERS = {
    "robust": "runs/encoders/resnet18_robust/checkpoint.pt",
    "standard": "runs/encoders/resnet18_standard/checkpoint.pt",
}


class PeakRSS:
    """Peak growth of this process's resident memory (MiB) while the block runs (psutil, every 10 ms)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.mib = (self.peak - self.start) / 2**20


def map_metrics(items: list[TestImage], maps: torch.Tensor, scores: list[float]) -> dict[str, Any]:
    """Image and pixel AUROC of (N, 1, H, W) ``maps`` and their image ``scores``, overall and per defect type."""
    masks = [ground_truth_mask(t, tuple(m.shape[-2:])) for t, m in zip(items, maps)]

    def metrics(keep: list[int]) -> dict[str, float | None]:
        return {
            "image_auroc": image_metrics([items[i].label for i in keep], [scores[i] for i in keep])["auroc"],
            "pixel_auroc": pixel_metrics([masks[i] for i in keep], [maps[i, 0] for i in keep])["auroc"],
        }

    good = [i for i, t in enumerate(items) if t.label == 0]
    out = metrics(list(range(len(items))))
    out["per_defect"] = {
        d: metrics(good + [i for i, t in enumerate(items) if t.defect == d])
        for d in sorted({t.defect for t in items if t.label == 1})
    }
    return out


def evaluate(det: AnomalyDetector, data: AnomalyData) -> dict[str, Any]:
    """Maps of every test image (batched), then image/pixel AUROC overall and per defect; ms per image."""
    items = data.test
    images = [det.prepare(read_image(t.path)) for t in items]
    with PeakRSS() as mem:
        start = time.perf_counter()
        maps = torch.cat([det.maps(x).cpu() for x in det.batches(images, 16)])
        ms = 1000 * (time.perf_counter() - start) / len(items)
    out = map_metrics(items, maps, det.image_scores(maps).tolist())
    out.update(score_ms_per_image=ms, score_peak_mib=mem.mib, maps=maps)
    return out


def held_out(cfg: AnomalyConfig, data: str, category: str) -> list[torch.Tensor]:
    """The held-out normal images of a fit (the same split as ``fit``)."""
    found = resolve_data(data, category, cfg.benchmark, "train")
    return [read_image(p) for p in split_normal(readable_images(found.train), cfg.holdout)[1]]


def fit_timed(cfg: AnomalyConfig, data: str, path: Path) -> tuple[AnomalyDetector, float | None, float | None]:
    """``fit`` (resumed where a decoder run exists), loaded: (detector, seconds, peak MiB).

    A model an earlier run finished is loaded, not fitted again (``fit`` would build a memory bank anew):
    its seconds and MiB are ``None``, as they were not measured here."""
    if path.is_file():
        return AnomalyDetector.load(path), None, None
    with PeakRSS() as mem:
        start = time.perf_counter()
        fit(cfg, data, path, resume=True)
        seconds = time.perf_counter() - start
    return AnomalyDetector.load(path), seconds, mem.mib


def measured(path: Path, measure: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``measure(*args)``, one measurement of the bench, kept in ``path`` (JSON, written whole): a bench restarted
    on the same ``--work`` reuses it rather than scoring again, so its figures, fit seconds included, are the
    first run's."""
    if path.is_file():
        return json.loads(path.read_text())
    result = json.loads(json.dumps(measure(*args), default=str))
    write_json(result, path)
    return result


def measure_fit(cfg: AnomalyConfig, data: str, path: Path, test: AnomalyData) -> dict[str, Any]:
    """Fit (or reuse) the model at ``path`` and score ``test``: AUROCs, fit seconds and peak MiB, bank size."""
    det, fit_s, fit_mib = fit_timed(cfg, data, path)
    res = evaluate(det, test)
    res.pop("maps")
    return {**res, "fit_s": fit_s, "fit_peak_mib": fit_mib, "bank": det.info.get("memory_bank")}


def measure_combined(
    models: tuple[Path, Path],
    parts: tuple[dict[str, Any], dict[str, Any]],
    cfg: AnomalyConfig,
    data: str,
    cat: str,
    test: AnomalyData,
) -> dict[str, Any]:
    """``combined`` from the reconstruction and memory models at ``models`` (their records: ``parts``), scored on
    ``test``; its fit seconds are the two fits' and the calibration's, its peak MiB the largest of the three (both
    ``None`` when a fit was not measured)."""
    det, cal_s, cal_mib = combine(AnomalyDetector.load(models[0]), AnomalyDetector.load(models[1]), cfg, data, cat)
    res = evaluate(det, test)
    res.pop("maps")
    fits = [p["fit_s"] for p in parts]
    fit_s = None if None in fits else sum(fits) + cal_s
    peaks = [p["fit_peak_mib"] for p in parts]
    fit_mib = None if None in peaks else max(cal_mib, *peaks)
    return {**res, "fit_s": fit_s, "fit_peak_mib": fit_mib, "bank": None}


def combine(
    rec: AnomalyDetector, memory: AnomalyDetector, cfg: AnomalyConfig, data: str, category: str
) -> tuple[AnomalyDetector, float, float]:
    """``method: combined`` from a reconstruction model's decoder and a memory model's bank, calibrated on the
    same held-out normal images (what ``--method combined`` fits, without training the decoder twice):
    (detector, calibration seconds, peak MiB)."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        det = AnomalyDetector(
            rec.ae,
            cfg.score,
            cfg.image_size,
            info=dict(memory.info),
            memory=memory.memory,
            method="combined",
            combined=cfg.combined,
        )
        det.calibrate(held_out(cfg, data, category), cfg.batch_size)
        seconds = time.perf_counter() - start
    return det, seconds, mem.mib


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def pct(v: float | None) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}"


def fit_cost(res: dict[str, Any]) -> str:
    """A record's fit seconds and peak MiB, or that an earlier run fitted the model (not measured here)."""
    if res["fit_s"] is None:
        return "not measured: an earlier run's model"
    return f"{res['fit_s']:.0f} s" + ("" if res["fit_peak_mib"] is None else f", {res['fit_peak_mib']:.0f} MiB")


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """What the JSON records of the machine: versions, threads, CPU and its load before and now."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_now": os.getloadavg(),
    }


def encoder_file(name: str, spec: str) -> str:
    """The checkpoint of the ``--robust`` / ``--standard`` encoder: a file, or ``shipped:NAME`` (checked)."""
    path = str(resolve_checkpoint(spec, f"--{name}", "encoder"))
    if not Path(path).is_file():
        raise RFIError(
            f"{name} encoder checkpoint not found: {path} (train it with: rfi train-encoder "
            f"--config configs/encoder/resnet18_{name}.yaml, or pass --{name} PATH or shipped:rfi_resnet18_{name})"
        )
    return path
