"""Benchmark: stride vs blur pooling vs learnable polyphase sampling (LPS), standard and robust training.

For each down-sampling (``stride``, ``blurpool``, ``lps``) and each training (standard, and
adversarial with L2 PGD), with the same budget: train a ResNet-18 encoder on the embedded
"which photo" task (``rfi train-encoder``'s :func:`encoders.robust.train.train_encoder`), train a
decoder for its ``layer3`` (:func:`inversion.train.train_decoder`; LPU up-sampling for the
LPS encoder), then measure on held-out validation crops:

- clean accuracy and PGD accuracy (L2, ``--eps``, ``--pgd-steps`` steps);
- classification shift consistency (two random circular shifts per image) and the
  ``layer3`` feature equivariance error (:func:`encoders.robust.shift.shift_consistency`);
- the decoder's reconstruction PSNR, its equivariance error (largest pixel difference
  between ``D(E(T_b x))`` and ``T_{b-a} D(E(T_a x))``) and the share of exactly
  equivariant reconstructions (<= 1e-5);
- the median time of an encoder training step (:meth:`encoders.robust.train.EncoderTrainer.train_step`:
  PGD example generation included for robust training) and of a decoder training step
  (:meth:`inversion.train.DecoderTrainer.train_step`: encoder forward, decoder, the run's
  pixel + feature loss, backward, update): the trainers' own steps, with each run's config,
  on one fixed batch of its training data. Timing runs after all training, *interleaved*:
  every round times one step of each configuration in turn, so load from other processes
  on a shared machine hits all of them alike.

Usage:
    python bench/shift.py                       # default: small, about 10 minutes on 2 idle CPU cores
    python bench/shift.py --train-crops 12000 --epochs 4 --decoder-steps 1500 --width 0.25 --seeds 3

Prints a table and writes ``bench/results/shift.json`` (``--out``). With ``--seeds N`` every
figure is the median over N seeds.
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
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.core.config import load_config  # noqa: E402
from encoders.core.runtime import setup_distributed  # noqa: E402
from encoders.core.serialization import atomic_write  # noqa: E402
from encoders.data.build import DataConfig  # noqa: E402
from encoders.data.embedded import EmbeddedCrops  # noqa: E402
from encoders.robust.evaluate import evaluate_encoder  # noqa: E402
from encoders.robust.shift import shift_consistency  # noqa: E402
from encoders.robust.train import EncoderTrainer, TrainEncoderConfig, train_encoder  # noqa: E402
from inversion.autoencoder import RobustAutoencoder  # noqa: E402
from inversion.train import DecoderTrainer, TrainDecoderConfig, train_decoder  # noqa: E402

METHODS = ("stride", "blurpool", "lps")
TRAININGS = ("standard", "robust")
LAYER = "layer3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of stride,blurpool,lps")
    p.add_argument("--trainings", default=",".join(TRAININGS), help="comma-separated subset of standard,robust")
    p.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    p.add_argument("--width", type=float, default=0.125, help="encoder width multiplier (default 0.125)")
    p.add_argument("--size", type=int, default=32, help="crop size in px (default 32)")
    p.add_argument("--train-crops", type=int, default=3000, help="training crops (default 3000)")
    p.add_argument("--val-crops", type=int, default=500, help="validation crops (default 500)")
    p.add_argument("--epochs", type=int, default=3, help="encoder epochs (default 3)")
    p.add_argument("--batch-size", type=int, default=128, help="encoder batch size (default 128)")
    p.add_argument("--eps", type=float, default=0.5, help="L2 radius for robust training and PGD eval")
    p.add_argument("--adv-steps", type=int, default=3, help="PGD steps in robust training (default 3)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps at evaluation (default 10)")
    p.add_argument("--decoder-steps", type=int, default=200, help="decoder training steps (default 200)")
    p.add_argument("--decoder-channels", type=int, default=32, help="decoder width (default 32)")
    p.add_argument("--decoder-batch", type=int, default=32, help="decoder batch size (default 32)")
    p.add_argument("--eval-images", type=int, default=500, help="validation images for every metric")
    p.add_argument(
        "--timing-steps",
        type=int,
        default=8,
        help="timed training steps of each configuration, interleaved (median; default 8)",
    )
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1, report medians")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models on shared cores)")
    p.add_argument("--work", help="folder for the runs' checkpoints (default: a temporary folder)")
    p.add_argument("--out", default="bench/results/shift.json")
    return p.parse_args(argv)


def encoder_config(args: argparse.Namespace, method: str, training: str, seed: int, out: Path) -> TrainEncoderConfig:
    return load_config(
        TrainEncoderConfig,
        None,
        [
            f"model.arch={args.arch}",
            f"model.width={args.width}",
            "model.small_input=true",
            f"model.downsample={method}",
            f"data.size={args.size}",
            f"data.train_crops={args.train_crops}",
            f"data.val_crops={args.val_crops}",
            f"epochs={args.epochs}",
            f"batch_size={args.batch_size}",
            f"adv.enabled={training == 'robust'}",
            f"adv.eps={args.eps}",
            f"adv.steps={args.adv_steps}",
            "eval.enabled=false",
            f"seed={seed}",
            "device=cpu",
            f"out={out}",
        ],
    )


def decoder_config(args: argparse.Namespace, encoder_path: Path, seed: int, out: Path) -> TrainDecoderConfig:
    return load_config(
        TrainDecoderConfig,
        None,
        [
            f"encoder.checkpoint={encoder_path}",
            f"encoder.layer={LAYER}",
            f"decoder.channels={args.decoder_channels}",
            f"decoder.min_channels={max(8, args.decoder_channels // 2)}",
            f"data.size={args.size}",
            f"data.train_crops={args.train_crops}",
            f"data.val_crops={min(args.val_crops, 128)}",
            f"steps={args.decoder_steps}",
            f"batch_size={args.decoder_batch}",
            "sample_every=0",
            f"log_every={max(1, args.decoder_steps // 10)}",
            f"seed={seed}",
            "device=cpu",
            f"out={out}",
        ],
    )


def _first_batch(dataset, batch_size: int) -> Any:
    return next(iter(DataLoader(dataset, batch_size=batch_size)))


def encoder_step(cfg: TrainEncoderConfig):
    """A function running one step of ``cfg``'s encoder training: :meth:`EncoderTrainer.train_step` on a fixed batch."""
    trainer = EncoderTrainer(cfg, *setup_distributed(cfg.device))
    trainer.encoder.train()
    x, y = _first_batch(trainer.train_set, cfg.batch_size)
    return lambda: trainer.train_step(x, y)


