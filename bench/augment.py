"""StyleAugment (SASSL) benchmark: linear-probe accuracy of a small SimCLR run with and without it,
its throughput, and its share of the SSL step time.

For every seed, the same SimCLR run (``configs/apps/ssl.yaml``: ResNet-18 width 0.25 on
32-px views of the embedded photos) is trained twice, interleaved: with the standard views
(crop, flip, colour jitter, grayscale) and with StyleAugment added after crop/flip. Both
runs of a seed share initialisation, data order and standard-augmentation draws
(StyleAugment has its own generator), so the accuracy difference is paired. A linear probe
(logistic regression on frozen features, 8-way "which photo", validation crops from
held-out regions) scores each backbone; the untrained backbone is probed too, as a floor.
Step times are medians over the steps of each run; StyleAugment's share is timed inside the
same steps. Throughput: StyleAugment alone on a batch of 64 crops of 64x64, median of
``--repeats`` calls. Prints a table and writes ``bench/results/augment.json``.

    python bench/augment.py                          # 3 seeds, ~10 min on 2 CPU cores
    python bench/augment.py --seeds 5 --epochs 10    # bigger budget
    python bench/augment.py --set style.p=0.8 --set crops=8192

The style model is the default robust autoencoder (runs/encoders/resnet18_robust/checkpoint.pt
+ runs/decoders/resnet18_robust_layer3/decoder.pt); ``--train-missing`` trains whichever is
missing with the public training functions and default configs first, or pass ``--model``
(an autoencoder file) or ``--encoder`` + ``--decoder``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.augment import DEFAULT_DECODER, DEFAULT_ENCODER, StyleAugment, load_style_model  # noqa: E402
from apps.simclr import SimCLR, SSLConfig, build_views, linear_probe, run_ssl  # noqa: E402
from encoders.config import config_to_dict, load_config  # noqa: E402
from encoders.data import EmbeddedCrops  # noqa: E402
from encoders.errors import RFIError  # noqa: E402
from encoders.evaluate import write_json  # noqa: E402
from encoders.runtime import seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SSL_CONFIG = ROOT / "configs" / "apps" / "ssl.yaml"
ENCODER_CONFIG = ROOT / "configs" / "encoder" / "resnet18_robust.yaml"
DECODER_CONFIG = ROOT / "configs" / "decoder" / "resnet18_robust_layer3.yaml"
GOAL_OVERHEAD = 0.25


def train_missing_defaults() -> None:
    """Train the default robust encoder and its layer3 decoder where their files are missing."""
    if not DEFAULT_ENCODER.is_file():
        from encoders.train import TrainEncoderConfig, train_encoder

        print(f"training the default robust encoder -> {DEFAULT_ENCODER.parent} (a few minutes)", flush=True)
        train_encoder(load_config(TrainEncoderConfig, ENCODER_CONFIG, [f"out={DEFAULT_ENCODER.parent}"]))
    if not DEFAULT_DECODER.is_file():
        from inversion.train import TrainDecoderConfig, train_decoder

        print(f"training its layer3 decoder -> {DEFAULT_DECODER.parent} (a few minutes)", flush=True)
        train_decoder(load_config(TrainDecoderConfig, DECODER_CONFIG,
                                  [f"out={DEFAULT_DECODER.parent}", f"encoder.checkpoint={DEFAULT_ENCODER}"]))


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(model, cfg: SSLConfig, repeats: int) -> dict[str, float]:
    """Images/s of StyleAugment (p=1 and the configured p) and of the standard views, batch 64 at 64x64."""
    x = torch.stack([EmbeddedCrops("train", 64, 64, seed=1)[i][0] for i in range(64)])
    geometry, _, colour = build_views(load_config(SSLConfig, None, ["view_size=64"]), torch.device("cpu"))
    out = {}
    for p in sorted({1.0, cfg.style.p}, reverse=True):
        aug = StyleAugment(model, p=p, alpha=cfg.style.alpha, beta=cfg.style.beta, generator=0)
        out[f"style_p{p:g}"] = len(x) / timed(lambda: aug(x), repeats)
    out["standard_views"] = len(x) / timed(lambda: colour(geometry(x)), repeats)
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="SSL seeds (each: one run per pipeline)")
    parser.add_argument("--epochs", type=int, help="SSL epochs (default: configs/apps/ssl.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override configs/apps/ssl.yaml (repeatable), e.g. --set style.p=0.8")
    parser.add_argument("--model", help="style autoencoder file (RobustAutoencoder.save)")
    parser.add_argument("--encoder", help="style encoder checkpoint (with --decoder)")
    parser.add_argument("--decoder", help="style decoder checkpoint (with --encoder)")
    parser.add_argument("--train-missing", action="store_true",
                        help="train the default robust encoder / decoder first if their files are missing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls for the throughput medians")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "augment.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.encoder) != bool(args.decoder):
        parser.error("--encoder and --decoder go together")
    if not (args.model or args.encoder) and args.train_missing:
        train_missing_defaults()
    style_keys = ([f"style.model={args.model}"] if args.model else
                  [f"style.encoder={args.encoder}", f"style.decoder={args.decoder}"] if args.encoder else
                  [f"style.encoder={DEFAULT_ENCODER}", f"style.decoder={DEFAULT_DECODER}"])
    overrides = [*args.set, *([f"epochs={args.epochs}"] if args.epochs else [])]
    try:
        model = load_style_model(args.model or (args.encoder, args.decoder) if (args.model or args.encoder) else None)
        base = load_config(SSLConfig, SSL_CONFIG, overrides)
    except RFIError as e:
        print(f"bench/augment.py: {e}", file=sys.stderr)
        print("(or run: python bench/augment.py --train-missing)", file=sys.stderr)
        return 2

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    speed = throughput(model, base, args.repeats)
    print(f"StyleAugment, batch 64 at 64x64: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in speed.items()),
          flush=True)

    runs: dict[str, list[dict]] = {"untrained": [], "standard": [], "standard+style": []}
    for seed in range(args.seeds):
        cfg = load_config(SSLConfig, SSL_CONFIG, [*overrides, f"seed={seed}"])
        seed_everything(seed)
        runs["untrained"].append({"seed": seed, "probe_acc": linear_probe(SimCLR(cfg.width, cfg.proj_dim).eval(), cfg)})
        for name, style in (("standard", False), ("standard+style", True)):
            cfg = load_config(SSLConfig, SSL_CONFIG,
                              [*overrides, f"seed={seed}", f"style.enabled={str(style).lower()}",
                               *(style_keys if style else [])])
            result = {"seed": seed, **run_ssl(cfg)}
            runs[name].append(result)
            print(f"seed {seed} {name:<15} probe {100 * result['probe_acc']:.1f}%  step {result['step_ms']:.0f} ms"
                  f"  style {result['style_ms']:.0f} ms  loss {result['loss_first']:.2f} -> {result['loss_last']:.2f}",
                  flush=True)

    summary = {}
    for name, rs in runs.items():
        acc_mean, acc_sd = mean_sd([r["probe_acc"] for r in rs])
        row = {"probe_acc_mean": acc_mean, "probe_acc_sd": acc_sd}
        if name != "untrained":
            row["step_ms"] = statistics.median(r["step_ms"] for r in rs)
            row["style_ms"] = statistics.median(r["style_ms"] for r in rs)
            row["images_per_s"] = statistics.median(r["images_per_s"] for r in rs)
        summary[name] = row
    diffs = [s["probe_acc"] - p["probe_acc"] for s, p in zip(runs["standard+style"], runs["standard"])]
    gain_mean, gain_sd = mean_sd(diffs)
    share = statistics.median(r["style_ms"] / r["step_ms"] for r in runs["standard+style"])
    overhead = statistics.median(s["step_ms"] / p["step_ms"] - 1 for s, p in zip(runs["standard+style"], runs["standard"]))

    cfg0 = load_config(SSLConfig, SSL_CONFIG, overrides)
    print()
    length = f"{cfg0.steps} steps" if cfg0.steps else f"{cfg0.epochs} epochs"
    print(f"SimCLR, {length} on {cfg0.crops} crops ({cfg0.view_size}-px views, batch {cfg0.batch_size}), "
          f"{args.seeds} seeds; StyleAugment p={cfg0.style.p:g} alpha={tuple(cfg0.style.alpha)} "
          f"beta={tuple(cfg0.style.beta)} on both views")
    head = f"{'pipeline':<16} {'linear probe':>15} {'step ms':>8} {'style ms':>9} {'img/s':>6}"
    print(head)
    print("-" * len(head))
    for name, row in summary.items():
        acc = f"{100 * row['probe_acc_mean']:.1f} ± {100 * row['probe_acc_sd']:.1f}%"
        timing = (f"{row['step_ms']:>8.0f} {row['style_ms']:>9.0f} {row['images_per_s']:>6.0f}" if "step_ms" in row
                  else f"{'-':>8} {'-':>9} {'-':>6}")
        print(f"{name:<16} {acc:>15} {timing}")
    print(f"paired gain from StyleAugment: {100 * gain_mean:+.1f} ± {100 * gain_sd:.1f} points")
    print(f"StyleAugment share of the step: {100 * share:.0f}%; step time +{100 * overhead:.0f}% vs standard "
          f"(goal < {100 * GOAL_OVERHEAD:.0f}%: {'met' if overhead < GOAL_OVERHEAD else 'NOT met'})")
    print(f"StyleAugment throughput (batch 64, 64x64): "
          + ", ".join(f"{k} {v:.0f} img/s" for k, v in speed.items()))

    path = write_json({
        "command": "python bench/augment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "ssl_config": config_to_dict(cfg0), "seeds": args.seeds,
        "style_model": {"model": args.model, "encoder": args.encoder or (None if args.model else str(DEFAULT_ENCODER)),
                        "decoder": args.decoder or (None if args.model else str(DEFAULT_DECODER))},
        "throughput_images_per_s": speed, "summary": summary,
        "paired_gain": {"mean": gain_mean, "sd": gain_sd, "per_seed": diffs},
        "style_share_of_step": share, "step_overhead": overhead, "goal_overhead": GOAL_OVERHEAD,
        "runs": runs,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "platform": platform.platform(), "load_average_start": load_start,
                        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                        "wall_s": time.perf_counter() - started},
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
