"""Benchmark: shift-equivariant semantic segmentation, plain vs equivariant encoders, same budget per row.

Rows: ResNet-18 with strided vs LPS down-sampling (``configs/encoder/resnet18_standard.yaml`` at
``--cnn-width``; decoder on ``layer3`` with ``layer1``, ``layer2`` skips) and, as an ablation, strided
with every convolution padded circularly as LPS's are (``model.options.padding=circular``), plain vs equivariant
Swin-T and SwinV2-T (``configs/encoder/swin_t_tiny_standard.yaml``; decoder on ``stage2`` with a
``stage1`` skip), and the same pair for every other registered transformer with an
``equivariant`` option that ships a ``configs/encoder/<arch>_tiny_standard.yaml`` (e.g. MViTv2,
CvT; decoder on its second tap with a skip from its first). Every row gets the same budget:
its encoder trained for ``--encoder-epochs`` on the embedded "which photo" crops, then a
segmenter (:func:`apps.segment.train.train_segmenter`, encoder fine-tuned unless
``--frozen``) for ``--steps`` steps on the same procedurally labelled scenes
(:mod:`encoders.data.scenes`). Measured on held-out scenes
(:func:`apps.segment.metrics.evaluate_segmenter`, the same crop side for every row):

- mIoU;
- circular mASC: the share of pixels whose class agrees between two circular shifts of an
  image (shifts undone); 100 % is the goal of every equivariant row;
- crop-shift mASC: the same on the overlap of two crops at different offsets (new content at
  the borders);
- median ms of one training step (the trainer's own :meth:`SegmenterTrainer.train_step`),
  timed interleaved after all training so machine load hits every row alike.

Runs go seed by seed (every row trained, then measured) and the JSON is rewritten after every seed.

Usage:
    OMP_NUM_THREADS=1 python bench/segmentation.py                    # 3 seeds, every row
    OMP_NUM_THREADS=1 python bench/segmentation.py --tiny             # smoke run: seconds
    OMP_NUM_THREADS=1 python bench/segmentation.py --figure           # also docs/img/segmentation_shift.png

Prints a markdown table and writes ``bench/results/segmentation.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.segment.config import SegmentConfig  # noqa: E402
from apps.segment.metrics import evaluate_segmenter  # noqa: E402
from apps.segment.model import load_segmenter  # noqa: E402
from apps.segment.train import SegmenterTrainer, train_segmenter  # noqa: E402
from bench.shift import interleaved_ms  # noqa: E402  (round-robin timing)
from encoders import list_encoders  # noqa: E402
from encoders.core.config import load_config  # noqa: E402
from encoders.core.runtime import setup_distributed  # noqa: E402
from encoders.core.serialization import atomic_write  # noqa: E402
from encoders.data.scenes import SceneSegmentation  # noqa: E402
from encoders.nets.registry import encoder_family  # noqa: E402
from encoders.robust.train import TrainEncoderConfig, train_encoder  # noqa: E402
from encoders.weights.checkpoints import load_encoder  # noqa: E402

CNN_LAYER = ("layer3", ["layer1", "layer2"])
PLAIN_SWINS = {"swin_t": [], "swin_v2_t": ["model.arch=swin_v2_t"]}
TINY = dict(
    seeds=1,
    encoder_epochs=1,
    train_crops=16,
    encoder_batch=8,
    size=64,
    train_items=8,
    val_items=4,
    steps=2,
    batch_size=4,
    max_crop_shift=16,
    timing_steps=1,
)


def rows() -> dict[str, tuple[str, list[str]]]:
    """Row name -> (encoder config file, overrides): the CNN pair, the Swin pairs, and every other registered
    transformer with an ``equivariant`` option and a shipped ``<arch>_tiny_standard.yaml``."""
    out: dict[str, tuple[str, list[str]]] = {
        "resnet18": ("resnet18_standard.yaml", ["model.downsample=stride"]),
        "resnet18_lps": ("resnet18_standard.yaml", ["model.downsample=lps"]),
        # the stride network with LPS's circular padding: separates the padding from the down-sampling
        "resnet18_circ": ("resnet18_standard.yaml", ["model.downsample=stride", "model.options.padding=circular"]),
    }
    for arch in list_encoders():
        if "equivariant" not in encoder_family(arch).options:
            continue
        if arch in PLAIN_SWINS:
            config, overrides = "swin_t_tiny_standard.yaml", PLAIN_SWINS[arch]
        elif (ROOT / "configs" / "encoder" / f"{arch}_tiny_standard.yaml").is_file():
            config, overrides = f"{arch}_tiny_standard.yaml", []
        else:
            continue
        out[arch] = (config, [*overrides, "model.options.equivariant=false"])
        out[f"{arch}_eq"] = (config, [*overrides, "model.options.equivariant=true"])
    return out


def pairs(names: list[str]) -> list[tuple[str, str]]:
    """(equivariant, plain) row pairs among ``names``."""
    candidates = [("resnet18_lps", "resnet18"), *((f"{name}_eq", name) for name in names)]
    return [(eq, plain) for eq, plain in candidates if eq in names and plain in names]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help=f"comma-separated subset of the rows (default: all: {','.join(rows())})")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--size", type=int, default=64, help="scene side in px (default 64; a multiple of 32)")
    p.add_argument("--train-items", type=int, default=2000, help="training scenes (default 2000)")
    p.add_argument("--val-items", type=int, default=128, help="validation scenes for every metric (default 128)")
    p.add_argument("--steps", type=int, default=600, help="segmenter training steps (default 600)")
    p.add_argument("--batch-size", type=int, default=16, help="segmenter batch size (default 16)")
    p.add_argument("--frozen", action="store_true", help="keep the encoders frozen (default: fine-tune them)")
    p.add_argument("--encoder-epochs", type=int, default=2, help="encoder pre-training epochs (default 2)")
    p.add_argument("--train-crops", type=int, default=3000, help="encoder pre-training crops (default 3000)")
    p.add_argument("--encoder-batch", type=int, default=128, help="encoder pre-training batch (default 128)")
    p.add_argument("--cnn-width", type=float, default=0.25, help="ResNet-18 width (default 0.25)")
    p.add_argument("--max-crop-shift", type=int, default=16, help="largest crop shift in px (default 16)")
    p.add_argument("--timing-steps", type=int, default=5, help="timed steps per row, interleaved (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny sizes and budgets, one seed")
    p.add_argument("--work", help="folder for checkpoints (default: a temporary folder)")
    p.add_argument("--out", default="bench/results/segmentation.json")
    p.add_argument(
        "--figure",
        nargs="?",
        const="docs/img/segmentation_shift.png",
        metavar="PNG",
        help="also draw the shift figure (default path: %(const)s)",
    )
    p.add_argument("--figure-shift", type=int, nargs=2, default=(5, 3), help="--figure: circular shift (dy, dx)")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def encoder_config(args: argparse.Namespace, row: str, seed: int, out: Path) -> TrainEncoderConfig:
    config, overrides = rows()[row]
    cnn = row.startswith("resnet")
    return load_config(
        TrainEncoderConfig,
        ROOT / "configs" / "encoder" / config,
        [
            *overrides,
            *([f"model.width={args.cnn_width}"] if cnn else []),
            "data.size=32",
            f"data.train_crops={args.train_crops}",
            "data.val_crops=16",
            f"epochs={args.encoder_epochs}",
            f"batch_size={args.encoder_batch}",
            "adv.enabled=false",
            "eval.enabled=false",
            f"seed={seed}",
            "device=cpu",
            f"out={out}",
        ],
    )


def segment_config(args: argparse.Namespace, row: str, encoder_path: Path, seed: int, out: Path) -> SegmentConfig:
    if row.startswith("resnet"):
        layer, skips = CNN_LAYER
    else:
        taps = load_encoder(encoder_path).layer_names
        layer, skips = taps[min(1, len(taps) - 1)], taps[: min(1, len(taps) - 1)]
    return load_config(
        SegmentConfig,
        None,
        [
            f"train.encoder.checkpoint={encoder_path}",
            f"train.encoder.layer={layer}",
            f"train.decoder.skips={skips}",
            f"train.finetune={not args.frozen}",
            f"train.data.size={args.size}",
            f"train.data.train_items={args.train_items}",
            f"train.data.val_items={args.val_items}",
            f"train.steps={args.steps}",
            f"train.batch_size={args.batch_size}",
            f"train.eval.images={args.val_items}",
            f"train.eval.max_crop_shift={args.max_crop_shift}",
            f"train.log_every={max(1, args.steps // 5)}",
            f"train.seed={seed}",
            "train.device=cpu",
            f"train.out={out}",
        ],
    )


def step_function(cfg: SegmentConfig):
    """One call: :meth:`SegmenterTrainer.train_step` of ``cfg``'s run on a fixed batch."""
    trainer = SegmenterTrainer(cfg.train, *setup_distributed("cpu"))
    trainer.segmenter.train()
    x, labels = next(iter(DataLoader(trainer.train_set, batch_size=cfg.train.batch_size)))
    return lambda: trainer.train_step(x, labels)


