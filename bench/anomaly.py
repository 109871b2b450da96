"""Anomaly detection benchmarks: the embedded textures (methods and encoders), and sets cut from unseen photos.

**Embedded mode** (default). For every benchmark draw (``benchmark.seed``), texture (brick,
grass, gravel) and seed, side by side in one run and with the same config
(``configs/apps/anomaly.yaml``):

- ``reconstruction``: ``rfi anomaly fit --method reconstruction`` on the robust encoder (the
  decoder is trained: one model per seed, ``train.seed``);
- ``memory (robust)`` / ``memory (standard)``: ``--method memory`` (PatchCore-style bank, the
  coreset seeded by ``memory.seed``) on the robust and on the standard encoder;
- ``combined``: the reconstruction model's decoder plus the robust memory bank, standardised
  and summed (``combined:`` weights), calibrated on the same held-out normal images (what
  ``--method combined`` fits, without training the decoder twice).

Each model scores every test image once; image AUROC and pixel AUROC are computed over all
test images and per defect type (normal images + that defect). Also: fit seconds, scoring ms
per image, and the peak resident-memory growth (MiB, sampled every 10 ms) of fitting and of
scoring. Medians over the seeds; the JSON (``--out``) is rewritten after every model, so a
killed run keeps what it measured, and every measurement is kept next to its model in ``--work``
(``<model>.json``), so a run restarted on the same ``--work`` measures only what is missing (a model
fitted by a killed run and not yet measured is loaded, its fit time and memory recorded as not measured).

**Unseen mode** (``--unseen``). Sets built by ``rfi anomaly make-benchmark --from`` (:mod:`apps.anomaly.benchmark`)
from the unseen photos (:mod:`encoders.data.unseen`, one category per photo; defects
``pasted_patch``, ``blurred_disk``, ``tinted_disk``). Seed ``s`` draws set ``benchmark.seed=s`` and
seeds the models (``train.seed``, ``memory.seed``), and every method is measured on that same set:
``reconstruction``, ``memory`` and ``combined`` on the robust encoder (``--robust``), next to
``raw pixels``, the raw-pixel patch nearest-neighbour baseline (:mod:`apps.anomaly.baseline`,
``--pixel-patch``, ``--pixel-patches-per-image``); with ``--standard``, also ``memory (standard)``, the
memory bank on the standard encoder (the robust encoder's baseline). Means over seeds, and each method's paired
difference to the baseline (per seed, the mean over photos). Goal: image AUROC >= 90 %. Two controls per model
(:func:`measure_controls`) say why a method misses: ``normal shift``, how much more anomalous the normal test
crops look than normal crops held out of the photo's training part (a photo's test tiles show other parts of
the scene), and ``defect>clean``, how often a defect raises the score of its own crop at all.

    python bench/anomaly.py                                   # embedded: draws 0 and 1, 3 seeds
    python bench/anomaly.py --draws 0 --seeds 1 --figure docs/img/anomaly_memory_vs_reconstruction.png
    python bench/anomaly.py --unseen                          # unseen photos, 3 seeds
    OMP_NUM_THREADS=1 python bench/anomaly.py --unseen --tiny # smoke run: seconds, an untrained tiny encoder

Needs the encoder checkpoints (``rfi train-encoder --config configs/encoder/resnet18_robust.yaml``
and, for the embedded mode, ``..._standard.yaml``), or ``--robust`` / ``--standard`` paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.anomaly.baseline import raw_pixel_maps  # noqa: E402
from apps.anomaly.benchmark import PHOTO_DEFECTS, make_benchmark, photo_controls  # noqa: E402
from apps.anomaly.config import DEFAULT_CONFIG, AnomalyConfig, load_anomaly_config  # noqa: E402
from apps.anomaly.data import (  # noqa: E402
    AnomalyData,
    TestImage,
    ground_truth_mask,
    load_anomaly_data,
    mvtec_categories,
    read_mask,
    readable_images,
    resolve_data,
)
from apps.anomaly.detector import AnomalyDetector  # noqa: E402
from apps.anomaly.fitting import fit, split_normal  # noqa: E402
from apps.anomaly.maps import image_scores  # noqa: E402
from apps.anomaly.metrics import image_metrics, pixel_metrics  # noqa: E402
from encoders.core.errors import RFIError  # noqa: E402
from encoders.core.imageio import read_image  # noqa: E402
from encoders.core.serialization import write_json  # noqa: E402
from encoders.data.unseen import unseen_folder  # noqa: E402
from encoders.weights.shipped import resolve_checkpoint  # noqa: E402

ENCODERS = {
    "robust": "runs/encoders/resnet18_robust/checkpoint.pt",
    "standard": "runs/encoders/resnet18_standard/checkpoint.pt",
}
METHODS = ("reconstruction", "memory (robust)", "memory (standard)", "combined")
GOAL = 0.95
UNSEEN_METHODS = ("reconstruction", "memory", "memory (standard)", "combined", "raw pixels")
BASELINE = "raw pixels"
UNSEEN_GOAL = 0.90
CONTROLS = ("region_shift", "defect_above_clean")
"""The unseen mode's controls of each model (:func:`measure_controls`)."""
TINY = [  # --tiny: the shipped config shrunk to fits of a few seconds (as the test suite's anomaly fits)
    "train.steps=6",
    "train.batch_size=8",
    "train.data.size=16",
    "train.data.repeat=2",
    "train.decoder.channels=16",
    "train.decoder.min_channels=8",
    "train.sample_every=0",
    "train.log_every=2",
    "train.device=cpu",
    "device=cpu",
    "batch_size=4",
    "benchmark.size=32",
    "benchmark.train=6",
    "benchmark.test_good=3",
    "benchmark.test_defect=2",
]
TINY_PHOTOS = ["camera", "coins"]
"""--tiny: the unseen photos made into categories (the set is built from all of them)."""


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


