"""Denoising benchmark: our robust-feature denoiser vs scikit-image's classical denoisers.

Evaluation images: the validation region (the last third along the longer side, never
seen in training) of each of the 8 embedded photos, whole (384 x 128-193 px). For each
noise level sigma (0-255 units, default 15, 25, 50) every method gets the very same noisy
images (Gaussian noise clipped to [0, 1], seeded per image and sigma):

- ``ours (robust)``: ``rfi train-denoiser`` on the default robust encoder (one blind
  model for all sigmas unless ``--fixed``: one model per sigma);
- ``ours (standard)``: the same config and budget on the standard encoder;
- scikit-image: ``denoise_nl_means`` (with ``estimate_sigma``, and with the true sigma
  given), ``denoise_tv_chambolle``, ``denoise_wavelet`` (BayesShrink, YCbCr) and
  ``denoise_bilateral``. Their parameters (NLM's ``h`` factor, TV weight, wavelet, bilateral
  colour/spatial sigmas) are tuned per sigma by PSNR on noisy crops of the *training*
  regions, never on the evaluation images.

Reported: PSNR and SSIM (``inversion.metrics``: SSIM = scikit-image's Gaussian-window
SSIM) averaged over images, and ms per image (median of ``--repeats`` timed passes; ours
on ``--threads`` torch threads, default 1, like scikit-image's single-threaded denoisers).
Models are trained in ``--workdir`` (finished runs are reused, killed ones resumed) unless
``--robust-model`` / ``--standard-model`` name existing files.

Usage:
    python bench/denoise.py                          # a few minutes on 2 CPU cores
    python bench/denoise.py --steps 1500             # bigger training budget
    python bench/denoise.py --fixed                  # one model per sigma (3x the budget)
    python bench/denoise.py --set train.decoder.skips=[layer1]   # any train-denoiser override
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.restoration import (denoise_bilateral, denoise_nl_means, denoise_tv_chambolle,  # noqa: E402
                                 denoise_wavelet, estimate_sigma)

from apps.denoise import add_noise, load_denoiser, load_denoiser_config, train_denoiser  # noqa: E402
from encoders.data import EMBEDDED_PHOTOS, EmbeddedCrops, embedded_image, region  # noqa: E402
from encoders.runtime import save_grid  # noqa: E402
from encoders.serialization import atomic_write  # noqa: E402
from inversion.metrics import psnr, ssim  # noqa: E402

log = logging.getLogger("rfi")
Classical = Callable[[np.ndarray, float, Any], np.ndarray]

# ----------------------------------------------------------------------------- scikit-image
# Each takes a noisy (H, W, 3) float64 image in [0, 1], the true sigma (0-255 units) and one
# tunable parameter, and returns the denoised image.


def _nlm(noisy: np.ndarray, sigma: float, h_factor: float, given: bool) -> np.ndarray:
    s = sigma / 255 if given else float(estimate_sigma(noisy, channel_axis=-1, average_sigmas=True))
    if s <= 0:
        return noisy
    return denoise_nl_means(noisy, h=h_factor * s, sigma=s, fast_mode=True, patch_size=5, patch_distance=6,
                            channel_axis=-1)


CLASSICAL: dict[str, tuple[Classical, list[Any]]] = {
    "nlm (sigma est.)": (lambda y, s, k: _nlm(y, s, k, given=False), [0.3, 0.45, 0.6, 0.8, 1.0]),
    "nlm (sigma given)": (lambda y, s, k: _nlm(y, s, k, given=True), [0.3, 0.45, 0.6, 0.8, 1.0]),
    "tv chambolle": (lambda y, s, w: denoise_tv_chambolle(y, weight=w, channel_axis=-1),
                     [0.02, 0.04, 0.06, 0.09, 0.13, 0.18, 0.25]),
    "wavelet bayes": (lambda y, s, wav: denoise_wavelet(y, method="BayesShrink", mode="soft", wavelet=wav,
                                                        channel_axis=-1, convert2ycbcr=True, rescale_sigma=True),
                      ["db1", "db2", "sym4", "coif1"]),
    "bilateral": (lambda y, s, p: denoise_bilateral(y, sigma_color=p[0], sigma_spatial=p[1], channel_axis=-1),
                  [(c, sp) for sp in (1.5, 3.0, 5.0) for c in (0.02, 0.05, 0.1, 0.2)]),
}


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).double().numpy()


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(a, 0, 1)).permute(2, 0, 1).float()


def noisy_images(clean: list[torch.Tensor], sigma: float, seed: int) -> list[torch.Tensor]:
    """The same noisy images for every method: image i at sigma s uses seed (seed, s, i)."""
    return [add_noise(x, sigma, torch.Generator().manual_seed((seed * 1009 + int(sigma * 10)) * 101 + i))
            for i, x in enumerate(clean)]


def tune_classical(sigmas: list[float], crops: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per method and sigma, the grid value with the best mean PSNR on noisy training-region crops."""
    tune = EmbeddedCrops("train", 96, crops, seed=seed + 17)
    clean = [tune[i][0] for i in range(len(tune))]
    best: dict[str, dict[str, Any]] = {name: {} for name in CLASSICAL}
    for sigma in sigmas:
        noisy = noisy_images(clean, sigma, seed + 1)
        for name, (fn, grid) in CLASSICAL.items():
            scores = []
            for p in grid:
                outs = [to_tensor(fn(to_numpy(y), sigma, p)) for y in noisy]
                scores.append(float(psnr(torch.stack(outs), torch.stack(clean)).mean()))
            best[name][str(sigma)] = grid[int(np.argmax(scores))]
    return best


