"""``rfi anomaly fit | score | make-benchmark``: anomaly detection (:mod:`apps.anomaly`).

Example:
    rfi anomaly fit --data embedded --category brick --out runs/anomaly/brick.pt   # RFI's shipped robust encoder
    rfi anomaly score --model runs/anomaly/brick.pt --data embedded --out runs/anomaly/brick_scores
    rfi anomaly make-benchmark --from my_photos --out data/my_bench    # then fit/score --data data/my_bench
"""

from __future__ import annotations

import argparse
import logging
import typing
from pathlib import Path

from apps.anomaly.benchmark import make_benchmark
from apps.anomaly.config import DEFAULT_CONFIG, AnomalyConfig, BenchmarkConfig, Method, load_anomaly_config
from apps.anomaly.data import mvtec_categories, resolve_data
from apps.anomaly.detector import AnomalyDetector
from apps.anomaly.fitting import fit
from apps.anomaly.metrics import format_metrics
from apps.anomaly.scoring import score
from apps.commands.common import common_flags
from encoders.core.config import FLAGS, check_config, parse_overrides
from encoders.core.files import check_output_file, check_output_folder, partial_exit, reported_writes
from encoders.core.runtime import resolve_device

log = logging.getLogger("rfi")


def register_anomaly(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi anomaly`` and its sub-commands (``--debug``/``--quiet`` come from :func:`common_flags`)."""
    sub = parser.add_subparsers(dest="anomaly_command", metavar="SUBCOMMAND")
    defaults = AnomalyConfig()  # the shipped configs/apps/anomaly.yaml: the one place defaults are written
    common = [common_flags(suppress=True)]  # also accepted after the sub-command

    p = sub.add_parser("fit", parents=common, help="train on normal images only; write one model file")
    p.add_argument(
        "--data",
        required=True,
        help="MVTec AD root or category, a folder with normal/ (+ test/), a folder of normal images, or 'embedded'",
    )
    p.add_argument("--out", required=True, help="the model file to write (e.g. runs/anomaly/brick.pt)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument("--category", help="category of an MVTec root with several (e.g. brick for --data embedded)")
    p.add_argument(
        "--method",
        help=f"{' | '.join(typing.get_args(Method))}: a decoder, a PatchCore-style memory "
        f"bank of patch features, or both (the config key 'method', default "
        f"{defaults.method})",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted decoder training")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. encoder=runs/encoders/resnet18_standard/checkpoint.pt "
        "train.steps=400 score.sigma=4",
    )
    p.set_defaults(func=run_fit)

    p = sub.add_parser("score", parents=common, help="score test images: CSV, heat-map PNGs, metrics")
    p.add_argument("--model", required=True, help="a model file written by 'rfi anomaly fit'")
    p.add_argument(
        "--data",
        required=True,
        help="MVTec AD root or category, a folder with test/ (+ labels.csv), a folder of test images, or 'embedded'",
    )
    p.add_argument("--out", required=True, help="output folder: scores.csv, maps/, metrics.json")
    p.add_argument("--category", help="category of an MVTec root (default: the model's)")
    p.add_argument("--labels", help="CSV 'name,label' (0 normal, 1 anomalous) for a plain test folder")
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"images per batch, at most 1 Mpx of them (1024-px images go one at a time; default "
        f"{defaults.batch_size}, the config's batch_size)",
    )
    p.add_argument(
        "--device",
        default=defaults.device,
        help=f"auto, cpu, cuda, cuda:1 ... (default {defaults.device}, the config's device)",
    )
    p.add_argument("--no-maps", action="store_true", help="do not write heat-map PNGs")
    p.set_defaults(func=run_score)

    p = sub.add_parser(
        "make-benchmark",
        parents=common,
        help="write a benchmark with synthetic defects in MVTec AD layout: the embedded textures, or --from photos",
    )
    p.add_argument("--out", required=True, help="destination folder, e.g. data/embedded_mvtec")
    p.add_argument(
        "--from",
        dest="photos",
        metavar="FOLDER",
        help="a folder of photos: one category per photo (named after its file), defects pasted_patch, "
        "blurred_disk, tinted_disk (default: the embedded textures)",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config whose benchmark: section is used")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. benchmark.size=96 benchmark.seed=1")
    p.set_defaults(func=run_make_benchmark)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_fit(args: argparse.Namespace) -> int:
    """``rfi anomaly fit``: prints the model file's path."""
    check_output_file(args.out)  # a folder, too long a name, a read-only place: one line before any training
    flags = {"method": args.method} if args.method else {}
    cfg = load_anomaly_config(args.config, {**parse_overrides(args.overrides), **flags})
    if args.category:
        cfg.category = args.category
    with reported_writes(Path(args.out).parent):  # a full disk: one line naming the folder
        print(fit(cfg, args.data, args.out, resume=args.resume))
    return 0


def run_score(args: argparse.Namespace) -> int:
    """``rfi anomaly score``: prints the metrics table and what was written.

    Exit code as every files-in/files-out command (:mod:`encoders.core.files`): 0, or 1 when some
    images could not be scored (each named on stderr) and the others were.
    """
    check_output_folder(args.out)  # before the model is loaded and anything is scored
    flags = check_config(AnomalyConfig(batch_size=args.batch_size, device=args.device), FLAGS)
    det = AnomalyDetector.load(args.model, device=resolve_device(flags.device))
    category = args.category or det.info.get("category")
    bench = BenchmarkConfig(**det.info["benchmark"]) if det.info.get("benchmark") else BenchmarkConfig()
    if args.data != "embedded" and args.category is None and category is not None:
        # a model fitted on one category scores that category of an MVTec root, or any folder given
        if category not in mvtec_categories(args.data):
            category = None
    data = resolve_data(args.data, category, bench, "test", args.labels)
    if data.category and det.info.get("category") and data.category != det.info["category"]:
        log.warning("the model was fitted on '%s' but scores '%s'", det.info["category"], data.category)
    with reported_writes(args.out):  # a full disk: one line naming the folder
        metrics = score(det, data, args.out, flags.batch_size, write_maps=not args.no_maps)
    print(format_metrics(metrics))
    print(
        f"wrote {Path(args.out) / 'scores.csv'}, {Path(args.out) / 'metrics.json'}"
        + ("" if args.no_maps else f" and {metrics['images']} heat maps in {Path(args.out) / 'maps'}")
    )
    return partial_exit(metrics["failed"])


def run_make_benchmark(args: argparse.Namespace) -> int:
    """``rfi anomaly make-benchmark [--from FOLDER]``: prints the benchmark folder."""
    check_output_folder(args.out)  # before the config is read: an empty --out is not the working directory
    cfg = load_anomaly_config(args.config, args.overrides)
    print(make_benchmark(args.out, cfg.benchmark, photos=args.photos))
    return 0