def evaluate_raw_pixels(cfg: AnomalyConfig, data: AnomalyData, patch: int, patches_per_image: int) -> dict[str, Any]:
    """The raw-pixel baseline (:func:`apps.anomaly.baseline.raw_pixel_maps`) on the normal images a fit trains on
    (the same split), scored as a detector's maps; its "fit" is building the bank and scoring together."""
    normal = [read_image(p) for p in split_normal(readable_images(data.train), cfg.holdout)[0]]
    memory = dataclasses.replace(cfg.memory, patches_per_image=patches_per_image)
    with PeakRSS() as mem:
        start = time.perf_counter()
        maps = raw_pixel_maps(normal, [read_image(t.path) for t in data.test], patch, memory)
        seconds = time.perf_counter() - start
    out = map_metrics(data.test, maps, image_scores(maps, cfg.score.image_score, cfg.score.topk).tolist())
    out.update(fit_s=seconds, fit_peak_mib=mem.mib)
    return out


Scores = Callable[[list[torch.Tensor]], list[float]]
"""A detector as a function: (3, H, W) images in [0, 1] -> their image scores."""


def detector_scores(det: AnomalyDetector, images: list[torch.Tensor]) -> list[float]:
    """Image scores of ``images`` (batched as :func:`evaluate` does)."""
    prepared = [det.prepare(x) for x in images]
    maps = torch.cat([det.maps(x).cpu() for x in det.batches(prepared, 16)])
    return det.image_scores(maps).tolist()


def fitted_scores(model: Path) -> Scores:
    """The detector fitted into ``model`` as a scoring function."""
    return functools.partial(detector_scores, AnomalyDetector.load(model))


def combined_scores(models: tuple[Path, Path], cfg: AnomalyConfig, data: str, category: str) -> Scores:
    """``combined`` built from the reconstruction and memory models at ``models`` (:func:`combine`)."""
    det, _, _ = combine(AnomalyDetector.load(models[0]), AnomalyDetector.load(models[1]), cfg, data, category)
    return functools.partial(detector_scores, det)


def raw_pixel_scores(cfg: AnomalyConfig, data: AnomalyData, patch: int, patches_per_image: int) -> Scores:
    """The raw-pixel baseline (:func:`evaluate_raw_pixels`'s bank) as a scoring function."""
    normal = [read_image(p) for p in split_normal(readable_images(data.train), cfg.holdout)[0]]
    memory = dataclasses.replace(cfg.memory, patches_per_image=patches_per_image)

    def scores(images: list[torch.Tensor]) -> list[float]:
        maps = raw_pixel_maps(normal, images, patch, memory)
        return image_scores(maps, cfg.score.image_score, cfg.score.topk).tolist()

    return scores


