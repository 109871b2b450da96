"""StyleAugment throughput at 224 px: full-resolution stylisation vs a reduced ``work_size``.

The default style model's encoder (ResNet-18 width 0.25 with the 3x3 stride-1 stem of the
32-px training crops) runs its first stage at the input's full resolution, so stylising a
224-px batch costs about (224 / 32)^2 times a 32-px one. ``StyleAugment(work_size=N)``
stylises at a short side of ``N`` and adds the upsampled change to the full-size image.

For each variant (``before``: ``work_size=None``; ``after``: each ``--work-sizes`` value) the
bench times ``StyleAugment`` alone on random batches of ``--size`` px at ``p=1`` (every image
restyled; styles from the batch), interleaved and repeated, on ``--threads`` torch threads,
and reports the median images/s. With trained ``--encoder``/``--decoder`` checkpoints it also
reports how far each reduced variant's output is from the full-resolution one (PSNR, same
random draws, on crops of the embedded photos); with random weights (the default: speed
does not depend on them) that column is left out.

Usage:
    OMP_NUM_THREADS=1 python bench/style_augment.py                      # about a minute
    OMP_NUM_THREADS=1 python bench/style_augment.py --encoder E.pt --decoder D.pt --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from apps.style.augment import StyleAugment, load_style_model  # noqa: E402  (after the path is set)
from bench.tiling import build  # noqa: E402
from encoders.core.serialization import write_json  # noqa: E402
from encoders.data.embedded import EmbeddedCrops  # noqa: E402
from inversion.metrics import psnr  # noqa: E402


def images_per_s(aug: StyleAugment, x: torch.Tensor) -> float:
    params = aug.make_params([x])
    start = time.perf_counter()
    aug.stylize(x, params)
    return x.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224, help="image side in px")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work-sizes", type=int, nargs="+", default=[160, 128, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoder", help="trained style encoder checkpoint (with --decoder)")
    parser.add_argument("--decoder", help="trained style decoder checkpoint (with --encoder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "style_augment.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trained = bool(args.encoder and args.decoder)
    model = load_style_model([args.encoder, args.decoder]) if trained else build()
    variants = {"before (full resolution)": None, **{f"after (work_size={w})": w for w in args.work_sizes}}
    augs = {
        name: StyleAugment(model, p=1.0, alpha=(0.5, 1.0), beta=(0.5, 1.0), work_size=w, generator=0)
        for name, w in variants.items()
    }
    x = (
        torch.stack([img for img, _ in EmbeddedCrops("train", args.size, args.batch_size)])
        if trained
        else torch.rand(args.batch_size, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    )
    load_before = os.getloadavg()
    for aug in augs.values():  # warm-up: oneDNN picks its kernels on the first call
        images_per_s(aug, x[:4])
    runs: dict[str, list[float]] = {name: [] for name in augs}
    for rep in range(args.repeats):
        for name, aug in augs.items():
            runs[name].append(images_per_s(aug, x))
            print(f"repeat {rep + 1}: {name}: {runs[name][-1]:.1f} images/s", file=sys.stderr)
    fidelity = {}
    if trained:  # same draws for every variant: how far is each from the full-resolution result?
        params = augs["before (full resolution)"].make_params([x])
        reference = augs["before (full resolution)"].stylize(x, params)
        for name, aug in augs.items():
            fidelity[name] = float(psnr(aug.stylize(x, params), reference).mean()) if aug.work_size else None
    base = statistics.median(runs["before (full resolution)"])
    rows = [
        {
            "variant": name,
            "work_size": variants[name],
            "images_per_s": statistics.median(r),
            "min": min(r),
            "max": max(r),
            "speedup": statistics.median(r) / base,
            "psnr_vs_full_resolution": fidelity.get(name),
        }
        for name, r in runs.items()
    ]
    result = {
        "size": args.size,
        "batch_size": args.batch_size,
        "p": 1.0,
        "threads": args.threads,
        "weights": "trained" if trained else "random",
        "repeats": args.repeats,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "rows": rows,
    }
    print(
        f"\nStyleAugment at {args.size} px, batch {args.batch_size}, p=1, {args.threads} thread(s), "
        f"median of {args.repeats}:"
    )
    print("| variant | images/s (min-max) | x before |" + (" PSNR vs full resolution (dB) |" if trained else ""))
    print("|---|---|---|" + ("---|" if trained else ""))
    for r in rows:
        extra = ""
        if trained:
            extra = " - |" if r["psnr_vs_full_resolution"] is None else f" {r['psnr_vs_full_resolution']:.2f} |"
        print(
            f"| {r['variant']} | {r['images_per_s']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | {r['speedup']:.2f}x |{extra}"
        )
    print(f"load average (1 min): {load_before[0]:.2f} before, {result['load_avg_after'][0]:.2f} after")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
