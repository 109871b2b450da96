"""Robust vs standard encoder at a small budget: the PGD accuracy gap and its spread over seeds.

Trains the two default configs (``configs/encoder/resnet18_{robust,standard}.yaml``) at the
budget of the test ``tests/encoders/test_train.py::test_robust_training_beats_standard_under_attack``
(16-px embedded crops, width 0.125, 4 epochs of 4096 crops) for each seed, and evaluates both
with PGD-10 at the training eps on the 512 validation crops. The test's threshold is taken
from the gaps this writes to ``bench/results/robust_gap.json``.

Usage:
    OMP_NUM_THREADS=1 python bench/robust_gap.py --seeds 0 1 2 3   # 4-8 min per seed on one thread of a busy CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "robust_gap.json"
SMALL = (
    "data.size=16",
    "data.train_crops=4096",
    "data.val_crops=512",
    "model.width=0.125",
    "epochs=4",
    "eval.enabled=false",
    "device=cpu",
)


def measure(out: Path, seed: int) -> dict[str, dict[str, float]]:
    """Clean and PGD-10 accuracy of the robust and the standard config trained with ``seed`` (runs under ``out``)."""
    from encoders import create_encoder
    from encoders.core.config import load_config
    from encoders.data.build import build_dataset
    from encoders.robust.evaluate import evaluate_encoder
    from encoders.robust.train import TrainEncoderConfig, train_encoder

    results = {}
    for name in ("robust", "standard"):
        cfg = load_config(
            TrainEncoderConfig,
            ROOT / "configs" / "encoder" / f"resnet18_{name}.yaml",
            [*SMALL, f"seed={seed}", f"out={Path(out) / name}"],
        )
        enc = create_encoder(checkpoint=str(train_encoder(cfg)))
        r = evaluate_encoder(enc, build_dataset(cfg.data, "val"), eps=cfg.adv.eps, steps=10, norm="l2")
        results[name] = {"clean_acc": r["clean_acc"], "pgd_acc": r["pgd_acc"]}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import torch

    runs = {}
    for seed in args.seeds:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(Path(tmp), seed)
        gap = r["robust"]["pgd_acc"] - r["standard"]["pgd_acc"]
        runs[str(seed)] = {**r, "gap": gap, "seconds": time.perf_counter() - start}
        print(f"seed {seed}: robust {r['robust']}, standard {r['standard']}, gap {gap:.3f}", flush=True)
    gaps = [r["gap"] for r in runs.values()]
    summary = {
        "setup": {"overrides": list(SMALL), "pgd": "L2, 10 steps, training eps", "threads": torch.get_num_threads()},
        "seeds": runs,
        "gap_min": min(gaps),
        "gap_max": max(gaps),
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"gap over seeds {args.seeds}: {min(gaps):.3f} .. {max(gaps):.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
