"""Fast adversarial training benchmark (issue 23): is a cheaper method as good as PGD-3 for inversion?

For each method (a row) and each of ``--seeds`` training seeds, on the same data and for the
same number of epochs, with the library's own trainers and the default robust config
(``configs/encoder/resnet18_robust.yaml``: ResNet-18 width 0.25, L2 ε = 0.5, the quickstart's
encoder):

- ``standard`` (no attack), ``pgd3`` (the default), ``pgd7``, ``fgsm_rs``, ``free`` (m = 4:
  ``epochs`` worth of optimiser steps in ``epochs / 4`` passes), ``n_fgsm`` and ``grad_align``
  (FGSM-RS with step ε and GradAlign λ = 0.2), each with its paper's settings
  (:mod:`encoders.robust.fast`);
- CPU seconds of the encoder's training (process CPU time, ``time.process_time``: every
  thread of this process; the training steps alone and the whole run with its per-epoch
  validation and probe), total and per epoch;
- clean accuracy, PGD-10 and PGD-50 accuracy with random restarts and the masking checks'
  flags (:func:`encoders.robust.evaluate.masking_checks`; ε sweep; transfer attack from the
  PGD-3 encoder of the same seed, or for PGD-3 itself from the next seed's);
- the PSNR of a layer3 decoder (``configs/decoder/resnet18_robust_layer3.yaml``) trained on
  each encoder's features, on held-out crops of the embedded photos and on unseen images at
  1x and 4x the training size (:func:`inversion.evaluate.compare_autoencoders`, what
  ``rfi quickstart`` reports).

Reported: per-row medians over seeds, and paired per-seed differences against PGD-3 (median,
min and max). The goal line: a method that matches PGD-3's PGD-50 accuracy and its decoders'
PSNR within the seed spread (the range of PGD-3's own values over seeds) at <= 0.5x its CPU
time (median of the per-seed ratios of training-step CPU time), with no masking flag on any
seed; the script prints which rows meet it and by how much each misses.

Budgets: ``default`` (the quickstart's: the configs as they are, 6 encoder epochs and 4 decoder
epochs), ``small`` (half of each) and ``--tiny`` (a smoke run of seconds). Finished runs are
cached under ``--workdir/<budget>_<hash of the settings>/<row>/seed<k>/`` (encoder, decoder,
``timing.json`` and ``evaluation.json``), so a killed run resumes at the first unfinished one; an
encoder whose ``timing.json`` is missing was cut short and is trained again from scratch (its CPU
time must cover the whole run). One process at a time holds a row and seed (a lock in its
folder), so processes started with the same ``--train-only`` or ``--evaluate-only`` seeds share
the work: each skips the runs another one holds (one process per core; 1 thread each).

Usage:
    python bench/fast_robust.py                          # 3 seeds, default budget (hours on 2 CPU cores)
    python bench/fast_robust.py --budget small --seeds 5
    python bench/fast_robust.py --rows pgd3 fgsm_rs free # a subset (pgd3 is always trained: the reference)
    python bench/fast_robust.py --train-only 0 1 2 & python bench/fast_robust.py --train-only 0 1 2; wait
    python bench/fast_robust.py --evaluate-only 0 1 2 & python bench/fast_robust.py --evaluate-only 0 1 2; wait
    python bench/fast_robust.py                          # then: the report, every run and evaluation reused
    python bench/fast_robust.py --tiny                   # smoke test: tiny models, a few steps

Prints a markdown table and writes ``bench/results/fast_robust.json`` (``--tiny``: in the workdir).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

import encoders.robust.train as encoder_training
from encoders.core.config import load_config
from encoders.core.rundir import RunInUseError, RunLock
from encoders.core.serialization import write_json
from encoders.data.build import build_dataset
from encoders.robust.evaluate import masking_checks
from encoders.robust.train import TrainEncoderConfig, train_encoder
from inversion import RobustAutoencoder
from inversion.evaluate import compare_autoencoders
from inversion.train import CHECKPOINT_NAME as DECODER_FILE
from inversion.train import TrainDecoderConfig, train_decoder

log = logging.getLogger("rfi")
ENCODER = ROOT / "configs/encoder/resnet18_robust.yaml"
DECODER = ROOT / "configs/decoder/resnet18_robust_layer3.yaml"
REFERENCE = "pgd3"
NOT_CANDIDATES = (REFERENCE, "standard")  # the reference and the no-attack baseline are not judged by the goal

# Each row: overrides of the robust default (eps 0.5, L2); the methods' defaults follow their papers' ratios to eps.
ROWS: dict[str, list[str]] = {
    "standard": ["adv.enabled=false"],
    "pgd3": [],
    "pgd7": ["adv.steps=7"],
    "fgsm_rs": ["adv.method=fgsm_rs"],
    "free": ["adv.method=free", "adv.replays=4"],
    "n_fgsm": ["adv.method=n_fgsm"],
    "grad_align": ["adv.method=fgsm_rs", "adv.step_size=0.5", "adv.grad_align=0.2"],
}
SETS = {"held-out": None, "unseen": "unseen"}

BUDGETS: dict[str, dict[str, Any]] = {
    "default": {
        "encoder": [],
        "decoder": ["sample_every=0"],
        "eval": {"images": 256, "restarts": 2, "sweep_steps": 20, "scales": [1, 4], "num": 100},
    },
    "small": {
        "encoder": ["epochs=3"],
        "decoder": ["epochs=2", "sample_every=0"],
        "eval": {"images": 256, "restarts": 2, "sweep_steps": 20, "scales": [1, 4], "num": 100},
    },
    "tiny": {
        "encoder": [
            "data.size=16",
            "data.train_crops=256",
            "data.val_crops=64",
            "model.width=0.125",
            "steps=4",
            "batch_size=64",
        ],
        "decoder": [
            "data.size=16",
            "data.train_crops=128",
            "data.val_crops=16",
            "batch_size=16",
            "steps=2",
            "decoder.channels=16",
            "decoder.min_channels=8",
            "sample_every=0",
        ],
        "eval": {"images": 8, "restarts": 1, "sweep_steps": 3, "scales": [1, 4], "num": 4},
    },
}
TRAINED = "trained"  # marker in a row's folder: encoder and decoder finished
ENCODER_FIXED = ["eval.enabled=false", "log_every=0", "device=cpu"]  # evaluated below, on every row alike


# ----------------------------------------------------------------------------- training
def encoder_config(row: str, seed: int, out: Path, budget: dict[str, Any], extra: list[str]) -> TrainEncoderConfig:
    return load_config(
        TrainEncoderConfig,
        ENCODER,
        [*budget["encoder"], *ENCODER_FIXED, *ROWS[row], f"seed={seed}", f"out={out}", *extra],
    )


def train_timed(cfg: TrainEncoderConfig, folder: Path) -> dict[str, Any]:
    """Train the encoder (or reuse a finished run) and return its CPU times, kept in ``timing.json``."""
    timing_path = folder / "timing.json"
    if timing_path.is_file():
        return json.loads(timing_path.read_text())
    shutil.rmtree(folder / "encoder", ignore_errors=True)  # cut short: train it whole, so that its time is whole
    step_cpu = [0.0]
    real_step = encoder_training.EncoderTrainer.train_step

    def timed_step(self, x, y):
        start = time.process_time()
        sums = real_step(self, x, y)
        step_cpu[0] += time.process_time() - start
        return sums

    encoder_training.EncoderTrainer.train_step = timed_step
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    try:
        result = train_encoder(cfg)
    finally:
        encoder_training.EncoderTrainer.train_step = real_step
    total_cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    epochs = cfg.epochs if cfg.steps <= 0 else cfg.steps * cfg.batch_size / len(build_dataset(cfg.data, "train"))
    timing = {
        "step_cpu_s": step_cpu[0],
        "run_cpu_s": total_cpu,
        "wall_s": wall,
        "epochs": epochs,
        "step_cpu_s_per_epoch": step_cpu[0] / epochs,
        "run_cpu_s_per_epoch": total_cpu / epochs,
        "val_acc": result.metrics.get("val_acc"),
        "probe": result.metrics.get("probe"),
        "overfitting_warning": result.metrics.get("overfitting_warning"),
        "threads": torch.get_num_threads(),
    }
    write_json(timing, timing_path)
    return timing


def run_of(row: str, seed: int, root: Path, budget: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The configs and files of one row and seed (trained or not) and, once trained, its timing."""
    folder = root / row / f"seed{seed}"
    cfg = encoder_config(row, seed, folder / "encoder", budget, args.set)
    decoder_cfg = load_config(
        TrainDecoderConfig,
        DECODER,
        [
            *budget["decoder"],
            f"seed={seed}",
            f"encoder.checkpoint={cfg.out}/checkpoint.pt",
            f"out={folder / 'decoder'}",
            "device=cpu",
            *args.set_decoder,
        ],
    )
    timing = folder / "timing.json"
    return {
        "folder": folder,
        "encoder_config": cfg,
        "decoder_config": decoder_cfg,
        "encoder": Path(cfg.out) / "checkpoint.pt",
        "decoder": Path(decoder_cfg.out) / DECODER_FILE,
        "timing": json.loads(timing.read_text()) if timing.is_file() else None,
        "train_size": decoder_cfg.data.size,
        "eps": cfg.adv.eps,
        "norm": cfg.adv.norm,
        "data": cfg.data,
    }


