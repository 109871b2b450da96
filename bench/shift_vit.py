"""Benchmark: plain vs truly shift-equivariant Swin / SwinV2 / MViTv2 / CvT, standard and robust, next to
ResNet-18 stride / LPS.

Every row gets the same budget: the same embedded "which photo" crops, epochs and batch size
(each model with its own shipped recipe: ``configs/encoder/{swin_t,mvit_v2,cvt_13}_tiny_*.yaml``
for the transformers, ``configs/encoder/resnet18_*.yaml`` at ``--cnn-width`` for the CNNs), then a
decoder for a stride-4 layer (``stage1`` / ``layer3``: 8x8 maps of 32-px crops) with the
same steps. Measured on held-out validation crops:

- clean accuracy and PGD-10 accuracy (L2, ``--eps``; for the adaptive models the attack
  differentiates the eval-mode forward, whose phase and window choices are argmax picks:
  the gradient flows through the kept values, not through the choices);
- classification consistency under two random *circular* shifts per image;
- classification consistency under *crop* shifts: two ``--size`` crops of a larger
  validation region, offset by a random non-zero shift of up to ``--max-crop-shift`` px in
  each direction (new content enters at the border, as when a camera moves);
- the decoder's PSNR and reconstruction equivariance under circular shifts (mean largest
  pixel difference; share of images within 1e-5);
- median ms of one encoder training step (the trainer's own
  :meth:`encoders.robust.train.EncoderTrainer.train_step`, PGD included for robust training), timed
  interleaved after all training so machine load hits every row alike.

Runs go seed by seed (all rows for seed 0, then seed 1, ...) and the JSON is rewritten
after every run, so an interrupted bench keeps what it measured. Per-seed differences
equivariant - plain are paired (same seed: same data order).

Usage:
    OMP_NUM_THREADS=1 python bench/shift_vit.py                  # 3 seeds, all rows
    OMP_NUM_THREADS=1 python bench/shift_vit.py --seeds 1 --models swin_t,swin_t_eq --trainings standard
    OMP_NUM_THREADS=1 python bench/shift_vit.py --tiny --out /tmp/shift_vit_tiny.json   # smoke run, every row

Prints a table and writes ``bench/results/shift_vit.json`` (``--out``).

The figure of ``docs/equivariant_vit.md`` (input, shifted copy, and how far each
autoencoder's reconstruction is from commuting with the shift)::

    python bench/shift_vit.py --figure docs/img/equivariant_vit_shift.png \
        --plain ENC.pt DEC.pt --equivariant ENC.pt DEC.pt
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shift import encoder_step, interleaved_ms  # noqa: E402  (the trainer's real step, timed round-robin)
from encoders.core.config import load_config  # noqa: E402
from encoders.core.serialization import atomic_write  # noqa: E402
from encoders.data.embedded import EmbeddedCrops  # noqa: E402
from encoders.nets.models import Encoder  # noqa: E402
from encoders.robust.evaluate import evaluate_encoder  # noqa: E402
from encoders.robust.shift import shift_consistency  # noqa: E402
from encoders.robust.train import TrainEncoderConfig, train_encoder  # noqa: E402
from encoders.weights.checkpoints import load_encoder  # noqa: E402
from inversion.autoencoder import RobustAutoencoder  # noqa: E402
from inversion.train import TrainDecoderConfig, train_decoder  # noqa: E402

# row name -> (encoder config stem without the training, overrides, decoder layer)
MODELS: dict[str, tuple[str, list[str], str]] = {
    "resnet18": ("resnet18_{t}", ["model.downsample=stride"], "layer3"),
    "resnet18_lps": ("resnet18_{t}", ["model.downsample=lps"], "layer3"),
    "swin_t": ("swin_t_tiny_{t}", [], "stage1"),
    "swin_t_eq": ("swin_t_tiny_{t}_equivariant", [], "stage1"),
    "swin_v2_t": ("swin_t_tiny_{t}", ["model.arch=swin_v2_t"], "stage1"),
    "swin_v2_t_eq": ("swin_t_tiny_{t}_equivariant", ["model.arch=swin_v2_t"], "stage1"),
    "mvit_v2_t": ("mvit_v2_tiny_{t}", [], "stage1"),
    "mvit_v2_t_eq": ("mvit_v2_tiny_{t}_equivariant", [], "stage1"),
    "cvt_13": ("cvt_13_tiny_{t}", [], "stage1"),
    "cvt_13_eq": ("cvt_13_tiny_{t}_equivariant", [], "stage1"),
}
PAIRS = (
    ("swin_t_eq", "swin_t"),
    ("swin_v2_t_eq", "swin_v2_t"),
    ("mvit_v2_t_eq", "mvit_v2_t"),
    ("cvt_13_eq", "cvt_13"),
    ("resnet18_lps", "resnet18"),
)
# --tiny: a smoke run of every row in seconds each (the pipeline, not the figures)
TINY = {
    "seeds": 1,
    "train_crops": 64,
    "val_crops": 16,
    "epochs": 1,
    "batch_size": 32,
    "adv_steps": 1,
    "pgd_steps": 1,
    "decoder_steps": 2,
    "decoder_batch": 8,
    "timing_steps": 1,
}
TRAININGS = ("standard", "robust")
METRICS = ("clean_acc", "pgd_acc", "consistency", "crop_consistency", "psnr", "recon_exact")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--trainings", default=",".join(TRAININGS), help="comma-separated subset of standard,robust")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--seed-list", help="comma-separated seeds instead of 0..N-1 (e.g. 1,2)")
    p.add_argument("--size", type=int, default=32, help="crop size in px (default 32)")
    p.add_argument("--train-crops", type=int, default=1500, help="training crops (default 1500)")
    p.add_argument("--val-crops", type=int, default=200, help="validation crops for every metric (default 200)")
    p.add_argument("--epochs", type=int, default=3, help="encoder epochs (default 3)")
    p.add_argument("--batch-size", type=int, default=128, help="encoder batch size (default 128)")
    p.add_argument("--cnn-width", type=float, default=0.125, help="ResNet-18 width (default 0.125)")
    p.add_argument("--eps", type=float, default=0.5, help="L2 radius for robust training and PGD eval")
    p.add_argument("--adv-steps", type=int, default=3, help="PGD steps in robust training (default 3)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps at evaluation (default 10)")
    p.add_argument("--max-crop-shift", type=int, default=8, help="largest crop shift in px (default 8)")
    p.add_argument("--decoder-steps", type=int, default=100, help="decoder training steps (default 100)")
    p.add_argument("--decoder-batch", type=int, default=32, help="decoder batch size (default 32)")
    p.add_argument("--timing-steps", type=int, default=5, help="timed encoder steps per row, interleaved (0: none)")
    p.add_argument("--timing-only", action="store_true", help="only time the training steps")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only combine earlier result files into one table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--work", help="folder for checkpoints (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    p.add_argument("--out", default="bench/results/shift_vit.json")
    p.add_argument("--figure", metavar="PNG", help="only draw the shift figure (needs --plain and --equivariant)")
    p.add_argument("--plain", nargs=2, metavar=("ENCODER", "DECODER"), help="--figure: plain autoencoder")
    p.add_argument("--equivariant", nargs=2, metavar=("ENCODER", "DECODER"), help="--figure: equivariant one")
    p.add_argument("--figure-size", type=int, default=64, help="--figure: image size (default 64)")
    p.add_argument("--figure-shift", type=int, nargs=2, default=(5, 3), help="--figure: circular shift (dy, dx)")
    args = p.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY)
    return args


@torch.no_grad()
def figure(args: argparse.Namespace) -> None:
    """Input, shifted input, and |D(E(T x)) - T D(E(x))| for the plain and the equivariant autoencoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crops = EmbeddedCrops("val", args.figure_size, 16, 0)
    x = max((crops[i][0] for i in range(len(crops))), key=lambda c: float(c.std()))[None]  # the most textured
    shift = tuple(args.figure_shift)
    xs = x.roll(shift, (2, 3))
    panels = [("input x", x[0]), (f"T x (circular shift {shift[0]}, {shift[1]} px)", xs[0])]
    for name, (enc, dec) in (("plain", args.plain), ("equivariant", args.equivariant)):
        ae = RobustAutoencoder.from_checkpoints(enc, dec)
        diff = (ae.reconstruct(xs) - ae.reconstruct(x).roll(shift, (2, 3))).abs()
        panels.append(
            (f"{name} Swin: |D(E(Tx)) - T D(E(x))|\nmax {diff.max():.2e} (shown x4)", (4 * diff[0]).clamp(0, 1))
        )
        print(f"{name}: largest pixel difference {diff.max():.3e}, mean {diff.mean():.3e}")
    fig, axes = plt.subplots(1, 4, figsize=(13, 4.0))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=100)
    print(f"wrote {args.figure}")


