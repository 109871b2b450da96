"""``rfi denoise train | apply``: train a denoiser on robust features, then denoise image files (:mod:`apps.denoise`).

``train`` writes one model file (:func:`apps.denoise.train_denoiser`) to the config's ``model``
(default ``<train.out>/denoiser.pt``); ``apply`` denoises images (:func:`apps.denoise.denoise_files`)
with the config's ``apply.model`` (default: RFI's shipped blind denoiser, ``shipped:rfi_denoiser``;
``null``: the one ``train`` writes) and the other settings of its ``apply:`` section, unless a flag
says otherwise. Both read ``configs/apps/denoise.yaml`` by default.

Example:
    rfi denoise train --config configs/apps/denoise.yaml 'noise.sigma=[5,50]' --out runs/denoise
    rfi denoise apply noisy/ --out clean/                     # the shipped denoiser
    rfi denoise apply photos/ --model runs/denoise/denoiser.pt --out demo/ --sigma 25 --save-noisy
"""

from __future__ import annotations

import argparse
import logging
import os

from apps.commands.common import add_job_arguments, common_flags, flag_overrides
from apps.denoise import DEFAULT_CONFIG, denoise_files, load_denoiser, load_denoiser_config, model_file, train_denoiser
from encoders.core.files import check_output_folder, reported_writes
from encoders.core.runtime import resolve_device

log = logging.getLogger("rfi")

APPLY_FLAGS = ("model", "sigma", "seed", "save_noisy", "tile", "device")
"""The ``rfi denoise apply`` flags that set a key of the config's ``apply:`` section (same names)."""


def register_denoise(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi denoise`` and its sub-commands ``train`` and ``apply``.

    The defaults of ``apply``'s flags are the config's ``apply:`` keys (``configs/apps/denoise.yaml``).
    """
    sub = parser.add_subparsers(dest="denoise_command", metavar="SUBCOMMAND")
    common = [common_flags(suppress=True)]  # also accepted after the sub-command

    p = sub.add_parser(
        "train",
        parents=common,
        help="train a denoiser: a decoder from noisy images' robust features to the clean images",
        description="Train a denoising decoder on robust features and write one model file.",
    )
    add_job_arguments(
        p,
        DEFAULT_CONFIG,
        "noise.sigma=25 'noise.sigma=[5,50]' train.steps=2000 "
        "train.encoder.checkpoint=PATH 'train.decoder.skips=[input,layer1]'",
        "training folder (default: train.out of the config)",
    )
    p.add_argument("--model", help="model file to write (default: model of the config, else <out>/denoiser.pt)")
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "apply",
        parents=common,
        help="denoise image files with a trained denoiser",
        description="Denoise image files (PNG outputs, same names). Flags override the config's apply: section.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder (PNG files, same names as the inputs)")
    p.add_argument(
        "--model",
        help="denoiser file, or shipped:NAME (config: apply.model, RFI's shipped denoiser; "
        "rfi denoise train writes runs/denoise/denoiser.pt)",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument(
        "--sigma",
        type=float,
        help="DEMO: first add Gaussian noise of this level (0-255 units) to the "
        "inputs, then denoise (config: apply.sigma)",
    )
    p.add_argument("--seed", type=int, help="seed of the --sigma noise (config: apply.seed)")
    p.add_argument(
        "--save-noisy",
        action=argparse.BooleanOptionalAction,
        help="with --sigma: also write <out>/noisy/<name>.png (config: apply.save_noisy)",
    )
    p.add_argument("--tile", type=int, help="tile side in px for large images (config: apply.tile)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (config: apply.device)")
    p.set_defaults(func=run_apply)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    """``rfi denoise train``: train; rank 0 prints the model file's path."""
    cfg = load_denoiser_config(args.config, args.overrides)
    if args.out is not None:
        cfg.train.out = args.out
    if args.model is not None:
        cfg.model = args.model
    with reported_writes(cfg.train.out or model_file(cfg)):  # a full disk: one line naming the folder
        path = train_denoiser(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(os.fspath(path))
    return 0


def run_apply(args: argparse.Namespace) -> int:
    """``rfi denoise apply``: denoise every input; the exit code follows :mod:`encoders.core.files`."""
    cfg = load_denoiser_config(args.config, flag_overrides(args, "apply", APPLY_FLAGS))
    settings = cfg.apply
    check_output_folder(args.out)  # before the model is loaded
    model, info = load_denoiser(settings.model or model_file(cfg), resolve_device(settings.device))
    if settings.sigma is not None and "sigma" in info:
        lo, hi = info["sigma"]
        if not lo <= settings.sigma <= hi:
            log.warning(
                "--sigma %g is outside the noise range this model was trained for [%g, %g]", settings.sigma, lo, hi
            )
    return denoise_files(
        model, args.inputs, args.out, settings.sigma, settings.tile, settings.seed, settings.save_noisy
    )