def measure_controls(
    data: AnomalyData, controls: tuple[list, list], make_scores: Callable[..., Scores], *args: Any
) -> dict[str, Any]:
    """The two controls of a photo set (:func:`apps.anomaly.benchmark.photo_controls`), scored by
    ``make_scores(*args)`` in one call (the raw-pixel bank is built once):

    - ``region_shift``: AUROC of the set's normal test images against normal crops held out of the training
      part of the photo (0.5: the test part looks as normal as the training part; 1: every normal test
      image scores above every held-out one);
    - ``defect_above_clean``: the fraction of defect images scored above the same crop without its defect.
    """
    held_out, clean = ([torch.from_numpy(a).permute(2, 0, 1) for a in part] for part in controls)
    good = [t for t in data.test if t.label == 0]
    defects = [t for t in data.test if t.label == 1]
    per_defect = len(clean) // len(PHOTO_DEFECTS)
    twins = [clean[PHOTO_DEFECTS.index(t.defect) * per_defect + int(t.path.stem)] for t in defects]
    groups = [[read_image(t.path) for t in good], [read_image(t.path) for t in defects], held_out, twins]
    flat = iter(make_scores(*args)([x for group in groups for x in group]))
    s_good, s_defects, s_held, s_twins = ([next(flat) for _ in group] for group in groups)
    return {
        "region_shift": image_metrics([1] * len(s_good) + [0] * len(s_held), s_good + s_held)["auroc"],
        "defect_above_clean": statistics.fmean(d > c for d, c in zip(s_defects, s_twins)),
    }


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


def pct(v: float | None) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}"


def fit_cost(res: dict[str, Any]) -> str:
    """A record's fit seconds and peak MiB, or that an earlier run fitted the model (not measured here)."""
    if res["fit_s"] is None:
        return "not measured: an earlier run's model"
    return f"{res['fit_s']:.0f} s" + ("" if res["fit_peak_mib"] is None else f", {res['fit_peak_mib']:.0f} MiB")


def example_figure(
    dets: dict[str, dict[str, AnomalyDetector]], cfg: AnomalyConfig, path: str, defect: str = "cut_paste"
) -> Path:
    """Rows = textures; columns: input | ground truth | reconstruction map | memory (robust) map."""
    import torch.nn.functional as F

    from encoders.core.runtime import save_grid

    cols: list[list[torch.Tensor]] = [[], [], [], []]
    for cat, by_method in dets.items():
        data = resolve_data("embedded", cat, cfg.benchmark, "test")
        item = next(t for t in data.test if t.defect == defect)
        img = read_image(item.path)
        mask = read_mask(item.mask).float()[None].expand(3, -1, -1)
        row = [img, mask]
        for name in ("reconstruction", "memory (robust)"):
            det = by_method[name]
            row.append(det.overlay(img, det.maps(det.prepare(img)[None])[0]))
        for col, t in zip(cols, row):
            col.append(F.interpolate(t[None], scale_factor=2, mode="nearest")[0])
    return save_grid([torch.stack(c) for c in cols], path, max_rows=len(cols[0]))


