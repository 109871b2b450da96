"""GPU check: real-size robust encoder training, decoder training and inversion, in fp32 and bf16.

For each architecture (full-size AlexNet and ResNet-50 at 224 px: width 1, ImageNet stem)
and each precision, it times the project's own training steps, not a re-implementation:

1. ``encoder``: robust training (``configs/encoder/imagenet_<arch>_robust.yaml``: L2 PGD,
   eps 3, 3 attack steps): :meth:`encoders.robust.train.EncoderTrainer.train_step`, the step
   :func:`encoders.robust.train.train_encoder` runs (attack, forward, backward, optimiser and
   scheduler step, with the config's ``precision`` / ``channels_last``) on one batch of a
   generated 224-px folder, ``--warmup`` untimed steps then ``--steps`` timed ones (data
   loading not included).
2. ``decoder``: :meth:`inversion.train.DecoderTrainer.train_step` (the step of
   :func:`inversion.train.train_decoder`) for ``conv5`` (AlexNet) / ``layer4`` (ResNet-50) of
   that (randomly initialised) encoder: encoder features, decoder, pixel L1 + feature loss,
   backward, Adam and scheduler step.
3. ``inversion``: :meth:`inversion.RobustAutoencoder.reconstruct` (encoder + that decoder,
   loaded from their checkpoint files) of one 4000x3000 image, timed on its second pass.
4. ``ssl``: SASSL's GPU recipe (``configs/apps/sassl_imagenet.yaml``: MoCo v2, ResNet-50, 224-px
   views, StyleAugment in a worker thread on a side CUDA stream) trained by
   :func:`apps.ssl.train.train_ssl` on a generated 224-px folder (data loading included), with and
   without StyleAugment: median step time and the time per epoch it implies for ImageNet-100 and
   ImageNet (one GPU; ``torchrun`` divides it by about the number of GPUs). GPU only: skipped on CPU.

On CPU each row also gives images per second of the process's CPU time
(``images_per_cpu_s``), which a shared machine's load does not depress.
Peak memory is ``torch.cuda.max_memory_allocated`` per job on CUDA; on CPU it is the
process's peak RSS so far (``VmHWM``, never reset), so only the first row is per job.
``precision`` and ``channels_last`` are passed to the training configs when this version
of RFI has them (otherwise non-fp32 rows say "not supported"); inference runs under
``torch.autocast`` for bf16/fp16. Weights are random (speed does not depend on them).

Usage (a CUDA machine; about 2-4 minutes on one recent GPU, including set-up):
    python bench/gpu_check.py                          # cuda, fp32 + bf16, alexnet + resnet50
    python bench/gpu_check.py --steps 10 --batch-size 128 --json gpu.json
    python bench/gpu_check.py --device cpu --tiny      # seconds: small widths and sizes (smoke test)

It prints a table and writes JSON (default ``bench/results/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from encoders.core.runtime import peak_memory_mib, reset_peak_memory  # noqa: E402  (after the path is set)
from encoders.core.serialization import write_json  # noqa: E402

LAYERS = {"alexnet": "conv5", "resnet50": "layer4"}
TINY = {"size": 32, "width": 0.125, "small_input": True, "inversion": (300, 400)}
FULL = {"size": 224, "width": 1.0, "small_input": False, "inversion": (3000, 4000)}


# ----------------------------------------------------------------------------- helpers
def make_photos(root: Path, n: int, size: int, seed: int = 0, classes: int = 2) -> Path:
    """``n`` JPEG crops (``size`` x ``size``, quality 90) of the shipped photos in ``classes`` class folders."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from encoders.data.embedded import EMBEDDED_PHOTOS, embedded_image

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        photo = embedded_image(EMBEDDED_PHOTOS[i % len(EMBEDDED_PHOTOS)])
        h, w = photo.shape[1:]
        side = int(torch.randint(min(h, w) // 2, min(h, w) + 1, (1,), generator=g))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = F.interpolate(
            photo[None, :, top : top + side, left : left + side],
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        arr = np.ascontiguousarray((crop.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        path = root / f"class{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=90)
    return root


def make_dataset(root: Path, size: int, n_train: int, n_val: int = 4) -> Path:
    """An ImageNet-style folder: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``."""
    make_photos(root / "train", n_train, size, seed=0)
    make_photos(root / "val", n_val, size, seed=1)
    return root


def has_key(cls: type, dotted: str) -> bool:
    """Whether the config dataclass ``cls`` has the (dotted) key, e.g. ``precision`` or ``decoder.preset``."""
    obj: Any = cls()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def scale_keys(cls: type, precision: str, device: str) -> tuple[list[str], str | None]:
    """Overrides for precision / channels-last / deterministic kernels, or why the precision cannot run."""
    out: list[str] = []
    if has_key(cls, "precision"):
        out.append(f"precision={precision}")
    elif precision != "fp32":
        return [], f"precision={precision} not supported by {cls.__name__} in this version"
    if device.startswith("cuda"):
        out += [k for k in ("channels_last=true", "deterministic=false") if has_key(cls, k.split("=")[0])]
    return out, None


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_encoder_checkpoint(arch: str, sizes: dict, path: Path) -> Path:
    """A randomly initialised encoder of ``arch`` at ``sizes`` (speed does not depend on the weights)."""
    import torch

    from encoders.nets.models import Encoder
    from encoders.weights.checkpoints import save_encoder

    torch.manual_seed(0)
    return save_encoder(Encoder(arch, num_classes=1000, width=sizes["width"], small_input=sizes["small_input"]), path)


# ----------------------------------------------------------------------------- jobs
def _first_batch(dataset, batch_size: int):
    from torch.utils.data import DataLoader

    return next(iter(DataLoader(dataset, batch_size=batch_size, shuffle=False)))


def time_steps(step, batch_size: int, warmup: int, steps: int, device: str) -> tuple[float, float]:
    """images/s of ``steps`` calls of ``step()`` after ``warmup`` untimed ones: per wall-clock second, and
    per second of this process's CPU time (on a shared CPU, the second one is what the job itself costs)."""
    for _ in range(warmup):
        step()
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return steps * batch_size / wall, steps * batch_size / max(cpu, 1e-9)


def encoder_config(
    arch: str,
    sizes: dict,
    data: Path,
    out: Path,
    batch_size: int,
    total_steps: int,
    num_workers: int,
    device: str,
    extra: list[str],
):
    """``configs/encoder/imagenet_<arch>_robust.yaml`` at ``sizes`` on the generated folder
    (one epoch of at least ``total_steps`` steps)."""
    from encoders.core.config import load_config
    from encoders.robust.train import TrainEncoderConfig

    n_train = len(list((data / "train").rglob("*.jpg")))
    repeat = max(1, -(-total_steps * batch_size // n_train))
    return load_config(
        TrainEncoderConfig,
        ROOT / f"configs/encoder/imagenet_{arch}_robust.yaml",
        [
            f"data.root={data}",
            f"data.size={sizes['size']}",
            "data.transforms=rfi",
            "data.crop=random",
            "data.decode=uint8",
            f"data.repeat={repeat}",
            f"model.width={sizes['width']}",
            f"model.small_input={str(sizes['small_input']).lower()}",
            "model.num_classes=1000",
            "flip=true",
            "eval.enabled=false",
            "epochs=1",
            f"batch_size={batch_size}",
            f"num_workers={num_workers}",
            f"device={device}",
            "log_every=0",
            f"out={out}",
            *extra,
        ],
    )


def encoder_job(
    arch: str,
    precision: str,
    device: str,
    sizes: dict,
    data: Path,
    out: Path,
    batch_size: int,
    steps: int,
    num_workers: int,
    warmup: int = 2,
) -> dict[str, Any]:
    """Robust (L2 PGD-3) encoder training steps (:meth:`encoders.robust.train.EncoderTrainer.train_step`), one batch."""
    import encoders.robust.train as T
    from encoders.core.runtime import setup_distributed

    extra, skip = scale_keys(T.TrainEncoderConfig, precision, device)
    if skip:
        return {"skipped": skip}
    cfg = encoder_config(arch, sizes, data, out, batch_size, warmup + steps, num_workers, device, extra)
    reset_peak_memory(device)
    trainer = T.EncoderTrainer(cfg, *setup_distributed(cfg.device))
    trainer.encoder.train()
    x, y = _first_batch(trainer.train_set, batch_size)
    ips, ips_cpu = time_steps(lambda: trainer.train_step(x, y), batch_size, warmup, steps, device)
    return {
        "images_per_s": ips,
        "images_per_cpu_s": ips_cpu,
        "peak_mib": peak_memory_mib(device),
        "method": "EncoderTrainer.train_step",
        "steps_timed": steps,
        "batch_size": batch_size,
    }


def decoder_config(
    arch: str,
    sizes: dict,
    data: Path,
    encoder_ckpt: Path,
    out: Path,
    batch_size: int,
    total_steps: int,
    num_workers: int,
    device: str,
    extra: list[str],
):
    """The default decoder config for conv5 / layer4 of ``encoder_ckpt``, on the generated folder."""
    from encoders.core.config import load_config
    from inversion.train import TrainDecoderConfig

    n_train = len(list((data / "train").rglob("*.jpg")))
    repeat = max(1, -(-total_steps * batch_size // n_train))  # one epoch holds every step
    return load_config(
        TrainDecoderConfig,
        ROOT / "configs/decoder/resnet18_robust_layer3.yaml",
        [
            f"encoder.checkpoint={encoder_ckpt}",
            f"encoder.layer={LAYERS[arch]}",
            "data.source=folder",
            f"data.root={data}",
            f"data.size={sizes['size']}",
            "data.crop=random",
            "data.decode=uint8",
            f"data.repeat={repeat}",
            f"steps={total_steps}",
            f"log_every={total_steps}",
            "sample_every=0",
            "checkpoint_every=0",
            f"batch_size={batch_size}",
            f"num_workers={num_workers}",
            f"device={device}",
            f"out={out}",
            *extra,
        ],
    )


def decoder_job(
    arch: str,
    precision: str,
    device: str,
    sizes: dict,
    data: Path,
    encoder_ckpt: Path,
    out: Path,
    batch_size: int,
    steps: int,
    num_workers: int,
    preset: str = "cpu",
    warmup: int = 2,
) -> dict[str, Any]:
    """Decoder training steps for conv5 / layer4: :meth:`inversion.train.DecoderTrainer.train_step` on one batch.

    Writes the decoder to ``out/decoder.pt`` (for :func:`inversion_job`).
    """
    import inversion.train as T
    from encoders.core.runtime import setup_distributed
    from inversion.decoders import save_decoder

    extra, skip = scale_keys(T.TrainDecoderConfig, precision, device)
    if skip:
        return {"skipped": skip}
    if preset != "cpu":
        if not has_key(T.TrainDecoderConfig, "decoder.preset"):
            return {"skipped": f"decoder.preset={preset} not supported in this version"}
        extra.append(f"decoder.preset={preset}")
    cfg = decoder_config(arch, sizes, data, encoder_ckpt, out, batch_size, warmup + steps, num_workers, device, extra)
    reset_peak_memory(device)
    trainer = T.DecoderTrainer(cfg, None, *setup_distributed(cfg.device))
    trainer.decoder.train()
    batch = _first_batch(trainer.train_set, batch_size)
    x = batch[0] if isinstance(batch, (list, tuple)) else batch  # (images, labels) or images
    ips, ips_cpu = time_steps(lambda: trainer.train_step(x), batch_size, warmup, steps, device)
    result = {
        "images_per_s": ips,
        "images_per_cpu_s": ips_cpu,
        "peak_mib": peak_memory_mib(device),
        "method": "DecoderTrainer.train_step",
        "steps_timed": steps,
        "batch_size": batch_size,
        "decoder_parameters": sum(p.numel() for p in trainer.decoder.parameters()),
    }
    path = save_decoder(trainer.decoder.eval(), out / "decoder.pt", trainer.encoder)  # records its fingerprint
    return {**result, "checkpoint": str(path)}


def inversion_job(
    precision: str,
    device: str,
    encoder_ckpt: Path,
    decoder_ckpt: Path,
    height: int,
    width: int,
    batch_size: int = 1,
    repeats: int = 1,
) -> dict[str, Any]:
    """:meth:`RobustAutoencoder.reconstruct` of ``batch_size`` images of ``height`` x ``width`` (one warm-up pass)."""
    import statistics

    import torch

    from inversion import RobustAutoencoder

    ae = RobustAutoencoder.from_checkpoints(encoder_ckpt, decoder_ckpt, device=device)
    x = torch.rand(batch_size, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times, cpu_times = [], []
    reset_peak_memory(device)
    for i in range(1 + repeats):
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            out = ae.reconstruct(x)
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu)
        assert out.shape == x.shape and bool(torch.isfinite(out.float()).all())
    seconds = statistics.median(times)
    return {
        "images_per_s": batch_size / seconds,
        "seconds_per_image": seconds / batch_size,
        "images_per_cpu_s": batch_size / max(statistics.median(cpu_times), 1e-9),
        "peak_mib": peak_memory_mib(device),
        "size": f"{width}x{height}",
        "batch_size": batch_size,
    }


# ----------------------------------------------------------------------------- main
def run_checks(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from encoders.data.folders import default_num_workers

    sizes = TINY if args.tiny else FULL
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: run with --device cpu --tiny for the CPU smoke check")
    if device == "cpu":
        torch.set_num_threads(args.threads or torch.get_num_threads())
    workers = 0 if args.tiny else (args.num_workers if args.num_workers is not None else default_num_workers())
    height, width = args.inversion_size or sizes["inversion"]
    info = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": args.tiny,
        "size": sizes["size"],
        "width": sizes["width"],
        "num_workers": workers,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="rfi-gpu-check-") as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", sizes["size"], n_train=max(8, min(args.batch_size, 64)))
        for arch in args.archs:
            for precision in args.precisions:
                tag = f"{arch}-{precision}"
                enc = encoder_job(
                    arch,
                    precision,
                    device,
                    sizes,
                    data,
                    tmp / f"enc-{tag}",
                    args.batch_size,
                    args.steps,
                    workers,
                    args.warmup,
                )
                rows.append({"arch": arch, "precision": precision, "job": "encoder (robust, PGD-3)", **enc})
                _print_row(rows[-1])
                ckpt = random_encoder_checkpoint(arch, sizes, tmp / f"encoder-{arch}.pt")
                dec = decoder_job(
                    arch,
                    precision,
                    device,
                    sizes,
                    data,
                    ckpt,
                    tmp / f"dec-{tag}",
                    args.decoder_batch_size or args.batch_size,
                    args.steps,
                    workers,
                    args.preset,
                    args.warmup,
                )
                rows.append({"arch": arch, "precision": precision, "job": f"decoder ({LAYERS[arch]})", **dec})
                _print_row(rows[-1])
                if "checkpoint" in dec:
                    inv = inversion_job(precision, device, ckpt, Path(dec["checkpoint"]), height, width)
                    rows.append(
                        {
                            "arch": arch,
                            "precision": precision,
                            "job": f"inversion {width}x{height} ({LAYERS[arch]})",
                            **inv,
                        }
                    )
                    _print_row(rows[-1])
        if args.ssl:
            for precision in args.precisions:
                for style in (False, True):
                    job = ssl_job(precision, style, device, tmp, args.batch_size, args.steps, args.warmup, workers)
                    name = f"ssl mocov2{' + StyleAugment' if style else ''} (sassl_imagenet)"
                    rows.append({"arch": "resnet50", "precision": precision, "job": name, **job})
                    _print_row(rows[-1])
                    if "epoch_minutes" in job:
                        minutes = job["epoch_minutes"]
                        print(
                            f"{'':<16}step {job['step_ms']:.0f} ms (StyleAugment {job['style_ms']:.0f} ms beside it, "
                            f"waited {job['wait_ms']:.1f} ms); one GPU: {minutes['imagenet100']:.1f} min per "
                            f"ImageNet-100 epoch, {minutes['imagenet']:.0f} min per ImageNet epoch",
                            flush=True,
                        )
    for r in rows:
        r.pop("checkpoint", None)
    return {**info, "rows": rows}


IMAGENET_TRAIN_IMAGES = {"imagenet100": 126_689, "imagenet": 1_281_167}


def ssl_job(
    precision: str, style: bool, device: str, tmp: Path, batch_size: int, steps: int, warmup: int, workers: int
) -> dict[str, Any]:
    """Median step time of the SASSL recipe (``configs/apps/sassl_imagenet.yaml``) on ``device`` (GPU only),
    with a random default-architecture style autoencoder (speed does not depend on the weights)."""
    if not device.startswith("cuda"):
        return {"skipped": "the SASSL recipe is measured on a GPU only"}
    import torch

    from apps.ssl import SSLConfig
    from apps.ssl.train import train_ssl
    from encoders import create_encoder
    from encoders.core.config import load_config
    from inversion.autoencoder import RobustAutoencoder
    from inversion.decoders import Decoder

    data = tmp / "ssl_data"
    if not data.is_dir():
        make_dataset(data, 224, n_train=batch_size * (steps + warmup + 2))
    model = tmp / "style_ae.pt"
    if not model.is_file():
        torch.manual_seed(0)
        enc = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
        RobustAutoencoder(enc, Decoder(64, 4, "layer3", channels=64, min_channels=32)).save(model)
    queue = 65536 if 65536 % batch_size == 0 else 256 * batch_size
    cfg = load_config(
        SSLConfig,
        ROOT / "configs" / "apps" / "sassl_imagenet.yaml",
        [
            f"data.root={data}",
            f"data.num_workers={workers}",
            f"batch_size={batch_size}",
            f"moco.queue={queue}",
            f"steps={steps + warmup + 1}",
            f"device={device}",
            f"precision={precision}",
            f"style.enabled={str(style).lower()}",
            f"style.model={model}",
            "probe.enabled=false",
            "log_every=0",
            f"out={tmp / f'ssl-{precision}-{style}'}",
        ],
    )
    reset_peak_memory(device)
    stats = train_ssl(cfg).metrics
    step_s = stats["step_ms"] / 1000
    return {
        "images_per_s": batch_size / step_s,
        "step_ms": stats["step_ms"],
        "style_ms": stats["style_ms"],
        "wait_ms": stats["wait_ms"],
        "epoch_minutes": {k: n / batch_size * step_s / 60 for k, n in IMAGENET_TRAIN_IMAGES.items()},
        "peak_mib": peak_memory_mib(device),
    }


def _print_row(r: dict[str, Any]) -> None:
    if "skipped" in r:
        print(f"{r['arch']:<9} {r['precision']:<5} {r['job']:<34} skipped: {r['skipped']}", flush=True)
    else:
        print(
            f"{r['arch']:<9} {r['precision']:<5} {r['job']:<34} {r['images_per_s']:>9.2f} images/s   "
            f"peak {r['peak_mib']:>8.0f} MiB",
            flush=True,
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="GPU check: real-size training and inversion speed and memory")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="small widths and sizes (a CPU smoke check in seconds)")
    parser.add_argument("--archs", nargs="+", default=["alexnet", "resnet50"], choices=sorted(LAYERS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per job")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before them")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decoder-batch-size", type=int, help="default: --batch-size")
    parser.add_argument("--preset", default="cpu", help="decoder capacity preset (cpu | paper)")
    parser.add_argument(
        "--num-workers", type=int, help="DataLoader workers (default: from the CPU count; 0 with --tiny)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (CPU only)")
    parser.add_argument(
        "--inversion-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="image to invert (default 3000 4000; 300 400 with --tiny)",
    )
    parser.add_argument(
        "--no-ssl", dest="ssl", action="store_false", help="leave out the SASSL recipe (MoCo v2 + StyleAugment)"
    )
    parser.add_argument("--json", default=str(ROOT / "bench/results/gpu_check.json"))
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        print("note: full size on CPU is slow; bench/real_size.py is the CPU measurement", file=sys.stderr)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    start = time.perf_counter()
    result = run_checks(args)
    result["total_seconds"] = time.perf_counter() - start
    print(f"total {result['total_seconds']:.0f} s on {result['device']}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
