"""Benchmark: robust vs standard feature inversion, and decoder vs optimisation-based inversion.

Part 1 (quality). The quickstart's standard and robust encoders, each with a layer3
decoder of the same architecture, losses and budget: PSNR / SSIM (and LPIPS when its
backbone is present) on held-out embedded crops at 1x, 2x and 4x the training size, and
the per-image robust-minus-standard PSNR difference (median, and how often robust wins).

Part 2 (speed). On the same held-out 1x crops: the decoder (one forward pass) against
optimisation-based inversion (Adam on pixels + TV prior, :mod:`inversion.optimize`) for a
range of step counts: ms per image (median of ``--repeats`` timed runs) and PSNR. The
optimiser's step size and TV weight are first tuned on *other* crops (small grid), so the
baseline gets its best settings.

    python bench/inversion.py                       # uses runs/quickstart (trains it if --train)
    python bench/inversion.py --train --budget small
    python bench/inversion.py --steps 50,100,200,400,800 --opt-images 32

Prints tables and writes ``bench/results/inversion.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoders.core.errors import RFIError  # noqa: E402
from encoders.core.serialization import write_json  # noqa: E402
from encoders.data.embedded import EmbeddedCrops  # noqa: E402
from inversion import RobustAutoencoder  # noqa: E402
from inversion.evaluate import compare_autoencoders, format_table, held_out_images, lpips_for  # noqa: E402
from inversion.metrics import psnr, ssim  # noqa: E402
from inversion.optimize import invert_by_optimization  # noqa: E402


def find_runs(quickstart: Path, train: bool, budget: str) -> dict[str, dict[str, str]]:
    report = quickstart / "report.json"
    if not report.exists():
        if not train:
            raise RFIError(f"{report} not found: run `rfi quickstart --out {quickstart}` first, or pass --train")
        from apps.quickstart import run_quickstart

        run_quickstart(quickstart, budget=budget)
    runs = json.loads(report.read_text())["runs"]
    return {name: {"encoder": r["encoder"]["path"], "decoder": r["decoder"]["path"]} for name, r in runs.items()}


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time (s) of ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def paired(models: dict[str, RobustAutoencoder], scales: list[int], size: int, num: int, seed: int) -> dict:
    """Per-image robust - standard PSNR differences at each scale."""
    out = {}
    for s in scales:
        x = held_out_images(size * s, num, seed)
        p = {n: psnr(ae.reconstruct(x), x) for n, ae in models.items()}
        d = p["robust"] - p["standard"]
        out[f"{s}x"] = {
            "median_diff_db": d.median().item(),
            "mean_diff_db": d.mean().item(),
            "robust_wins": (d > 0).float().mean().item(),
        }
    return out


def per_photo(models: dict[str, RobustAutoencoder], size: int, num: int, seed: int) -> dict:
    """Mean PSNR per embedded photo at 1x, and the robust - standard difference (where does robust win?)."""
    ds = EmbeddedCrops("val", size, num, seed)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    p = {n: psnr(ae.reconstruct(x), x) for n, ae in models.items()}
    out = {}
    for c, name in enumerate(ds.classes):
        k = ds.labels == c
        d = p["robust"][k] - p["standard"][k]
        out[name] = {
            "standard": p["standard"][k].mean().item(),
            "robust": p["robust"][k].mean().item(),
            "mean_diff_db": d.mean().item(),
            "robust_wins": (d > 0).float().mean().item(),
            "n": int(k.sum()),
        }
    return out


def tune_optimizer(encoder, layer: str, images: torch.Tensor, steps: int, lrs, tvs) -> dict:
    best = None
    grid = []
    for lr in lrs:
        for tv in tvs:
            g = torch.Generator().manual_seed(0)
            rec = invert_by_optimization(encoder, images, layer, steps=steps, lr=lr, tv_weight=tv, generator=g)
            value = psnr(rec, images).mean().item()
            grid.append({"lr": lr, "tv_weight": tv, "psnr": value})
            if best is None or value > best["psnr"]:
                best = grid[-1]
    return {"best": best, "grid": grid, "steps": steps, "images": len(images)}


def speed(
    ae: RobustAutoencoder,
    images: torch.Tensor,
    steps_list: list[int],
    repeats: int,
    opt_repeats: int,
    lr: float,
    tv: float,
) -> dict:
    n = len(images)
    dec_s, rec = timed(lambda: ae.reconstruct(images), repeats)
    dec_1, _ = timed(lambda: [ae.reconstruct(images[i : i + 1]) for i in range(n)], repeats)
    dec = {
        "ms_per_image_batched": 1000 * dec_s / n,
        "ms_per_image_batch1": 1000 * dec_1 / n,
        "psnr": psnr(rec, images).mean().item(),
        "ssim": ssim(rec, images).mean().item(),
    }
    rows = []
    for steps in steps_list:

        def run(steps: int = steps):
            g = torch.Generator().manual_seed(0)
            return invert_by_optimization(ae.encoder, images, ae.layer, steps=steps, lr=lr, tv_weight=tv, generator=g)

        t, out = timed(run, opt_repeats)
        rows.append(
            {
                "steps": steps,
                "ms_per_image": 1000 * t / n,
                "ms_per_step_per_image": 1000 * t / n / max(steps, 1),
                "psnr": psnr(out, images).mean().item(),
                "ssim": ssim(out, images).mean().item(),
                "slowdown_vs_decoder": (1000 * t / n) / dec["ms_per_image_batched"],
            }
        )
    return {"images": n, "decoder": dec, "optimization": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quickstart",
        default=str(ROOT / "runs" / "quickstart"),
        help="folder of a finished `rfi quickstart` (its report.json names the checkpoints)",
    )
    ap.add_argument("--train", action="store_true", help="run the quickstart first when it is missing")
    ap.add_argument("--budget", default="default", help="quickstart budget for --train")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--num", type=int, default=200, help="held-out crops per scale (quality)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opt-images", type=int, default=8, help="images for the speed comparison")
    ap.add_argument("--steps", default="100,300,1000,3000", help="optimisation step counts")
    ap.add_argument("--opt-encoder", default="robust", choices=["robust", "standard"])
    ap.add_argument("--tune-steps", type=int, default=1000, help="steps of the tuning runs (0: no tuning)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of the decoder (median)")
    ap.add_argument(
        "--opt-repeats",
        type=int,
        default=1,
        help="timed repeats of each optimisation (median; each run is already seconds long)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--lpips-weights", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "inversion.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    t0 = time.perf_counter()

    runs = find_runs(Path(args.quickstart), args.train, args.budget)
    models = {n: RobustAutoencoder.from_checkpoints(r["encoder"], r["decoder"]) for n, r in runs.items()}
    from encoders.core.serialization import load_checkpoint

    size = int(load_checkpoint(runs["robust"]["decoder"])["train_size"])
    scales = [int(s) for s in args.scales.split(",")]

    # ---------------------------------------------------------------- part 1: quality
    lpips_model, note = lpips_for("alex", args.lpips_weights)
    quality = compare_autoencoders(models, scales, size, args.num, args.seed, lpips_model=lpips_model, lpips_note=note)
    quality["paired"] = paired(models, scales, size, args.num, args.seed)
    print(f"## Robust vs standard encoder, same layer3 decoder ({args.num} held-out crops per scale)\n")
    print(format_table(quality))
    print()
    print("| scale | robust - standard PSNR (median per image) | mean | robust better on |")
    print("|---|---|---|---|")
    for s, p in quality["paired"].items():
        print(f"| {s} | {p['median_diff_db']:+.2f} dB | {p['mean_diff_db']:+.2f} dB | {100 * p['robust_wins']:.0f}% |")
    quality["per_photo_1x"] = per_photo(models, size, args.num, args.seed)
    print("\n| photo (1x) | standard PSNR | robust PSNR | difference | robust better on |\n|---|---|---|---|---|")
    for name, r in quality["per_photo_1x"].items():
        print(
            f"| {name} | {r['standard']:.2f} | {r['robust']:.2f} | {r['mean_diff_db']:+.2f} dB | "
            f"{100 * r['robust_wins']:.0f}% |"
        )
    print(f"\n{quality['lpips']}\n")

    # ---------------------------------------------------------------- part 2: speed
    ae = models[args.opt_encoder]
    images = held_out_images(size, args.opt_images, args.seed)
    tuning = None
    lr, tv = 0.2, 0.05
    if args.tune_steps > 0:
        tune_images = held_out_images(size, 4, args.seed + 1)  # other crops than the timed ones
        tuning = tune_optimizer(ae.encoder, ae.layer, tune_images, args.tune_steps, (0.1, 0.2), (0.05, 0.1))
        lr, tv = tuning["best"]["lr"], tuning["best"]["tv_weight"]
    steps_list = [int(s) for s in args.steps.split(",")]
    sp = speed(ae, images, steps_list, args.repeats, args.opt_repeats, lr, tv)
    sp.update({"encoder": args.opt_encoder, "lr": lr, "tv_weight": tv, "tuning": tuning})
    d = sp["decoder"]
    print(
        f"## Decoder vs optimisation-based inversion ({args.opt_encoder} encoder, {sp['images']} held-out "
        f"{size}px crops; Adam lr={lr:g}, TV weight={tv:g}, tuned on other crops)\n"
    )
    print("| method | ms / image | PSNR (dB) | SSIM | time vs decoder |")
    print("|---|---|---|---|---|")
    print(
        f"| decoder (batch {sp['images']}) | {d['ms_per_image_batched']:.2f} | {d['psnr']:.2f} | {d['ssim']:.3f} | 1x |"
    )
    print(
        f"| decoder (batch 1) | {d['ms_per_image_batch1']:.2f} | {d['psnr']:.2f} | {d['ssim']:.3f} | "
        f"{d['ms_per_image_batch1'] / d['ms_per_image_batched']:.1f}x |"
    )
    for r in sp["optimization"]:
        print(
            f"| optimisation, {r['steps']} steps | {r['ms_per_image']:.1f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
            f"{r['slowdown_vs_decoder']:.0f}x |"
        )
    reach = [r for r in sp["optimization"] if r["psnr"] >= d["psnr"]]
    sp["first_steps_reaching_decoder_psnr"] = reach[0]["steps"] if reach else None
    print(
        "\n"
        + (
            f"Optimisation first reaches the decoder's PSNR at {reach[0]['steps']} steps, "
            f"{reach[0]['slowdown_vs_decoder']:.0f}x slower."
            if reach
            else f"Optimisation does not reach the decoder's PSNR within {max(steps_list)} steps "
            f"(best {max(r['psnr'] for r in sp['optimization']):.2f} dB vs {d['psnr']:.2f} dB)."
        )
    )

    result = {
        "quality": quality,
        "speed": sp,
        "runs": runs,
        "train_size": size,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "seconds": time.perf_counter() - t0,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    out = write_json(result, args.out)
    print(f"\nwrote {out} ({result['seconds']:.0f} s; load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