def encoder_config(args: argparse.Namespace, model: str, training: str, seed: int, out: Path) -> TrainEncoderConfig:
    stem, overrides, _ = MODELS[model]
    cnn = model.startswith("resnet")
    return load_config(
        TrainEncoderConfig,
        ROOT / "configs" / "encoder" / f"{stem.format(t=training)}.yaml",
        [
            *overrides,
            *([f"model.width={args.cnn_width}"] if cnn else []),
            f"data.size={args.size}",
            f"data.train_crops={args.train_crops}",
            f"data.val_crops={args.val_crops}",
            f"epochs={args.epochs}",
            f"batch_size={args.batch_size}",
            f"adv.eps={args.eps}",
            f"adv.steps={args.adv_steps}",
            "eval.enabled=false",
            f"seed={seed}",
            "device=cpu",
            f"out={out}",
        ],
    )


def decoder_config(
    args: argparse.Namespace, model: str, encoder_path: Path, seed: int, out: Path
) -> TrainDecoderConfig:
    return load_config(
        TrainDecoderConfig,
        None,
        [
            f"encoder.checkpoint={encoder_path}",
            f"encoder.layer={MODELS[model][2]}",
            "decoder.channels=32",
            "decoder.min_channels=16",
            f"data.size={args.size}",
            f"data.train_crops={args.train_crops}",
            f"data.val_crops={min(args.val_crops, 128)}",
            f"steps={args.decoder_steps}",
            f"batch_size={args.decoder_batch}",
            "sample_every=0",
            f"log_every={max(1, args.decoder_steps // 5)}",
            f"seed={seed}",
            "device=cpu",
            f"out={out}",
        ],
    )


