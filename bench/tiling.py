"""Benchmark: tiled vs whole-image reconstruction (``RobustAutoencoder.reconstruct``).

The shipped architecture at its default width (the ResNet-18 encoder of
``configs/encoder/resnet18_robust.yaml``: width 0.25, 3x3 stem; the layer3 decoder of
``configs/decoder/resnet18_robust_layer3.yaml``), randomly initialised (weights do not change
the speed), on one random image of ``--size`` (default 4000x3000). Three ways, interleaved
round by round, median of ``--runs``:

- ``whole``: one pass over the whole image (``max_pixels`` above its size);
- ``old tiler``: the previous default, run through :func:`inversion.tiling.tiled_apply`:
  whole reconstructions of 512-px tiles overlapping by a quarter tile (128 px), blended, one
  tile per forward pass;
- ``new tiler``: today's default above ``max_pixels`` (1 Mpx): exact tiles (encoder, then
  decoder, each with its receptive field as margin, windows of up to 1024 px, batched
  within 1 Mpx), checked against the whole pass (max |difference|).

Peak memory is the largest resident-set growth over the process's size before the call
(sampled every 5 ms). Wall time and the process's CPU time (``time.process_time``; on a
shared machine the wall time mostly measures the other jobs) are both reported. Threads are
pinned with ``--threads`` (default 1) and the machine's load average is recorded before and after.

    python bench/tiling.py                      # 4000x3000, 3 runs, 1 thread
    python bench/tiling.py --size 2000x1500 --runs 3 --threads 1

Prints a table and writes ``bench/results/tiling.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoders import create_encoder  # noqa: E402
from encoders.core.serialization import write_json  # noqa: E402
from inversion.autoencoder import RobustAutoencoder  # noqa: E402
from inversion.decoders import Decoder  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measured(fn):
    """(wall seconds, CPU seconds of this process, peak RSS growth in bytes, result) of one call."""
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    done.set()
    t.join()
    return seconds, cpu, max(peak[0], rss()) - base, out


def build() -> RobustAutoencoder:
    torch.manual_seed(0)
    enc = create_encoder("resnet18", width=0.25, small_input=True, num_classes=9)
    info = enc.feature_info()
    dec = Decoder(
        info["layer3"][0],
        info["layer3"][1],
        "layer3",
        channels=64,
        min_channels=32,
        blocks=1,
        padding_mode="reflect",
        norm=True,
    )
    return RobustAutoencoder(enc, dec).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="4000x3000", help="image WxH (default 4000x3000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", default="", help="comma-separated methods not to run (whole, old, new)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tiling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    load_before = os.getloadavg()
    ae = build()
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    enc_margin, dec_margin = ae.margins("layer3")

    def whole():
        ae.max_pixels = h * w
        return ae.reconstruct(x)

    def old():
        ae.max_pixels = 512 * 512  # one 512-px tile per forward pass
        return ae.reconstruct(x, tile=512, overlap=128)

    def new():
        ae.max_pixels = 1024 * 1024
        return ae.reconstruct(x)

    methods = {"whole": whole, "old tiler": old, "new tiler": new}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    methods = {k: v for k, v in methods.items() if k.split()[0] not in skip}
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpus: dict[str, list[float]] = {k: [] for k in methods}
    peaks: dict[str, list[int]] = {k: [] for k in methods}
    outputs: dict[str, torch.Tensor] = {}
    for r in range(args.runs):
        for name, fn in methods.items():
            seconds, cpu, peak, out = measured(fn)
            times[name].append(seconds)
            cpus[name].append(cpu)
            peaks[name].append(peak)
            outputs[name] = out
            print(
                f"run {r + 1}/{args.runs} {name}: {seconds:.1f} s ({cpu:.1f} CPU s), peak +{peak / 2**30:.2f} GiB",
                flush=True,
            )
    load_after = os.getloadavg()
    ref = times.get("whole")  # wall time depends on the load; CPU time (one thread) much less
    rows = []
    for name in methods:
        row = {
            "method": name,
            "median_s": statistics.median(times[name]),
            "runs_s": times[name],
            "median_cpu_s": statistics.median(cpus[name]),
            "runs_cpu_s": cpus[name],
            "peak_rss_gib": max(peaks[name]) / 2**30,
        }
        if ref:
            row["vs_whole"] = row["median_s"] / statistics.median(ref)
            row["cpu_vs_whole"] = row["median_cpu_s"] / statistics.median(cpus["whole"])
            row["max_abs_diff_vs_whole"] = float((outputs[name] - outputs["whole"]).abs().max())
        rows.append(row)
    print(
        f"\nreconstruct {w}x{h}, ResNet-18 (w 0.25, 3x3 stem) layer3 + decoder (64 ch), {args.threads} thread(s); "
        f"margins: encoder {enc_margin} px, decoder {dec_margin} feature px; load {load_before[0]:.1f} -> "
        f"{load_after[0]:.1f}"
    )
    print(
        f"{'method':<10} | {'median s':>9} | {'x whole':>7} | {'CPU s':>7} | {'x whole':>7} | {'peak GiB':>8} | "
        f"{'max |diff|':>10}"
    )
    for row in rows:
        print(
            f"{row['method']:<10} | {row['median_s']:9.1f} | {row.get('vs_whole', math.nan):7.2f} | "
            f"{row['median_cpu_s']:7.1f} | {row.get('cpu_vs_whole', math.nan):7.2f} | "
            f"{row['peak_rss_gib']:8.2f} | {row.get('max_abs_diff_vs_whole', math.nan):10.2e}"
        )
    write_json(
        {
            "size": [w, h],
            "runs": args.runs,
            "threads": args.threads,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "margins": {"encoder_px": enc_margin, "decoder_feature_px": dec_margin},
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "rows": rows,
        },
        Path(args.out),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
