"""Folder loading benchmark: images/s of an ImageNet-style folder through a DataLoader, before and after.

Folders of ``--images`` photos of about 500x375 px (crops of scikit-image's shipped
photos in 4 class folders; one folder per ``--formats`` entry: all JPEG (quality 90, as
ImageNet), all PNG, or half of each) are read through
:class:`encoders.data.folders.ImageFiles` with the standard ImageNet training transforms
(``RandomResizedCrop(224)`` + flip), by a ``DataLoader`` with 0 and N worker processes:

- ``before``: ``decode=float``: each file is converted to float32 first and the transforms
  run on floats (RFI's pipeline before; still the ``transforms: rfi`` default, bit-identical
  to earlier results);
- ``after``: ``decode=uint8``: decoded to uint8, cropped and resized in uint8, converted to
  float only at the end (the ``transforms: imagenet`` default).

Every pass reads every image once (batch 32, shuffled), in a fresh DataLoader (worker
start-up included); torch runs on one thread per process. Variants are interleaved and
repeated; the table reports the median images/s, per wall-clock second and per
CPU-second of the main process and its workers (``os.times``, workers counted once joined):
on a shared machine the second is what the loading itself costs. It also times listing a folder of
``--list-files`` empty files (the one part of a million-file dataset done up front) and
the size of the packed file list.

Usage:
    nice -n 10 python bench/folder_loading.py                  # about a minute on 2 CPU cores
    python bench/folder_loading.py --images 200 --workers 0 1 --repeats 5 --formats jpg png mixed
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from encoders.core.serialization import write_json  # noqa: E402  (after the path is set)


def make_folder(root: Path, n: int, size: tuple[int, int] = (375, 500), seed: int = 0, fmt: str = "mixed") -> Path:
    """``n`` photos of ``size`` (H, W) in 4 class folders.

    ``fmt``: ``jpg`` (quality 90), ``png`` or ``mixed`` (half each).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from encoders.data.embedded import EMBEDDED_PHOTOS, embedded_image

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        photo = embedded_image(EMBEDDED_PHOTOS[i % len(EMBEDDED_PHOTOS)], short_side=512)
        h, w = photo.shape[1:]
        ch, cw = min(h, int(size[0] * 1.2)), min(w, int(size[1] * 1.2))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        crop = F.interpolate(
            photo[None, :, top : top + ch, left : left + cw],
            size=size,
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        arr = (crop.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        ext = fmt if fmt != "mixed" else ("jpg" if i % 2 == 0 else "png")
        path = root / f"class{i % 4}" / f"{i:06d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(arr)).save(path, quality=90)
    return root


def _cpu_seconds() -> float:
    t = os.times()  # reaped children: the DataLoader workers, once shut down (clock-tick resolution)
    return time.process_time() + t.children_user + t.children_system


def images_per_s(root: Path, decode: str, workers: int, batch_size: int = 32, seed: int = 0) -> tuple[float, float]:
    """One pass over the folder's train split: images per wall-clock second (loader start-up included)
    and images per CPU-second (main process + workers)."""
    import torch
    from torch.utils.data import DataLoader

    from encoders.data.folders import ImageFiles

    ds = ImageFiles(root, "train", 224, transforms="imagenet", decode=decode)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=lambda _: torch.set_num_threads(1),
    )
    start, cpu = time.perf_counter(), _cpu_seconds()
    seen = 0
    it = iter(loader)
    for x, _ in it:
        assert x.dtype == torch.float32 and x.shape[-2:] == (224, 224)
        seen += x.shape[0]
    wall = time.perf_counter() - start
    del it, loader  # joins the workers, so their CPU time is counted
    return seen / wall, seen / (_cpu_seconds() - cpu)


def listing(root: Path, n: int) -> dict:
    """Time building the file list of ``n`` (empty) files in 100 class folders."""
    from encoders.data.folders import ImageFiles

    for i in range(n):
        d = root / f"n{i % 100:05d}"
        if i < 100:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:08d}.JPEG").touch()
    start = time.perf_counter()
    ds = ImageFiles(root, "train", 224, transforms="imagenet")
    seconds = time.perf_counter() - start
    return {
        "files": n,
        "seconds": seconds,
        "train_items": len(ds),
        "file_list_mb": (ds._paths.nbytes + ds._labels.nbytes) / 2**20,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        help="DataLoader worker counts (default: 0 and RFI's default, min(8, CPUs - 1))",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["mixed"],
        choices=["jpg", "png", "mixed"],
        help="one folder per entry: all JPEG, all PNG, or half of each",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--list-files", type=int, default=100_000, help="0: skip the listing measurement")
    parser.add_argument(
        "--folder", help="use/keep the generated photos here, one sub-folder per format (default: a temporary folder)"
    )
    parser.add_argument("--json", default=str(ROOT / "bench/results/folder_loading.json"))
    args = parser.parse_args(argv)

    import torch

    from encoders.data.folders import default_num_workers

    args.workers = args.workers or sorted({0, default_num_workers()})

    torch.set_num_threads(1)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.folder) if args.folder else Path(tmp) / "photos"
        roots = {fmt: base / fmt for fmt in args.formats}
        for fmt, root in roots.items():
            if not root.is_dir() or not any(root.rglob("*.*")):
                make_folder(root, args.images, fmt=fmt)
        runs: dict[str, list[float]] = {}
        cpu_runs: dict[str, list[float]] = {}
        for rep in range(args.repeats):
            for fmt, root in roots.items():
                for workers in args.workers:
                    for decode in ("float", "uint8"):
                        key = f"{fmt}/{decode}/{workers}"
                        wall, cpu = images_per_s(root, decode, workers, seed=rep)
                        runs.setdefault(key, []).append(wall)
                        cpu_runs.setdefault(key, []).append(cpu)
                        print(
                            f"repeat {rep + 1}: {fmt:5s} decode={decode:5s} workers={workers}: {wall:.1f} images/s, "
                            f"{cpu:.1f} images per CPU-second",
                            file=sys.stderr,
                        )
        listed = listing(Path(tmp) / "many", args.list_files) if args.list_files else None

    rows = []
    for fmt in args.formats:
        for workers in args.workers:
            before, after = (statistics.median(runs[f"{fmt}/{d}/{workers}"]) for d in ("float", "uint8"))
            cpu_before, cpu_after = (statistics.median(cpu_runs[f"{fmt}/{d}/{workers}"]) for d in ("float", "uint8"))
            rows.append(
                {
                    "format": fmt,
                    "workers": workers,
                    "before_images_per_s": before,
                    "after_images_per_s": after,
                    "speedup": after / before,
                    "before_images_per_cpu_s": cpu_before,
                    "after_images_per_cpu_s": cpu_after,
                    "cpu_speedup": cpu_after / cpu_before,
                }
            )
    result = {
        "images": args.images,
        "image_size": "500x375",
        "formats": args.formats,
        "transforms": "imagenet train: RandomResizedCrop(224) + RandomHorizontalFlip",
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "torch_threads": 1,
        "rows": rows,
        "runs": runs,
        "cpu_runs": cpu_runs,
        "listing": listed,
    }
    print(
        "\n| files | DataLoader workers | images/s before (float decode) | after (uint8 decode) | speed-up "
        "| images per CPU-second before | after | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['format']} | {r['workers']} | {r['before_images_per_s']:.1f} | {r['after_images_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['before_images_per_cpu_s']:.1f} | {r['after_images_per_cpu_s']:.1f} | "
            f"{r['cpu_speedup']:.2f}x |"
        )
    if listed:
        print(
            f"\nlisting {listed['files']} files: {listed['seconds']:.2f} s, file list {listed['file_list_mb']:.1f} MiB"
        )
    print(f"load average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in result['load_avg'])}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
