"""Decoder training benchmark: speed and peak memory of ``rfi train-decoder`` vs a plain PyTorch loop.

Both variants train the default decoder config (``configs/decoder/resnet18_robust_layer3.yaml``:
a decoder for layer3 of the ResNet-18 width-0.25 encoder, 32-px embedded crops, batch 64,
pixel L1 + feature loss, Adam) for one epoch over the same crops:

- ``rfi``: :func:`inversion.train.train_decoder` (the whole training loop: DDP-ready data
  sampling, loss terms, lr schedule, metrics); images/s is the one the run logs for the
  epoch (``log_every`` = the epoch's steps), which spans data loading and every step;
- ``plain``: the shortest correct hand-written PyTorch loop with the same frozen encoder,
  the same :class:`inversion.decoders.Decoder`, the same L1 + relative feature loss and Adam.

Sample grids are off in both (``sample_every=0``); the per-epoch validation and checkpoint
of the ``rfi`` run are outside the timed window. Each measurement runs in a fresh process; its
peak memory is counted from after the photos are loaded (peak RSS, ``VmHWM`` reset through
``/proc/self/clear_refs``, on CPU; ``torch.cuda.max_memory_allocated`` on GPU), so it covers model set-up and training.
Variants are interleaved and repeated, and the table reports medians.

The encoder is the config's checkpoint when it exists; otherwise a randomly initialised
encoder of the same architecture (speed does not depend on the weights), which the output
says.

Usage:
    python bench/decoder_training.py                      # about 2 minutes on 2 CPU cores
    python bench/decoder_training.py --crops 4096 --repeats 5 --threads 2
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
from encoders.core.runtime import peak_memory_mib, reset_peak_memory  # noqa: E402  (after the path is set)

VARIANTS = ("rfi", "plain")
DEFAULT_CONFIG = "configs/decoder/resnet18_robust_layer3.yaml"


def _config(args: argparse.Namespace, out: str | None = None):
    from encoders.core.config import load_config
    from inversion.train import TrainDecoderConfig

    steps = args.crops // args.batch_size
    encoder = [f"encoder.checkpoint={args.encoder}"] if args.encoder else []
    return load_config(
        TrainDecoderConfig,
        ROOT / args.config,
        [
            *encoder,
            f"data.train_crops={args.crops}",
            "data.val_crops=64",
            f"batch_size={args.batch_size}",
            "epochs=1",
            "steps=0",
            "sample_every=0",
            f"log_every={steps}",
            f"device={args.device}",
            f"out={out or 'unused'}",
        ],
    )


def _current_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmRSS"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def _prepare(cfg):
    """Build the datasets once (caches the decoded photos), then reset the peak-memory counter.

    Returns the device and the memory in use at that point (imports + photos: the baseline).
    """
    from encoders.core.runtime import resolve_device
    from encoders.data.build import build_dataset

    build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    device = resolve_device(cfg.device)
    reset_peak_memory(device)
    return device, _current_memory_mib(device)


def _rfi(args: argparse.Namespace) -> dict:
    from inversion.train import train_decoder

    with tempfile.TemporaryDirectory() as out:
        cfg = _config(args, out)
        device, base = _prepare(cfg)
        train_decoder(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if "images_per_s" in r)
    peak = peak_memory_mib(device)
    return {"images_per_s": epoch["images_per_s"], "peak_mib": peak, "training_mib": peak - base}


def _plain(args: argparse.Namespace) -> dict:
    """The baseline: a minimal PyTorch loop for the same encoder, decoder, losses and optimizer."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from encoders.data.build import build_dataset
    from encoders.weights.checkpoints import load_encoder
    from inversion.decoders import Decoder

    cfg = _config(args)
    device, base = _prepare(cfg)
    torch.manual_seed(0)
    layer = cfg.encoder.layer
    encoder = load_encoder(cfg.encoder.checkpoint).eval().requires_grad_(False).to(device)
    channels, stride = encoder.feature_info()[layer]
    d = cfg.decoder
    decoder = Decoder(
        channels, stride, layer, d.channels, d.min_channels, d.blocks, padding_mode=d.padding_mode, norm=d.norm
    ).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    loader = DataLoader(build_dataset(cfg.data, "train"), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    seen, start = 0, time.perf_counter()
    for x, _ in loader:
        x = x.to(device)
        with torch.no_grad():
            target = encoder(x, layers=[layer])[layer]
        rec = decoder(target)
        feat = encoder(rec, layers=[layer])[layer]
        loss = (
            cfg.loss.pixel * F.l1_loss(rec, x) + cfg.loss.feature * (feat - target).pow(2).sum() / target.pow(2).sum()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = peak_memory_mib(device)
    return {"images_per_s": seen / (time.perf_counter() - start), "peak_mib": peak, "training_mib": peak - base}


def _child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps((_rfi if args.child == "rfi" else _plain)(args)))


def _run_child(args: argparse.Namespace, variant: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--config",
        args.config,
        "--encoder",
        args.encoder,
        "--crops",
        str(args.crops),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RFI_NO_PROGRESS="1"), cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _encoder_for(args: argparse.Namespace, tmp: str) -> tuple[str, str]:
    """The config's encoder checkpoint, or a random one of the default architecture saved to ``tmp``."""
    import torch

    from encoders import create_encoder
    from encoders.weights.checkpoints import save_encoder

    cfg = _config(args)
    path = ROOT / cfg.encoder.checkpoint
    if path.is_file():
        return str(path), f"trained checkpoint {cfg.encoder.checkpoint}"
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
    random_path = str(save_encoder(encoder, Path(tmp) / "random_encoder.pt"))
    return random_path, (
        f"randomly initialised resnet18 width 0.25 (no checkpoint at {cfg.encoder.checkpoint}; "
        f"speed does not depend on the weights)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="decoder config (relative to the repository)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per variant (median reported)")
    p.add_argument("--crops", type=int, default=1024, help="training crops per measured epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=str(ROOT / "bench/results/decoder_training.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--encoder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    import torch

    from encoders.core.serialization import atomic_write

    with tempfile.TemporaryDirectory() as tmp:
        args.encoder, encoder_note = _encoder_for(args, tmp)
        load = os.getloadavg()
        samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):  # interleaved, so drifting machine load hits both variants alike
            for v in VARIANTS:
                samples[v].append(_run_child(args, v))
                print(
                    f"repeat {r + 1}/{args.repeats} {v:<6} {samples[v][-1]['images_per_s']:8.1f} images/s",
                    file=sys.stderr,
                )
    rows = {
        v: {
            "images_per_s": statistics.median(s["images_per_s"] for s in samples[v]),
            "peak_mib": statistics.median(s["peak_mib"] for s in samples[v]),
            "training_mib": statistics.median(s["training_mib"] for s in samples[v]),
            "samples": samples[v],
        }
        for v in VARIANTS
    }
    cfg = _config(args)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    report = {
        "setup": {
            "config": args.config,
            "encoder": encoder_note,
            "layer": cfg.encoder.layer,
            "decoder": {
                "channels": cfg.decoder.channels,
                "min_channels": cfg.decoder.min_channels,
                "blocks": cfg.decoder.blocks,
            },
            "loss": f"pixel {cfg.loss.pixel_type} {cfg.loss.pixel:g} + feature {cfg.loss.feature:g}",
            "data": f"{args.crops} embedded {cfg.data.size}px crops, 1 epoch",
            "batch_size": args.batch_size,
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
    extra = "above baseline"
    print(f"\nDecoder training, {cfg.encoder.layer} decoder of {report['setup']['encoder']}")
    print(
        f"{report['setup']['data']}, batch {args.batch_size}, {report['setup']['loss']}, {device}, "
        f"{report['setup']['threads']} threads (median of {args.repeats}; load avg {load[0]:.1f})"
    )
    print(f"{'variant':<8} {'images/s':>9} {'vs plain':>9} {memory:>13} {extra:>15}")
    for v in VARIANTS:
        print(
            f"{v:<8} {rows[v]['images_per_s']:>9.1f} {rows[v]['images_per_s'] / rows['plain']['images_per_s']:>8.2f}x "
            f"{rows[v]['peak_mib']:>13.0f} {rows[v]['training_mib']:>15.0f}"
        )
    print("(baseline: the process after imports and loading the photos, the same for both variants)")
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(args.json, lambda t: Path(t).write_text(text))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
