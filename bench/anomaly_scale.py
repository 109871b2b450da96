"""Benchmark: ``rfi anomaly fit`` and ``score`` at MVTec AD resolution (1024 px), before and after, in one run.

Generates an MVTec-layout category at ``--size`` (the embedded benchmark, ``benchmark.size=1024``:
the brick texture upsampled 8x, synthetic defects with masks; ``--train`` normal training
images, ``--test-good`` normal and ``--test-defect`` x 3 defective test images), then runs,
each in a fresh Python process (so its peak resident memory, ``VmHWM`` via
:func:`encoders.core.runtime.peak_memory_mib`, is its own) with threads pinned (``--threads``):

- ``fit``: ``rfi anomaly fit`` at the default settings except ``train.steps`` (``--steps``; ``decoder.steps``
  in the ``--before`` tree, where the section had its earlier name)
  and the encoder (``--encoder``, the small robust ResNet-18 of the default architecture);
- ``score``: ``rfi anomaly score`` of the test images at the default settings (batch 16, heat
  maps written, pixel metrics), with the model fitted by the current code (the same model
  for both, so only the code differs),

- ``pixel metrics``: pixel AUROC and F1 of ``--pixel-maps`` random 1024-px maps and masks (117: the
  issue's count), the way each version's ``score`` does it: the current code streams them into
  :class:`apps.anomaly.metrics.PixelMetrics`; the earlier code holds every map and mask and calls
  scikit-learn on all pixels at once,

once with the current tree ("after") and once with commit ``--before`` ("before"; checked out
with ``git worktree add`` into a temporary folder, removed at the end). Each process runs
under a timeout (``--timeout``) and an address-space limit (``--mem-gb``, ``RLIMIT_AS``): a
phase that exceeds either is recorded as such, not retried. The two fits' decoder weights are
compared (largest absolute difference: the training crops are the same for the same seed). The machine's load average is
recorded around each phase.

    python bench/anomaly_scale.py                       # 1024 px, 8 train / 8 test images, 25 steps
    python bench/anomaly_scale.py --steps 200 --timeout 900

Prints a table and writes ``bench/results/anomaly_scale.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoders.core.serialization import write_json  # noqa: E402

CHILD = """
import json, sys, time
from apps.cli import main
from encoders.core.runtime import peak_memory_mib
start, cpu = time.perf_counter(), time.process_time()
rc = main(sys.argv[2:])
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
json.dump({"rc": rc, "seconds": seconds, "cpu_s": cpu, "peak_mib": peak_memory_mib("cpu")},
          open(sys.argv[1], "w"))
"""
PIXEL_CHILD = """
import json, sys, time
import torch
try:
    import apps.anomaly.metrics as anomaly  # the package layout
except ImportError:
    import apps.anomaly as anomaly  # the one module of --before
from encoders.core.runtime import peak_memory_mib
n, side = int(sys.argv[2]), int(sys.argv[3])
def pairs():
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        mask = torch.rand(side, side, generator=g) < 0.05
        yield mask, torch.randn(side, side, generator=g) + 2 * mask
start, cpu = time.perf_counter(), time.process_time()
if hasattr(anomaly, "PixelMetrics"):  # streamed, as score() does now
    acc = anomaly.PixelMetrics()
    for mask, amap in pairs():
        acc.update(mask, amap)
    m = acc.result()
else:  # every map and mask held, as score() did
    masks, maps = zip(*pairs())
    m = anomaly.pixel_metrics(list(masks), list(maps))
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
json.dump({"rc": 0, "seconds": seconds, "cpu_s": cpu, "peak_mib": peak_memory_mib("cpu"), "pixel_auroc": m["auroc"]},
          open(sys.argv[1], "w"))
