"""``rfi denoise``: denoise image files with a trained denoiser (:func:`apps.denoise.denoise_files`).

Example:
    rfi denoise noisy/ --model runs/denoise/denoiser.pt --out clean/
    rfi denoise photos/ --model runs/denoise/denoiser.pt --out demo/ --sigma 25 --save-noisy
"""
from __future__ import annotations

import argparse
import logging

from apps.denoise import denoise_files, load_denoiser
from encoders.core.errors import RFIError
from encoders.core.files import check_output_folder
from encoders.core.runtime import resolve_device

log = logging.getLogger("rfi")


def register_denoise(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi denoise``."""
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--model", required=True, help="denoiser file written by rfi train-denoiser")
    parser.add_argument("--out", required=True, help="output folder (PNG files, same names as the inputs)")
    parser.add_argument("--sigma", type=float, default=None,
                        help="DEMO: first add Gaussian noise of this level (0-255 units) to the inputs, "
                             "then denoise; without it the inputs are denoised as they are")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sigma noise (default 0)")
    parser.add_argument("--save-noisy", action="store_true", help="with --sigma: also write <out>/noisy/<name>.png")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile side in px for large images (default: whole image up to 1 Mpx, else 1024)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Denoise every input; the exit code follows :mod:`encoders.core.files`."""
    if args.tile is not None and args.tile < 1:
        raise RFIError(f"--tile must be a positive number of pixels, got {args.tile}")
    if args.sigma is not None and not 0 <= args.sigma < float("inf"):
        raise RFIError(f"--sigma must be a finite number >= 0 (0-255 units), got {args.sigma:g}")
    check_output_folder(args.out)  # before the model is loaded
    model, info = load_denoiser(args.model, resolve_device(args.device))
    if args.sigma is not None and "sigma" in info:
        lo, hi = info["sigma"]
        if not lo <= args.sigma <= hi:
            log.warning("--sigma %g is outside the noise range this model was trained for [%g, %g]",
                        args.sigma, lo, hi)
    return denoise_files(model, args.inputs, args.out, args.sigma, args.tile, args.seed, args.save_noisy)
