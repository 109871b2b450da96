"""``rfi augment``: write N style-augmented views per image and a contact sheet (:class:`apps.style.augment.StyleAugment`).

Example:
    rfi augment photos/ --out views/ --views 4 --model runs/style/pyramid.pt
    rfi augment photos/ --out views/ --styles styles/ --p 1 --alpha 0.5,1
"""
from __future__ import annotations

import argparse
import logging
import math

import torch
from torchvision.transforms import v2

from apps.style.augment import AugmentConfig, StyleAugment, load_style_model, unit_range
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from encoders.core.files import FileBatch, check_finite
from encoders.core.imageio import read_image
from encoders.core.runtime import progress, resolve_device, save_grid

log = logging.getLogger("rfi")


def float_pair(text: str) -> list[float]:
    """``"0.5,1"`` -> ``[0.5, 1.0]`` (an argparse type: a bad value is a usage error)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lo,hi (e.g. 0.5,1), got {text!r}") from None


def register_augment(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi augment``."""
    parser.add_argument("images", metavar="IMAGE_DIR", nargs="+", help="image folder(s) or files")
    parser.add_argument("--out", required=True, help="output folder for <stem>_view<k>.png and contact_sheet.png")
    parser.add_argument("--config", help="YAML of defaults (configs/apps/augment.yaml)")
    parser.add_argument("--views", type=int, help="augmented views per image (default 4)")
    parser.add_argument("--model", help="autoencoder file (RobustAutoencoder.save)")
    parser.add_argument("--encoder", help="encoder checkpoint (with --decoder), instead of --model")
    parser.add_argument("--decoder", help="decoder checkpoint (with --encoder)")
    parser.add_argument("--styles", help="style image folder (default: styles from the other images)")
    parser.add_argument("--p", type=float, help="probability that a view is restyled (default 0.5)")
    parser.add_argument("--alpha", type=float_pair, help="feature-space blend range lo,hi (default 0.5,1)")
    parser.add_argument("--beta", type=float_pair, help="pixel-space blend range lo,hi (default 0.5,1)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--size", type=int, help="resize + centre-crop images to SIZE x SIZE (default 128)")
    parser.add_argument("--batch-size", type=int, dest="batch_size", help="images restyled together (default 16)")
    parser.add_argument("--device", help="cpu (default), cuda, auto")
    parser.set_defaults(func=run)


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    """The config file (if any), then the flags given on the command line."""
    cfg = load_config(AugmentConfig, args.config)
    for key in ("views", "model", "encoder", "decoder", "styles", "p", "alpha", "beta", "seed", "size",
                "batch_size", "device"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    unit_range(cfg.alpha, "alpha"), unit_range(cfg.beta, "beta")  # fail before any model is loaded
    if not 0 <= cfg.p <= 1:
        raise RFIError(f"p (probability of restyling an image) must be in [0, 1], got {cfg.p}")
    if cfg.views < 1 or cfg.size < 1 or cfg.batch_size < 1:
        raise RFIError(f"views, size and batch-size must be >= 1, got {cfg.views}, {cfg.size}, {cfg.batch_size}")
    if bool(cfg.encoder) != bool(cfg.decoder):
        raise RFIError("--encoder and --decoder go together (or pass --model)")
    return cfg


def run(args: argparse.Namespace) -> int:
    """``rfi augment``: N style-augmented views per image, plus a contact sheet.

    Inputs, outputs and exit codes follow :mod:`encoders.core.files` (no input is ever overwritten,
    two inputs never write the same view, unreadable inputs are named and skipped).
    """
    cfg = augment_config(args)
    device = resolve_device(cfg.device)
    batch_files = FileBatch(args.images, args.out, desc="augment",
                            names=lambda p: [f"{p.stem}_view{k + 1}.png" for k in range(cfg.views)])
    sheet_path = batch_files.out / "contact_sheet.png"
    if sheet_path.resolve() in {f.resolve() for f in batch_files.files}:
        raise RFIError(f"refusing to overwrite input {sheet_path}: choose an --out folder other than the inputs'")
    resize = v2.Compose([v2.Resize(cfg.size, antialias=True), v2.CenterCrop(cfg.size)])
    files, loaded = [], []
    for f in progress(batch_files.files, desc="read", unit="img"):  # every input is read before anything is written
        try:
            loaded.append(resize(check_finite(read_image(f), str(f))).clamp(0, 1))
            files.append(f)
        except RFIError as e:
            batch_files.fail(f, e)
    if not files:
        return batch_files.finish()
    if cfg.styles == "batch" and len(files) < 2:
        raise RFIError(f"styles from the batch need at least 2 images, {' '.join(args.images)} holds "
                       f"{len(files)} readable: pass --styles DIR")
    images = torch.stack(loaded)
    model = cfg.model or ((cfg.encoder, cfg.decoder) if cfg.encoder else None)
    aug = StyleAugment(load_style_model(model, device), p=cfg.p, alpha=cfg.alpha, beta=cfg.beta,
                       styles=cfg.styles, generator=cfg.seed, style_size=cfg.style_size,
                       work_size=cfg.work_size)
    # Batches are split evenly, so none is a batch of one (which styles='batch' refuses).
    n_batches = math.ceil(len(files) / cfg.batch_size)
    views = torch.empty(cfg.views, *images.shape)
    for batch in progress(torch.arange(len(files)).tensor_split(n_batches), desc="augment", unit="batch"):
        x = images[batch].to(device)
        for k in range(cfg.views):
            views[k, batch] = aug(x).cpu()
    targets = dict(zip(batch_files.files, batch_files.targets))
    for i, f in enumerate(progress(files, desc="write", unit="img")):
        for k in range(cfg.views):
            batch_files.write(views[k, i], targets[f][k], str(f))
    out = batch_files.out
    rows = min(len(files), cfg.sheet_rows)
    sheet = save_grid([images, *views], sheet_path, max_rows=rows)
    log.info("wrote %d views of %d images to %s; contact sheet %s", cfg.views * len(files), len(files), out, sheet)
    return batch_files.finish()


