"""``rfi eval-encoder``: clean and PGD accuracy of an encoder checkpoint (:func:`encoders.robust.evaluate.evaluate_encoder`).

The checkpoint (RFI, ``robustness``-library or torchvision file) is read once: the encoder
and the training config it records (attack norm and radius, data) come from the same dict.

Example:
    rfi eval-encoder --checkpoint runs/encoders/resnet18_robust/checkpoint.pt --eps 0.25 0.5 1.0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from apps.commands.common import add_data_arguments, data_config, json_output
from encoders.robust.attacks import NORMS, check_attack
from encoders.weights.checkpoints import encoder_from_checkpoint
from encoders.data.build import build_dataset
from encoders.core.errors import RFIError
from encoders.robust.evaluate import evaluate_encoder, format_table
from encoders.core.runtime import resolve_device
from encoders.core.serialization import load_checkpoint, write_json


def register_eval_encoder(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi eval-encoder``."""
    parser.add_argument("--checkpoint", required=True,
                        help="RFI encoder checkpoint, robustness-library checkpoint or torchvision state dict")
    parser.add_argument("--arch", help="architecture of a foreign checkpoint (alexnet, vgg16, vgg19, resnet18, resnet50)")
    parser.add_argument("--eps", type=float, nargs="+",
                        help="attack radii (default: the training eps, else 0.5)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--norm", choices=NORMS, help="attack norm (default: the training norm, else l2)")
    parser.add_argument("--step-size", type=float, help="PGD step size (default 2.5*eps/steps)")
    add_data_arguments(parser)
    parser.add_argument("--max-images", type=int, default=1000, help="evaluate on at most this many images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="OUT", help="results file (default: <checkpoint>.eval.json)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate at every ``--eps``; print a table and write the JSON file."""
    ckpt_path = Path(args.checkpoint)
    for eps in args.eps or []:
        check_attack(eps, args.steps, args.step_size)
    out = json_output(args.json, ckpt_path.with_name(ckpt_path.stem + ".eval.json"))  # before the evaluation
    ckpt = load_checkpoint(ckpt_path)
    encoder = encoder_from_checkpoint(ckpt, str(ckpt_path), name=args.arch)
    train_cfg = (ckpt.get("train") or {}).get("config") or {}
    del ckpt
    adv = train_cfg.get("adv", {})
    norm = args.norm or adv.get("norm", "l2")
    eps_list = args.eps or [adv.get("eps", 0.5)]
    data_cfg = data_config(args.data, args.size, train_cfg.get("data"), encoder.small_input)
    dataset = build_dataset(data_cfg, "val")
    classes = getattr(dataset, "num_classes", None)
    if classes is not None and classes > encoder.num_classes:
        raise RFIError(f"{ckpt_path} has {encoder.num_classes} outputs but the data has {classes} classes")
    device = resolve_device(args.device)
    encoder.to(device)
    rows = [evaluate_encoder(encoder, dataset, eps, args.steps, norm, args.step_size, args.batch_size,
                             args.max_images, seed=args.seed, device=device) for eps in eps_list]
    print(f"{ckpt_path}: {encoder.arch} (width {encoder.width:g}, {encoder.num_classes} classes) on "
          f"{data_cfg.source} val, {data_cfg.size}px")
    print(format_table(rows))
    write_json({"checkpoint": str(ckpt_path), "arch": encoder.arch, "data": vars(data_cfg), "results": rows}, out)
    print(f"wrote {out}")
    return 0