def summarise(runs: list[dict], draws: list[int], categories: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for draw in draws:
        for cat in categories:
            for m in METHODS:
                rs = [r for r in runs if r["draw"] == draw and r["category"] == cat and r["method"] == m]
                if not rs:
                    continue
                row = {
                    k: median([r[k] for r in rs])
                    for k in (
                        "image_auroc",
                        "pixel_auroc",
                        "fit_s",
                        "fit_peak_mib",
                        "score_ms_per_image",
                        "score_peak_mib",
                    )
                }
                row["seeds"] = len(rs)
                row["per_defect"] = {
                    d: {k: median([r["per_defect"][d][k] for r in rs]) for k in ("image_auroc", "pixel_auroc")}
                    for d in rs[0]["per_defect"]
                }
                table.setdefault(f"draw {draw}", {}).setdefault(cat, {})[m] = row
    return table


def format_table(table: dict[str, Any], categories: list[str]) -> str:
    lines = []
    for draw, cats in table.items():
        head = f"{'':<9}" + "".join(f" | {m:>22}" for m in METHODS)
        lines += [f"{draw}: image AUROC / pixel AUROC (%), median over seeds", head, "-" * len(head)]
        means: dict[str, list[float]] = {m: [] for m in METHODS}
        for cat in categories:
            if cat not in cats:
                continue
            cells = []
            for m in METHODS:
                r = cats[cat].get(m)
                cells.append(f"{pct(r['image_auroc'])} / {pct(r['pixel_auroc'])}" if r else "-")
                if r and r["image_auroc"] is not None:
                    means[m].append(r["image_auroc"])
            lines.append(f"{cat:<9}" + "".join(f" | {c:>22}" for c in cells))
            defects = next(iter(cats[cat].values()))["per_defect"]
            for d in defects:
                cells = [
                    f"{pct(cats[cat][m]['per_defect'][d]['image_auroc'])} / "
                    f"{pct(cats[cat][m]['per_defect'][d]['pixel_auroc'])}"
                    if m in cats[cat]
                    else "-"
                    for m in METHODS
                ]
                lines.append(f"  {d:<7}" + "".join(f" | {c:>22}" for c in cells))
        lines.append(
            f"{'mean img':<9}" + "".join(f" | {pct(statistics.fmean(v)) if v else '  n/a':>22}" for v in means.values())
        )
        cells = []
        for m in METHODS:
            rows = [cats[c][m] for c in categories if c in cats and m in cats[c]]
            fit_s = median([r["fit_s"] for r in rows]) or 0 if rows else 0
            peak = median([r["fit_peak_mib"] for r in rows]) or 0 if rows else 0
            cells.append(f"{fit_s:.0f} s, {peak:.0f} MiB" if rows else "-")
        lines.append(f"{'fit':<9}" + "".join(f" | {c:>22}" for c in cells))
        cells = []
        for m in METHODS:
            rows = [cats[c][m] for c in categories if c in cats and m in cats[c]]
            cells.append(
                f"{median([r['score_ms_per_image'] for r in rows]) or 0:.1f} ms, "
                f"{median([r['score_peak_mib'] for r in rows]) or 0:.0f} MiB"
                if rows
                else "-"
            )
        lines.append(f"{'score':<9}" + "".join(f" | {c:>22}" for c in cells))
        lines.append("")
    return "\n".join(lines)


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise_unseen(runs: list[dict], categories: list[str], seeds: list[int]) -> dict[str, Any]:
    """Means over seeds per photo and overall, and each method's paired difference to the raw-pixel baseline.

    A seed's overall figure is the mean over the photos where every method was measured; the paired
    difference compares a method and the baseline seed by seed on those figures (mean, sd, seeds won).
    """
    keys = ("image_auroc", "pixel_auroc")
    methods = [m for m in UNSEEN_METHODS if any(r["method"] == m for r in runs)]
    by = {(r["seed"], r["category"], r["method"]): r for r in runs}
    table: dict[str, Any] = {"categories": {}, "mean": {}, "paired_vs_raw_pixels": {}}
    for cat in categories:
        for m in methods:
            rs = [by[s, cat, m] for s in seeds if (s, cat, m) in by]
            if rs:
                table["categories"].setdefault(cat, {})[m] = {
                    **{k: mean([r[k] for r in rs]) for k in keys},
                    "per_defect": {
                        d: {k: mean([r["per_defect"][d][k] for r in rs]) for k in keys} for d in rs[0]["per_defect"]
                    },
                    "fit_s": mean([r["fit_s"] for r in rs]),
                    "controls": {k: mean([r["controls"][k] for r in rs]) for k in CONTROLS},
                    "seeds": len(rs),
                }
    per_seed: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in methods}
    measured_photos: set[str] = set()
    for s in seeds:
        complete = [c for c in categories if all((s, c, m) in by for m in methods)]
        if not complete:
            continue
        measured_photos.update(complete)
        for m in methods:
            for k in keys:
                per_seed[m][k].append(statistics.fmean(by[s, c, m][k] for c in complete))
    for m in methods:
        table["mean"][m] = {k: mean(per_seed[m][k]) for k in keys} | {"seeds": len(per_seed[m]["image_auroc"])}
        table["mean"][m]["controls"] = {
            k: mean([r["controls"][k] for r in runs if r["method"] == m and r["category"] in measured_photos])
            for k in CONTROLS
        }
        if m == BASELINE or BASELINE not in methods:
            continue
        paired = {}
        for k in keys:
            diffs = [a - b for a, b in zip(per_seed[m][k], per_seed[BASELINE][k])]
            paired[k] = {
                "mean": mean(diffs),
                "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                "wins": sum(d > 0 for d in diffs),
                "seeds": len(diffs),
            }
        table["paired_vs_raw_pixels"][m] = paired
    return table


