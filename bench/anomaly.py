"""Anomaly detection on the embedded benchmark: robust vs standard encoder, same budget.

For every texture (brick, grass, gravel) and every decoder seed, one anomaly model is
fitted per encoder with the very same config (``configs/apps/anomaly.yaml``: decoder steps,
crops, score settings), then scored on the held-out test images: image AUROC and pixel
AUROC, medians over the seeds. The score components are also measured alone (pixel
error only, feature error only), recalibrated on the same held-out normal images, to show
what each contributes. Prints a table and writes ``bench/results/anomaly.json``.

    python bench/anomaly.py                       # 1 seed, ~1-2 min per model on 2 CPU cores
    python bench/anomaly.py --seeds 3 decoder.steps=800

Needs the two encoder checkpoints (``rfi train-encoder --config configs/encoder/resnet18_robust.yaml``
and ``..._standard.yaml``), or ``--robust`` / ``--standard`` paths.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.anomaly import DEFAULT_CONFIG, AnomalyConfig, AnomalyDetector, ScoreConfig, fit, resolve_data, score  # noqa: E402
from encoders.config import load_config  # noqa: E402
from encoders.errors import RFIError  # noqa: E402
from encoders.evaluate import write_json  # noqa: E402
from encoders.imageio import list_images, read_image  # noqa: E402

ENCODERS = {"robust": "runs/encoders/resnet18_robust/checkpoint.pt",
            "standard": "runs/encoders/resnet18_standard/checkpoint.pt"}
GOAL = 0.95


def variants(base: ScoreConfig) -> dict[str, ScoreConfig]:
    """The configured score and its two components alone."""
    return {"combined": base, "pixel only": replace(base, feature_weight=0.0),
            "feature only": replace(base, pixel_weight=0.0)}


def measure(model: Path, data, out: Path, base: ScoreConfig) -> dict[str, dict]:
    """Metrics of every score variant of one fitted model (recalibrated on its held-out normal images)."""
    det = AnomalyDetector.load(model)
    held = [read_image(p) for p in list_images([model.with_name(model.stem + "_fit") / "normal" / "val"])]
    results = {}
    for name, cfg in variants(base).items():
        d = det if name == "combined" else AnomalyDetector(det.ae, cfg, det.image_size, info=det.info)
        if name != "combined":
            d.calibrate(held)
        start = time.perf_counter()
        m = score(d, data, out / name.replace(" ", "_"), write_maps=False)
        m["ms_per_image"] = 1000 * (time.perf_counter() - start) / max(m["images"], 1)
        results[name] = m
    return results


def example_figure(models: dict[str, Path], benchmark, path: str) -> Path:
    """A grid: one row per (texture, defect type): input | heat-map overlay | ground-truth mask."""
    import torch.nn.functional as F

    from apps.anomaly_data import DEFECTS, read_mask
    from encoders.runtime import save_grid

    cols: list[list[torch.Tensor]] = [[], [], []]
    for cat, model in models.items():
        det = AnomalyDetector.load(model)
        data = resolve_data("embedded", cat, benchmark, "test")
        for defect in DEFECTS:
            item = next(t for t in data.test if t.defect == defect)
            img = read_image(item.path)
            over = det.overlay(img, det.maps(det.prepare(img)[None])[0])
            mask = read_mask(item.mask).float()[None].expand(3, -1, -1)
            for col, t in zip(cols, (img, over, mask)):
                col.append(F.interpolate(t[None], scale_factor=2, mode="nearest")[0])
    return save_grid([torch.stack(c) for c in cols], path, max_rows=len(cols[0]))


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def pct(v: float | None) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--robust", default=ENCODERS["robust"], help="robust encoder checkpoint")
    parser.add_argument("--standard", default=ENCODERS["standard"], help="standard encoder checkpoint")
    parser.add_argument("--categories", nargs="+", help="textures (default: the config's benchmark.textures)")
    parser.add_argument("--seeds", type=int, default=1, help="decoder seeds per model (medians are reported)")
    parser.add_argument("--work", help="folder for models and scores (default: a temporary folder)")
    parser.add_argument("--out", default="bench/results/anomaly.json")
    parser.add_argument("--figure", help="also write example heat maps of the robust models (PNG)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, for both encoders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    try:
        base = load_config(AnomalyConfig, args.config, args.overrides)
        encoders = {"robust": args.robust, "standard": args.standard}
        for name, path in encoders.items():
            if not Path(path).is_file():
                raise RFIError(f"{name} encoder checkpoint not found: {path} (train it with: rfi train-encoder "
                               f"--config configs/encoder/resnet18_{name}.yaml, or pass --{name} PATH)")
        categories = args.categories or list(base.benchmark.textures)
        work = Path(args.work or tempfile.mkdtemp(prefix="rfi-bench-anomaly-"))
        runs = []
        for cat in categories:
            data = resolve_data("embedded", cat, base.benchmark, "test")
            for seed in range(args.seeds):
                for enc, path in encoders.items():
                    cfg = load_config(AnomalyConfig, args.config, [*args.overrides, f"decoder.seed={seed}",
                                                                   f"encoder={path}", f"category={cat}"])
                    model = work / f"seed{seed}" / enc / f"{cat}.pt"
                    start = time.perf_counter()
                    fit(cfg, "embedded", model, resume=True)
                    fit_s = time.perf_counter() - start
                    res = measure(model, data, work / f"seed{seed}" / enc / cat, cfg.score)
                    runs.append({"category": cat, "seed": seed, "encoder": enc, "fit_s": fit_s, "metrics": res})
                    c = res["combined"]
                    print(f"{cat:<7} seed {seed} {enc:<8} image AUROC {pct(c['image_auroc'])}  pixel AUROC "
                          f"{pct(c['pixel_auroc'])}  (fit {fit_s:.0f} s)", flush=True)
    except RFIError as e:
        print(f"bench/anomaly.py: error: {e}", file=sys.stderr)
        return 2

    def med(cat: str, enc: str, variant: str, key: str) -> float | None:
        return median([r["metrics"][variant][key] for r in runs if r["category"] == cat and r["encoder"] == enc])

    table = {cat: {enc: {v: {k: med(cat, enc, v, k) for k in ("image_auroc", "pixel_auroc", "ms_per_image")}
                         for v in variants(base.score)} for enc in encoders} for cat in categories}
    fit_s = {enc: median([r["fit_s"] for r in runs if r["encoder"] == enc]) for enc in encoders}
    head = (f"{'category':<10} {'robust img':>10} {'standard img':>12} {'robust pix':>10} {'standard pix':>12}   "
            f"{'robust img (pixel / feature only)':>33} {'standard img (pixel / feature only)':>35}")
    lines = [f"Embedded anomaly benchmark: AUROC in %, median over {args.seeds} decoder seed(s); "
             f"same config for both encoders ({base.decoder.steps} decoder steps, layer {base.decoder.encoder.layer}, "
             f"score = {base.score.pixel_metric} pixel x{base.score.pixel_weight:g} + {base.score.feature_metric} "
             f"feature {'/'.join(base.score.feature_layers)} x{base.score.feature_weight:g})", head, "-" * len(head)]
    for cat in categories:
        t = table[cat]
        lines.append(
            f"{cat:<10} {pct(t['robust']['combined']['image_auroc']):>10} {pct(t['standard']['combined']['image_auroc']):>12} "
            f"{pct(t['robust']['combined']['pixel_auroc']):>10} {pct(t['standard']['combined']['pixel_auroc']):>12}   "
            f"{pct(t['robust']['pixel only']['image_auroc']) + ' / ' + pct(t['robust']['feature only']['image_auroc']):>33} "
            f"{pct(t['standard']['pixel only']['image_auroc']) + ' / ' + pct(t['standard']['feature only']['image_auroc']):>35}")
    robust_img = [table[c]["robust"]["combined"]["image_auroc"] for c in categories]
    standard_img = [table[c]["standard"]["combined"]["image_auroc"] for c in categories]
    mean = lambda xs: sum(xs) / len(xs) if xs and None not in xs else None  # noqa: E731
    lines.append(f"{'mean':<10} {pct(mean(robust_img)):>10} {pct(mean(standard_img)):>12} "
                 f"{pct(mean([table[c]['robust']['combined']['pixel_auroc'] for c in categories])):>10} "
                 f"{pct(mean([table[c]['standard']['combined']['pixel_auroc'] for c in categories])):>12}")
    defects = sorted({d for r in runs for d in (r["metrics"]["combined"].get("per_defect") or {})})
    per_defect = {cat: {enc: {d: median([r["metrics"]["combined"]["per_defect"].get(d) for r in runs
                                         if r["category"] == cat and r["encoder"] == enc])
                              for d in defects} for enc in encoders} for cat in categories}
    lines += ["", "image AUROC per defect type (normal vs that defect), robust / standard:",
              f"{'category':<10} " + " ".join(f"{d:>18}" for d in defects)]
    for cat in categories:
        lines.append(f"{cat:<10} " + " ".join(
            f"{pct(per_defect[cat]['robust'][d]) + ' / ' + pct(per_defect[cat]['standard'][d]):>18}" for d in defects))
    goal_met = all(v is not None and v >= GOAL for v in robust_img)
    robust_wins = all(r is not None and s is not None and r >= s for r, s in zip(robust_img, standard_img))
    lines.append(f"goal image AUROC >= {100 * GOAL:.0f}% on every category (robust): {'met' if goal_met else 'NOT met'}; "
                 f"robust >= standard on every category: {'yes' if robust_wins else 'no'}")
    lines.append(f"median fit time: robust {fit_s['robust']:.0f} s, standard {fit_s['standard']:.0f} s; "
                 f"scoring {table[categories[0]]['robust']['combined']['ms_per_image']:.1f} ms/image "
                 f"({torch.get_num_threads()} threads)")
    print("\n".join(lines))

    result = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "categories": categories,
              "encoders": encoders, "benchmark": vars(base.benchmark), "table": table, "per_defect": per_defect, "fit_seconds": fit_s,
              "goal": {"image_auroc": GOAL, "met": goal_met, "robust_ge_standard": robust_wins},
              "runs": runs, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                        "threads": torch.get_num_threads(), "cpu": platform.processor()},
              "command": " ".join(["python", "bench/anomaly.py", *(argv if argv is not None else sys.argv[1:])])}
    if args.figure:
        first = {cat: work / "seed0" / "robust" / f"{cat}.pt" for cat in categories}
        print(f"wrote {example_figure(first, base.benchmark, args.figure)}")
    print(f"wrote {write_json(json.loads(json.dumps(result, default=str)), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
