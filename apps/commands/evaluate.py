"""``rfi evaluate``: PSNR / SSIM / LPIPS of decoders at several scales (:mod:`inversion.evaluate`).

Each encoder and decoder checkpoint is read once (the decoder's training size comes from
the autoencoder's :attr:`~inversion.autoencoder.RobustAutoencoder.metadata`).

Example:
    rfi evaluate --encoder runs/encoders/resnet18_standard/checkpoint.pt \\
        --decoder runs/decoders/resnet18_standard_layer3/decoder.pt \\
        --encoder runs/encoders/resnet18_robust/checkpoint.pt \\
        --decoder runs/decoders/resnet18_robust_layer3/decoder.pt --names standard,robust

    # also the unseen photos whole, at their own sizes (``--scales ...,full``)
    rfi evaluate --encoder shipped:rfi_resnet18_robust --decoder shipped:rfi_resnet18_robust_layer3 \\
        --encoder E2 --decoder D2 --names robust,standard --data unseen --scales 1,4,full
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from apps.commands.common import add_flag, checked_flags
from encoders.core.config import bounded, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.files import check_output_folder, partial_exit, reported_writes
from encoders.core.runtime import resolve_device
from encoders.core.serialization import write_json
from encoders.weights.shipped import SHIPPED_PREFIX, resolve_checkpoint
from inversion.autoencoder import RobustAutoencoder
from inversion.evaluate import EMBEDDED, FULL, UNSEEN, compare_autoencoders, format_table, lpips_for


@yaml_dataclass("commands.yaml", "evaluate")
class EvaluateFlags:
    """The defaults and rules of ``rfi evaluate``'s flags (the ``evaluate:`` section of ``configs/commands.yaml``)."""

    scales: str
    num: int = bounded(low=1)
    seed: int
    out: str
    size: int | None = bounded(low=1)
    lpips_net: Literal["alex", "vgg"]
    batch_size: int = bounded(low=1)
    device: str


def parse_scales(text: str) -> list[int | str]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ``full`` (the held-out images whole, at their own sizes) is kept as ``"full"``.

    Raises:
        RFIError: anything but positive integers and ``full`` separated by commas (one line).

    Example:
        >>> parse_scales("1, 2,4")
        [1, 2, 4]
        >>> parse_scales("1,4,full")
        [1, 4, 'full']
        >>> parse_scales("1,huge")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        encoders.core.errors.RFIError: --scales must be positive integers or full, ... got '1,huge'
    """
    scales: list[int | str] = []
    for part in str(text).split(","):
        part = part.strip()
        if part.lower() == FULL:
            scales.append(FULL)
        elif part:
            try:
                scales.append(int(part))
            except ValueError:
                scales = []
                break
    if not scales or any(s != FULL and s < 1 for s in scales):
        raise RFIError(
            f"--scales must be positive integers or {FULL}, separated by commas (e.g. 1,2,4 or 1,4,{FULL}), "
            f"got {text!r}"
        )
    return scales


def run_names(decoders: Sequence[str], names: str | None) -> list[str]:
    """``--names`` split and checked, else the decoders' folder names or shipped names (``run1``... when they repeat).

    Example:
        >>> run_names(["runs/a/decoder.pt", "shipped:rfi_resnet18_robust_layer3"], None)
        ['a', 'rfi_resnet18_robust_layer3']
    """
    if names:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(decoders) or len(set(out)) != len(out) or not all(out):
            raise RFIError(f"--names needs {len(decoders)} distinct names separated by commas, got {names!r}")
        return out
    parents = [
        str(d).removeprefix(SHIPPED_PREFIX) if str(d).startswith(SHIPPED_PREFIX) else Path(d).resolve().parent.name
        for d in decoders
    ]
    return parents if len(set(parents)) == len(parents) else [f"run{i + 1}" for i in range(len(decoders))]


def register_evaluate(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi evaluate``."""
    parser.add_argument(
        "--encoder",
        action="append",
        required=True,
        metavar="E",
        help="encoder checkpoint (repeat, one per --decoder): RFI, robustness-library or torchvision file",
    )
    parser.add_argument(
        "--arch",
        help="architecture of robustness-library / torchvision encoder files "
        "(e.g. resnet50; default: as each decoder records)",
    )
    parser.add_argument(
        "--decoder",
        action="append",
        required=True,
        metavar="D",
        help="decoder checkpoint for the preceding --encoder (repeat)",
    )
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="pair a --decoder with an encoder other than the one it was trained on (on purpose)",
    )
    parser.add_argument(
        "--names",
        help="run names for the table and grid columns, e.g. standard,robust (default: the decoders' folder names)",
    )
    add_flag(
        parser,
        EvaluateFlags,
        "scales",
        f"multiples of the training size, separated by commas; '{FULL}': the held-out images whole, "
        "at their own sizes (e.g. 1,4,full)",
    )
    add_flag(parser, EvaluateFlags, "size", "training size in px (none: from the decoder checkpoint)")
    add_flag(parser, EvaluateFlags, "num", f"held-out images per scale ({FULL}: at most this many whole images)")
    parser.add_argument(
        "--data",
        metavar="DATA",
        action="append",
        help=f"'{EMBEDDED}' (validation regions of the embedded photos, default), '{UNSEEN}' "
        "(images no job trains on, see encoders/data/unseen.py) or an image folder's validation "
        "split; repeat to report several side by side (e.g. --data embedded --data unseen)",
    )
    add_flag(parser, EvaluateFlags, "seed", "embedded crop positions")
    add_flag(parser, EvaluateFlags, "out", "folder for evaluate.json and grid PNGs")
    parser.add_argument(
        "--lpips-weights", metavar="PATH", help="torchvision backbone file for LPIPS (default: the torch hub cache)"
    )
    add_flag(parser, EvaluateFlags, "lpips_net", "LPIPS backbone")
    add_flag(parser, EvaluateFlags, "batch_size", "images per batch")
    add_flag(parser, EvaluateFlags, "device", "auto, cpu, cuda, cuda:1 ...")
    parser.set_defaults(func=run)