"""


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_phase(
    tree: Path, argv: list[str], threads: int, timeout: float, mem_gb: float, work: Path, child: str = CHILD
) -> dict[str, Any]:
    """Run ``child`` (default: ``rfi <argv>``) from ``tree`` in a fresh process; its time, peak RSS and exit status."""
    result_file = work / f"result_{time.monotonic_ns()}.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "RFI_CACHE_DIR": str(work / "cache"),
    }
    limit = int(mem_gb * 2**30)

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    before = load()
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", child, str(result_file), *argv],
            cwd=tree,
            env=env,
            preexec_fn=limits,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {
            "status": f"timed out after {timeout:.0f} s",
            "seconds": None,
            "peak_mib": None,
            "load": [before, load()],
        }
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"load": [before, load()], "wall_s": round(wall, 1)}
    if result_file.is_file():
        r = json.loads(result_file.read_text())
        out.update(
            status="ok" if r["rc"] == 0 else f"exit {r['rc']}",
            seconds=round(r["seconds"], 1),
            cpu_s=round(r["cpu_s"], 1),
            peak_mib=round(r["peak_mib"]),
            **{k: v for k, v in r.items() if k == "pixel_auroc"},
        )
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        memory = "MemoryError" in proc.stderr or "bad_alloc" in proc.stderr or "DefaultCPUAllocator" in proc.stderr
        why = f"out of memory (RLIMIT_AS {mem_gb:g} GiB)" if memory else f"failed (exit {proc.returncode})"
        out.update(status=f"{why}: {tail[0][:200]}", seconds=None, peak_mib=None)
    return out


def decoder_difference(work: Path) -> float | None:
    """Largest absolute difference between the decoder weights trained by the two fits (``None``: one failed)."""
    from encoders.core.serialization import load_checkpoint

    files = [work / name / "model_fit" / "decoder" / "decoder.pt" for name in ("after", "before")]
    if not all(f.is_file() for f in files):
        return None
    a, b = (load_checkpoint(f)["state_dict"] for f in files)
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--train", type=int, default=8, help="normal training images (every 5th held out)")
    p.add_argument("--test-good", type=int, default=2)
    p.add_argument("--test-defect", type=int, default=2, help="test images per defect type (3 types)")
    p.add_argument("--steps", type=int, default=25, help="train.steps (default config: 200)")
    p.add_argument("--encoder", default="runs/encoders/resnet18_robust_small/checkpoint.pt")
    p.add_argument("--before", default="25aaab1", help="the commit to compare with")
    p.add_argument("--pixel-maps", type=int, default=117, help="maps for the pixel-metrics phase (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=240, help="seconds per phase")
    p.add_argument("--mem-gb", type=float, default=12, help="address-space limit per phase (GiB)")
    p.add_argument("--out", default="bench/results/anomaly_scale.json")
    args = p.parse_args()
    encoder = Path(args.encoder).resolve()
    if not encoder.is_file():
        sys.exit(f"encoder checkpoint not found: {encoder} (rfi train-encoder, or --encoder PATH)")

    work = Path(tempfile.mkdtemp(prefix="rfi-anomaly-scale-"))
    before_tree = work / "before"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_tree), args.before],
        check=True,
        capture_output=True,
    )
    trees = {"after": ROOT, "before": before_tree}
    results: dict[str, Any] = {
        "command": "python bench/anomaly_scale.py " + " ".join(sys.argv[1:]),
        "size": args.size,
        "train_images": args.train,
        "test_images": args.test_good + 3 * args.test_defect,
        "decoder_steps": args.steps,
        "pixel_maps": args.pixel_maps,
        "before": args.before,
        "threads": args.threads,
        "mem_limit_gib": args.mem_gb,
        "timeout_s": args.timeout,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "phases": {},
    }
    try:
        bench = work / "data"
        made = run_phase(
            ROOT,
            [
                "anomaly",
                "make-benchmark",
                "--out",
                str(bench),
                f"benchmark.size={args.size}",
                f"benchmark.train={args.train}",
                f"benchmark.test_good={args.test_good}",
                f"benchmark.test_defect={args.test_defect}",
                "benchmark.textures=[brick]",
            ],
            args.threads,
            args.timeout,
            args.mem_gb,
            work,
        )
        if made["status"] != "ok":
            sys.exit(f"make-benchmark failed: {made['status']}")
        data = str(bench / "brick")
        for name in ("after", "before"):  # after first: its model is the one both score
            model = work / name / "model.pt"
            section = "train" if name == "after" else "decoder"  # the decoder-training section's name in each tree
            fit_args = [f"encoder={encoder}", f"{section}.steps={args.steps}", "device=cpu", f"{section}.device=cpu"]
            results["phases"][f"fit {name}"] = run_phase(
                trees[name],
                ["anomaly", "fit", "--data", data, "--out", str(model), *fit_args],
                args.threads,
                args.timeout,
                args.mem_gb,
                work,
            )
            print(f"fit {name}: {results['phases'][f'fit {name}']}", flush=True)
        results["decoder_max_abs_difference"] = decoder_difference(work)
        model = work / "after" / "model.pt"
        for name in ("after", "before"):
            results["phases"][f"score {name}"] = run_phase(
                trees[name],
                [
                    "anomaly",
                    "score",
                    "--model",
                    str(model),
                    "--data",
                    data,
                    "--out",
                    str(work / name / "scores"),
                    "--device",
                    "cpu",
                ],
                args.threads,
                args.timeout,
                args.mem_gb,
                work,
            )
            metrics = work / name / "scores" / "metrics.json"
            if metrics.is_file():
                m = json.loads(metrics.read_text())
                results["phases"][f"score {name}"].update(
                    {k: m.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_f1", "pixel_method")}
                )
            print(f"score {name}: {results['phases'][f'score {name}']}", flush=True)
        for name in ("after", "before") if args.pixel_maps else ():
            results["phases"][f"pixels {name}"] = run_phase(
                trees[name],
                [str(args.pixel_maps), str(args.size)],
                args.threads,
                args.timeout,
                args.mem_gb,
                work,
                PIXEL_CHILD,
            )
            print(f"pixels {name}: {results['phases'][f'pixels {name}']}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        write_json(results, ROOT / args.out)

    head = f"{'phase':<14} {'status':<10} {'wall s':>7} {'CPU s':>7} {'peak MiB':>9}  load before -> after"
    print(head)
    print("-" * len(head))
    for k, r in results["phases"].items():
        print(
            f"{k:<14} {r['status'][:10]:<10} {r['seconds'] if r['seconds'] is not None else '-':>7} "
            f"{r.get('cpu_s', '-'):>7} {r['peak_mib'] if r['peak_mib'] is not None else '-':>9}  "
            f"{r['load'][0][0]} -> {r['load'][1][0]}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