def decoder_step(cfg: TrainDecoderConfig):
    """A function running one step of ``cfg``'s decoder training: :meth:`DecoderTrainer.train_step` on a fixed batch."""
    trainer = DecoderTrainer(cfg, None, *setup_distributed(cfg.device))
    trainer.decoder.train()
    x, _ = _first_batch(trainer.train_set, cfg.batch_size)
    return lambda: trainer.train_step(x)


def interleaved_ms(steps: dict[str, Any], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each step function, timed round-robin (one call of each per round)."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[key].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(args: argparse.Namespace, method: str, training: str, seed: int, work: Path) -> dict[str, Any]:
    run = work / f"{method}_{training}_seed{seed}"
    cfg = encoder_config(args, method, training, seed, run / "encoder")
    t0 = time.perf_counter()
    trained = train_encoder(cfg)
    encoder = trained.model
    t1 = time.perf_counter()
    dec_cfg = decoder_config(args, trained.path, seed, run / "decoder")
    dec_path = train_decoder(dec_cfg).path
    t2 = time.perf_counter()
    val = EmbeddedCrops("val", args.size, args.val_crops, DataConfig().seed)
    attack = evaluate_encoder(
        encoder,
        val,
        eps=args.eps,
        steps=args.pgd_steps,
        norm="l2",
        max_images=args.eval_images,
        batch_size=250,
        seed=seed,
    )
    ae = RobustAutoencoder.from_checkpoints(encoder, dec_path)
    shift = shift_consistency(
        encoder, val, LAYER, ae.reconstruct, max_images=args.eval_images, batch_size=100, seed=seed
    )
    return {
        "clean_acc": attack["clean_acc"],
        "pgd_acc": attack["pgd_acc"],
        "consistency": shift["consistency"],
        "feature_equiv_error": shift["feature_equiv_error"],
        "psnr": shift["psnr"],
        "recon_equiv_error": shift["recon_equiv_error"],
        "recon_exact": shift["recon_exact"],
        "encoder_train_s": t1 - t0,
        "decoder_train_s": t2 - t1,
    }, (cfg, dec_cfg)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'method':<9} {'training':<9} {'clean':>6} {'PGD':>6} {'consist.':>8} {'feat err':>9} "
        f"{'PSNR dB':>7} {'rec err':>8} {'exact':>6} {'enc ms/step':>11} {'dec ms/step':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<9} {r['training']:<9} {100 * r['clean_acc']:>5.1f}% {100 * r['pgd_acc']:>5.1f}% "
            f"{100 * r['consistency']:>7.1f}% {r['feature_equiv_error']:>9.2e} {r['psnr']:>7.2f} "
            f"{r['recon_equiv_error']:>8.1e} {100 * r['recon_exact']:>5.1f}% {r['encoder_step_ms']:>11.1f} "
            f"{r['decoder_step_ms']:>11.1f}"
        )
    return "\n".join(lines)


