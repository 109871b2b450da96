"""``rfi train-denoiser``: train a denoising decoder on robust features (:func:`apps.denoise.train_denoiser`).

Example:
    rfi train-denoiser --config configs/apps/denoise.yaml 'noise.sigma=[5,50]' --out runs/denoise
"""
from __future__ import annotations

import argparse
import os

from apps.commands.common import add_job_arguments
from apps.denoise import load_denoiser_config, train_denoiser


def register_train_denoiser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi train-denoiser``."""
    add_job_arguments(parser, None, "noise.sigma=25 'noise.sigma=[5,50]' train.steps=2000 "
                                    "train.encoder.checkpoint=PATH 'train.decoder.skips=[input,layer1]'",
                      "training folder (default: train.out of the config, else runs/denoise)")
    parser.add_argument("--model", help="model file to write (default: <out>/denoiser.pt)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; rank 0 prints the model file's path."""
    cfg = load_denoiser_config(args.config, args.overrides)
    if args.out:
        cfg.train.out = args.out
    if args.model:
        cfg.model = args.model
    path = train_denoiser(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(os.fspath(path))
    return 0
