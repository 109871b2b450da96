"""``rfi style train | apply``: style transfer (WCT / AdaIN) through a decoder pyramid (:mod:`apps.style`).

``train`` writes the pyramid (:func:`apps.style.pyramid.train_pyramid`) to the config's ``out``;
``apply`` stylises images (:func:`apps.style.transfer.stylize`) through ``--model`` (default: RFI's
shipped pyramid, ``shipped:rfi_style_pyramid``: the config's ``apply.model``; ``apply.model:
null``: the config's ``out``, where ``train`` writes), with the
settings of the config's ``apply:`` section unless a flag says otherwise. Both read
``configs/apps/style.yaml`` by default.

Example:
    rfi style train --config configs/apps/style.yaml train.steps=100 --out runs/style/pyramid.pt
    rfi style apply photo.jpg --style starry.jpg --out styled/ --alpha 0.8      # the shipped pyramid
    rfi style apply photo.jpg --style starry.jpg --out styled/ --model runs/style/pyramid.pt
    rfi style apply photos/ --style a.jpg --style b.jpg --weights 0.7,0.3 --out mixed/ --preserve-color
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor

from apps.commands.common import add_job_arguments, common_flags, flag_overrides
from apps.style.config import DEFAULT_CONFIG, StyleConfig
from apps.style.pyramid import load_pyramid, train_pyramid
from apps.style.transfer import check_weights, resize_longer, stylize
from apps.style.transforms import METHODS
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from encoders.core.files import FileBatch, check_output_file, reported_writes
from encoders.core.imageio import check_image_side, read_image
from encoders.core.runtime import resolve_device
from encoders.weights.shipped import resolve_checkpoint

APPLY_FLAGS = ("model", "method", "alpha", "preserve_color", "size", "style_size", "layers", "device")
"""The ``rfi style apply`` flags that set a key of the config's ``apply:`` section (same names)."""


def parse_weights(text: str | None) -> list[float] | None:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``; ``None`` stays ``None``.

    Raises:
        RFIError: not comma-separated numbers.

    Example:
        >>> parse_weights("0.7,0.3")
        [0.7, 0.3]
    """
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise RFIError(f"--weights must be comma-separated numbers such as 0.7,0.3, got {text!r}") from None


def comma_list(text: str) -> list[str]:
    """``"layer1,layer2"`` -> ``["layer1", "layer2"]`` (an argparse type).

    Example:
        >>> comma_list("layer1, layer2")
        ['layer1', 'layer2']
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def register_style(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi style`` and its sub-commands ``train`` and ``apply``.

    The defaults of ``apply``'s flags are the config's ``apply:`` keys (``configs/apps/style.yaml``),
    so no default is written here.
    """
    sub = parser.add_subparsers(dest="style_command", metavar="SUBCOMMAND")
    common = [common_flags(suppress=True)]  # also accepted after the sub-command

    p = sub.add_parser(
        "train",
        parents=common,
        help="train a decoder pyramid: one decoder per encoder layer",
        description="Train a decoder pyramid (one rfi train-decoder run per layer) and write it as one model file.",
    )
    add_job_arguments(
        p,
        DEFAULT_CONFIG,
        "train.steps=100 'layers=[layer1,layer2,layer3]' train.encoder.checkpoint=PATH per_layer.layer1.steps=50",
        "pyramid model file (default: out of the config)",
        "continue (or reuse) the per-layer runs",
    )
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "apply",
        parents=common,
        help="stylise images through a decoder pyramid (WCT / AdaIN)",
        description="Stylise images coarse-to-fine through a decoder pyramid. Flags override "
        "the config's apply: section.",
    )
    p.add_argument("contents", nargs="+", metavar="CONTENT", help="content images and/or folders of images")
    p.add_argument(
        "--style",
        action="append",
        required=True,
        metavar="STYLE",
        help="style image; repeat for several (blended with --weights, else one output each)",
    )
    p.add_argument(
        "--weights", help="comma-separated weights of the styles, e.g. 0.7,0.3: blend them into one output per content"
    )
    p.add_argument("--out", required=True, help="output folder (PNG files)")
    p.add_argument(
        "--model",
        help="decoder pyramid: a file (e.g. what rfi style train wrote) or shipped:NAME (config: apply.model, "
        "default RFI's shipped pyramid; null there: the config's out)",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument("--method", help=f"feature transform: {' or '.join(METHODS)} (config: apply.method)")
    p.add_argument("--alpha", type=float, help="content-style trade-off in [0, 1] (config: apply.alpha)")
    p.add_argument(
        "--preserve-color",
        action=argparse.BooleanOptionalAction,
        help="keep the content's colours (config: apply.preserve_color)",
    )
    p.add_argument("--size", type=int, help="resize contents so the longer side is SIZE px (config: apply.size)")
    p.add_argument("--style-size", type=int, help="longer side of the styles in px (config: apply.style_size)")
    p.add_argument("--layers", type=comma_list, help="comma-separated pyramid layers to use (config: apply.layers)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (config: apply.device)")
    p.set_defaults(func=run_apply)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    """``rfi style train``: train every layer's decoder; print the pyramid file's path."""
    cfg = load_config(StyleConfig, args.config, args.overrides)
    if args.out is not None:
        cfg.out = args.out
    check_output_file(cfg.out)  # empty, a folder, too long a name, read-only: one line before any training
    with reported_writes(cfg.out):  # a full disk: one line naming the file
        print(train_pyramid(cfg, resume=args.resume).path)
    return 0


def run_apply(args: argparse.Namespace) -> int:
    """``rfi style apply``: stylise every content image; the exit code follows :mod:`encoders.core.files`."""
    cfg = load_config(StyleConfig, args.config, flag_overrides(args, "apply", APPLY_FLAGS))
    settings = cfg.apply
    check_image_side(settings.size, "--size")
    check_image_side(settings.style_size, "--style-size")
    style_paths = [Path(s) for s in args.style]
    for path in style_paths:
        if not path.is_file():
            raise RFIError(f"style image not found: {path}")
    weights = parse_weights(args.weights)
    if weights is not None:
        check_weights(weights, len(style_paths))
    separate = weights is None and len(style_paths) > 1
    batch = FileBatch(
        args.contents,
        args.out,
        protect=style_paths,
        desc="style apply",
        names=lambda c: [f"{c.stem}_{s.stem}.png" for s in style_paths] if separate else [f"{c.stem}.png"],
    )
    styles = [read_image(p) for p in style_paths]
    device = resolve_device(settings.device)
    ae = load_pyramid(resolve_checkpoint(settings.model or cfg.out, flag="--model", kind="style"), device)
    groups = [[i] for i in range(len(styles))] if separate else [list(range(len(styles)))]

    def process(path: Path, image: Tensor) -> list[Tensor]:
        content = resize_longer(image, settings.size).to(device)
        side = settings.style_size or max(content.shape[-2:])
        return [
            stylize(
                ae,
                content,
                [resize_longer(styles[i], side) for i in group],
                weights=[weights[i] for i in group] if weights else None,
                method=settings.method,
                alpha=settings.alpha,
                preserve_color=settings.preserve_color,
                layers=settings.layers,
            )
            for group in groups
        ]

    return batch.run(process)