# ----------------------------------------------------------------------------- timing
def run_timed(fn: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor],
              repeats: int) -> tuple[list[torch.Tensor], float]:
    """Outputs of ``fn`` on each image and the median over ``repeats`` passes of ms per image."""
    times, outs = [], []
    for r in range(repeats):
        start = time.perf_counter()
        result = [fn(x) for x in images]
        times.append((time.perf_counter() - start) * 1000 / len(images))
        outs = outs or result
    return outs, statistics.median(times)


def ours_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: model.reconstruct(x[None])[0]


# ----------------------------------------------------------------------------- models
def get_model(args: argparse.Namespace, kind: str, sigma: float | None) -> tuple[Path, dict[str, Any]]:
    """The robust or standard denoiser: a given file, or trained (or reused) in the workdir."""
    given = args.robust_model if kind == "robust" else args.standard_model
    if given:
        return Path(given), {}
    encoder = args.robust_encoder if kind == "robust" else args.standard_encoder
    noise = f"noise.sigma={sigma:g}" if sigma is not None else f"noise.sigma=[{args.train_sigma[0]:g},{args.train_sigma[1]:g}]"
    # One folder per (encoder, noise, budget, overrides): a finished run is reused, never extended.
    tag = f"{kind}_{f'sigma{sigma:g}' if sigma is not None else 'blind'}_{args.steps}steps"
    key = hashlib.sha1(Path(encoder).read_bytes())  # a retrained encoder gets a new folder
    key.update(" ".join(args.set).encode())
    tag += "_" + key.hexdigest()[:8]
    out = Path(args.workdir) / tag
    overrides = [noise, f"train.steps={args.steps}", f"train.encoder.checkpoint={encoder}",
                 f"train.out={out}", f"train.device={args.device}", "train.sample_every=0", *args.set]
    cfg = load_denoiser_config(args.config, overrides)
    start = time.perf_counter()
    path = train_denoiser(cfg, resume=True)
    # seconds spent here: near 0 when a finished run in the workdir was reused
    return path, {"train_seconds_this_run": time.perf_counter() - start, "overrides": overrides}


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sigmas", type=float, nargs="+", default=[15, 25, 50])
    p.add_argument("--config", default=str(ROOT / "configs/apps/denoise.yaml"))
    p.add_argument("--steps", type=int, default=400,
                   help="training steps per denoiser (default 400: ~2 min per model on one free core)")
    p.add_argument("--train-sigma", type=float, nargs=2, default=[0, 55], metavar=("LO", "HI"),
                   help="noise range of the blind denoisers")
    p.add_argument("--fixed", action="store_true", help="one denoiser per sigma instead of one blind model")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more train-denoiser overrides")
    p.add_argument("--robust-encoder", default="runs/encoders/resnet18_robust/checkpoint.pt")
    p.add_argument("--standard-encoder", default="runs/encoders/resnet18_standard/checkpoint.pt")
    p.add_argument("--robust-model", help="use this denoiser file instead of training one")
    p.add_argument("--standard-model", help="use this denoiser file instead of training one")
    p.add_argument("--no-standard", action="store_true", help="skip the standard-encoder denoiser")
    p.add_argument("--workdir", default="runs/bench/denoise")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per method (median reported)")
    p.add_argument("--tune-crops", type=int, default=16, help="training-region crops for classical tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the whole run (default 1: same as scikit-image's single-threaded "
                        "denoisers, and robust to a shared machine; 0 = torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench/results/denoise.json"))
    p.add_argument("--example", default=str(ROOT / "docs/img/denoise_example.png"),
                   help="figure noisy | ours | best scikit-image | clean ('' to skip)")
    p.add_argument("--example-sigma", type=float, default=None, help="noise level of the figure (default: middle)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sigmas = [float(s) for s in args.sigmas]
    names = list(EMBEDDED_PHOTOS)
    clean = [region(embedded_image(n), "val").contiguous() for n in names]
    t0 = time.perf_counter()

    kinds = ["robust"] + ([] if args.no_standard else ["standard"])
    models: dict[str, dict[float, Any]] = {}
    model_info: dict[str, Any] = {}
    for kind in kinds:
        models[kind] = {}
        for sigma in (sigmas if args.fixed else [None]):
            path, info = get_model(args, kind, sigma)
            model, meta = load_denoiser(path, args.device)
            for s in (sigmas if sigma is None else [sigma]):
                models[kind][s] = model
            model_info[f"{kind}" + (f" sigma {sigma:g}" if sigma is not None else "")] = {
                "file": str(path), "trained_sigma": meta.get("sigma"),
                "steps": (meta.get("config") or {}).get("train", {}).get("steps"), **info}
    log.info("models ready (%.0f s); tuning scikit-image parameters on training crops", time.perf_counter() - t0)
    tuned = tune_classical(sigmas, args.tune_crops, args.seed)

    results: dict[str, dict[str, Any]] = {}
    example: dict[str, list[torch.Tensor]] = {}
    mid = args.example_sigma if args.example_sigma is not None else sigmas[len(sigmas) // 2]
    if mid not in sigmas:
        raise SystemExit(f"--example-sigma {mid:g} is not one of --sigmas")
    for sigma in sigmas:
        noisy = noisy_images(clean, sigma, args.seed)
        methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for kind in kinds:
            ours_fn(models[kind][sigma])(noisy[0][:, :32, :32])  # warm-up (traces the feature extractor)
            methods[f"ours ({kind})"] = ours_fn(models[kind][sigma])
        for name, (fn, _) in CLASSICAL.items():
            param = tuned[name][str(sigma)]
            methods[name] = (lambda f, s, p: lambda x: to_tensor(f(to_numpy(x), s, p)))(fn, sigma, param)
        row: dict[str, Any] = {}
        for name, fn in {"noisy input": lambda x: x, **methods}.items():
            outs, ms = run_timed(fn, noisy, 1 if name == "noisy input" else args.repeats)
            p = [float(psnr(o[None], c[None])) for o, c in zip(outs, clean)]
            s = [float(ssim(o[None], c[None])) for o, c in zip(outs, clean)]
            row[name] = {"psnr": statistics.fmean(p), "ssim": statistics.fmean(s),
                         "ms_per_image": None if name == "noisy input" else ms,
                         "psnr_per_image": dict(zip(names, p))}
            if sigma == mid:
                example[name] = outs
            log.info("sigma %g  %-20s PSNR %6.2f  SSIM %.4f  %s", sigma, name, row[name]["psnr"],
                     row[name]["ssim"], "" if name == "noisy input" else f"{ms:8.1f} ms/img")
        classical = {k: v for k, v in row.items() if k in CLASSICAL}
        best = max(classical, key=lambda k: classical[k]["psnr"])
        results[f"{sigma:g}"] = {"methods": row, "best_classical": best,
                                 "ours_robust_minus_best_db": row["ours (robust)"]["psnr"] - row[best]["psnr"],
                                 "ours_beats_best": row["ours (robust)"]["psnr"] > row[best]["psnr"]}

    report = {
        "command": "python bench/denoise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "images": {n: list(c.shape[1:]) for n, c in zip(names, clean)},
        "sigmas": sigmas, "seed": args.seed, "models": model_info, "classical_params": tuned,
        "results": results,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
                "cpu": platform.processor() or platform.machine(), "seconds": time.perf_counter() - t0},
    }
    print_table(report)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, default=str) + "\n"))
    print(f"\nwrote {args.out}")
    if args.example:
        write_example(example, clean, names, results[f"{mid:g}"]["best_classical"], args.example)
        print(f"wrote {args.example} (sigma {mid:g}: noisy | ours | {results[f'{mid:g}']['best_classical']} | clean)")
    return report


