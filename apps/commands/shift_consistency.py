"""``rfi shift-consistency``: shift consistency / equivariance of an encoder and, with ``--decoder``,
of its autoencoder (:func:`encoders.robust.shift.shift_consistency`).

Each checkpoint is read once. The autoencoder part (``--decoder``) lives here, in the
application layer: :mod:`encoders.robust.shift` only takes a ``reconstruct`` callable.

Example:
    rfi shift-consistency --encoder runs/encoders/lps/checkpoint.pt --decoder runs/decoders/lps/decoder.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apps.commands.common import add_data_arguments, add_flag, checked_flags, data_config, json_output
from encoders.core.config import bounded, yaml_dataclass
from encoders.core.files import reported_writes
from encoders.core.runtime import resolve_device
from encoders.core.serialization import load_checkpoint, write_json
from encoders.data.build import build_dataset
from encoders.robust.shift import format_table, shift_consistency
from encoders.weights.checkpoints import encoder_from_checkpoint
from inversion.autoencoder import RobustAutoencoder


@yaml_dataclass("commands.yaml", "shift_consistency")
class ShiftConsistencyFlags:
    """Defaults and rules of ``rfi shift-consistency``'s flags (``shift_consistency:`` of ``configs/commands.yaml``)."""

    max_images: int = bounded(low=1)
    batch_size: int = bounded(low=1)
    seed: int
    device: str


def register_shift_consistency(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi shift-consistency``."""
    parser.add_argument("--encoder", required=True, metavar="E", help="RFI encoder checkpoint")
    parser.add_argument(
        "--decoder",
        metavar="D",
        help="decoder checkpoint for the encoder: also measure the autoencoder's reconstruction equivariance",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--layer", help="layer of the feature equivariance error (default: the decoder's, else the deepest)"
    )
    add_flag(parser, ShiftConsistencyFlags, "max_images", "use at most this many images")
    add_flag(parser, ShiftConsistencyFlags, "batch_size", "images per batch")
    add_flag(parser, ShiftConsistencyFlags, "seed", "seed of the random shifts")
    add_flag(parser, ShiftConsistencyFlags, "device", "auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--json", metavar="OUT", help="results file (default: <encoder>.shift.json)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure; print a table and write the JSON file."""
    flags = checked_flags(ShiftConsistencyFlags, args)
    path = Path(args.encoder)
    out = json_output(args.json, path.with_name(path.stem + ".shift.json"))  # before the measurement
    ckpt = load_checkpoint(path)
    encoder = encoder_from_checkpoint(ckpt, str(path))
    train_cfg = (ckpt.get("train") or {}).get("config") or {}
    del ckpt
    device = resolve_device(flags.device)
    encoder.to(device)
    data_cfg = data_config(args.data, args.size, train_cfg.get("data"), encoder.small_input)
    dataset = build_dataset(data_cfg, "val")
    reconstruct, layer = None, args.layer
    if args.decoder:
        ae = RobustAutoencoder.from_checkpoints(encoder, args.decoder, device=device)
        reconstruct, layer = ae.reconstruct, layer or ae.layer
    result = shift_consistency(
        encoder, dataset, layer, reconstruct, flags.max_images, flags.batch_size, flags.seed, device
    )
    kind = (
        f"equivariant={getattr(encoder, 'equivariant', False)}"
        if "equivariant" in encoder.family.options
        else f"downsample={encoder.downsample}"
    )
    print(
        f"{path}: {encoder.arch} ({kind}) on {data_cfg.source} val, "
        f"{data_cfg.size}px, two random circular shifts per image (seed {flags.seed})"
    )
    print(format_table([result], [path.stem if path.stem != "checkpoint" else path.parent.name]))
    with reported_writes(out, "--json"):  # a full disk: one line naming the file
        write_json(
            {
                "encoder": str(path),
                "decoder": args.decoder,
                "downsample": encoder.downsample,
                "equivariant": bool(getattr(encoder, "equivariant", False)),
                "data": vars(data_cfg),
                **result,
            },
            out,
        )
    print(f"wrote {out}")
    return 0
