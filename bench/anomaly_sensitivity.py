"""Why a memory bank on one encoder misses defects that the same bank on another finds: how far each defect type
moves the patch features the bank compares, robust vs standard encoder, on the unseen-photo sets.

For each photo of the unseen benchmark (``bench/anomaly.py --unseen``'s sets, ``benchmark.seed`` ``--seed``: the
same crops and defects) and each encoder, every defect test image is compared with the same crop without its
defect (:func:`apps.anomaly.benchmark.photo_controls`), in the patch features of the memory method
(:func:`apps.anomaly.memory.patch_features`: the encoder's default memory layers, ``memory.pool``), at the
locations inside the defect's mask:

- ``shift``: the mean feature distance ``||f(defect) - f(clean)||`` there, divided by the median distance between
  the features of two random locations of the photo's normal training crops (the spread of normal patches): how
  much the defect changes what the encoder sees, in the encoder's own units;
- ``rise``: the mean rise there of the distance to the nearest normal training feature (a random
  ``--bank`` of them: a memory bank without coreset), divided by the median of that distance over the clean
  crops' locations: how much more anomalous the defect makes its locations look to a bank;
- ``above``: whether the image's largest such distance (the score of a bank without coreset and smoothing) is
  above that of the same crop without the defect: ``defect>clean`` of ``bench/anomaly.py --unseen`` for an
  ideal bank (the share, in %, in the table).

Medians (``above``: the mean) over a defect type's images of every photo; the JSON keeps each photo's. About
20 s per photo on one core.

    OMP_NUM_THREADS=1 python bench/anomaly_sensitivity.py   # the shipped encoders, seed 0, all ten photos
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.anomaly.benchmark import PHOTO_DEFECTS, make_benchmark, photo_controls  # noqa: E402
from apps.anomaly.config import load_anomaly_config  # noqa: E402
from apps.anomaly.data import ground_truth_mask, load_anomaly_data, mvtec_categories, readable_images  # noqa: E402
from apps.anomaly.memory import default_memory_layers, patch_features  # noqa: E402
from bench.anomaly_unseen import defect_twins  # noqa: E402
from encoders.core.imageio import read_image  # noqa: E402
from encoders.core.serialization import write_json  # noqa: E402
from encoders.data.unseen import unseen_folder  # noqa: E402
from encoders.weights.checkpoints import load_encoder  # noqa: E402

MEASURES = ("shift", "rise", "above")


def locations(f: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) features -> (B * h * w, D) rows, one per location."""
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


