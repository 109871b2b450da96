"""Encoder training benchmark: speed and peak memory of ``rfi train-encoder`` vs a plain PyTorch loop.

Four variants train the same model (the default config's ResNet-18, width 0.25, 32-px
embedded crops, batch 128, SGD) for one epoch over the same crops:

- ``rfi standard`` / ``rfi adversarial``: :func:`encoders.robust.train.train_encoder` (the
  adversarial one with the default L2 PGD, eps 0.5, 3 steps);
- ``plain standard`` / ``plain adversarial``: a minimal hand-written PyTorch loop of the
  same model and optimizer (the adversarial one with an inline 3-step L2 PGD).

Each measurement runs in a fresh process (so its peak memory is its own: ``ru_maxrss`` on
CPU, ``torch.cuda.max_memory_allocated`` on GPU); variants are interleaved and repeated,
and the table reports medians. ``--full`` also trains the two default configs
(``configs/encoder/resnet18_{robust,standard}.yaml``, reusing finished runs) and reports
their clean and PGD-10 accuracy at the training eps.

Usage:
    python bench/encoders.py                   # a few minutes on 2 CPU cores
    python bench/encoders.py --full            # + the full-budget robust vs standard figure
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from encoders.core.runtime import peak_memory_mib  # noqa: E402  (after the path is set)

VARIANTS = ("rfi standard", "plain standard", "rfi adversarial", "plain adversarial")


def _overrides(args: argparse.Namespace, adversarial: bool) -> list[str]:
    return [
        f"data.train_crops={args.crops}",
        "data.val_crops=256",
        f"batch_size={args.batch_size}",
        "epochs=1",
        "eval.enabled=false",
        "flip=false",
        f"adv.enabled={str(adversarial).lower()}",
        f"device={args.device}",
        "log_every=0",
    ]


def _rfi(args: argparse.Namespace, adversarial: bool) -> dict:
    from encoders.core.config import load_config
    from encoders.core.runtime import resolve_device
    from encoders.robust.train import TrainEncoderConfig, train_encoder

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            TrainEncoderConfig,
            ROOT / "configs/encoder/resnet18_robust.yaml",
            [*_overrides(args, adversarial), f"out={out}"],
        )
        train_encoder(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if "images_per_s" in r)
    return {"images_per_s": epoch["images_per_s"], "peak_mib": peak_memory_mib(resolve_device(args.device))}


def _plain(args: argparse.Namespace, adversarial: bool) -> dict:
    """The baseline: the shortest correct PyTorch loop for the same model, data and optimizer."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from encoders.core.config import load_config
    from encoders.core.runtime import resolve_device
    from encoders.data.build import build_dataset
    from encoders.nets.models import Encoder
    from encoders.robust.train import TrainEncoderConfig

    cfg = load_config(TrainEncoderConfig, ROOT / "configs/encoder/resnet18_robust.yaml", _overrides(args, adversarial))
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    data = build_dataset(cfg.data, "train")
    model = Encoder("resnet18", data.num_classes, cfg.model.width, cfg.model.small_input).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    eps, steps = cfg.adv.eps, cfg.adv.steps
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True)
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if adversarial:  # L2 PGD with a random start, in eval mode
            model.eval()
            d = torch.randn_like(x)
            x_adv = (x + eps * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(model.logits(x_adv), y, reduction="sum"), x_adv)
                x_adv = x_adv.detach() + 2.5 * eps / steps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                d = x_adv - x
                d = d * (eps / d.flatten(1).norm(dim=1).clamp_min(eps)).view(-1, 1, 1, 1)
                x_adv = (x + d).clamp(0, 1)
            model.train()
            x = x_adv
        loss = F.cross_entropy(model.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": seen / (time.perf_counter() - start), "peak_mib": peak_memory_mib(device)}


def _child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    kind, mode = args.child.split()
    result = (_rfi if kind == "rfi" else _plain)(args, mode == "adversarial")
    print(json.dumps(result))


def _run_child(args: argparse.Namespace, variant: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--crops",
        str(args.crops),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, RFI_NO_PROGRESS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _full(args: argparse.Namespace) -> dict:
    """Train (or reuse) the two default configs and evaluate both with PGD-10 at the training eps."""
    from encoders.core.config import load_config
    from encoders.core.serialization import load_checkpoint
    from encoders.data.build import build_dataset
    from encoders.robust.evaluate import evaluate_encoder
    from encoders.robust.train import TrainEncoderConfig, train_encoder
    from encoders.weights.checkpoints import load_encoder

    out = {}
    for name in ("resnet18_robust", "resnet18_standard"):
        cfg = load_config(
            TrainEncoderConfig,
            ROOT / f"configs/encoder/{name}.yaml",
            [f"out={Path(args.runs) / name}", f"device={args.device}"],
        )
        start, cpu = time.perf_counter(), time.process_time()
        path = train_encoder(cfg, resume=True)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        train_seconds = sum(r.get("epoch_seconds", 0) for r in records)
        encoder = load_encoder(path)
        val = build_dataset(cfg.data, "val")
        result = evaluate_encoder(
            encoder, val, eps=cfg.adv.eps, steps=10, norm=cfg.adv.norm, max_images=cfg.data.val_crops
        )
        out[name] = {
            **result,
            "train_seconds": train_seconds,
            "wall_seconds_this_call": wall,
            "cpu_seconds_this_call": cpu,
            "reused": wall < 0.5 * train_seconds,
            "epochs": load_checkpoint(path)["train"]["epoch"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="measurements per variant (median reported)")
    p.add_argument("--crops", type=int, default=512, help="training crops per measured epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--full", action="store_true", help="also train + evaluate the full default configs")
    p.add_argument("--runs", default="runs/encoders", help="where --full keeps its runs (reused if finished)")
    p.add_argument("--json", default=str(ROOT / "bench/results/encoders.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    import torch

    from encoders.core.serialization import write_json

    load = os.getloadavg()
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):  # interleaved, so drifting machine load hits every variant alike
        for v in VARIANTS:
            samples[v].append(_run_child(args, v))
            print(
                f"repeat {r + 1}/{args.repeats} {v:<18} {samples[v][-1]['images_per_s']:8.1f} images/s", file=sys.stderr
            )
    rows = {
        v: {
            "images_per_s": statistics.median(s["images_per_s"] for s in samples[v]),
            "peak_mib": statistics.median(s["peak_mib"] for s in samples[v]),
            "samples": samples[v],
        }
        for v in VARIANTS
    }
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    report = {
        "setup": {
            "model": "resnet18 width 0.25 small_input",
            "data": f"{args.crops} embedded 32px crops",
            "batch_size": args.batch_size,
            "adversarial": "L2 PGD eps 0.5, 3 steps",
            "device": device,
            "threads": args.threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_avg_before": load,
            "load_avg_after": os.getloadavg(),
            "repeats": args.repeats,
        },
        "training": rows,
    }
    memory = "peak GPU MiB" if device.startswith("cuda") else "peak RSS MiB"
    print(
        f"\nEncoder training, {report['setup']['model']}, {report['setup']['data']}, batch {args.batch_size}, "
        f"{device}, {report['setup']['threads']} threads (median of {args.repeats}; load avg {load[0]:.1f})"
    )
    print(f"{'variant':<18} {'images/s':>9} {'vs plain':>9} {memory:>13}")
    for v in VARIANTS:
        base = rows["plain " + v.split()[1]]["images_per_s"]
        speed = rows[v]["images_per_s"]
        print(f"{v:<18} {speed:>9.1f} {speed / base:>8.2f}x {rows[v]['peak_mib']:>13.0f}")
    if args.full:
        report["full"] = _full(args)
        print(
            f"\nFull default configs (embedded val, {report['full']['resnet18_robust']['images']} crops, "
            f"PGD-10 L2 at the training eps)"
        )
        print(f"{'config':<20} {'clean acc':>9} {'PGD acc':>8} {'train time':>11}")
        for name, r in report["full"].items():
            print(f"{name:<20} {100 * r['clean_acc']:>8.1f}% {100 * r['pgd_acc']:>7.1f}% {r['train_seconds']:>10.0f}s")
    write_json(report, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