def format_unseen(table: dict[str, Any]) -> str:
    """The unseen-photos table: image / pixel AUROC (%) per photo and method, the mean, the paired difference."""
    methods = list(table["mean"])
    head = f"{'photo':<14}" + "".join(f" | {m:>18}" for m in methods)
    lines = ["image AUROC / pixel AUROC (%), mean over seeds", head, "-" * len(head)]
    for cat, row in table["categories"].items():
        cells = [f"{pct(row[m]['image_auroc'])} / {pct(row[m]['pixel_auroc'])}" if m in row else "-" for m in methods]
        lines.append(f"{cat:<14}" + "".join(f" | {c:>18}" for c in cells))
    cells = [f"{pct(table['mean'][m]['image_auroc'])} / {pct(table['mean'][m]['pixel_auroc'])}" for m in methods]
    lines += ["-" * len(head), f"{'mean':<14}" + "".join(f" | {c:>18}" for c in cells)]

    def diff(d: dict[str, Any]) -> str:
        if d["mean"] is None:
            return "n/a"
        sd = "" if d["sd"] is None else f" ± {100 * d['sd']:.1f}"
        return f"{100 * d['mean']:+.1f}{sd} ({d['wins']}/{d['seeds']})"

    for k, label in (("image_auroc", "image"), ("pixel_auroc", "pixel")):
        cells = [
            diff(table["paired_vs_raw_pixels"][m][k]) if m in table["paired_vs_raw_pixels"] else "-" for m in methods
        ]
        lines.append(f"{'vs raw ' + label:<14}" + "".join(f" | {c:>18}" for c in cells))
    for k, label in (("region_shift", "normal shift"), ("defect_above_clean", "defect>clean")):
        lines.append(f"{label:<14}" + "".join(f" | {pct(table['mean'][m]['controls'][k]):>18}" for m in methods))
    lines.append("vs raw: paired difference of the photo means, per seed (points; mean ± sd over seeds, seeds won)")
    lines.append(
        "normal shift: AUROC of the normal test crops against normal crops held out of the photo's training part "
        "(50: none); defect>clean: % of defect images scored above the same crop without the defect"
    )
    return "\n".join(lines)


def tiny_encoder(path: Path) -> Path:
    """--tiny: an untrained ResNet-18 at width 0.125 with a 3x3 stem (the test suite's tiny encoder), saved."""
    from encoders import create_encoder
    from encoders.weights.checkpoints import save_encoder

    torch.manual_seed(0)
    return save_encoder(create_encoder("resnet18", width=0.125, small_input=True, num_classes=8).eval(), path)


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