def _slug(data: str) -> str:
    return Path(data).name if data not in (EMBEDDED, UNSEEN) else data


def run(args: argparse.Namespace) -> int:
    """Evaluate every (encoder, decoder) pair on every ``--data``; print tables, write JSON and grids.

    Returns:
        0 when everything asked was measured; :data:`~encoders.core.files.EXIT_PARTIAL` when a
        scale was skipped (no image large enough) or a file of a ``--data`` folder could not be
        read (each named on stderr).

    Raises:
        RFIError: bad flags or models, nothing measured at all, or the outputs cannot be written.
    """
    if len(args.encoder) != len(args.decoder):
        raise RFIError(
            f"give one --encoder per --decoder (got {len(args.encoder)} encoders, {len(args.decoder)} decoders)"
        )
    flags = checked_flags(EvaluateFlags, args)
    scales = parse_scales(flags.scales)
    for data in args.data or []:
        if data not in (EMBEDDED, UNSEEN) and not Path(data).is_dir():
            raise RFIError(f"--data {data}: no such folder (give a folder, {EMBEDDED} or {UNSEEN})")
    if args.lpips_weights is not None and not Path(args.lpips_weights).is_file():
        raise RFIError(
            f"--lpips-weights {args.lpips_weights}: no such file (give the torchvision backbone file, "
            "or leave the flag out to use the torch hub cache)"
        )
    check_output_folder(flags.out)
    device = resolve_device(flags.device)
    names = run_names(args.decoder, args.names)
    models = {
        n: RobustAutoencoder.from_checkpoints(
            resolve_checkpoint(e, "--encoder", "encoder"),
            resolve_checkpoint(d, "--decoder", "decoder"),
            device=device,
            arch=args.arch,
            allow_mismatch=args.allow_mismatch,
        )
        for n, e, d in zip(names, args.encoder, args.decoder)
    }
    sizes = {
        d: flags.size or ae.metadata["decoders"][ae.layer].get("train_size")
        for d, ae in zip(args.decoder, models.values())
    }
    if any(s != FULL for s in scales):  # whole images (full) need no training size
        if None in sizes.values():
            missing = [d for d, s in sizes.items() if s is None]
            raise RFIError(f"{missing[0]} does not record its training size: pass --size PX")
        if len(set(sizes.values())) > 1:
            raise RFIError(
                f"the decoders were trained at different sizes {sorted(set(sizes.values()))}: "
                f"pass --size PX to evaluate them at the same scales"
            )
    train_size = sizes[args.decoder[0]]
    lpips_model, note = lpips_for(flags.lpips_net, args.lpips_weights, device)
    if lpips_model is None:
        print(f"note: {note}")
    datasets = args.data or [EMBEDDED]
    with reported_writes(flags.out):
        by_data = {
            data: compare_autoencoders(
                models,
                scales,
                int(train_size) if train_size is not None else None,
                flags.num,
                flags.seed,
                data,
                lpips_model,
                note,
                flags.batch_size,
                grid_dir=Path(flags.out) / ("" if i == 0 else _slug(data)),
            )
            for i, data in enumerate(datasets)
        }
        if not any(rows for res in by_data.values() for rows in res["models"].values()):
            raise RFIError(
                "nothing measured on "
                + ", ".join(datasets)
                + ": every scale was skipped ("
                + "; ".join(f"{k}: {v}" for res in by_data.values() for k, v in res["skipped"].items())
                + ")"
            )
        result = dict(by_data[datasets[0]])  # the first data set at the top level, as before
        result["by_data"] = by_data
        result["runs"] = {
            n: {"encoder": str(e), "decoder": str(d)} for n, e, d in zip(names, args.encoder, args.decoder)
        }
        path = write_json(result, Path(flags.out) / "evaluate.json")
    failures = []
    for data, res in by_data.items():
        print(f"\n{data}:" if len(by_data) > 1 else "", format_table(res), sep="\n" if len(by_data) > 1 else "")
        for scale, why in res["skipped"].items():
            print(f"  {scale} skipped: {why}")
            failures.append(f"{data}: scale {scale} not measured: {why}")
        failures += res["left_out"]
    print(f"wrote {path} and {sum(len(r['grids']) for r in by_data.values())} grid(s) in {flags.out}")
    return partial_exit(failures)
