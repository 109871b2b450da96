"""``rfi eval-encoder``: clean and PGD accuracy of an encoder checkpoint
(:func:`encoders.robust.evaluate.evaluate_encoder`), and on request the gradient-masking checks
(:func:`encoders.robust.evaluate.masking_checks`).

The checkpoint (RFI, ``robustness``-library or torchvision file) is read once: the encoder
and the training config it records (attack norm and radius, data) come from the same dict.
``--masking-checks`` (implied by ``--twin``) adds what a reviewer asks before believing a
fast-trained model, at every ``--eps``: PGD-10 and PGD-50 with ``--restarts`` random starts,
accuracy as ε grows (``--sweep``: multiples of ε; it must fall to about 0), and with ``--twin``
a transfer attack from a model trained apart (e.g. the PGD-trained twin; it must not beat the
white-box attack). A model that fails any check is flagged "possibly gradient-masked" in the
printed table and in the JSON (``masking``: one result per ε, with its ``masking_flags``).

Example:
    rfi eval-encoder --checkpoint runs/encoders/resnet18_robust/checkpoint.pt --eps 0.25 0.5 1.0
    rfi eval-encoder --checkpoint runs/encoders/fast/checkpoint.pt --twin runs/encoders/resnet18_robust/checkpoint.pt
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apps.commands.common import add_data_arguments, add_flag, checked_flags, data_config, json_output
from encoders.core.config import bounded, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.files import reported_writes
from encoders.core.runtime import resolve_device
from encoders.core.serialization import load_checkpoint, write_json
from encoders.data.build import build_dataset
from encoders.nets.models import Encoder
from encoders.robust.attacks import NORMS, check_attack
from encoders.robust.evaluate import evaluate_encoder, format_table, masking_checks
from encoders.weights.checkpoints import encoder_from_checkpoint

MASKED = "possibly gradient-masked"


@yaml_dataclass("commands.yaml", "eval_encoder")
class EvalEncoderFlags:
    """The defaults and rules of ``rfi eval-encoder``'s flags (``eval_encoder:`` in ``configs/commands.yaml``)."""

    steps: int = bounded(low=1)
    max_images: int = bounded(low=1)
    batch_size: int = bounded(low=1)
    seed: int
    device: str
    restarts: int = bounded(low=1)
    sweep: list[float] = bounded(low=0, low_open=True)


def register_eval_encoder(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi eval-encoder``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="RFI encoder checkpoint, robustness-library checkpoint or torchvision state dict",
    )
    parser.add_argument(
        "--arch", help="architecture of a foreign checkpoint (alexnet, vgg16, vgg19, resnet18, resnet50)"
    )
    parser.add_argument("--eps", type=float, nargs="+", help="attack radii (default: the training eps, else 0.5)")
    add_flag(parser, EvalEncoderFlags, "steps", "PGD steps")
    parser.add_argument("--norm", choices=NORMS, help="attack norm (default: the training norm, else l2)")
    parser.add_argument("--step-size", type=float, help="PGD step size (default 2.5*eps/steps)")
    add_data_arguments(parser)
    add_flag(parser, EvalEncoderFlags, "max_images", "evaluate on at most this many images")
    add_flag(parser, EvalEncoderFlags, "batch_size", "images per batch")
    add_flag(parser, EvalEncoderFlags, "seed", "seed of the attacks' random starts")
    add_flag(parser, EvalEncoderFlags, "device", "auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--masking-checks",
        action="store_true",
        help="also run the gradient-masking checks at every eps (PGD-10/PGD-50 with restarts, "
        "an eps sweep, the transfer attack with --twin)",
    )
    parser.add_argument(
        "--twin",
        metavar="CKPT",
        help="a model of the same task trained apart (e.g. the PGD-trained "
        "twin of a fast-trained model): transfer attack from it; "
        "implies --masking-checks",
    )
    add_flag(parser, EvalEncoderFlags, "restarts", "random restarts of the checks' PGD-10 and PGD-50")
    add_flag(
        parser,
        EvalEncoderFlags,
        "sweep",
        "the checks' eps sweep, as multiples of eps (increasing)",
        nargs="+",
        type=float,
    )
    parser.add_argument("--json", metavar="OUT", help="results file (default: <checkpoint>.eval.json)")
    parser.set_defaults(func=run)


def _load_encoder(path: Path, arch: str | None) -> tuple[Encoder, dict[str, Any]]:
    """The encoder of a checkpoint file and the training config it records (``{}`` for a foreign file)."""
    ckpt = load_checkpoint(path)
    encoder = encoder_from_checkpoint(ckpt, str(path), name=arch)
    return encoder, (ckpt.get("train") or {}).get("config") or {}


