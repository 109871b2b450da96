"""Real size on CPU: full-size AlexNet and ResNet-50 at 224 px -- images/s and peak memory.

Three jobs per architecture, each the project's own code (the jobs of ``bench/gpu_check.py``,
at full size: width 1, ImageNet stem, 224-px images):

- ``encoder``: robust training steps (``configs/encoder/imagenet_<arch>_robust.yaml``: L2
  PGD, eps 3, 3 attack steps): ``train_step`` of the trainer behind
  :func:`encoders.robust.train.train_encoder`, ``--warmup`` untimed then ``--steps`` timed steps
  on one batch (data loading not included).
- ``decoder``: ``train_step`` of the trainer behind :func:`inversion.train.train_decoder`
  for ``conv5`` (AlexNet) / ``layer4`` (ResNet-50), default (``cpu``) decoder preset,
  pixel L1 + feature loss.
- ``inversion``: :meth:`inversion.RobustAutoencoder.reconstruct` (encoder + a decoder,
  loaded from their files) of a batch of 224-px images; median of 3 passes after one
  warm-up.

Each measurement runs in a fresh process with ``torch.set_num_threads(--threads)``; peak
memory is that process's peak RSS (``VmHWM``; it includes the Python and torch
baseline, reported separately as the RSS after imports). Besides images per wall-clock
second, each row gives images per second of the process's CPU time
(``time.process_time``): with one thread, what the job itself costs, which the load of a
shared machine does not depress (wall-clock images/s does). Jobs are repeated ``--repeats``
times, interleaved, and the table reports medians. The machine's load average is recorded
before and after, since the CPU may be shared. fp32 only (the CPU default).

Usage:
    nice -n 10 python bench/real_size.py                       # ResNet-50 then AlexNet, 1 thread
    python bench/real_size.py --archs resnet50 --repeats 3 --steps 2 --batch-size 4 --threads 1
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
sys.path.append(str(ROOT / "bench"))  # for gpu_check; appended: bench/encoders.py must not shadow the package
from encoders.core.runtime import peak_memory_mib  # noqa: E402  (after the path is set)
from encoders.core.serialization import write_json  # noqa: E402

JOBS = ("encoder", "decoder", "inversion")


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import gpu_check  # the shared job code (bench/gpu_check.py)

    from encoders.core.config import load_config  # noqa: F401  (imports counted in the baseline)
    from inversion import RobustAutoencoder  # noqa: F401

    sizes = gpu_check.FULL
    data = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix=f"rfi-real-{args.arch}-{args.job}-"))
    encoder_ckpt = Path(args.encoder_checkpoint)
    baseline = peak_memory_mib()
    load_before = os.getloadavg()
    if args.job == "encoder":
        result = gpu_check.encoder_job(
            args.arch, "fp32", "cpu", sizes, data, work / "enc", args.batch_size, args.steps, 0, args.warmup
        )
    elif args.job == "decoder":
        result = gpu_check.decoder_job(
            args.arch,
            "fp32",
            "cpu",
            sizes,
            data,
            encoder_ckpt,
            work / "dec",
            args.batch_size,
            args.steps,
            0,
            warmup=args.warmup,
        )
    else:
        result = gpu_check.inversion_job(
            "fp32", "cpu", encoder_ckpt, Path(args.decoder_checkpoint), 224, 224, batch_size=args.batch_size, repeats=3
        )
    result.pop("checkpoint", None)
    print(
        json.dumps(
            {
                **result,
                "peak_rss_mib": peak_memory_mib(),
                "baseline_rss_mib": baseline,
                "threads": torch.get_num_threads(),
                "load_before": load_before,
                "load_after": os.getloadavg(),
            }
        )
    )


def run_child(
    args: argparse.Namespace, job: str, arch: str, data: Path, encoder_ckpt: Path, decoder_ckpt: Path | None
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        job,
        "--arch",
        arch,
        "--data",
        str(data),
        "--encoder-checkpoint",
        str(encoder_ckpt),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
    ]
    if decoder_ckpt is not None:
        cmd += ["--decoder-checkpoint", str(decoder_ckpt)]
    env = {
        **os.environ,
        "RFI_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Real size on CPU: AlexNet / ResNet-50 at 224 px")
    parser.add_argument("--archs", nargs="+", default=["resnet50", "alexnet"])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per training job")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "bench/results/real_size.json"))
    parser.add_argument("--child", choices=JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--encoder-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--decoder-checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.job = args.child
        child(args)
        return {}

    import gpu_check
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    start = time.time()
    load_start = os.getloadavg()
    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="rfi-real-size-") as tmp:
        tmp = Path(tmp)
        data = gpu_check.make_dataset(tmp / "data", 224, n_train=max(8, args.batch_size))
        for arch in args.archs:
            encoder_ckpt = gpu_check.random_encoder_checkpoint(arch, gpu_check.FULL, tmp / f"encoder-{arch}.pt")
            decoder_ckpt = None
            for rep in range(args.repeats):
                for job in args.jobs:
                    if job == "inversion" and decoder_ckpt is None:
                        # a decoder checkpoint to invert with: one short run, outside the timings
                        r = gpu_check.decoder_job(
                            arch,
                            "fp32",
                            "cpu",
                            gpu_check.FULL,
                            data,
                            encoder_ckpt,
                            tmp / f"dec-{arch}",
                            args.batch_size,
                            1,
                            0,
                            warmup=0,
                        )
                        decoder_ckpt = Path(r["checkpoint"]) if "checkpoint" in r else None
                        if decoder_ckpt is None:
                            rows.setdefault((arch, job), []).append({"error": r.get("skipped", "no decoder")})
                            continue
                    r = run_child(args, job, arch, data, encoder_ckpt, decoder_ckpt)
                    rows.setdefault((arch, job), []).append(r)
                    msg = r.get("error") or f"{r['images_per_s']:.3f} images/s, peak RSS {r['peak_rss_mib']:.0f} MiB"
                    print(f"repeat {rep + 1}: {arch} {job}: {msg}", file=sys.stderr, flush=True)
    table = []
    for (arch, job), runs in rows.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            table.append({"arch": arch, "job": job, "error": runs[-1]["error"]})
            continue
        table.append(
            {
                "arch": arch,
                "job": job,
                "runs": len(ok),
                "images_per_s": statistics.median(r["images_per_s"] for r in ok),
                "images_per_s_min_max": [min(r["images_per_s"] for r in ok), max(r["images_per_s"] for r in ok)],
                "images_per_cpu_s": statistics.median(r["images_per_cpu_s"] for r in ok),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok),
                "baseline_rss_mib": statistics.median(r["baseline_rss_mib"] for r in ok),
                "load": [ok[0]["load_before"][0], ok[-1]["load_after"][0]],
            }
        )
    result = {
        "threads": args.threads,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "seconds": time.time() - start,
        "rows": table,
        "runs": {f"{a}/{j}": v for (a, j), v in rows.items()},
    }
    labels = {
        "encoder": "encoder training (robust, L2 PGD-3)",
        "decoder": "decoder training",
        "inversion": "inversion (encoder + decoder)",
    }
    print(
        "\n| model | job | images/s (median, min-max) | images per CPU-second | peak RSS MiB (after imports) "
        "| load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|")
    for r in table:
        job = labels[r["job"]] + (f" ({gpu_check.LAYERS[r['arch']]})" if r["job"] != "encoder" else "")
        if "error" in r:
            print(f"| {r['arch']} | {job} | failed: {r['error'][:120]} | | | |")
            continue
        lo, hi = r["images_per_s_min_max"]
        print(
            f"| {r['arch']} | {job} | {r['images_per_s']:.2f} ({lo:.2f}-{hi:.2f}) | {r['images_per_cpu_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} ({r['baseline_rss_mib']:.0f}) | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |"
        )
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
