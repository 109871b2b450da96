"""``rfi train-encoder``: standard or adversarially robust (PGD) encoder training (:mod:`encoders.robust.train`).

Example:
    rfi train-encoder --config configs/encoder/resnet18_robust.yaml epochs=2 --out runs/encoders/r18
    torchrun --standalone --nproc_per_node 2 -m apps.cli train-encoder --config ...   # DDP
"""

from __future__ import annotations

import argparse

from apps.commands.common import add_job_arguments, run_training
from encoders.robust.train import TrainEncoderConfig, train_encoder


def register_train_encoder(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi train-encoder``: ``--config``, ``key=value`` overrides, ``--out``, ``--resume``."""
    add_job_arguments(
        parser,
        None,
        "epochs=2 adv.eps=1.0 data.source=folder data.root=imgs",
        "output folder (default: runs/encoders/<config name>)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; rank 0 prints the checkpoint's path."""
    return run_training(args, TrainEncoderConfig, train_encoder, "runs/encoders")