def goal(rows: list[dict[str, Any]]) -> list[str]:
    """LPS vs stride, per training: 100% consistency, accuracy within 1 point, PSNR within 0.5 dB."""
    out = []
    for training in TRAININGS:
        by = {r["method"]: r for r in rows if r["training"] == training}
        if "lps" not in by or "stride" not in by:
            continue
        lps, ref = by["lps"], by["stride"]
        # Paired by seed (same data order and initial weights apart from the sampling layers):
        # the median of per-seed differences, and their range.
        diffs = {
            k: [scale * (a[k] - b[k]) for a, b in zip(lps["per_seed"], ref["per_seed"])]
            for k, scale in (("clean_acc", 100), ("pgd_acc", 100), ("psnr", 1))
        }
        d_acc, d_pgd, d_psnr = (statistics.median(diffs[k]) for k in ("clean_acc", "pgd_acc", "psnr"))
        spread = (
            ", ".join(f"{k} {min(v):+.1f}..{max(v):+.1f}" for k, v in diffs.items()) if len(diffs["psnr"]) > 1 else ""
        )
        ok = lps["consistency"] == 1.0 and d_acc >= -1.0 and d_psnr >= -0.5
        out.append(
            f"{training}: LPS consistency {100 * lps['consistency']:.1f}%, clean acc {d_acc:+.1f} pt, "
            f"PGD acc {d_pgd:+.1f} pt, PSNR {d_psnr:+.2f} dB vs stride (median of per-seed differences"
            f"{'; range ' + spread if spread else ''}) -> goal {'met' if ok else 'NOT met'}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    logging.basicConfig(level=logging.WARNING)
    methods, trainings = args.methods.split(","), args.trainings.split(",")
    bad = [m for m in methods if m not in METHODS] + [t for t in trainings if t not in TRAININGS]
    if bad:
        raise SystemExit(f"unknown method/training {bad} (valid: {METHODS}, {TRAININGS})")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rfi-bench-shift-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        rows, configs = [], {}
        for training in trainings:
            for method in methods:
                runs = []
                for seed in range(args.seeds):
                    t = time.perf_counter()
                    result, cfgs = measure(args, method, training, seed, work)
                    runs.append(result)
                    configs.setdefault((method, training), cfgs)
                    print(
                        f"  {method:<9} {training:<9} seed {seed}: clean {100 * result['clean_acc']:.1f}%, "
                        f"consistency {100 * result['consistency']:.1f}%, PSNR {result['psnr']:.2f} dB "
                        f"({time.perf_counter() - t:.0f} s)",
                        flush=True,
                    )
                row = {"method": method, "training": training, "seeds": args.seeds}
                row.update({k: statistics.median(r[k] for r in runs) for k in runs[0]})
                row["per_seed"] = [{k: r[k] for k in ("clean_acc", "pgd_acc", "consistency", "psnr")} for r in runs]
                rows.append(row)
        print(f"  timing {args.timing_steps} interleaved rounds ...", flush=True)
        enc_ms = interleaved_ms({k: encoder_step(c[0]) for k, c in configs.items()}, args.timing_steps)
        dec_ms = interleaved_ms({k: decoder_step(c[1]) for k, c in configs.items()}, args.timing_steps)
        for row in rows:
            key = (row["method"], row["training"])
            row.update(encoder_step_ms=enc_ms[key], decoder_step_ms=dec_ms[key])
    print(table(rows))
    checks = goal(rows)
    print("\n".join(checks))
    total = time.perf_counter() - start
    print(f"total {total:.0f} s ({args.threads} thread(s))")
    result = {
        "config": vars(args),
        "layer": LAYER,
        "rows": rows,
        "goal": checks,
        "total_s": total,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
