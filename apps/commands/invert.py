"""``rfi invert``: reconstruct image files from their encoder features (:func:`inversion.invert.invert_files`).

``--method decoder`` (default) runs :meth:`RobustAutoencoder.reconstruct`; ``--method optimize``
runs the optimisation baseline (:func:`inversion.optimize.invert_by_optimization`). Each
checkpoint is read once. Without ``--encoder`` it inverts with RFI's shipped robust encoder and
its layer3 decoder (``configs/commands.yaml``, ``invert:``); the default decoder goes with the
default encoder only, so an ``--encoder`` of one's own needs its ``--decoder`` (or ``--layer``).

Example:
    rfi invert photo.jpg --out out/
    rfi invert photos/ --encoder runs/encoders/resnet18_robust/checkpoint.pt \\
        --decoder runs/decoders/resnet18_robust_layer3/decoder.pt --out inverted/
    rfi invert photos/ --encoder imagenet_l2_3_0.pt --arch resnet50 \\
        --decoder runs/decoders/resnet50_layer4/decoder.pt --out inverted/
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from apps.commands.common import add_flag, checked_flags
from encoders.core.config import bounded, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.files import check_output_folder
from encoders.core.runtime import resolve_device
from encoders.weights.checkpoints import load_encoder
from encoders.weights.shipped import resolve_checkpoint
from inversion.autoencoder import RobustAutoencoder
from inversion.invert import invert_files


@yaml_dataclass("commands.yaml", "invert")
class InvertFlags:
    """The defaults and rules of ``rfi invert``'s flags (the ``invert:`` section of ``configs/commands.yaml``)."""

    encoder: str
    decoder: str | None
    method: Literal["decoder", "optimize"]
    steps: int = bounded(low=1)
    lr: float = bounded(low=0, low_open=True)
    tv_weight: float = bounded(low=0)
    seed: int
    tile: int | None = bounded(low=1)
    device: str


def register_invert(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi invert``."""
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    add_flag(parser, InvertFlags, "encoder", "encoder: RFI, robustness-library or torchvision file, or shipped:NAME")
    parser.add_argument(
        "--arch",
        help="the encoder's architecture (e.g. resnet50) when --encoder is a "
        "robustness-library or torchvision file (default: as the decoder records)",
    )
    add_flag(
        parser,
        InvertFlags,
        "decoder",
        "decoder checkpoint or shipped:NAME (the default goes with the default --encoder only; "
        "with --method optimize it names the layer)",
    )
    parser.add_argument("--out", required=True, help="output folder (one PNG per input, same names)")
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="use --decoder with an encoder other than the one it was trained on (on purpose)",
    )
    add_flag(parser, InvertFlags, "method", "decoder (fast) or optimize (gradient descent on pixels)")
    add_flag(
        parser,
        InvertFlags,
        "tile",
        "decoder: tile side in px for large images (none: whole image up to 1 Mpx, else 1024; equal to a whole pass)",
    )
    parser.add_argument("--layer", help="optimize: encoder layer to match (default: the decoder's)")
    add_flag(parser, InvertFlags, "steps", "optimize: Adam steps (about 1000 match the decoder's PSNR)")
    add_flag(parser, InvertFlags, "lr", "optimize: step size on the logits")
    add_flag(parser, InvertFlags, "tv_weight", "optimize: total-variation weight")
    add_flag(parser, InvertFlags, "seed", "optimize: seed of the initial noise")
    add_flag(parser, InvertFlags, "device", "auto, cpu, cuda, cuda:1 ...")
    parser.set_defaults(func=run)


def chosen_decoder(flags: InvertFlags, layer: str | None) -> str | None:
    """The decoder to use: ``--decoder``, whose default goes with the default encoder only (so it is never
    paired with an encoder of one's own), and is not used by ``--method optimize --layer NAME``."""
    defaults = InvertFlags()
    own_encoder = flags.encoder != defaults.encoder
    if flags.decoder == defaults.decoder and (own_encoder or (flags.method == "optimize" and layer)):
        return None
    return flags.decoder


def inverter(args: argparse.Namespace, flags: InvertFlags, device: torch.device) -> Callable[[Tensor], Tensor]:
    """The function ``images (1, 3, H, W) -> reconstructions`` that ``--method`` asks for."""
    decoder = chosen_decoder(flags, args.layer)
    encoder_file = resolve_checkpoint(flags.encoder, flag="--encoder", kind="encoder")
    if flags.method == "decoder":
        if not decoder:
            raise RFIError("--method decoder needs --decoder D (a decoder checkpoint) with an --encoder of your own")
        ae = RobustAutoencoder.from_checkpoints(
            encoder_file,
            resolve_checkpoint(decoder, flag="--decoder", kind="decoder"),
            device=device,
            arch=args.arch,
            allow_mismatch=args.allow_mismatch,
        )
        return lambda x: ae.reconstruct(x, tile=flags.tile)
    from inversion.optimize import invert_by_optimization

    if decoder:
        ae = RobustAutoencoder.from_checkpoints(
            encoder_file,
            resolve_checkpoint(decoder, flag="--decoder", kind="decoder"),
            device=device,
            arch=args.arch,
            allow_mismatch=args.allow_mismatch,
        )
        encoder, layer = ae.encoder, args.layer or ae.layer
    elif args.layer:
        encoder, layer = load_encoder(encoder_file, args.arch).to(device), args.layer
    else:
        raise RFIError("--method optimize needs --layer NAME (or a --decoder, whose layer is used)")
    encoder.check_layers([layer])
    generator = torch.Generator(device=device).manual_seed(flags.seed)
    return lambda x: invert_by_optimization(
        encoder, x, layer, steps=flags.steps, lr=flags.lr, tv_weight=flags.tv_weight, generator=generator, progress=True
    )


def run(args: argparse.Namespace) -> int:
    """Invert every input; the exit code follows :mod:`encoders.core.files`."""
    flags = checked_flags(InvertFlags, args)
    check_output_folder(args.out)  # before the models are loaded
    device = resolve_device(flags.device)
    return invert_files(args.inputs, args.out, inverter(args, flags, device), device)