BUDGET_KEYS = (
    "size", "train_items", "val_items", "steps", "batch_size", "frozen",
    "encoder_epochs", "train_crops", "encoder_batch", "cnn_width",
)  # fmt: skip


def train(args: argparse.Namespace, row: str, seed: int, work: Path) -> dict[str, Any]:
    """Train the row's encoder, then its segmenter; the files and the times.

    Runs live in ``work/<row>_seed<k>_<hash of the budget>``: a finished one (its ``trained.json``
    written) of an earlier, interrupted bench with the same ``--work`` and budget is reused as it is.
    """
    budget = {k: getattr(args, k) for k in BUDGET_KEYS}
    run = work / f"{row}_seed{seed}_{hashlib.sha1(json.dumps(budget).encode()).hexdigest()[:8]}"
    record = run / "trained.json"
    if record.is_file():
        return json.loads(record.read_text())
    t0 = time.perf_counter()
    encoder = train_encoder(encoder_config(args, row, seed, run / "encoder"))
    t1 = time.perf_counter()
    cfg = segment_config(args, row, Path(encoder.path), seed, run / "segment")
    result = train_segmenter(cfg)
    trained = {
        "seed": seed,
        "layer": cfg.train.encoder.layer,
        "encoder": str(encoder.path),
        "model": str(result.path),
        "equivariant_decoder": result.model.decoder.upsample == "lps",
        "encoder_train_s": t1 - t0,
        "segmenter_train_s": time.perf_counter() - t1,
        "budget": budget,
    }
    atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(trained, indent=2) + "\n"))
    return trained


