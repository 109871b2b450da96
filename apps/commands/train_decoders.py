"""``rfi train-decoders``: train a decoder pyramid for style transfer (:func:`apps.style.pyramid.train_pyramid`).

Example:
    rfi train-decoders --config configs/apps/style.yaml train.steps=100 --out runs/style/pyramid.pt
"""
from __future__ import annotations

import argparse

from apps.commands.common import add_job_arguments
from apps.style.pyramid import DEFAULT_CONFIG, TrainDecodersConfig, train_pyramid
from encoders.core.config import load_config


def register_train_decoders(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi train-decoders``."""
    add_job_arguments(parser, DEFAULT_CONFIG, "train.steps=100 'layers=[layer1,layer2,layer3]' "
                                              "train.encoder.checkpoint=PATH per_layer.layer1.steps=50",
                      "pyramid model file (default: out of the config)", "continue (or reuse) the per-layer runs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train every layer's decoder; print the pyramid file's path."""
    cfg = load_config(TrainDecodersConfig, args.config, args.overrides)
    if args.out:
        cfg.out = args.out
    print(train_pyramid(cfg, resume=args.resume).path)
    return 0