def format_masking_table(checks: Sequence[dict[str, Any]]) -> str:
    """Results of :func:`~encoders.robust.evaluate.masking_checks` as a text table (accuracies in %), one row per
    eps, ending with each row's verdict and, below the table, the reasons for every flag."""
    factors = [f"x{s['eps'] / checks[0]['eps']:g}" for s in checks[0]["sweep"]]
    head = (
        f"{'norm':<5} {'eps':>8} {'images':>6} {'clean':>6} {'PGD-10':>7} {'PGD-50':>7} "
        + " ".join(f"{f:>6}" for f in factors)
        + f" {'transfer':>8}  verdict"
    )
    lines = [head, "-" * len(head)]
    reasons = []
    for c in checks:
        transfer = "-" if c["transfer_acc"] is None else f"{100 * c['transfer_acc']:.1f}%"
        lines.append(
            f"{c['norm']:<5} {c['eps']:>8.4g} {c['images']:>6d} {100 * c['clean_acc']:>5.1f}% "
            f"{100 * c['pgd10_acc']:>6.1f}% {100 * c['pgd50_acc']:>6.1f}% "
            + " ".join(f"{100 * s['acc']:>5.1f}%" for s in c["sweep"])
            + f" {transfer:>8}  {MASKED if c['masking_flags'] else 'ok'}"
        )
        reasons += [f"{MASKED} at eps={c['eps']:g}: {flag}" for flag in c["masking_flags"]]
    return "\n".join(lines + reasons)


def run(args: argparse.Namespace) -> int:
    """Evaluate at every ``--eps`` (and run the masking checks when asked); print tables and write the JSON file."""
    flags = checked_flags(EvalEncoderFlags, args)
    ckpt_path = Path(args.checkpoint)
    masking = args.masking_checks or args.twin is not None
    for eps in args.eps or []:
        check_attack(eps, flags.steps, args.step_size)
        if masking and eps <= 0:
            raise RFIError(f"--masking-checks need every --eps > 0 (a robustness claim at a radius), got {eps}")
    if masking and any(a >= b for a, b in zip(flags.sweep, flags.sweep[1:])):
        raise RFIError(f"--sweep (multiples of eps) must increase, got {flags.sweep}")
    out = json_output(args.json, ckpt_path.with_name(ckpt_path.stem + ".eval.json"))  # before the evaluation
    encoder, train_cfg = _load_encoder(ckpt_path, args.arch)
    twin = None
    if args.twin is not None:
        twin, _ = _load_encoder(Path(args.twin), args.arch)
        if twin.num_classes != encoder.num_classes:
            raise RFIError(
                f"--twin {args.twin} has {twin.num_classes} outputs but {ckpt_path} has "
                f"{encoder.num_classes}: the twin must be trained on the same task"
            )
    adv = train_cfg.get("adv", {})
    norm = args.norm or adv.get("norm", "l2")
    eps_list = args.eps or [adv.get("eps", 0.5)]
    data_cfg = data_config(args.data, args.size, train_cfg.get("data"), encoder.small_input)
    dataset = build_dataset(data_cfg, "val")
    classes = getattr(dataset, "num_classes", None)
    if classes is not None and classes != encoder.num_classes:  # else labels and outputs mean different things
        raise RFIError(
            f"{ckpt_path} has {encoder.num_classes} outputs but the {data_cfg.source} data has {classes} "
            f"classes: give --data with the {encoder.num_classes} classes it was trained on"
        )
    device = resolve_device(flags.device)
    encoder.to(device)
    rows = [
        evaluate_encoder(
            encoder,
            dataset,
            eps,
            flags.steps,
            norm,
            args.step_size,
            flags.batch_size,
            flags.max_images,
            seed=flags.seed,
            device=device,
        )
        for eps in eps_list
    ]
    print(
        f"{ckpt_path}: {encoder.arch} (width {encoder.width:g}, {encoder.num_classes} classes) on "
        f"{data_cfg.source} val, {data_cfg.size}px"
    )
    print(format_table(rows))
    report: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "arch": encoder.arch,
        "data": vars(data_cfg),
        "results": rows,
    }
    if masking:
        if twin is not None:
            twin.to(device)
        checks = [
            masking_checks(
                encoder,
                dataset,
                eps,
                norm,
                twin,
                flags.restarts,
                flags.sweep,
                batch_size=flags.batch_size,
                max_images=flags.max_images,
                seed=flags.seed,
                device=device,
            )
            for eps in eps_list
        ]
        for c in checks:
            c["possibly_gradient_masked"] = bool(c["masking_flags"])
        print(
            f"\nmasking checks: PGD with {flags.restarts} restarts, eps sweep (PGD-20), "
            f"{f'transfer (PGD-50) from {args.twin}' if twin is not None else 'no --twin: no transfer attack'}"
        )
        print(format_masking_table(checks))
        report["masking"] = checks
        report["twin"] = args.twin
    with reported_writes(out, "--json"):
        write_json(report, out)
    print(f"wrote {out}")
    return 0
