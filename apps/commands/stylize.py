"""``rfi stylize``: style transfer (WCT / AdaIN) through a decoder pyramid (:func:`apps.style.pyramid.stylize`).

Example:
    rfi stylize photo.jpg --style starry.jpg --out styled/ --alpha 0.8
    rfi stylize photos/ --style a.jpg --style b.jpg --weights 0.7,0.3 --out mixed/ --preserve-color
"""
from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor

from apps.style.pyramid import DEFAULT_MODEL, METHODS, check_weights, load_pyramid, resize_longer, stylize
from encoders.core.errors import RFIError
from encoders.core.files import FileBatch
from encoders.core.imageio import read_image
from encoders.core.runtime import resolve_device


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


def register_stylize(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi stylize``."""
    parser.add_argument("contents", nargs="+", metavar="CONTENT", help="content images and/or folders of images")
    parser.add_argument("--style", action="append", required=True, metavar="STYLE",
                        help="style image; repeat for several (blended with --weights, else one output each)")
    parser.add_argument("--weights", help="comma-separated weights of the styles, e.g. 0.7,0.3: blend "
                                          "them into one output per content")
    parser.add_argument("--out", required=True, help="output folder (PNG files)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"decoder pyramid (default {DEFAULT_MODEL})")
    parser.add_argument("--method", choices=METHODS, default="wct", help="feature transform (default wct)")
    parser.add_argument("--alpha", type=float, default=1.0, help="content-style trade-off in [0, 1] (default 1)")
    parser.add_argument("--preserve-color", action="store_true", help="keep the content's colours")
    parser.add_argument("--size", type=int, help="resize contents so the longer side is SIZE px (default: as is)")
    parser.add_argument("--style-size", type=int,
                        help="longer side of the styles in px (default: the content's longer side)")
    parser.add_argument("--layers", help="comma-separated pyramid layers to use (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Stylise every content image; the exit code follows :mod:`encoders.core.files`."""
    for name in ("size", "style_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RFIError(f"--{name.replace('_', '-')} must be a positive number of pixels, got {value}")
    if not 0 <= args.alpha <= 1:
        raise RFIError(f"--alpha must be in [0, 1], got {args.alpha}")
    style_paths = [Path(s) for s in args.style]
    for p in style_paths:
        if not p.is_file():
            raise RFIError(f"style image not found: {p}")
    weights = parse_weights(args.weights)
    if weights is not None:
        check_weights(weights, len(style_paths))
    separate = weights is None and len(style_paths) > 1
    batch = FileBatch(args.contents, args.out, protect=style_paths, desc="stylize",
                      names=lambda c: [f"{c.stem}_{s.stem}.png" for s in style_paths] if separate else [f"{c.stem}.png"])
    styles = [read_image(p) for p in style_paths]
    device = resolve_device(args.device)
    ae = load_pyramid(args.model, device)
    layers = args.layers.split(",") if args.layers else None
    groups = [[i] for i in range(len(styles))] if separate else [list(range(len(styles)))]

    def process(path: Path, image: Tensor) -> list[Tensor]:
        content = resize_longer(image, args.size).to(device)
        side = args.style_size or max(content.shape[-2:])
        return [stylize(ae, content, [resize_longer(styles[i], side) for i in group],
                        weights=[weights[i] for i in group] if weights else None, method=args.method,
                        alpha=args.alpha, preserve_color=args.preserve_color, layers=layers)
                for group in groups]

    return batch.run(process)