def write_example(outs: dict[str, list[torch.Tensor]], clean: list[torch.Tensor], names: list[str],
                  best: str, path: str, show: tuple[str, ...] = ("astronaut", "chelsea", "coffee"),
                  size: tuple[int, int] = (160, 128)) -> None:
    """Rows = images (a centre crop), columns = noisy | ours | best scikit-image | clean."""
    def crop(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = (h - size[0]) // 2, (w - size[1]) // 2
        return x[:, top:top + size[0], left:left + size[1]]

    idx = [names.index(n) for n in show]
    cols = [torch.stack([crop(outs[k][i]) for i in idx]) for k in ("noisy input", "ours (robust)", best)]
    save_grid([*cols, torch.stack([crop(clean[i]) for i in idx])], path)


def print_table(report: dict[str, Any]) -> None:
    sigmas = [f"{s:g}" for s in report["sigmas"]]
    methods = list(report["results"][sigmas[0]]["methods"])
    head = f"{'method':<20}" + "".join(f" | sigma={s:<3} PSNR   SSIM   ms/img" for s in sigmas)
    print("\n" + head)
    print("-" * len(head))
    for m in methods:
        line = f"{m:<20}"
        for s in sigmas:
            r = report["results"][s]["methods"][m]
            ms = "" if r["ms_per_image"] is None else f"{r['ms_per_image']:.1f}"
            line += f" |       {r['psnr']:6.2f}  {r['ssim']:.3f}  {ms:>7}"
        print(line)
    for s in sigmas:
        r = report["results"][s]
        print(f"sigma {s}: best scikit-image = {r['best_classical']}; ours (robust) "
              f"{'beats' if r['ours_beats_best'] else 'does NOT beat'} it by {r['ours_robust_minus_best_db']:+.2f} dB")


if __name__ == "__main__":
    main()
