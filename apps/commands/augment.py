"""``rfi augment``: write N style-augmented views per image and a contact sheet (:mod:`apps.style.augment`).

The settings are :class:`AugmentConfig` (``configs/apps/augment.yaml``); a flag given on the
command line sets the key of the same name.

Example:
    rfi augment photos/ --out views/                       # RFI's shipped style pyramid
    rfi augment photos/ --out views/ --views 4 --model runs/style/pyramid.pt
    rfi augment photos/ --out views/ --styles styles/ --p 1 --alpha 0.5,1
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

import torch
from torchvision.transforms import v2

from apps.style.augment import StyleAugment, load_style_model
from encoders.core.budget import FLOAT_BYTES, check_memory
from encoders.core.config import bounded, load_config, value_range, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.files import FileBatch, check_finite
from encoders.core.imageio import check_image_side, read_image
from encoders.core.runtime import progress, resolve_device, save_grid

log = logging.getLogger("rfi")

DEFAULT_CONFIG = "configs/apps/augment.yaml"


@yaml_dataclass("apps/augment.yaml")
class AugmentConfig:
    """``rfi augment`` settings (YAML: ``configs/apps/augment.yaml``; command-line flags win).

    ``model``: an autoencoder file or ``shipped:NAME`` (default: RFI's shipped style pyramid);
    ``encoder`` + ``decoder`` checkpoints, when given, win over it. ``styles``: ``batch`` or a
    style folder. ``p``, ``alpha``, ``beta``, ``style_size``, ``work_size``: as
    :class:`~apps.style.augment.StyleAugment` takes them
    (``alpha``, ``beta``: one number or a range ``[lo, hi]``). ``views``: augmented views per
    image. ``size``: images are resized (short side) and centre-cropped to ``size`` x ``size``.
    ``batch_size``: images restyled together (with ``styles: batch`` they lend each other their
    styles). ``sheet_rows``: at most this many images on the contact sheet.
    """

    model: str | None
    encoder: str | None
    decoder: str | None
    styles: str
    p: float = bounded(low=0, high=1)
    alpha: list[float] = bounded(low=0, high=1)
    beta: list[float] = bounded(low=0, high=1)
    style_size: int = bounded(low=1)
    work_size: int | None = bounded(low=1)
    views: int = bounded(low=1)
    size: int = bounded(low=1)
    batch_size: int = bounded(low=1)
    seed: int
    device: str
    sheet_rows: int = bounded(low=1)

    def check(self) -> None:
        """The rules across keys (run by ``load_config``): ``alpha`` and ``beta`` are ranges with lo <= hi;
        ``encoder`` goes with ``decoder``.

        Raises:
            RFIError: a range with lo > hi (or more than two numbers), or only one of ``encoder``/``decoder``.
        """
        value_range(self.alpha, "alpha")  # one number or [lo, hi] with lo <= hi (the bounds are the fields' own)
        value_range(self.beta, "beta")
        if bool(self.encoder) != bool(self.decoder):
            raise RFIError("encoder and decoder (--encoder, --decoder) go together: give both, or a --model file")


def float_pair(text: str) -> list[float]:
    """``"0.5,1"`` -> ``[0.5, 1.0]`` (an argparse type: a bad value is a usage error).

    Example:
        >>> float_pair("0.5,1")
        [0.5, 1.0]
    """
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lo,hi (e.g. 0.5,1), got {text!r}") from None


FLAGS = ("views", "model", "encoder", "decoder", "styles", "p", "alpha", "beta", "seed", "size", "batch_size", "device")
"""The flags that set the :class:`AugmentConfig` key of the same name."""


def register_augment(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi augment``; their defaults are the config's keys (no default is written here)."""
    parser.add_argument("images", metavar="IMAGE_DIR", nargs="+", help="image folder(s) or files")
    parser.add_argument("--out", required=True, help="output folder for <stem>_view<k>.png and contact_sheet.png")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--views", type=int, help="augmented views per image (config: views)")
    parser.add_argument(
        "--model", help="autoencoder file (RobustAutoencoder.save) or shipped:NAME (config: model, the shipped pyramid)"
    )
    parser.add_argument("--encoder", help="encoder checkpoint (with --decoder), instead of --model")
    parser.add_argument("--decoder", help="decoder checkpoint (with --encoder)")
    parser.add_argument(
        "--styles", help="style image folder, or 'batch': styles from the other images (config: styles)"
    )
    parser.add_argument("--p", type=float, help="probability that a view is restyled (config: p)")
    parser.add_argument("--alpha", type=float_pair, help="feature-space blend range lo,hi (config: alpha)")
    parser.add_argument("--beta", type=float_pair, help="pixel-space blend range lo,hi (config: beta)")
    parser.add_argument("--seed", type=int, help="random seed (config: seed)")
    parser.add_argument("--size", type=int, help="resize + centre-crop images to SIZE x SIZE (config: size)")
    parser.add_argument(
        "--batch-size", type=int, dest="batch_size", help="images restyled together (config: batch_size)"
    )
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (config: device)")
    parser.set_defaults(func=run)


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    """The config file, then the flags given on the command line (checked as config keys, before any model loads)."""
    flags: dict[str, Any] = {key: getattr(args, key) for key in FLAGS if getattr(args, key) is not None}
    return load_config(AugmentConfig, args.config, flags)


def run(args: argparse.Namespace) -> int:
    """``rfi augment``: N style-augmented views per image, plus a contact sheet.

    Inputs, outputs and exit codes follow :mod:`encoders.core.files` (no input is ever overwritten,
    two inputs never write the same view, unreadable inputs are named and skipped).
    """
    cfg = augment_config(args)
    check_image_side(cfg.size, "--size")
    device = resolve_device(cfg.device)
    batch_files = FileBatch(
        args.images, args.out, desc="augment", names=lambda p: [f"{p.stem}_view{k + 1}.png" for k in range(cfg.views)]
    )
    held = (1 + cfg.views) * len(batch_files.files) * 3 * cfg.size**2 * FLOAT_BYTES  # the images and their views
    check_memory(
        held,
        f"--size {cfg.size} with --views {cfg.views} for {len(batch_files.files)} images",
        "lower --size or --views, or augment fewer images at a time",
    )
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
        raise RFIError(
            f"styles from the batch need at least 2 images, {' '.join(args.images)} holds "
            f"{len(files)} readable: pass --styles DIR"
        )
    images = torch.stack(loaded)
    model = (cfg.encoder, cfg.decoder) if cfg.encoder else cfg.model
    aug = StyleAugment(
        load_style_model(model, device),
        p=cfg.p,
        alpha=cfg.alpha,
        beta=cfg.beta,
        styles=cfg.styles,
        generator=cfg.seed,
        style_size=cfg.style_size,
        work_size=cfg.work_size,
    )
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
