"""Denoising benchmark: the robust-feature denoiser vs BM3D, a same-budget DnCNN and scikit-image.

Evaluation images (``--data``):

- ``embedded`` (the default): the validation region (the last third along the longer side,
  never seen in training) of each of the 8 embedded photos, whole (384 x 128-193 px, 0.50 Mpx
  in all);
- ``unseen``: the 10 unseen images of :mod:`encoders.data.unseen` (new scenes no model trained
  on), whole, at full size (172 x 448 to 660 x 550 px, 2.13 Mpx in all: 4.3x the pixels of
  ``embedded``), loaded by :func:`inversion.evaluate.whole_images` like ``rfi evaluate --scales full``.
  The images stay whole even for the slow methods. Measured on the largest, ``cell``
  (660 x 550, sigma 25, one thread, CPU seconds on a busy 2-core machine): BM3D 48 s, DnCNN
  5.3 s (width 64; 2.0 s at width 32), ours 1.2 s, bilateral 0.8 s, NLM 0.35 s, TV 0.13 s,
  wavelet 0.06 s. All 10 images hold 5.9x its pixels, so BM3D (one timed pass) takes about
  5 minutes per sigma, 15 for the default three; every other method, seconds per pass.

``--max-images N`` keeps the first N images (for smoke runs). For each noise level sigma
(0-255 units, default 15, 25, 50) every method gets the very same noisy images (Gaussian noise
clipped to [0, 1], seeded per image and sigma):

- ``ours (robust)``: ``rfi denoise train`` on the default robust encoder (one blind
  model for all sigmas unless ``--fixed``: one model per sigma), one per seed (``--seeds``);
- ``ours (standard)``: the same config and budget on the standard encoder;
- ``bm3d``: the ``bm3d`` package (``bm3d_rgb``, the true sigma given; an optional bench-only
  dependency: ``pip install 'robust-inversion[bench]'``; skipped with a message when absent);
- ``dncnn``: a DnCNN (:class:`DnCNN`, 17 layers) trained here on the same training crops,
  noise range, batch size and number of steps as our denoisers (one per seed);
- scikit-image: ``denoise_nl_means`` (with ``estimate_sigma``, and with the true sigma
  given), ``denoise_tv_chambolle``, ``denoise_wavelet`` (BayesShrink, YCbCr) and
  ``denoise_bilateral``. Their parameters (NLM's ``h`` factor, TV weight, wavelet, bilateral
  colour/spatial sigmas) are tuned per sigma by PSNR on noisy crops of the *training*
  regions of the embedded photos, never on the evaluation images (with ``--data unseen`` too).

Reported: PSNR and SSIM (``inversion.metrics``: SSIM = scikit-image's Gaussian-window
SSIM) averaged over images, and ms per image (median of ``--repeats`` timed passes; ours
on ``--threads`` torch threads, default 1, like scikit-image's single-threaded denoisers).
Trained methods are reported as the median over ``--seeds`` training seeds (each seed's
figures are in the JSON). Models are trained in ``--workdir`` (finished runs are reused,
killed ones resumed) unless ``--robust-model`` / ``--standard-model`` name existing files
or shipped models (``shipped:rfi_denoiser``, resolved by
:func:`encoders.weights.shipped.resolve_checkpoint`; one line of error when not in this build).
The JSON (``--out``, default ``bench/results/denoise.json``, ``denoise_unseen.json`` with
``--data unseen``) records the data and is rewritten after each sigma, so a killed run keeps
what it measured.

Usage:
    python bench/denoise.py                          # 3 seeds x 3 trained methods: long on a CPU
    python bench/denoise.py --seeds 1 --steps 200    # quick look
    python bench/denoise.py --steps 1500             # bigger training budget
    python bench/denoise.py --fixed                  # one model per sigma (3x the budget)
    python bench/denoise.py --set train.decoder.skips=[layer1]   # any denoise train override
    python bench/denoise.py --data unseen            # the unseen images, whole -> denoise_unseen.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.restoration import (  # noqa: E402
    denoise_bilateral,
    denoise_nl_means,
    denoise_tv_chambolle,
    denoise_wavelet,
    estimate_sigma,
)
from torch import nn  # noqa: E402

from apps.denoise import DENOISER_APP, add_noise, load_denoiser, load_denoiser_config, train_denoiser  # noqa: E402
from encoders.core.errors import RFIError  # noqa: E402
from encoders.core.runtime import save_grid  # noqa: E402
from encoders.core.serialization import atomic_write, load_checkpoint, save_checkpoint  # noqa: E402
from encoders.data.embedded import EmbeddedCrops  # noqa: E402
from encoders.weights.shipped import resolve_checkpoint  # noqa: E402
from inversion.evaluate import whole_images  # noqa: E402
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
    return denoise_nl_means(
        noisy, h=h_factor * s, sigma=s, fast_mode=True, patch_size=5, patch_distance=6, channel_axis=-1
    )


CLASSICAL: dict[str, tuple[Classical, list[Any]]] = {
    "nlm (sigma est.)": (lambda y, s, k: _nlm(y, s, k, given=False), [0.3, 0.45, 0.6, 0.8, 1.0]),
    "nlm (sigma given)": (lambda y, s, k: _nlm(y, s, k, given=True), [0.3, 0.45, 0.6, 0.8, 1.0]),
    "tv chambolle": (
        lambda y, s, w: denoise_tv_chambolle(y, weight=w, channel_axis=-1),
        [0.02, 0.04, 0.06, 0.09, 0.13, 0.18, 0.25],
    ),
    "wavelet bayes": (
        lambda y, s, wav: denoise_wavelet(
            y, method="BayesShrink", mode="soft", wavelet=wav, channel_axis=-1, convert2ycbcr=True, rescale_sigma=True
        ),
        ["db1", "db2", "sym4", "coif1"],
    ),
    "bilateral": (
        lambda y, s, p: denoise_bilateral(y, sigma_color=p[0], sigma_spatial=p[1], channel_axis=-1),
        [(c, sp) for sp in (1.5, 3.0, 5.0) for c in (0.02, 0.05, 0.1, 0.2)],
    ),
}


# ----------------------------------------------------------------------------- data
DATA = ("embedded", "unseen")
"""What ``--data`` takes: the evaluation images (module docstring)."""
OUTPUTS = {"embedded": ("denoise.json", "denoise_comparison.png"), "unseen": ("denoise_unseen.json", None)}
"""Per ``--data``: the default JSON (in ``bench/results/``) and figure (in ``docs/img/``; None: none)."""
EXAMPLE_IMAGES = {"embedded": ("astronaut", "chelsea", "coffee"), "unseen": ("china", "grace_hopper", "camera")}
"""Per ``--data``: the images shown in the example figure (those evaluated; else the first three)."""


def eval_images(data: str, count: int | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """The evaluation images, whole: names and (3, H, W) tensors in [0, 1].

    Args:
        data: ``embedded`` (the validation region of each embedded photo) or ``unseen`` (the
            unseen images at full size): :func:`inversion.evaluate.whole_images`, what
            ``rfi evaluate --scales full`` measures.
        count: keep the first ``count`` images (``None``: all).

    Raises:
        RFIError: an unknown ``data``.
    """
    if data not in DATA:
        raise RFIError(f"unknown data '{data}' (valid: {', '.join(DATA)})")
    images = whole_images(count, data)
    return [n for n, _ in images], [x.contiguous() for _, x in images]


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).double().numpy()


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(a, 0, 1)).permute(2, 0, 1).float()


def noisy_images(clean: list[torch.Tensor], sigma: float, seed: int) -> list[torch.Tensor]:
    """The same noisy images for every method: image i at sigma s uses seed (seed, s, i)."""
    return [
        add_noise(x, sigma, torch.Generator().manual_seed((seed * 1009 + int(sigma * 10)) * 101 + i))
        for i, x in enumerate(clean)
    ]


def tune_classical(
    sigmas: list[float], crops: int, seed: int, names: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per method and sigma, the grid value with the best mean PSNR on noisy training-region crops."""
    tune = EmbeddedCrops("train", 96, crops, seed=seed + 17)
    clean = [tune[i][0] for i in range(len(tune))]
    names = list(CLASSICAL) if names is None else names
    best: dict[str, dict[str, Any]] = {name: {} for name in names}
    for sigma in sigmas:
        noisy = noisy_images(clean, sigma, seed + 1)
        for name in names:
            fn, grid = CLASSICAL[name]
            scores = []
            for p in grid:
                outs = [to_tensor(fn(to_numpy(y), sigma, p)) for y in noisy]
                scores.append(float(psnr(torch.stack(outs), torch.stack(clean)).mean()))
            best[name][str(sigma)] = grid[int(np.argmax(scores))]
    return best


