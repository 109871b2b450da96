"""``rfi segment train | apply``: train a shift-equivariant segmenter, then label image files (:mod:`apps.segment`).

``train`` writes one model file (:func:`apps.segment.train.train_segmenter`) to the config's
``model`` (default ``<train.out>/segmenter.pt``); ``apply`` writes the label map of each image
(:func:`apps.segment.apply.segment_files`), with the settings of the config's ``apply:``
section unless a flag says otherwise. Both read ``configs/apps/segment.yaml`` by default, so
the same ``--config`` trains and applies one segmenter.

Example:
    rfi segment train --config configs/apps/segment.yaml train.steps=200 --out runs/segment
    rfi segment train train.data.source=voc train.data.root=VOCdevkit/VOC2012 train.data.resize=160 \
        train.data.size=128 train.encoder.checkpoint=runs/encoders/swin_t_tiny_robust_equivariant/checkpoint.pt \
        train.encoder.layer=stage1 'train.decoder.skips=[]'
    rfi segment apply photos/ --out labels/ --overlay
"""

from __future__ import annotations

import argparse
import os

from apps.commands.common import add_job_arguments, common_flags, flag_overrides
from apps.segment.apply import segment_files
from apps.segment.config import DEFAULT_CONFIG, SegmentConfig, model_file
from apps.segment.model import load_segmenter
from apps.segment.train import train_segmenter
from encoders.core.config import load_config
from encoders.core.files import check_output_folder
from encoders.core.runtime import resolve_device

APPLY_FLAGS = ("overlay", "device")
"""The ``rfi segment apply`` flags that set a key of the config's ``apply:`` section (same names)."""


def register_segment(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi segment`` and its sub-commands ``train`` and ``apply``.

    The defaults of ``apply``'s flags are the config's ``apply:`` keys (``configs/apps/segment.yaml``).
    """
    sub = parser.add_subparsers(dest="segment_command", metavar="SUBCOMMAND")
    common = [common_flags(suppress=True)]  # also accepted after the sub-command

    p = sub.add_parser(
        "train",
        parents=common,
        help="train a segmenter: class logits at the input size from an "
        "encoder layer, shift-equivariant with LPS / equivariant encoders",
        description="Train a segmenter (cross-entropy, frozen or fine-tuned encoder) and write one model file.",
    )
    add_job_arguments(
        p,
        DEFAULT_CONFIG,
        "train.steps=200 train.encoder.checkpoint=PATH train.finetune=true "
        "train.data.source=voc train.data.root=VOC2012",
        "training folder (default: train.out of the config)",
    )
    p.add_argument("--model", help="model file to write (default: model of the config, else <out>/segmenter.pt)")
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "apply",
        parents=common,
        help="write the label map of image files (palette PNGs)",
        description="Segment image files: <out>/<name>.png holds each pixel's class index (VOC "
        "colours). Flags override the config's apply: section.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder (PNG label maps, same names as the inputs)")
    p.add_argument("--model", help="segmenter file (default: model of the config, where rfi segment train writes it)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument(
        "--overlay",
        action=argparse.BooleanOptionalAction,
        help="also write <out>/<name>_overlay.png, the image tinted with its labels (config: apply.overlay)",
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (config: apply.device)")
    p.set_defaults(func=run_apply)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    """``rfi segment train``: train; rank 0 prints the model file's path."""
    cfg = load_config(SegmentConfig, args.config, args.overrides)
    if args.out:
        cfg.train.out = args.out
    if args.model:
        cfg.model = args.model
    result = train_segmenter(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(os.fspath(result.path))
    return 0


def run_apply(args: argparse.Namespace) -> int:
    """``rfi segment apply``: label every input; the exit code follows :mod:`encoders.core.files`."""
    cfg = load_config(SegmentConfig, args.config, flag_overrides(args, "apply", APPLY_FLAGS))
    check_output_folder(args.out)  # before the model is loaded
    model = load_segmenter(args.model or model_file(cfg), resolve_device(cfg.apply.device))
    return segment_files(model, args.inputs, args.out, cfg.apply.overlay)