def run_unseen(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The unseen-photos mode (module docstring): every seed, photo and method; the JSON after every measurement."""
    load_before = os.getloadavg()
    tiny = TINY if args.tiny else []
    work = Path(args.work or tempfile.mkdtemp(prefix="rfi-bench-anomaly-unseen-"))
    encoder = args.robust or (str(tiny_encoder(work / "tiny_encoder.pt")) if args.tiny else ENCODERS["robust"])
    encoder = encoder_file("robust", encoder)
    standard = encoder_file("standard", args.standard) if args.standard else None
    photos = unseen_folder(work / "photos")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    base = load_anomaly_config(args.config, [*tiny, *args.overrides])
    categories = args.categories or (TINY_PHOTOS if args.tiny else None)
    runs: list[dict[str, Any]] = []

    def write(partial: bool) -> dict[str, Any]:
        cats = categories or sorted({r["category"] for r in runs})
        result = {
            "command": command,
            "mode": "unseen",
            "config": args.config,
            "overrides": [*tiny, *args.overrides],
            "seeds": seeds,
            "categories": cats,
            "encoder": encoder + (" (untrained tiny ResNet-18: a smoke run)" if args.tiny and not args.robust else ""),
            "standard_encoder": standard,
            "benchmark": vars(base.benchmark),
            "baseline": {"patch": args.pixel_patch, "patches_per_image": args.pixel_patches_per_image},
            "partial": partial,
            "table": summarise_unseen(runs, cats, seeds),
            "runs": runs,
            "machine": machine(load_before),
        }
        write_json(json.loads(json.dumps(result, default=str)), args.out)
        return result

    def record(seed: int, cat: str, method: str, res: dict[str, Any]) -> None:
        runs.append({"seed": seed, "category": cat, "method": method, **res})
        print(
            f"seed {seed} {cat:<13} {method:<15} image AUROC {pct(res['image_auroc'])}  pixel AUROC "
            f"{pct(res['pixel_auroc'])}  (fit {fit_cost(res)})",
            flush=True,
        )
        write(partial=True)

    for seed in seeds:
        common = [*tiny, *args.overrides, f"benchmark.seed={seed}", f"train.seed={seed}", f"memory.seed={seed}"]
        cfg = load_anomaly_config(args.config, [*common, f"encoder={encoder}"])
        root = make_benchmark(work / "sets" / f"seed{seed}", cfg.benchmark, photos=photos)
        for cat in categories or mvtec_categories(root):
            data = load_anomaly_data(root, category=cat)
            folder = work / "models" / f"seed{seed}"
            records: dict[str, dict[str, Any]] = {}
            fits = [("reconstruction", encoder, "reconstruction"), ("memory", encoder, "memory")]
            if standard is not None:  # the same memory bank on the baseline encoder
                fits.append(("memory (standard)", standard, "memory_standard"))
            ctl = photo_controls(photos, cat, cfg.benchmark)
            for name, enc, stem in fits:
                method = name.split(" ")[0]
                c = load_anomaly_config(args.config, [*common, f"encoder={enc}", f"method={method}", f"category={cat}"])
                model = folder / f"{cat}_{stem}.pt"
                records[name] = measured(model.with_suffix(".json"), measure_fit, c, str(root), model, data)
                checks = measured(
                    folder / f"{cat}_{stem}_controls.json", measure_controls, data, ctl, fitted_scores, model
                )
                record(seed, cat, name, {**records[name], "controls": checks})
            models = (folder / f"{cat}_reconstruction.pt", folder / f"{cat}_memory.pt")
            parts = (records["reconstruction"], records["memory"])
            combined = measured(
                folder / f"{cat}_combined.json", measure_combined, models, parts, cfg, str(root), cat, data
            )
            checks = measured(
                folder / f"{cat}_combined_controls.json", measure_controls, data, ctl, combined_scores, models, cfg,
                str(root), cat,
            )  # fmt: skip
            record(seed, cat, "combined", {**combined, "controls": checks})
            pixel = (args.pixel_patch, args.pixel_patches_per_image)
            raw = measured(folder / f"{cat}_raw_pixels.json", evaluate_raw_pixels, cfg, data, *pixel)
            checks = measured(
                folder / f"{cat}_raw_pixels_controls.json", measure_controls, data, ctl, raw_pixel_scores, cfg, data,
                *pixel,
            )  # fmt: skip
            record(seed, cat, BASELINE, {**raw, "controls": checks})
    return write(partial=False)


def merge(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """``--merge``: the runs of several result files (e.g. seeds spread over processes) in one result at ``--out``."""
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    runs = [r for part in parts for r in part["runs"]]
    draws = sorted({r["draw"] for r in runs})
    categories = [c for c in parts[0]["categories"] if any(r["category"] == c for r in runs)]
    table = summarise(runs, draws, categories)
    merged = {
        **parts[0],
        "command": command,
        "merged_from": [p["command"] for p in parts],
        "draws": draws,
        "partial": any(p["partial"] for p in parts),
        "table": table,
        "runs": runs,
        "seeds": sorted({r["seed"] for r in runs}),
    }
    write_json(merged, args.out)
    return merged


def run_embedded(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], dict[str, dict[str, Path]]]:
    """The embedded mode (module docstring): every draw, texture, seed and method; the JSON after every measurement.

    Returns the result and the model files of the figure's detectors (first draw and seed), texture -> method -> file.
    """
    load_before = os.getloadavg()
    base = load_anomaly_config(args.config, args.overrides)
    encoders = {name: encoder_file(name, getattr(args, name)) for name in ("robust", "standard")}
    categories = args.categories or list(base.benchmark.textures)
    work = Path(args.work or tempfile.mkdtemp(prefix="rfi-bench-anomaly-"))
    runs: list[dict[str, Any]] = []
    figure_models: dict[str, dict[str, Path]] = {}

    def record(draw: int, cat: str, seed: int, method: str, res: dict[str, Any], model: Path | None) -> None:
        runs.append({"draw": draw, "category": cat, "seed": seed, "method": method, **res})
        print(
            f"draw {draw} {cat:<7} seed {seed} {method:<18} image AUROC {pct(res['image_auroc'])}  pixel AUROC "
            f"{pct(res['pixel_auroc'])}  (fit {fit_cost(res)}; score "
            f"{res['score_ms_per_image']:.1f} ms/img; load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        if draw == args.draws[0] and seed == args.first_seed and model is not None:
            figure_models.setdefault(cat, {})[method] = model
        write(partial=True)

    def write(partial: bool) -> dict[str, Any]:
        table = summarise(runs, args.draws, categories)
        result = {
            "command": command,
            "config": args.config,
            "overrides": args.overrides,
            "seeds": args.seeds,
            "draws": args.draws,
            "categories": categories,
            "encoders": encoders,
            "benchmark": vars(base.benchmark),
            "partial": partial,
            "table": table,
            "runs": runs,
            "machine": machine(load_before),
        }
        write_json(json.loads(json.dumps(result, default=str)), args.out)
        return result

    for draw in args.draws:
        for cat in categories:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                common = [
                    *args.overrides,
                    f"benchmark.seed={draw}",
                    f"category={cat}",
                    f"train.seed={seed}",
                    f"memory.seed={seed}",
                ]
                cfg = load_anomaly_config(args.config, [*common, f"encoder={encoders['robust']}"])
                data = resolve_data("embedded", cat, cfg.benchmark, "test")
                folder = work / f"draw{draw}" / f"seed{seed}"
                records: dict[str, dict[str, Any]] = {}
                models: dict[str, Path] = {}
                jobs = [
                    ("reconstruction", "robust", "reconstruction"),
                    ("memory (robust)", "robust", "memory"),
                    ("memory (standard)", "standard", "memory"),
                ]
                for name, enc, method in jobs:
                    if name not in args.methods and not (name != "memory (standard)" and "combined" in args.methods):
                        continue
                    c = load_anomaly_config(args.config, [*common, f"encoder={encoders[enc]}", f"method={method}"])
                    model = models[name] = folder / f"{cat}_{method}_{enc}.pt"
                    records[name] = measured(model.with_suffix(".json"), measure_fit, c, "embedded", model, data)
                    if name in args.methods:
                        record(draw, cat, seed, name, records[name], model)
                if "combined" in args.methods:
                    pair = ("reconstruction", "memory (robust)")
                    res = measured(
                        folder / f"{cat}_combined.json",
                        measure_combined,
                        (models[pair[0]], models[pair[1]]),
                        (records[pair[0]], records[pair[1]]),
                        cfg,
                        "embedded",
                        cat,
                        data,
                    )
                    record(draw, cat, seed, "combined", res, None)
    return write(partial=False), figure_models


def embedded_verdict(table: dict[str, Any], categories: list[str]) -> list[str]:
    """The goal lines of the embedded mode: every method's AUROC against :data:`GOAL`, robust vs standard memory."""
    verdict = []
    for draw, cats in table.items():
        for m in METHODS:
            vals = [cats[c][m]["image_auroc"] for c in categories if c in cats and m in cats[c]]
            if vals:
                ok = all(v is not None and v >= GOAL for v in vals)
                verdict.append(
                    f"{draw} {m}: image AUROC >= {100 * GOAL:.0f}% on every texture: {'met' if ok else 'NOT met'}"
                )
        rs = [
            (cats[c]["memory (robust)"]["image_auroc"], cats[c]["memory (standard)"]["image_auroc"])
            for c in categories
            if c in cats and "memory (robust)" in cats[c] and "memory (standard)" in cats[c]
        ]
        if rs:
            verdict.append(
                f"{draw} memory: robust >= standard on every texture: "
                f"{'yes' if all(r >= s for r, s in rs) else 'NO'} "
                f"({', '.join(f'{pct(r).strip()} vs {pct(s).strip()}' for r, s in rs)})"
            )
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--unseen", action="store_true", help="the unseen-photos mode (see above)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="with --unseen: a smoke run (tiny sizes and budgets, photos camera and coins, an untrained tiny "
        "encoder unless --robust is given)",
    )
    parser.add_argument(
        "--robust", help=f"robust encoder checkpoint (default {ENCODERS['robust']}; --tiny: an untrained tiny one)"
    )
    parser.add_argument(
        "--standard",
        help=f"standard encoder checkpoint (default {ENCODERS['standard']}); with --unseen: also a memory row on it",
    )
    parser.add_argument(
        "--categories",
        nargs="+",
        help="textures (default: the config's benchmark.textures); with --unseen: photos (default: all)",
    )
    parser.add_argument(
        "--pixel-patch", type=int, default=5, help="--unseen: patch side of the raw-pixel baseline (default 5)"
    )
    parser.add_argument(
        "--pixel-patches-per-image",
        type=int,
        default=1024,
        help="--unseen: random patches per normal image kept by the raw-pixel baseline before its coreset "
        "(default 1024: the memory method's layer2 locations on a 64-px crop of the quickstart encoder)",
    )
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1], help="benchmark.seed values (default 0 1)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per model (train.seed, memory.seed)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds are first-seed .. first-seed + seeds - 1 (to spread seeds over processes; "
        "merge the JSONs with --merge)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="only merge the runs of these result files into --out and print the table",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--work", help="folder for models (default: a temporary folder)")
    parser.add_argument("--out", help="JSON (default bench/results/anomaly.json; --unseen: anomaly_unseen.json)")
    parser.add_argument("--figure", help="also write maps of reconstruction vs memory on cut-and-paste defects (PNG)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, for every method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    command = " ".join(["python", "bench/anomaly.py", *(argv if argv is not None else sys.argv[1:])])
    if args.tiny and not args.unseen:
        parser.error("--tiny is a smoke run of --unseen: add --unseen")
    args.out = args.out or f"bench/results/anomaly{'_unseen' if args.unseen else ''}.json"
    args.robust = args.robust or (None if args.unseen else ENCODERS["robust"])
    args.standard = args.standard or (None if args.unseen else ENCODERS["standard"])
    figure_models: dict[str, dict[str, Path]] = {}  # the embedded mode's figure: texture -> method -> model file
    try:
        if args.unseen:
            result = run_unseen(args, command)
        elif args.merge:
            result = merge(args, command)
        else:
            result, figure_models = run_embedded(args, command)
    except RFIError as e:
        print(f"bench/anomaly.py: error: {e}", file=sys.stderr)
        return 2
    print()
    if args.unseen:
        print(format_unseen(result["table"]))
        for m, row in result["table"]["mean"].items():
            v = row["image_auroc"]
            met = v is not None and v >= UNSEEN_GOAL
            print(
                f"{m}: mean image AUROC >= {100 * UNSEEN_GOAL:.0f}%: {'met' if met else 'NOT met'} ({pct(v).strip()})"
            )
    else:
        print(format_table(result["table"], result["categories"]))
        print("\n".join(embedded_verdict(result["table"], result["categories"])))
    if (
        args.figure
        and figure_models
        and all({"reconstruction", "memory (robust)"} <= set(m) for m in figure_models.values())
    ):
        figure_cfg = load_anomaly_config(args.config, [*args.overrides, f"benchmark.seed={args.draws[0]}"])
        dets = {cat: {m: AnomalyDetector.load(p) for m, p in by.items()} for cat, by in figure_models.items()}
        print(f"wrote {example_figure(dets, figure_cfg, args.figure)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
