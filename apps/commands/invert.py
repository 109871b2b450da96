"""``rfi invert``: reconstruct image files from their encoder features (:func:`inversion.invert.invert_files`).

``--method decoder`` (default) runs :meth:`RobustAutoencoder.reconstruct`; ``--method optimize``
runs the optimisation baseline (:func:`inversion.optimize.invert_by_optimization`). Each
checkpoint is read once.

Example:
    rfi invert photos/ --encoder runs/encoders/resnet18_robust/checkpoint.pt \\
        --decoder runs/decoders/resnet18_robust_layer3/decoder.pt --out inverted/
    rfi invert photos/ --encoder imagenet_l2_3_0.pt --arch resnet50 \\
        --decoder runs/decoders/resnet50_layer4/decoder.pt --out inverted/
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import Tensor

from encoders.weights.checkpoints import load_encoder
from encoders.core.errors import RFIError
from encoders.core.files import check_output_folder
from encoders.core.runtime import resolve_device
from inversion.autoencoder import RobustAutoencoder
from inversion.invert import invert_files


def register_invert(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi invert``."""
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    parser.add_argument("--encoder", required=True, help="encoder checkpoint: RFI, robustness-library or "
                                                         "torchvision file")
    parser.add_argument("--arch", help="the encoder's architecture (e.g. resnet50) when --encoder is a "
                                       "robustness-library or torchvision file (default: as the decoder records)")
    parser.add_argument("--decoder", help="decoder checkpoint (required for --method decoder; "
                                          "with --method optimize it names the layer)")
    parser.add_argument("--out", required=True, help="output folder (one PNG per input, same names)")
    parser.add_argument("--method", choices=["decoder", "optimize"], default="decoder",
                        help="decoder (fast, default) or optimize (gradient descent on pixels)")
    parser.add_argument("--tile", type=int, help="decoder: tile side in px for large images "
                                                  "(default: whole image up to 1 Mpx, else 1024; equal to a whole pass)")
    parser.add_argument("--layer", help="optimize: encoder layer to match (default: the decoder's)")
    parser.add_argument("--steps", type=int, default=300, help="optimize: Adam steps (default 300; about "
                                                               "1000 match the decoder's PSNR)")
    parser.add_argument("--lr", type=float, default=0.2, help="optimize: step size on the logits (default 0.2)")
    parser.add_argument("--tv-weight", type=float, default=0.05, help="optimize: total-variation weight")
    parser.add_argument("--seed", type=int, default=0, help="optimize: seed of the initial noise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.set_defaults(func=run)


def inverter(args: argparse.Namespace, device: torch.device) -> Callable[[Tensor], Tensor]:
    """The function ``images (1, 3, H, W) -> reconstructions`` that ``--method`` asks for."""
    if args.method == "decoder":
        if not args.decoder:
            raise RFIError("--method decoder needs --decoder D (a decoder checkpoint)")
        if args.tile is not None and args.tile < 1:
            raise RFIError(f"--tile must be a positive number of pixels, got {args.tile}")
        ae = RobustAutoencoder.from_checkpoints(args.encoder, args.decoder, device=device, arch=args.arch)
        return lambda x: ae.reconstruct(x, tile=args.tile)
    from inversion.optimize import invert_by_optimization

    if args.decoder:
        ae = RobustAutoencoder.from_checkpoints(args.encoder, args.decoder, device=device, arch=args.arch)
        encoder, layer = ae.encoder, args.layer or ae.layer
    elif args.layer:
        encoder, layer = load_encoder(args.encoder, args.arch).to(device), args.layer
    else:
        raise RFIError("--method optimize needs --layer NAME (or a --decoder, whose layer is used)")
    encoder.check_layers([layer])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return lambda x: invert_by_optimization(encoder, x, layer, steps=args.steps, lr=args.lr,
                                            tv_weight=args.tv_weight, generator=generator, progress=True)


def run(args: argparse.Namespace) -> int:
    """Invert every input; the exit code follows :mod:`encoders.core.files`."""
    check_output_folder(args.out)  # before the models are loaded
    device = resolve_device(args.device)
    return invert_files(args.inputs, args.out, inverter(args, device), device)