def train_row(row: str, seed: int, root: Path, budget: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) one row and seed: its encoder, then its decoder, holding the row's folder.

    Raises:
        RunInUseError: another process is training or evaluating this row and seed.
    """
    run = run_of(row, seed, root, budget, args)
    if (run["folder"] / TRAINED).is_file():
        return run
    with RunLock(run["folder"]):  # one process per row: the next line deletes a cut-short encoder
        run["timing"] = train_timed(run["encoder_config"], run["folder"])
        train_decoder(run["decoder_config"], resume=True)
        (run["folder"] / TRAINED).touch()
    return run


# ----------------------------------------------------------------------------- evaluation
def evaluate_row(run: dict[str, Any], twin: Path | None, ev: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, masking checks (cached next to the run) and decoder PSNR of one trained row and seed.

    Raises:
        RunInUseError: another process holds the row (training or evaluating it).
    """
    cache = run["folder"] / "evaluation.json"
    key = {"twin": str(twin), **ev}

    def cached() -> dict[str, Any] | None:
        entry = json.loads(cache.read_text()) if cache.is_file() else {}
        return entry["result"] if entry.get("key") == key else None

    if (result := cached()) is not None:
        return result
    with RunLock(run["folder"]):
        return cached() or measure_row(run, twin, ev, cache, key)


