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
(:func:`bench.anomaly_unseen.measure_controls`) say why a method misses: ``normal shift``, how much more
anomalous the normal test crops look than normal crops held out of the photo's training part (a photo's test
tiles show other parts of the scene), and ``defect>clean``, how often a defect raises the score of its own crop
at all. The unseen mode's code is :mod:`bench.anomaly_unseen`; what both modes measure with,
:mod:`bench.anomaly_measure`.

    python bench/anomaly.py                                   # embedded: draws 0 and 1, 3 seeds
    python bench/anomaly.py --draws 0 --seeds 1 --figure docs/img/anomaly_memory_vs_reconstruction.png
    python bench/anomaly.py --unseen                          # unseen photos, 3 seeds
    OMP_NUM_THREADS=1 python bench/anomaly.py --unseen --tiny # smoke run: seconds, an untrained tiny encoder
    python bench/anomaly.py --unseen --first-seed 1 --seeds 1 --out s1.json --resume  # one seed; keeps what s1.json has
    python bench/anomaly.py --unseen --merge s0.json s1.json s2.json --out anomaly_unseen.json  # seeds run apart

Needs the encoder checkpoints (``rfi train-encoder --config configs/encoder/resnet18_robust.yaml``
and, for the embedded mode, ``..._standard.yaml``), or ``--robust`` / ``--standard`` paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.anomaly.config import DEFAULT_CONFIG, AnomalyConfig, load_anomaly_config  # noqa: E402
from apps.anomaly.data import read_mask, resolve_data  # noqa: E402
from apps.anomaly.detector import AnomalyDetector  # noqa: E402
from bench.anomaly_measure import (  # noqa: E402
    ENCODERS,
    encoder_file,
    fit_cost,
    machine,
    measure_combined,
    measure_fit,
    measured,
    median,
    pct,
)
from bench.anomaly_unseen import format_unseen, merge_unseen, run_unseen, unseen_verdict  # noqa: E402
from encoders.core.errors import RFIError  # noqa: E402
from encoders.core.imageio import read_image  # noqa: E402
from encoders.core.serialization import write_json  # noqa: E402

METHODS = ("reconstruction", "memory (robust)", "memory (standard)", "combined")
GOAL = 0.95


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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="--unseen: keep the photos that --out (an earlier run's JSON, measured the same way) measured with every "
        "method; measure the rest (for runs longer than a session: commit --out, rerun with --resume)",
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
        if args.unseen and args.merge:
            result = merge_unseen(args.merge, args.out, command)
        elif args.unseen:
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
        print("\n".join(unseen_verdict(result["table"])))
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
