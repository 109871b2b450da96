"""``rfi train-decoder``: train a decoder that inverts one layer of a frozen encoder (:mod:`inversion.train`).

Example:
    rfi train-decoder --config configs/decoder/resnet18_robust_layer3.yaml epochs=2
    torchrun --standalone --nproc_per_node 2 -m apps.cli train-decoder --config ...   # DDP
"""

from __future__ import annotations

import argparse

from apps.commands.common import add_job_arguments, run_training
from inversion.train import TrainDecoderConfig, train_decoder


def register_train_decoder(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi train-decoder``: ``--config``, ``key=value`` overrides, ``--out``, ``--resume``."""
    add_job_arguments(
        parser,
        None,
        "epochs=2 loss.feature=0.5 encoder.layer=layer2",
        "output folder (default: runs/decoders/<config name>)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; rank 0 prints the checkpoint's path."""
    return run_training(args, TrainDecoderConfig, train_decoder, "runs/decoders")