def measure_row(run: dict[str, Any], twin: Path | None, ev: dict[str, Any], cache: Path, key: dict) -> dict[str, Any]:
    """Measure one row and seed (the bench's costly part) and cache the result with its key."""
    from encoders import create_encoder

    encoder = create_encoder(checkpoint=run["encoder"]).eval()
    twin_encoder = create_encoder(checkpoint=twin).eval() if twin is not None else None
    val = build_dataset(run["data"], "val")
    checks = masking_checks(
        encoder,
        val,
        run["eps"],
        run["norm"],
        twin_encoder,
        ev["restarts"],
        sweep_steps=ev["sweep_steps"],
        max_images=ev["images"],
    )
    model = RobustAutoencoder.from_checkpoints(run["encoder"], run["decoder"], device="cpu")
    psnr = {}
    for name, folder in SETS.items():
        res = compare_autoencoders({"m": model}, ev["scales"], run["train_size"], ev["num"], 0, folder)
        psnr.update({f"{name} {r['scale']}x": r["psnr"] for r in res["models"]["m"]})
    result = {
        "clean_acc": checks["clean_acc"],
        "pgd10_acc": checks["pgd10_acc"],
        "pgd50_acc": checks["pgd50_acc"],
        "masking_flags": checks["masking_flags"],
        "sweep": checks["sweep"],
        "transfer_acc": checks["transfer_acc"],
        "psnr": psnr,
    }
    write_json({"key": key, "result": result}, cache)
    return result