@torch.no_grad()
def crop_shift_consistency(encoder: Encoder, regions: torch.Tensor, size: int, seed: int) -> float:
    """Share of regions whose two ``size`` crops, at random distinct offsets, get the same class."""
    g = torch.Generator().manual_seed(seed)
    span = regions.shape[-1] - size
    a = torch.randint(span + 1, (len(regions), 2), generator=g)
    b = torch.randint(span + 1, (len(regions), 2), generator=g)
    same = (a == b).all(1)
    b[same] = (b[same] + 1) % (span + 1)  # always a real shift

    def crop(offsets: torch.Tensor) -> torch.Tensor:
        return torch.stack([r[:, i : i + size, j : j + size] for r, (i, j) in zip(regions, offsets.tolist())])

    encoder.eval()
    agree = 0
    for start in range(0, len(regions), 100):
        sl = slice(start, start + 100)
        agree += (encoder.logits(crop(a[sl])).argmax(1) == encoder.logits(crop(b[sl])).argmax(1)).sum().item()
    return agree / len(regions)


def measure(args: argparse.Namespace, model: str, training: str, seed: int, work: Path) -> dict[str, Any]:
    run = work / f"{model}_{training}_seed{seed}"
    cfg = encoder_config(args, model, training, seed, run / "encoder")
    t0 = time.perf_counter()
    enc_path = train_encoder(cfg)
    t1 = time.perf_counter()
    dec_path = train_decoder(decoder_config(args, model, enc_path, seed, run / "decoder"))
    t2 = time.perf_counter()
    encoder = load_encoder(enc_path)
    val = EmbeddedCrops("val", args.size, args.val_crops, 0)
    attack = evaluate_encoder(
        encoder,
        val,
        eps=args.eps,
        steps=args.pgd_steps,
        norm="l2",
        max_images=args.val_crops,
        batch_size=100,
        seed=seed,
    )
    ae = RobustAutoencoder.from_checkpoints(encoder, dec_path)
    layer = MODELS[model][2]
    shift = shift_consistency(encoder, val, layer, ae.reconstruct, batch_size=100, seed=seed)
    big = EmbeddedCrops("val", args.size + args.max_crop_shift, args.val_crops, 0)
    regions = torch.stack([big[i][0] for i in range(len(big))])
    return {
        "clean_acc": attack["clean_acc"],
        "pgd_acc": attack["pgd_acc"],
        "consistency": shift["consistency"],
        "crop_consistency": crop_shift_consistency(encoder, regions, args.size, seed),
        "feature_equiv_error": shift["feature_equiv_error"],
        "psnr": shift["psnr"],
        "recon_equiv_error": shift["recon_equiv_error"],
        "recon_exact": shift["recon_exact"],
        "encoder_train_s": t1 - t0,
        "decoder_train_s": t2 - t1,
        "layer": layer,
    }


