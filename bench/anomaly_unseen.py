"""``bench/anomaly.py --unseen``: anomaly detection on sets cut from the unseen photos (the module docstring of
``bench/anomaly.py`` says what is measured): every seed, photo and method next to the raw-pixel baseline, and the two
controls that say why a method misses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from apps.anomaly.baseline import raw_pixel_maps
from apps.anomaly.benchmark import PHOTO_DEFECTS, make_benchmark, photo_controls
from apps.anomaly.config import AnomalyConfig, load_anomaly_config
from apps.anomaly.data import AnomalyData, TestImage, load_anomaly_data, mvtec_categories, readable_images
from apps.anomaly.detector import AnomalyDetector
from apps.anomaly.fitting import split_normal
from apps.anomaly.maps import image_scores
from apps.anomaly.metrics import image_metrics
from bench.anomaly_measure import (
    ENCODERS,
    PeakRSS,
    combine,
    encoder_file,
    fit_cost,
    machine,
    map_metrics,
    mean,
    measure_combined,
    measure_fit,
    measured,
    pct,
)
from encoders.core.errors import RFIError
from encoders.core.imageio import read_image
from encoders.core.serialization import write_json
from encoders.data.unseen import unseen_folder
from encoders.weights.zoo import sha256_file

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


def defect_twins(data: AnomalyData, clean: list) -> tuple[list[TestImage], list[torch.Tensor]]:
    """The defect images of a photo set and, for each, the same crop without its defect ((3, H, W) in [0, 1]):
    ``clean`` is :func:`apps.anomaly.benchmark.photo_controls`' second list, in the order of the set's files."""
    defects = [t for t in data.test if t.label == 1]
    per_defect = len(clean) // len(PHOTO_DEFECTS)
    twins = [clean[PHOTO_DEFECTS.index(t.defect) * per_defect + int(t.path.stem)] for t in defects]
    return defects, [torch.from_numpy(a).permute(2, 0, 1) for a in twins]


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
    held_out = [torch.from_numpy(a).permute(2, 0, 1) for a in controls[0]]
    good = [t for t in data.test if t.label == 0]
    defects, twins = defect_twins(data, controls[1])
    groups = [[read_image(t.path) for t in good], [read_image(t.path) for t in defects], held_out, twins]
    flat = iter(make_scores(*args)([x for group in groups for x in group]))
    s_good, s_defects, s_held, s_twins = ([next(flat) for _ in group] for group in groups)
    return {
        "region_shift": image_metrics([1] * len(s_good) + [0] * len(s_held), s_good + s_held)["auroc"],
        "defect_above_clean": statistics.fmean(d > c for d, c in zip(s_defects, s_twins)),
    }


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


SETUP_KEYS = ("config", "overrides", "benchmark", "baseline", "encoder_sha256", "standard_encoder_sha256")
"""What a result file records of how it was measured (the encoders by content, wherever their files are): a
``--resume`` run reuses only runs measured the same way, and ``--merge`` joins only those."""


def restored_photos(path: Path, setup: dict[str, Any]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """``--resume``: the runs of every (seed, photo) that ``path`` (an earlier run's ``--out``) measured with every
    method; a photo measured in part is measured again (its models may be gone with an earlier ``--work``).

    Raises:
        RFIError: ``path`` was measured another way (names the keys that differ).
    """
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    differ = [k for k in SETUP_KEYS if old.get(k) != setup[k]]
    if differ:
        raise RFIError(f"--resume: {path} was measured with another {', '.join(differ)}; pass another --out")
    photos: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in old["runs"]:
        photos.setdefault((r["seed"], r["category"]), []).append(r)
    methods = [m for m in UNSEEN_METHODS if setup["standard_encoder"] is not None or m != "memory (standard)"]
    return {k: rs for k, rs in photos.items() if sorted(r["method"] for r in rs) == sorted(methods)}


def run_unseen(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The unseen-photos mode (module docstring): every seed, photo and method; the JSON after every measurement.
    With ``args.resume``, the photos the JSON at ``args.out`` measured in full are kept, not measured again."""
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
    setup = json.loads(
        json.dumps(
            {
                "config": args.config,
                "overrides": [*tiny, *args.overrides],
                "benchmark": vars(base.benchmark),
                "baseline": {"patch": args.pixel_patch, "patches_per_image": args.pixel_patches_per_image},
                "encoder": encoder
                + (" (untrained tiny ResNet-18: a smoke run)" if args.tiny and not args.robust else ""),
                "standard_encoder": standard,
                "encoder_sha256": sha256_file(encoder),
                "standard_encoder_sha256": None if standard is None else sha256_file(standard),
            },
            default=str,
        )
    )
    restored = restored_photos(Path(args.out), setup) if args.resume else {}
    outside = sorted(k for k in restored if k[0] not in seeds or (categories is not None and k[1] not in categories))
    if outside:  # rewriting --out without them would lose them
        raise RFIError(
            f"--resume: {args.out} also holds seed {outside[0][0]}, photo {outside[0][1]}, which this run does not "
            "measure; give the same --first-seed, --seeds and --categories, or another --out"
        )

    def write(partial: bool) -> dict[str, Any]:
        cats = categories or sorted({r["category"] for r in runs})
        result = {
            "command": command,
            "mode": "unseen",
            **setup,
            "seeds": seeds,
            "categories": cats,
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
            if (seed, cat) in restored:
                runs.extend(restored[seed, cat])
                print(f"seed {seed} {cat:<13} kept from {args.out} (--resume)", flush=True)
                continue
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


def merge_unseen(paths: list[str], out: str, command: str) -> dict[str, Any]:
    """``--unseen --merge``: the runs of several unseen result files (seeds spread over processes or sessions),
    measured the same way, in one result at ``out``.

    Raises:
        RFIError: the files were measured in different ways (names the keys), or two hold the same seed and photo.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for path, part in zip(paths[1:], parts[1:]):
        differ = [k for k in SETUP_KEYS if part.get(k) != parts[0].get(k)]
        if differ:
            raise RFIError(f"--merge: {path} was measured with another {', '.join(differ)} than {paths[0]}")
    runs = [r for part in parts for r in part["runs"]]
    keys = [(r["seed"], r["category"], r["method"]) for r in runs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise RFIError(f"--merge: seed {twice[0][0]}, photo {twice[0][1]} is in more than one file")
    seeds = sorted({r["seed"] for r in runs})
    categories = list(dict.fromkeys(c for part in parts for c in part["categories"]))
    merged = {
        **parts[0],
        "command": command,
        "merged_from": [p["command"] for p in parts],
        "seeds": seeds,
        "categories": categories,
        "partial": any(p["partial"] for p in parts),
        "table": summarise_unseen(runs, categories, seeds),
        "runs": runs,
    }
    write_json(merged, out)
    return merged


def unseen_verdict(table: dict[str, Any]) -> list[str]:
    """The goal lines of the unseen mode: every method's mean image AUROC against :data:`UNSEEN_GOAL`."""
    verdict = []
    for m, row in table["mean"].items():
        v = row["image_auroc"]
        met = v is not None and v >= UNSEEN_GOAL
        verdict.append(
            f"{m}: mean image AUROC >= {100 * UNSEEN_GOAL:.0f}%: {'met' if met else 'NOT met'} ({pct(v).strip()})"
        )
    return verdict