# ----------------------------------------------------------------------------- timing
def run_timed(
    fn: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor], repeats: int
) -> tuple[list[torch.Tensor], float]:
    """Outputs of ``fn`` on each image and the median over ``repeats`` passes of ms per image."""
    times, outs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = [fn(x) for x in images]
        times.append((time.perf_counter() - start) * 1000 / len(images))
        outs = outs or result
    return outs, statistics.median(times)


def ours_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: model.reconstruct(x[None])[0]


# ----------------------------------------------------------------------------- BM3D
BM3D_MISSING = (
    "bm3d is not installed: the BM3D column is skipped (pip install 'robust-inversion[bench]', "
    "or pip install bm3d; free for non-commercial use only, see docs/denoise.md)"
)


def bm3d_fn(sigma: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """BM3D (``bm3d.bm3d_rgb``, opponent colour space, the true sigma) or ``None`` when not installed."""
    try:
        import bm3d
    except ImportError:
        return None
    return lambda x: to_tensor(bm3d.bm3d_rgb(to_numpy(x), sigma_psd=max(sigma, 1e-3) / 255))


# ----------------------------------------------------------------------------- DnCNN
class DnCNN(nn.Module):
    """DnCNN (Zhang et al., "Beyond a Gaussian denoiser", TIP 2017): ``depth`` 3x3 conv layers,
    conv-ReLU, (depth - 2) x conv-BN-ReLU, conv; residual learning (it predicts the noise).

    Hand-written here (some twenty lines) because no maintained package ships a trainable
    DnCNN: the reference is MATLAB/MatConvNet, KAIR/deepinv carry it inside large frameworks.

    Shape:
        (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1], any H, W.

    Example:
        >>> net = DnCNN(depth=5, width=8)
        >>> tuple(net(torch.rand(1, 3, 20, 13)).shape)
        (1, 3, 20, 13)
    """

    def __init__(self, depth: int = 17, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.depth, self.width = depth, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.body(x)).clamp(0, 1)


def train_dncnn(args: argparse.Namespace, seed: int) -> tuple[DnCNN, dict[str, Any]]:
    """Train a DnCNN with our denoiser's budget: same crops (``train.data``), noise range, batch size,
    steps, Adam with cosine decay (lr ``--dncnn-lr``); reused from the workdir when finished."""
    cfg = load_denoiser_config(args.config, [f"train.steps={args.steps}", f"train.seed={seed}", *args.set])
    t = cfg.train
    out = Path(args.workdir) / f"dncnn_d{args.dncnn_depth}_w{args.dncnn_width}_{args.steps}steps_seed{seed}.pt"
    net = DnCNN(args.dncnn_depth, args.dncnn_width)
    info = {
        "steps": args.steps,
        "batch_size": t.batch_size,
        "crop": t.data.size,
        "crops": t.data.train_crops,
        "sigma": list(cfg.noise.sigma),
        "lr": args.dncnn_lr,
        "params": sum(p.numel() for p in net.parameters()),
    }
    if out.is_file():
        net.load_state_dict(load_checkpoint(out)["state_dict"])
        return net.eval(), {**info, "file": str(out), "train_seconds_this_run": 0.0}
    data = EmbeddedCrops("train", t.data.size, t.data.train_crops, t.data.seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DnCNN(args.dncnn_depth, args.dncnn_width)
    opt = torch.optim.Adam(net.parameters(), lr=args.dncnn_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = time.perf_counter()
    net.train()
    order = torch.randperm(len(data), generator=gen)
    for step in range(args.steps):
        idx = order[(step * t.batch_size) % len(data) :][: t.batch_size]
        if len(idx) < t.batch_size:
            order = torch.randperm(len(data), generator=gen)
            idx = order[: t.batch_size]
        clean = torch.stack([data[int(i)][0] for i in idx])
        noisy = add_noise(clean, cfg.noise.sigma, gen)
        loss = (net(noisy) - clean).pow(2).mean()  # the same L2 pixel loss as our denoiser
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            log.info("dncnn seed %d step %d/%d loss %.5f", seed, step, args.steps, float(loss))
    secs = time.perf_counter() - start
    save_checkpoint({"state_dict": net.state_dict(), "info": info}, out)
    return net.eval(), {**info, "file": str(out), "train_seconds_this_run": secs}


# ----------------------------------------------------------------------------- models
def get_model(args: argparse.Namespace, kind: str, sigma: float | None, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """The robust or standard denoiser: a given file, or trained (or reused) in the workdir."""
    given = args.robust_model if kind == "robust" else args.standard_model
    if given:  # a file, or shipped:NAME (the library's resolver: checked path, or one line of error)
        return Path(resolve_checkpoint(given, flag=f"--{kind}-model", kind=DENOISER_APP)), {}
    encoder = args.robust_encoder if kind == "robust" else args.standard_encoder
    lo, hi = args.train_sigma
    noise = f"noise.sigma={sigma:g}" if sigma is not None else f"noise.sigma=[{lo:g},{hi:g}]"
    # One folder per (encoder, noise, budget, seed, overrides): a finished run is reused, never extended.
    tag = f"{kind}_{f'sigma{sigma:g}' if sigma is not None else 'blind'}_{args.steps}steps_seed{seed}"
    key = hashlib.sha1(Path(encoder).read_bytes())  # a retrained encoder gets a new folder
    key.update(" ".join(args.set).encode())
    key.update(Path(args.config).read_bytes())  # so does a changed config
    tag += "_" + key.hexdigest()[:8]
    out = Path(args.workdir) / tag
    overrides = [
        noise,
        f"train.steps={args.steps}",
        f"train.encoder.checkpoint={encoder}",
        f"train.seed={seed}",
        f"train.out={out}",
        f"train.device={args.device}",
        "train.sample_every=0",
        *args.set,
    ]
    cfg = load_denoiser_config(args.config, overrides)
    start = time.perf_counter()
    path = train_denoiser(cfg, resume=True)
    # seconds spent here: near 0 when a finished run in the workdir was reused
    return path, {"train_seconds_this_run": time.perf_counter() - start, "overrides": overrides}


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        default="embedded",
        choices=DATA,
        help="evaluation images: embedded (validation regions of the 8 photos, default) or unseen "
        "(the unseen images of encoders.data.unseen, whole); classical tuning stays on embedded training crops",
    )
    p.add_argument(
        "--max-images", type=int, default=None, metavar="N", help="evaluate the first N images only (smoke runs)"
    )
    p.add_argument("--sigmas", type=float, nargs="+", default=[15, 25, 50])
    p.add_argument("--config", default=str(ROOT / "configs/apps/denoise.yaml"))
    p.add_argument(
        "--steps", type=int, default=400, help="training steps per trained model (ours and DnCNN; default 400)"
    )
    p.add_argument("--seeds", type=int, default=3, help="training seeds per trained method (medians reported)")
    p.add_argument(
        "--train-sigma",
        type=float,
        nargs=2,
        default=[0, 55],
        metavar=("LO", "HI"),
        help="noise range of the blind denoisers (ours and DnCNN)",
    )
    p.add_argument("--fixed", action="store_true", help="one denoiser per sigma instead of one blind model")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more denoise train overrides")
    p.add_argument("--robust-encoder", default="runs/encoders/resnet18_robust/checkpoint.pt")
    p.add_argument("--standard-encoder", default="runs/encoders/resnet18_standard/checkpoint.pt")
    p.add_argument("--robust-model", help="use this denoiser file (or shipped:rfi_denoiser) instead of training one")
    p.add_argument("--standard-model", help="use this denoiser file instead of training one")
    p.add_argument("--no-standard", action="store_true", help="skip the standard-encoder denoiser")
    p.add_argument("--no-dncnn", action="store_true", help="skip the DnCNN baseline")
    p.add_argument("--no-bm3d", action="store_true", help="skip BM3D")
    p.add_argument("--dncnn-depth", type=int, default=17)
    p.add_argument("--dncnn-width", type=int, default=64)
    p.add_argument("--dncnn-lr", type=float, default=1e-3)
    p.add_argument(
        "--classical",
        nargs="+",
        default=list(CLASSICAL),
        choices=list(CLASSICAL),
        help="scikit-image methods to run (default: all)",
    )
    p.add_argument("--workdir", default="runs/bench/denoise")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per method (median reported)")
    p.add_argument("--tune-crops", type=int, default=16, help="training-region crops for classical tuning")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the whole run (default 1: same as scikit-image's single-threaded "
        "denoisers, and robust to a shared machine; 0 = torch's default)",
    )
    p.add_argument(
        "--out", help="the JSON (default: bench/results/denoise.json; denoise_unseen.json with --data unseen)"
    )
    p.add_argument(
        "--example",
        help="figure noisy | ours | BM3D | DnCNN | clean ('' to skip; default: docs/img/denoise_comparison.png "
        "with --data embedded, none with --data unseen)",
    )
    p.add_argument("--example-sigma", type=float, default=None, help="noise level of the figure (default: middle)")
    args = p.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        p.error(f"--max-images must be at least 1, got {args.max_images}")
    json_name, figure = OUTPUTS[args.data]
    if args.out is None:
        args.out = str(ROOT / "bench/results" / json_name)
    if args.example is None:
        args.example = str(ROOT / "docs/img" / figure) if figure else ""
    return args


def _classical(fn: Callable, sigma: float, param: Any, x: torch.Tensor) -> torch.Tensor:
    """A scikit-image denoiser ``fn(image, sigma, param)`` on a (3, H, W) tensor."""
    return to_tensor(fn(to_numpy(x), sigma, param))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the bench (module docstring); a library error (e.g. a shipped model not in this build) is one line."""
    args = parse_args(argv)
    try:
        return run(args, argv)
    except RFIError as e:
        raise SystemExit(f"bench/denoise.py: error: {e}") from None


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """The bench on parsed arguments: train or load the models, tune, measure, write the JSON (and figure)."""
    for kind in ("robust", "standard"):  # a given model that cannot be used fails before any training
        if getattr(args, f"{kind}_model"):
            get_model(args, kind, None)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    sigmas = [float(s) for s in args.sigmas]
    names, clean = eval_images(args.data, args.max_images)
    log.info("%s data: %d images, %.2f Mpx", args.data, len(names), sum(x[0].numel() for x in clean) / 1e6)
    t0 = time.perf_counter()
    seeds = list(range(args.seeds))
    have_bm3d = not args.no_bm3d and bm3d_fn(25) is not None
    if not args.no_bm3d and not have_bm3d:
        print(BM3D_MISSING, file=sys.stderr)

    kinds = ["robust"] + ([] if args.no_standard else ["standard"])
    models: dict[str, dict[int, dict[float, Any]]] = {}  # method -> seed -> sigma -> model
    model_info: dict[str, Any] = {}
    for seed in seeds:  # seeds one after the other, so a killed run has whole seeds
        for kind in kinds:
            if seed > seeds[0] and (args.robust_model if kind == "robust" else args.standard_model):
                continue  # a given model file is not trained per seed: it is evaluated once
            for sigma in sigmas if args.fixed else [None]:
                path, info = get_model(args, kind, sigma, seed)
                model, meta = load_denoiser(path, args.device)
                for s in sigmas if sigma is None else [sigma]:
                    models.setdefault(f"ours ({kind})", {}).setdefault(seed, {})[s] = model
                params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoders."))
                model_info[f"{kind} seed {seed}" + (f" sigma {sigma:g}" if sigma is not None else "")] = {
                    "file": str(path),
                    "trained_sigma": meta.get("sigma"),
                    "decoder_params": params,
                    "steps": (meta.get("config") or {}).get("train", {}).get("steps"),
                    **info,
                }
                log.info("ours (%s) seed %d ready (%.0f s so far)", kind, seed, time.perf_counter() - t0)
        if not args.no_dncnn:
            net, info = train_dncnn(args, seed)
            models.setdefault("dncnn", {})[seed] = {s: net for s in sigmas}
            model_info[f"dncnn seed {seed}"] = info
            log.info("dncnn seed %d ready (%.0f s so far)", seed, time.perf_counter() - t0)
    log.info("models ready (%.0f s); tuning scikit-image parameters on training crops", time.perf_counter() - t0)
    tuned = tune_classical(sigmas, args.tune_crops, args.seed, args.classical)

    results: dict[str, dict[str, Any]] = {}
    example: dict[str, list[torch.Tensor]] = {}
    mid = args.example_sigma if args.example_sigma is not None else sigmas[len(sigmas) // 2]
    if mid not in sigmas:
        raise SystemExit(f"--example-sigma {mid:g} is not one of --sigmas")

    def report(partial: bool) -> dict[str, Any]:
        rep = {
            "command": "python bench/denoise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "data": args.data,
            "images": {n: list(c.shape[1:]) for n, c in zip(names, clean)},
            "sigmas": sigmas,
            "seed": args.seed,
            "seeds": seeds,
            "steps": args.steps,
            "models": model_info,
            "classical_params": tuned,
            "bm3d": "bm3d " + _version("bm3d") if have_bm3d else None,
            "results": results,
            "partial": partial,
            "env": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "device": args.device,
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_avg_before": load_before,
                "load_avg_now": os.getloadavg(),
                "seconds": time.perf_counter() - t0,
            },
        }
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(rep, indent=2, default=str) + "\n"))
        return rep

    for sigma in sigmas:
        noisy = noisy_images(clean, sigma, args.seed)
        methods: dict[str, dict[int, Callable[[torch.Tensor], torch.Tensor]]] = {}
        for name, by_seed in models.items():
            methods[name] = {}
            for seed, by_sigma in by_seed.items():
                m = by_sigma[sigma]
                fn = ours_fn(m) if name.startswith("ours") else (lambda net: lambda x: net(x[None])[0])(m)
                with torch.no_grad():
                    fn(noisy[0][:, :32, :32])  # warm-up (traces the feature extractor)
                methods[name][seed] = fn
        if have_bm3d:
            methods["bm3d"] = {0: bm3d_fn(sigma)}
        for name in args.classical:
            fn, _ = CLASSICAL[name]
            param = tuned[name][str(sigma)]
            methods[name] = {0: functools.partial(_classical, fn, sigma, param)}
        row: dict[str, Any] = {}
        for name, by_seed in {"noisy input": {0: lambda x: x}, **methods}.items():
            per_seed = {}
            for seed, fn in by_seed.items():
                with torch.no_grad():
                    outs, ms = run_timed(fn, noisy, 1 if name in ("noisy input", "bm3d") else args.repeats)
                p = [float(psnr(o[None], c[None])) for o, c in zip(outs, clean)]
                s = [float(ssim(o[None], c[None])) for o, c in zip(outs, clean)]
                per_seed[seed] = {
                    "psnr": statistics.fmean(p),
                    "ssim": statistics.fmean(s),
                    "ms_per_image": ms,
                    "psnr_per_image": dict(zip(names, p)),
                }
                if sigma == mid and seed == 0:
                    example[name] = outs
            row[name] = {
                "psnr": statistics.median(v["psnr"] for v in per_seed.values()),
                "ssim": statistics.median(v["ssim"] for v in per_seed.values()),
                "ms_per_image": None
                if name == "noisy input"
                else statistics.median(v["ms_per_image"] for v in per_seed.values()),
                "seeds": len(per_seed),
                "per_seed": per_seed,
            }
            log.info(
                "sigma %g  %-20s PSNR %6.2f  SSIM %.4f  %s (%d seed(s))",
                sigma,
                name,
                row[name]["psnr"],
                row[name]["ssim"],
                "" if name == "noisy input" else f"{row[name]['ms_per_image']:8.1f} ms/img",
                len(per_seed),
            )
        classical = {k: v for k, v in row.items() if k in CLASSICAL}
        best = max(classical, key=lambda k: classical[k]["psnr"]) if classical else None
        ours = row["ours (robust)"]["psnr"]
        rivals = {k: row[k]["psnr"] for k in ("bm3d", "dncnn", best) if k in row}
        results[f"{sigma:g}"] = {
            "methods": row,
            "best_classical": best,
            "ours_robust_minus": {k: ours - v for k, v in rivals.items()},
            "ours_robust_ahead_of_all": all(ours > v for v in rivals.values()),
        }
        report(partial=True)

    rep = report(partial=False)
    print_table(rep)
    print(f"\nwrote {args.out}")
    if args.example:
        cols = [
            "noisy input",
            "ours (robust)",
            *(["bm3d"] if "bm3d" in example else []),
            *(["dncnn"] if "dncnn" in example else []),
        ]
        write_example(example, clean, names, cols, args.example, EXAMPLE_IMAGES[args.data])
        print(f"wrote {args.example} (sigma {mid:g}: {' | '.join(cols)} | clean)")
    return rep


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def write_example(
    outs: dict[str, list[torch.Tensor]],
    clean: list[torch.Tensor],
    names: list[str],
    cols: list[str],
    path: str,
    show: tuple[str, ...] = ("astronaut", "chelsea", "coffee"),
    size: tuple[int, int] = (128, 128),
) -> None:
    """Rows = images (a centre crop); columns = ``cols`` (e.g. noisy | ours | BM3D | DnCNN), then clean."""

    def crop(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = (h - size[0]) // 2, (w - size[1]) // 2
        return x[:, top : top + size[0], left : left + size[1]]

    idx = [names.index(n) for n in show if n in names] or list(range(min(3, len(names))))
    columns = [torch.stack([crop(outs[k][i]) for i in idx]) for k in cols]
    save_grid([*columns, torch.stack([crop(clean[i]) for i in idx])], path)


def print_table(report: dict[str, Any]) -> None:
    sigmas = [f"{s:g}" for s in report["sigmas"]]
    methods = list(report["results"][sigmas[0]]["methods"])
    head = f"{'method':<20}" + "".join(f" | sigma={s:<3} PSNR   SSIM   ms/img" for s in sigmas)
    print(
        f"\ntrained methods: median over {len(report['seeds'])} training seed(s), {report['steps']} steps each; "
        "a given model file (--robust-model, --standard-model): evaluated once"
    )
    print(head)
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
        diffs = ", ".join(f"{k} {v:+.2f} dB" for k, v in r["ours_robust_minus"].items())
        print(
            f"sigma {s}: ours (robust) minus: {diffs} -> "
            f"{'ahead of all' if r['ours_robust_ahead_of_all'] else 'NOT ahead of all'}"
        )


if __name__ == "__main__":
    main()