def summarise(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (mean and sd over seeds) and paired per-seed differences equivariant - plain."""
    rows = []
    for (model, training), results in runs.items():
        row: dict[str, Any] = {"model": model, "training": training, "seeds": len(results)}
        for k in (*METRICS, "feature_equiv_error", "recon_equiv_error", "encoder_train_s"):
            vals = [r[k] for r in results]
            row[k] = statistics.mean(vals)
            row[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["per_seed"] = results
        rows.append(row)
    lines = []
    for training in TRAININGS:
        for new, old in PAIRS:
            a = {r.get("seed", i): r for i, r in enumerate(runs.get((new, training), []))}
            b = {r.get("seed", i): r for i, r in enumerate(runs.get((old, training), []))}
            common = sorted(set(a) & set(b))
            n = len(common)
            if not n:
                continue
            parts = []
            for k, scale, unit in (
                ("clean_acc", 100, "pt"),
                ("pgd_acc", 100, "pt"),
                ("consistency", 100, "pt"),
                ("crop_consistency", 100, "pt"),
                ("psnr", 1, "dB"),
            ):
                d = [scale * (a[sd][k] - b[sd][k]) for sd in common]
                parts.append(f"{k} {statistics.mean(d):+.1f} {unit} [{', '.join(f'{v:+.1f}' for v in d)}]")
            lines.append(f"{training}: {new} - {old} over {n} paired seed(s): " + "; ".join(parts))
    return rows, lines


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':<13} {'training':<9} {'seeds':>5} {'clean':>12} {'PGD-10':>12} {'circ. cons.':>12} "
        f"{'crop cons.':>12} {'PSNR dB':>12} {'rec exact':>9} {'rec err':>8} {'ms/step':>8}"
    )
    lines = [head, "-" * len(head)]
    pm = lambda r, k, s=100: f"{s * r[k]:.1f}±{s * r[k + '_sd']:.1f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"{r['model']:<13} {r['training']:<9} {r['seeds']:>5} {pm(r, 'clean_acc'):>12} "
            f"{pm(r, 'pgd_acc'):>12} {pm(r, 'consistency'):>12} {pm(r, 'crop_consistency'):>12} "
            f"{pm(r, 'psnr', 1):>12} {100 * r['recon_exact']:>8.1f}% {r['recon_equiv_error']:>8.1e} "
            f"{r.get('encoder_step_ms') or float('nan'):>8.0f}"
        )
    return "\n".join(lines)


def merge(paths: list[str]) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], dict[tuple[str, str], float]]:
    """Per-seed results and step times from earlier JSON files of this bench (later files win)."""
    runs: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    ms: dict[tuple[str, str], float] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        cfg = data.get("config", {})
        seeds = [int(v) for v in cfg["seed_list"].split(",")] if cfg.get("seed_list") else None
        for row in data["rows"]:
            key = (row["model"], row["training"])
            for i, r in enumerate(row.get("per_seed", [])):
                seed = r.get("seed", seeds[i] if seeds else i)
                runs.setdefault(key, {})[seed] = {**r, "seed": seed}
            if row.get("encoder_step_ms") is not None:
                ms[key] = row["encoder_step_ms"]
    return {k: [v[s] for s in sorted(v)] for k, v in runs.items()}, ms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.figure:
        if not (args.plain and args.equivariant):
            raise SystemExit("--figure needs --plain ENCODER DECODER and --equivariant ENCODER DECODER")
        figure(args)
        return 0
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    logging.basicConfig(level=logging.WARNING)
    models, trainings = args.models.split(","), args.trainings.split(",")
    bad = [m for m in models if m not in MODELS] + [t for t in trainings if t not in TRAININGS]
    if bad:
        raise SystemExit(f"unknown model/training {bad} (valid: {list(MODELS)}, {list(TRAININGS)})")
    seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    start = time.perf_counter()
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    ms: dict[tuple[str, str], float] = {}
    if args.merge:
        runs, ms = merge(args.merge)
        seeds = []

    def write(rows: list[dict[str, Any]], lines: list[str], complete: bool) -> None:
        result = {
            "config": vars(args),
            "rows": rows,
            "paired": lines,
            "complete": complete,
            "total_s": time.perf_counter() - start,
            "torch": torch.__version__,
            "threads": args.threads,
        }
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))

    with tempfile.TemporaryDirectory(prefix="rfi-bench-shift-vit-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for seed in [] if args.timing_only else seeds:
            for training in trainings:
                for model in models:
                    t = time.perf_counter()
                    r = {**measure(args, model, training, seed, work), "seed": seed}
                    runs.setdefault((model, training), []).append(r)
                    print(
                        f"  {model:<13} {training:<9} seed {seed}: clean {100 * r['clean_acc']:.1f}%, PGD "
                        f"{100 * r['pgd_acc']:.1f}%, circ {100 * r['consistency']:.1f}%, crop "
                        f"{100 * r['crop_consistency']:.1f}%, PSNR {r['psnr']:.2f} dB, exact "
                        f"{100 * r['recon_exact']:.0f}% ({time.perf_counter() - t:.0f} s)",
                        flush=True,
                    )
                    write(*summarise(runs), complete=False)
        if args.timing_steps > 0 and not args.merge:
            print(f"  timing {args.timing_steps} interleaved rounds ...", flush=True)
            cfgs = {(m, t): encoder_config(args, m, t, 0, work / "timing") for t in trainings for m in models}
            ms = interleaved_ms({k: encoder_step(c) for k, c in cfgs.items()}, args.timing_steps, warmup=1)
    if args.timing_only:
        rows = [{"model": m, "training": t, "encoder_step_ms": v, "per_seed": []} for (m, t), v in ms.items()]
        write(rows, [], complete=True)
        print("\n".join(f"{m:<13} {t:<9} {v:8.0f} ms/step" for (m, t), v in ms.items()))
        return 0
    rows, lines = summarise(runs)
    for row in rows:
        row["encoder_step_ms"] = ms.get((row["model"], row["training"]))
    print(table(rows))
    print("\n".join(lines))
    print(f"total {time.perf_counter() - start:.0f} s ({args.threads} thread(s))")
    write(rows, lines, complete=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
