"""``rfi ssl``: self-supervised pre-training (SimCLR or MoCo v2) with optional style augmentation (SASSL).

The library code is :mod:`apps.ssl` (:func:`apps.ssl.train.run_ssl`); this module parses the command line
and runs it.

Example:
    rfi ssl --config configs/apps/ssl.yaml method=mocov2                     # -> runs/ssl/mocov2
    rfi ssl --config configs/apps/ssl.yaml method=simclr style.enabled=true --out runs/ssl/simclr_style
    rfi ssl --config configs/apps/ssl.yaml method=mocov2 --resume           # continue an interrupted run
    torchrun --nproc_per_node 8 -m apps.cli ssl --config configs/apps/sassl_imagenet.yaml data.root=DIR  # DDP
    rfi eval-encoder --checkpoint runs/ssl/mocov2/checkpoint.pt ...         # the backbone is an RFI encoder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apps.commands.common import add_job_arguments
from encoders.core.config import load_config
from encoders.core.files import check_output_folder, reported_writes

DEFAULT_CONFIG = "configs/apps/ssl.yaml"


def register_ssl(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi ssl``: ``--config``, ``key=value`` overrides, ``--out``, ``--resume``."""
    add_job_arguments(
        parser,
        DEFAULT_CONFIG,
        "method=mocov2 style.enabled=true steps=200",
        "output folder (default: runs/ssl/<method>[_style])",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train, checkpoint, probe; prints the checkpoint path and one line per probe task (rank 0 of a DDP job)."""
    from apps.ssl import SSLConfig, run_ssl
    from apps.ssl.train import default_out

    cfg = load_config(SSLConfig, args.config, args.overrides)  # checks every key before any model is built
    if args.out:
        cfg.out = args.out
    elif not cfg.out:
        cfg.out = str(default_out(cfg))
    check_output_folder(cfg.out)  # empty, a file, too long a name, read-only: one line before any work
    with reported_writes(cfg.out):  # a full disk: one line naming the folder
        result = run_ssl(cfg, resume=args.resume)
    if result["rank"] != 0:
        return 0
    print(Path(cfg.out) / "checkpoint.pt")
    for task, acc in result["probe"].items():
        print(f"linear probe {task}: {100 * acc:.1f}%")
    if result["step_ms"] is None:  # a finished run resumed: no step timed
        print("no step ran (the run was already finished)")
    else:
        print(
            f"step {result['step_ms']:.0f} ms (StyleAugment {result['style_ms']:.0f} ms"
            f"{', in the background' if result['background'] else ''}), {result['images_per_s']:.0f} images/s"
        )
    return 0