@torch.no_grad()
def photo_sensitivity(
    encoder: Any, train: list[torch.Tensor], defects: list, twins: list[torch.Tensor], pool: int, bank: int
) -> dict[str, dict[str, list[float]]]:
    """``shift`` and ``rise`` (module docstring) of each defect image of one photo: ``{defect: {measure: [...]}}``.

    ``train``: the normal training crops; ``defects``: the defect :class:`~apps.anomaly.data.TestImage` s and
    ``twins`` the same crops without the defect, (3, H, W) in [0, 1]."""
    layers = default_memory_layers(encoder)
    g = torch.Generator().manual_seed(0)
    normal = locations(patch_features(encoder, torch.stack(train), layers, pool))
    normal = normal[torch.randperm(len(normal), generator=g)[:bank]]
    pairs = torch.randint(len(normal), (2, 4096), generator=g)
    spread = (normal[pairs[0]] - normal[pairs[1]]).norm(dim=1).median()
    images = torch.stack([read_image(t.path) for t in defects])
    bad = patch_features(encoder, images, layers, pool)
    clean = patch_features(encoder, torch.stack(twins), layers, pool)
    hw = bad.shape[-2:]
    d_bad, d_clean = (torch.cdist(locations(f), normal).min(1).values.view(len(f), -1) for f in (bad, clean))
    floor = d_clean.median()
    out: dict[str, dict[str, list[float]]] = {d: {m: [] for m in MEASURES} for d in PHOTO_DEFECTS}
    for i, t in enumerate(defects):
        full = ground_truth_mask(t, tuple(images.shape[-2:])).float()[None, None]
        mask = F.adaptive_max_pool2d(full, tuple(hw)).flatten() > 0  # the locations the defect touches
        b, c = locations(bad[i : i + 1])[mask], locations(clean[i : i + 1])[mask]
        out[t.defect]["shift"].append(float((b - c).norm(dim=1).mean() / spread))
        out[t.defect]["rise"].append(float((d_bad[i][mask] - d_clean[i][mask]).mean() / floor))
        out[t.defect]["above"].append(float(d_bad[i].max() > d_clean[i].max()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--robust", default="shipped:rfi_resnet18_robust")
    p.add_argument("--standard", default="shipped:rfi_resnet18_standard")
    p.add_argument("--config", default="configs/apps/anomaly.yaml", help="its benchmark: and memory.pool")
    p.add_argument("--seed", type=int, default=0, help="benchmark.seed: the set drawn (as bench/anomaly.py --unseen)")
    p.add_argument("--categories", nargs="+", help="photos (default: all)")
    p.add_argument("--bank", type=int, default=8192, help="random normal training features kept per photo")
    p.add_argument("--work", help="folder for the photos and the set (default: a temporary folder)")
    p.add_argument("--out", default="bench/results/anomaly_sensitivity.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (benchmark.*)")
    args = p.parse_args(argv)
    cfg = load_anomaly_config(args.config, [*args.overrides, f"benchmark.seed={args.seed}"])
    work = Path(args.work or tempfile.mkdtemp(prefix="rfi-bench-sensitivity-"))
    photos = unseen_folder(work / "photos")
    root = make_benchmark(work / "sets" / f"seed{args.seed}", cfg.benchmark, photos=photos)
    encoders = {"robust": load_encoder(args.robust).eval(), "standard": load_encoder(args.standard).eval()}
    per_photo: dict[str, dict[str, Any]] = {}
    for cat in args.categories or mvtec_categories(root):
        data = load_anomaly_data(root, category=cat)
        train = [read_image(path) for path in readable_images(data.train)]
        defects, twins = defect_twins(data, photo_controls(photos, cat, cfg.benchmark)[1])
        per_photo[cat] = {
            name: photo_sensitivity(enc, train, defects, twins, cfg.memory.pool, args.bank)
            for name, enc in encoders.items()
        }
        print(
            f"{cat}: "
            + "  ".join(
                f"{n} shift {statistics.median(v for d in r.values() for v in d['shift']):.2f}"
                for n, r in per_photo[cat].items()
            ),
            flush=True,
        )
    table = {
        name: {
            d: {
                m: (statistics.fmean if m == "above" else statistics.median)(
                    [v for r in per_photo.values() for v in r[name][d][m]]
                )
                for m in MEASURES
            }
            for d in PHOTO_DEFECTS
        }
        for name in encoders
    }
    print(f"\nmedian (above: % of images) over the defect images of {len(per_photo)} photos (set seed {args.seed})")
    print(f"{'defect':<14}" + "".join(f" | {n + ' ' + m:>15}" for n in encoders for m in MEASURES))
    for d in PHOTO_DEFECTS:
        cells = [
            f"{100 * table[n][d][m]:.0f}" if m == "above" else f"{table[n][d][m]:.2f}"
            for n in encoders
            for m in MEASURES
        ]
        print(f"{d:<14}" + "".join(f" | {c:>15}" for c in cells))
    result = {
        "command": " ".join(["python", "bench/anomaly_sensitivity.py", *(argv if argv is not None else sys.argv[1:])]),
        "encoders": {"robust": args.robust, "standard": args.standard},
        "seed": args.seed,
        "benchmark": json.loads(json.dumps(vars(cfg.benchmark), default=str)),
        "pool": cfg.memory.pool,
        "bank": args.bank,
        "table": table,
        "per_photo": per_photo,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