def evaluate(args: argparse.Namespace, trained: dict[str, dict[str, Any]], seed: int) -> None:
    """Add the metrics to each row's record, every row measured on the same scenes, shifts and crop side."""
    models = {row: load_segmenter(r["model"]) for row, r in trained.items()}
    multiple = max(m.size_multiple for m in models.values())
    val = SceneSegmentation("val", args.size, args.val_items, 0)
    for row, model in models.items():
        r = evaluate_segmenter(
            model.predict,
            val,
            len(model.classes),
            max_crop_shift=args.max_crop_shift,
            size_multiple=multiple,
            seed=seed,
        )
        trained[row].update({k: r[k] for k in ("miou", "masc_circular", "masc_crop", "pixel_acc", "crop_size")})


def summarise(runs: dict[str, list[dict[str, Any]]], ms: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for row, results in runs.items():
        summary: dict[str, Any] = {
            "model": row,
            "seeds": len(results),
            "ms_per_step": ms.get(row),
            "layer": results[0]["layer"],
            "per_seed": results,
        }
        for key in ("miou", "masc_circular", "masc_crop", "pixel_acc"):
            values = [r[key] for r in results]
            summary[key] = statistics.mean(values)
            summary[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(summary)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    pm = lambda r, k: f"{100 * r[k]:.2f} ± {100 * r[k + '_sd']:.2f}"  # noqa: E731
    lines = [
        "| model | layer | seeds | mIoU % | circular mASC % | crop mASC % | ms / step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        step = "–" if r["ms_per_step"] is None else f"{r['ms_per_step']:.0f}"
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['seeds']} | {pm(r, 'miou')} | {pm(r, 'masc_circular')} | "
            f"{pm(r, 'masc_crop')} | {step} |"
        )
    return "\n".join(lines)


@torch.no_grad()
def figure(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> Path:
    """Image, shifted image, and where each model's label map of the shifted image differs from its shifted map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    equivariant, plain = next(iter(pairs(list(runs))))
    val = SceneSegmentation("val", args.size, args.val_items, 0)
    x = val[0][0][None]
    shift = tuple(args.figure_shift)
    xs = x.roll(shift, (2, 3))
    panels = [
        ("image x", x[0].permute(1, 2, 0)),
        (f"T x (circular shift {shift[0]}, {shift[1]} px)", xs[0].permute(1, 2, 0)),
    ]
    for name in (plain, equivariant):
        model = load_segmenter(runs[name][-1]["model"])
        differ = model.predict(xs)[0] != model.predict(x)[0].roll(shift, (0, 1))
        panels.append(
            (f"{name}: seg(T x) != T seg(x)\n{100 * differ.float().mean():.1f}% of pixels (white)", differ.float())
        )
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.8))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = Path(args.figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    logging.basicConfig(level=logging.WARNING)
    names = args.models.split(",") if args.models else list(rows())
    bad = [m for m in names if m not in rows()]
    if bad:
        raise SystemExit(f"unknown rows {bad} (valid: {', '.join(rows())})")
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    ms: dict[str, float] = {}

    def write(complete: bool) -> dict[str, Any]:
        result = {
            "config": vars(args),
            "rows": summarise(runs, ms),
            "complete": complete,
            "total_s": time.perf_counter() - start,
            "torch": torch.__version__,
            "threads": args.threads,
        }
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
        return result

    with tempfile.TemporaryDirectory(prefix="rfi-bench-segmentation-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for seed in range(args.seeds):
            trained = {row: train(args, row, seed, work) for row in names}
            evaluate(args, trained, seed)
            for row, r in trained.items():
                runs.setdefault(row, []).append(r)
                print(
                    f"  {row:<14} seed {seed}: mIoU {100 * r['miou']:.1f}%, circular mASC "
                    f"{100 * r['masc_circular']:.2f}%, crop mASC {100 * r['masc_crop']:.2f}% "
                    f"({r['encoder_train_s'] + r['segmenter_train_s']:.0f} s)",
                    flush=True,
                )
            write(complete=False)
        if args.timing_steps > 0:
            cfgs = {
                row: segment_config(args, row, Path(runs[row][0]["encoder"]), 0, work / "timing" / row) for row in names
            }
            ms = interleaved_ms({row: step_function(c) for row, c in cfgs.items()}, args.timing_steps, warmup=1)
        if args.figure:
            figure(runs, args)
        result = write(complete=True)
    print(table(result["rows"]))
    print(f"total {time.perf_counter() - start:.0f} s ({args.threads} thread(s)); wrote {out}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