def evaluate(
    row: str, seed: int, seeds: list[int], root: Path, budget: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Train (or reuse) one row and seed and its twin, then evaluate it (or reuse its evaluation).

    The twin, whose attack transfers, is PGD-3 of the same seed, or for PGD-3 itself the next seed's.
    """
    run = train_row(row, seed, root, budget, args)
    if row != REFERENCE:
        twin_seed: int | None = seed
    elif len(seeds) > 1:
        twin_seed = seeds[(seeds.index(seed) + 1) % len(seeds)]
    else:
        twin_seed = None
    twin = None if twin_seed is None else train_row(REFERENCE, twin_seed, root, budget, args)["encoder"]
    return {
        **evaluate_row(run, twin, budget["eval"]),
        "timing": run["timing"],
        "twin": str(twin) if twin is not None else None,
    }


# ----------------------------------------------------------------------------- summaries
def _spread(values: list[float]) -> dict[str, Any]:
    return {"per_seed": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def metrics_of(r: dict[str, Any]) -> dict[str, float]:
    """The figures compared across rows, from one row's per-seed result."""
    t = r["timing"]
    return {
        "step_cpu_s": t["step_cpu_s"],
        "step_cpu_s_per_epoch": t["step_cpu_s_per_epoch"],
        "run_cpu_s": t["run_cpu_s"],
        "clean_acc": r["clean_acc"],
        "pgd10_acc": r["pgd10_acc"],
        "pgd50_acc": r["pgd50_acc"],
        **{f"psnr {k}": v for k, v in r["psnr"].items()},
    }


def summarize(results: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per-row medians over seeds, paired differences against PGD-3 and the goal verdicts."""
    rows: dict[str, Any] = {}
    ref = [metrics_of(results[REFERENCE][str(s)]) for s in seeds]
    for row, per_seed in results.items():
        values = [metrics_of(per_seed[str(s)]) for s in seeds]
        names = list(values[0])
        rows[row] = {
            "median": {k: statistics.median(v[k] for v in values) for k in names},
            "minus_pgd3": {k: _spread([v[k] - r[k] for v, r in zip(values, ref)]) for k in names},
            "cpu_ratio": _spread([v["step_cpu_s"] / r["step_cpu_s"] for v, r in zip(values, ref)]),
            "masking_flags": sorted({f for s in seeds for f in per_seed[str(s)]["masking_flags"]}),
            "overfitting_warnings": [
                per_seed[str(s)]["timing"]["overfitting_warning"]
                for s in seeds
                if per_seed[str(s)]["timing"]["overfitting_warning"]
            ],
        }
    for row, s in rows.items():
        s["goal"] = goal(s, ref, row)
    return rows


def goal(s: dict[str, Any], ref: list[dict[str, float]], row: str) -> dict[str, Any]:
    """Whether ``row`` meets the goal against PGD-3, and each shortfall (negative: missed by that much)."""
    misses: list[str] = []
    margins: dict[str, float] = {}
    for key in [k for k in ref[0] if k == "pgd50_acc" or k.startswith("psnr ")]:
        allowed = max(r[key] for r in ref) - min(r[key] for r in ref)  # PGD-3's own spread over seeds
        margins[key] = s["minus_pgd3"][key]["median"] + allowed
        if margins[key] < 0:
            unit = " points" if key.endswith("acc") else " dB"
            scale = 100 if key.endswith("acc") else 1
            misses.append(
                f"{key} {scale * s['minus_pgd3'][key]['median']:+.2f}{unit} vs PGD-3 (allowed -{scale * allowed:.2f})"
            )
    ratio = s["cpu_ratio"]["median"]
    margins["cpu_ratio"] = 0.5 - ratio
    if ratio > 0.5:
        misses.append(f"CPU {ratio:.2f}x PGD-3's (goal <= 0.5x)")
    if s["masking_flags"]:
        misses.append(f"{len(s['masking_flags'])} masking flag(s)")
    return {"met": not misses and row not in NOT_CANDIDATES, "misses": misses, "margins": margins}


def print_table(rep: dict[str, Any]) -> None:
    s, seeds = rep["summary"], rep["seeds"]
    psnr_keys = [k for k in next(iter(s.values()))["median"] if k.startswith("psnr ")]
    head = (
        [
            "method",
            "CPU s (steps)",
            "CPU s / epoch",
            "x PGD-3",
            "clean acc",
            "PGD-10 acc",
            "PGD-50 acc",
            "PGD-50 - PGD-3 [min, max]",
        ]
        + [f"PSNR {k[5:]}" for k in psnr_keys]
        + ["PSNR held-out 1x - PGD-3", "masking flags"]
    )
    print(
        f"\nFast adversarial training, budget {rep['budget']}: medians over {len(seeds)} seed(s) {seeds}; "
        f"CPU = process CPU time of the training steps ({rep['env']['threads']} threads)\n"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row, r in s.items():
        m, d = r["median"], r["minus_pgd3"]
        psnr_diff = d.get("psnr held-out 1x")
        cells = [
            row,
            f"{m['step_cpu_s']:.1f}",
            f"{m['step_cpu_s_per_epoch']:.1f}",
            f"{r['cpu_ratio']['median']:.2f}",
            f"{100 * m['clean_acc']:.1f}%",
            f"{100 * m['pgd10_acc']:.1f}%",
            f"{100 * m['pgd50_acc']:.1f}%",
            f"{100 * d['pgd50_acc']['median']:+.1f} [{100 * d['pgd50_acc']['min']:+.1f}, "
            f"{100 * d['pgd50_acc']['max']:+.1f}]",
        ]
        cells += [f"{m[k]:.2f}" for k in psnr_keys]
        cells += [
            f"{psnr_diff['median']:+.2f} [{psnr_diff['min']:+.2f}, {psnr_diff['max']:+.2f}]" if psnr_diff else "-",
            str(len(r["masking_flags"])),
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        "\nGoal: a method that matches PGD-3's PGD-50 accuracy and its decoders' PSNR within the seed spread at "
        "<= 0.5x its CPU time, with no masking flag."
    )
    for row, r in s.items():
        if row in NOT_CANDIDATES:
            continue
        g = r["goal"]
        print(f"  {row}: {'meets it' if g['met'] else 'misses: ' + '; '.join(g['misses'])}")
    for row, r in s.items():
        for flag in r["masking_flags"]:
            print(f"  {row}: possibly gradient-masked: {flag}")
        for warning in r["overfitting_warnings"]:
            print(f"  {row}: {warning}")


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--budget",
        choices=["default", "small"],
        default="default",
        help="default: the quickstart's encoder/decoder budgets; small: half",
    )
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny models, a few steps (seconds)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds, paired across rows (default 3; --tiny: 2)")
    p.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        default=list(ROWS),
        help="methods to train (pgd3, the reference, is always added)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more overrides of every encoder config")
    p.add_argument("--set-decoder", nargs="*", default=[], metavar="key=value", help="more decoder overrides")
    p.add_argument("--workdir", default="runs/bench/fast_robust")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="JSON (default bench/results/fast_robust.json; --tiny: in the workdir)")
    share = p.add_mutually_exclusive_group()
    share.add_argument(
        "--train-only",
        type=int,
        nargs="+",
        metavar="SEED",
        help="only train every row of these seeds, skipping the runs another process holds (no evaluation, "
        "no report): to share the training among processes, run the same command in each",
    )
    share.add_argument(
        "--evaluate-only",
        type=int,
        nargs="+",
        metavar="SEED",
        help="only evaluate every row of these seeds (training what is missing), skipping the runs another "
        "process holds; no report: run the plain command last",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    name = "tiny" if args.tiny else args.budget
    budget = BUDGETS[name]
    seeds = list(range(args.seeds or (2 if args.tiny else 3)))
    rows = [REFERENCE] + [r for r in args.rows if r != REFERENCE]
    if bad := sorted(set(args.train_only or args.evaluate_only or []) - set(seeds)):
        raise SystemExit(f"fast_robust.py: seed(s) {bad} not among --seeds' {seeds}")
    settings = json.dumps([budget, args.set, args.set_decoder])
    workdir = Path(args.workdir) / f"{name}_{hashlib.sha1(settings.encode()).hexdigest()[:8]}"
    t0, load_before = time.perf_counter(), os.getloadavg()
    if args.train_only or args.evaluate_only:  # a share of the work: skip what another process holds
        verb = "trained" if args.train_only else "evaluated"
        for seed in args.train_only or args.evaluate_only:
            for row in rows:
                try:
                    if args.train_only:
                        train_row(row, seed, workdir, budget, args)
                    else:
                        evaluate(row, seed, seeds, workdir, budget, args)
                except RunInUseError as e:
                    log.info("%s seed %d skipped (another process has it): %s", row, seed, e)
                    continue
                log.info("%s seed %d %s (%.0f s so far)", row, seed, verb, time.perf_counter() - t0)
        return {}
    for seed in seeds:  # seed by seed, every row: the pairs are complete as early as possible
        for row in rows:
            train_row(row, seed, workdir, budget, args)
            log.info("%s seed %d trained (%.0f s so far)", row, seed, time.perf_counter() - t0)
    results = {row: {str(seed): evaluate(row, seed, seeds, workdir, budget, args) for seed in seeds} for row in rows}
    rep = {
        "command": "python bench/fast_robust.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget": name,
        "overrides": {"rows": {r: ROWS[r] for r in rows}, **budget},
        "seeds": seeds,
        "workdir": str(workdir),
        "results": results,
        "summary": summarize(results, seeds),
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_now": os.getloadavg(),
            "seconds": time.perf_counter() - t0,
        },
    }
    out = (
        Path(args.out)
        if args.out
        else (workdir / "fast_robust_tiny.json" if args.tiny else ROOT / "bench/results/fast_robust.json")
    )
    write_json(rep, out)
    print_table(rep)
    print(f"\nwrote {out} ({rep['env']['seconds']:.0f} s)")
    return rep


if __name__ == "__main__":
    main()
