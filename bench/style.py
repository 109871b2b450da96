"""Style-transfer benchmark: speed, content loss and style loss, robust vs standard pyramid, WCT vs AdaIN.

For each decoder pyramid (one on the robust encoder, one on the standard encoder, trained
with the same config), each method (WCT, AdaIN) and each size (longer side 256 and 512 px),
it stylises a few content photos (scikit-image's shipped photos) with a style photo each and
reports:

- ``ms``: milliseconds per image on this machine's CPU (median over ``--repeats`` timed
  runs per image, after one warm-up; then the median over images);
- ``content``: relative feature error ``||f(out) - f(content)||^2 / ||f(content)||^2`` at
  ``--content-layer``;
- ``style``: relative Gram-matrix error ``||G(out) - G(style)||^2 / ||G(style)||^2``,
  averaged over ``--style-layers`` (``G = F F^T / (H W)``);
- ``band_L``, ``band_T``, ``band_R``, ``band_B``: the border band (issue 26) on stylised *unseen* photos
  (``--band-images``, :mod:`encoders.data.unseen`, longer side ``size``, styled with the pairs' styles):
  per side (left, top, right, bottom), the mean grey level (0-255) of the outer 8 px against that of
  the next 32 px, |outer - next| averaged over the photos (:func:`band_columns`; the JSON keeps both
  means per side and photo). The ``content image`` row gives the photos' own figures for reference.
- ``edge_L`` .. ``edge_B``: the band's paired control, what the border itself adds. Each photo is also
  stylised with ``EDGE_CUT`` px cut off its top and left, and off its bottom and right; per side, the
  outer-minus-next difference of the cut image is compared with that of the same pixels inside the
  whole stylised photo, |edge - inside| in grey levels averaged over the photos
  (:func:`edge_effect`). A style moves light and dark around the image, so ``band_*`` can differ from
  the photo's own level with no border effect at all; ``edge_*`` is 0 when the same rows come out
  the same at the border as inside the image.

``ms`` at size 512 is the time per 512-px image.

Losses are measured in the feature space of *both* encoders (``_R``: robust judge, ``_S``:
standard judge), so neither pyramid is graded only by its own encoder. Two reference rows
per size frame the numbers: ``content image`` (the unstylised content: content loss 0, its
style loss says how far the content is from the style) and ``reconstruction`` (alpha=0: the
pyramid's chained plain reconstruction, the content-loss floor of that pyramid).

Pyramids missing at ``--robust`` / ``--standard`` are first trained with
``rfi style train --config configs/apps/style.yaml`` on the default encoders (a few
minutes each on 2 CPU cores; the bench says so); encoders must exist (``rfi train-encoder``).
Writes ``bench/results/style.json`` and the grid ``docs/img/style_grid.png``
(content | style | standard | robust, WCT at 256 px).

Usage:
    python bench/style.py                       # default: 3 images, sizes 256 512, 3 repeats
    python bench/style.py --repeats 5 --images 6 --sizes 256 512 1024
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2.functional import center_crop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.style.config import StyleConfig  # noqa: E402
from apps.style.pyramid import STYLE_APP, load_pyramid, train_pyramid  # noqa: E402
from apps.style.transfer import resize_longer, stylize  # noqa: E402
from encoders.core.config import load_config  # noqa: E402
from encoders.core.errors import RFIError  # noqa: E402
from encoders.core.runtime import save_grid  # noqa: E402
from encoders.core.serialization import atomic_write, load_checkpoint  # noqa: E402
from encoders.data.embedded import embedded_image  # noqa: E402
from encoders.data.unseen import UNSEEN_IMAGES, unseen_image  # noqa: E402
from encoders.weights.shipped import resolve_checkpoint  # noqa: E402
from inversion.autoencoder import RobustAutoencoder  # noqa: E402

PAIRS = (
    ("chelsea", "immunohistochemistry"),
    ("astronaut", "retina"),
    ("coffee", "stereo_motorcycle"),
    ("rocket", "immunohistochemistry"),
    ("stereo_motorcycle", "retina"),
    ("chelsea", "hubble_deep_field"),
)
ENCODERS = {
    "robust": "runs/encoders/resnet18_robust/checkpoint.pt",
    "standard": "runs/encoders/resnet18_standard/checkpoint.pt",
}
BAND_IMAGES = ("china", "flower", "grace_hopper", "camera", "coins", "cell")
SIDES = ("left", "top", "right", "bottom")
BAND_COLUMNS = tuple(f"band_{side[0].upper()}" for side in SIDES)
EDGE_COLUMNS = tuple(f"edge_{side[0].upper()}" for side in SIDES)
EDGE_CUT = 64
"""px cut off two sides of a photo for :func:`edge_effect` (wider than the widest mirrored frame, 28 px)."""
BUDGET_FREE = ("out", "runs", "apply")  # config keys that may differ between the two pyramids (not training)


def ensure_pyramid(kind: str, path: Path, config: str, overrides: list[str]) -> bool:
    """Train the pyramid at ``path`` on the default ``kind`` encoder if missing; True if trained."""
    if path.is_file():
        return False
    print(
        f"[bench] no {kind} pyramid at {path}: training one with {config} on {ENCODERS[kind]} "
        f"(a few minutes on 2 CPU cores)",
        flush=True,
    )
    cfg = load_config(
        StyleConfig, ROOT / config, [f"train.encoder.checkpoint={ENCODERS[kind]}", f"out={path}", *overrides]
    )
    train_pyramid(cfg, resume=True)
    return True


def budget(path: Path) -> dict[str, Any]:
    """The training config stored in a pyramid file, without what may differ (encoder, paths)."""
    cfg = dict(load_checkpoint(path).get("config") or {})
    for key in BUDGET_FREE:
        cfg.pop(key, None)
    train = dict(cfg.get("train") or {})
    train.pop("out", None)
    train["encoder"] = {k: v for k, v in (train.get("encoder") or {}).items() if k != "checkpoint"}
    cfg["train"] = train
    return cfg


def gram(f: torch.Tensor) -> torch.Tensor:
    b, c, h, w = f.shape
    f = f.flatten(2)
    return f @ f.transpose(1, 2) / (h * w)


@torch.no_grad()
def losses(
    judge: RobustAutoencoder,
    out: torch.Tensor,
    content: torch.Tensor,
    style: torch.Tensor,
    content_layer: str,
    style_layers: list[str],
) -> tuple[float, float]:
    """(relative content loss, relative style loss) of ``out`` in ``judge``'s feature space."""
    layers = sorted({content_layer, *style_layers}, key=judge.encoder.layer_names.index)
    fo, fc, fs = (judge.features(x, layers) for x in (out, content, style))
    c_loss = (fo[content_layer] - fc[content_layer]).pow(2).sum() / fc[content_layer].pow(2).sum()
    s_loss = [(gram(fo[k]) - gram(fs[k])).pow(2).sum() / gram(fs[k]).pow(2).sum() for k in style_layers]
    return float(c_loss), float(torch.stack(s_loss).mean())


def border_band(image: torch.Tensor, outer: int = 8, inner: int = 32) -> dict[str, dict[str, float]]:
    """Mean grey level (0-255, mean of R, G, B) of the outer ``outer`` px along each side of ``image``
    ((1, 3, H, W) or (3, H, W) in [0, 1]) and of the ``inner`` px next to them.

    Returns:
        ``{side: {"outer": ..., "next": ...}}`` for left, top, right, bottom.

    Example:
        >>> x = torch.full((3, 60, 80), 0.5)
        >>> x[:, :, :8] = 1.0  # a bright band along the left edge
        >>> band = border_band(x)
        >>> band["left"], band["right"]
        ({'outer': 255.0, 'next': 127.5}, {'outer': 127.5, 'next': 127.5})
    """
    grey = image.reshape(-1, *image.shape[-2:]).mean(0) * 255  # (H, W)
    lines = {"left": grey.T, "top": grey, "right": grey.T.flip(0), "bottom": grey.flip(0)}  # the side first
    return {
        side: {"outer": float(g[:outer].mean()), "next": float(g[outer : outer + inner].mean())}
        for side, g in lines.items()
    }


def band_columns(images: list[torch.Tensor]) -> dict[str, Any]:
    """The table's ``band_L`` .. ``band_B``: per side, the mean over ``images`` of |outer - next| in grey
    levels (a band of either sign counts), and the JSON's ``band``: :func:`border_band` of each image."""
    bands = [border_band(x) for x in images]
    columns = {
        f"band_{side[0].upper()}": statistics.mean(abs(b[side]["outer"] - b[side]["next"]) for b in bands)
        for side in SIDES
    }
    return columns | {"band": bands}


def edge_effect(
    run: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, whole: torch.Tensor
) -> dict[str, float]:
    """What the border adds to the band of ``run`` (a stylisation) on ``image`` ((1, 3, H, W) in [0, 1]).

    ``image`` is also run with :data:`EDGE_CUT` px cut off its top and left, and off its bottom and right; per
    side, the band (outer 8 px minus the next 32, :func:`border_band`) of the cut image minus the band of the
    same pixels inside ``whole`` (``run(image)``), where they are not at the border. Signed, in grey levels.

    Example:
        >>> x = torch.rand(1, 3, 160, 200)
        >>> edge_effect(lambda y: y.clamp(0.2, 0.8), x, x.clamp(0.2, 0.8))  # a pointwise op has no border
        {'left': 0.0, 'top': 0.0, 'right': 0.0, 'bottom': 0.0}
    """
    k = EDGE_CUT
    cuts = {"top_left": (..., slice(k, None), slice(k, None)), "bottom_right": (..., slice(None, -k), slice(None, -k))}
    cut_of = {"left": "top_left", "top": "top_left", "right": "bottom_right", "bottom": "bottom_right"}
    at_edge = {name: border_band(run(image[cut])) for name, cut in cuts.items()}
    inside = {name: border_band(whole[cut]) for name, cut in cuts.items()}

    def band(b: dict[str, dict[str, float]], side: str) -> float:
        return b[side]["outer"] - b[side]["next"]

    return {side: band(at_edge[cut_of[side]], side) - band(inside[cut_of[side]], side) for side in SIDES}


def edge_columns(runs: list[Callable[[torch.Tensor], torch.Tensor]], images: list[torch.Tensor]) -> dict[str, Any]:
    """Run each of ``images`` through its stylisation in ``runs``: :func:`band_columns` of the results and the
    table's ``edge_L`` .. ``edge_B``, per side the mean over ``images`` of |:func:`edge_effect`| (the JSON's
    ``edge``: each image's)."""
    wholes = [run(x) for run, x in zip(runs, images)]
    edges = [edge_effect(run, x, w) for run, x, w in zip(runs, images, wholes)]
    columns = {f"edge_{side[0].upper()}": statistics.mean(abs(e[side]) for e in edges) for side in SIDES}
    return band_columns(wholes) | columns | {"edge": edges}


def stylisations(ae: RobustAutoencoder, styles: list[torch.Tensor], **kw: Any) -> list[Callable[..., torch.Tensor]]:
    """One stylisation per style, as a function of the content (``stylize(ae, content, style, **kw)``)."""
    return [functools.partial(stylize, ae, styles=s, **kw) for s in styles]


def time_ms(fn, repeats: int) -> float:
    fn()  # warm-up (feature extractors are built on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--robust", default="runs/style/pyramid.pt", help="robust pyramid (trained if missing), or shipped:NAME"
    )
    p.add_argument("--standard", default="runs/style/pyramid_standard.pt", help="standard pyramid (trained if missing)")
    p.add_argument("--config", default="configs/apps/style.yaml", help="config for pyramids that must be trained")
    p.add_argument(
        "--train-overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="overrides for pyramids that must be trained, e.g. train.steps=400",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="longer side in px")
    p.add_argument("--methods", nargs="+", default=["wct", "adain"], choices=["wct", "adain"])
    p.add_argument("--images", type=int, default=3, help=f"content/style pairs (at most {len(PAIRS)})")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per image (median)")
    p.add_argument(
        "--band-images",
        nargs="+",
        default=list(BAND_IMAGES),
        choices=list(UNSEEN_IMAGES),
        help="unseen photos for the border band",
    )
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--content-layer", default="layer3")
    p.add_argument("--style-layers", nargs="+", default=["layer1", "layer2", "layer3", "layer4"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="bench/results/style.json")
    p.add_argument("--grid", default="docs/img/style_grid.png", help="grid PNG ('' to skip)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]  # the cores are shared: record how busy they were
    pairs = PAIRS[: max(1, min(args.images, len(PAIRS)))]

    try:  # a shipped pyramid (shipped:rfi_style_pyramid) is the checked file of this build, never trained here
        paths = {k: Path(resolve_checkpoint(getattr(args, k), f"--{k}", STYLE_APP)) for k in ("robust", "standard")}
    except RFIError as e:
        raise SystemExit(f"bench/style.py: error: {e}") from None
    trained = {k: ensure_pyramid(k, paths[k], args.config, args.train_overrides) for k in paths}
    same_budget = budget(paths["robust"]) == budget(paths["standard"])
    if not same_budget:
        print("[bench] WARNING: the two pyramids were trained with different configs (not the same budget)")
    models = {k: load_pyramid(v) for k, v in paths.items()}
    for k, m in models.items():
        print(f"[bench] {k}: {paths[k]} (layers {', '.join(m.layers)})")

    rows: list[dict[str, Any]] = []
    grid_cols: dict[str, list[torch.Tensor]] = {"content": [], "style": [], "standard": [], "robust": []}
    for size in args.sizes:
        images = [
            (resize_longer(embedded_image(c), size)[None], resize_longer(embedded_image(s), size)[None])
            for c, s in pairs
        ]
        band_contents = [resize_longer(unseen_image(n), size)[None] for n in args.band_images]
        band_styles = [images[i % len(images)][1] for i in range(len(band_contents))]  # the pairs' styles

        def judged(outs: list[torch.Tensor], images: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
            rec: dict[str, float] = {}
            for jname, judge in models.items():
                vals = [
                    losses(judge, o, c, s, args.content_layer, args.style_layers) for o, (c, s) in zip(outs, images)
                ]
                tag = jname[0].upper()
                rec[f"content_{tag}"] = statistics.mean(v[0] for v in vals)
                rec[f"style_{tag}"] = statistics.mean(v[1] for v in vals)
            return rec

        rows.append(
            {
                "size": size,
                "pyramid": "-",
                "method": "content image",
                "ms": None,
                **judged([c for c, _ in images], images),
                **band_columns(band_contents),
                **dict.fromkeys(EDGE_COLUMNS),
            }
        )
        for name, ae in models.items():
            outs = [stylize(ae, c, s, alpha=0.0) for c, s in images]
            rows.append(
                {
                    "size": size,
                    "pyramid": name,
                    "method": "reconstruction",
                    "ms": None,
                    **judged(outs, images),
                    **edge_columns(stylisations(ae, band_styles, alpha=0.0), band_contents),
                }
            )
            for method in args.methods:
                ms, outs = [], []
                for c, s in images:
                    ms.append(
                        time_ms(functools.partial(stylize, ae, c, s, method=method, alpha=args.alpha), args.repeats)
                    )
                    outs.append(stylize(ae, c, s, method=method, alpha=args.alpha))
                rows.append(
                    {
                        "size": size,
                        "pyramid": name,
                        "method": method,
                        "ms": statistics.median(ms),
                        **judged(outs, images),
                        **edge_columns(stylisations(ae, band_styles, method=method, alpha=args.alpha), band_contents),
                    }
                )
                print(f"[bench] {size}px {name} {method}: {statistics.median(ms):.0f} ms/image", flush=True)
                if size == min(args.sizes) and method == args.methods[0]:
                    grid_cols[name] = outs
        if size == min(args.sizes):
            grid_cols["content"] = [c for c, _ in images]
            grid_cols["style"] = [s for _, s in images]

    cols = (
        *("size", "pyramid", "method", "ms", "content_R", "style_R", "content_S", "style_S"),
        *BAND_COLUMNS,
        *EDGE_COLUMNS,
    )
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [
            "-"
            if r[c] is None
            else f"{r[c]:.0f}"
            if c == "ms"
            else f"{r[c]:.1f}"
            if c.startswith(("band_", "edge_"))
            else f"{r[c]:.3f}"
            if isinstance(r[c], float)
            else str(r[c])
            for c in cols
        ]
        print("| " + " | ".join(cells) + " |")

    result = {
        "rows": rows,
        "pairs": [list(p) for p in pairs],
        "sizes": args.sizes,
        "methods": args.methods,
        "repeats": args.repeats,
        "alpha": args.alpha,
        "content_layer": args.content_layer,
        "band_images": args.band_images,
        "band_px": {"outer": 8, "next": 32},
        "edge_cut_px": EDGE_CUT,
        "style_layers": args.style_layers,
        "threads": torch.get_num_threads(),
        "models": {k: str(v) for k, v in paths.items()},
        "trained_by_bench": trained,
        "same_budget": same_budget,
        "device": "cpu",
        "torch": torch.__version__,
        "load_average": [load_start, os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
    }
    print(
        f"\n{torch.get_num_threads()} torch thread(s); load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    out = Path(args.out)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    print(f"\nwrote {out}")
    if args.grid and grid_cols["robust"]:
        write_grid(grid_cols, Path(args.grid))
        print(f"wrote {args.grid}")
    return 0


def write_grid(cols: dict[str, list[torch.Tensor]], path: Path) -> None:
    """Rows of content | style | standard | robust: the centre square of each image, 256 x 256."""

    def square(t: torch.Tensor) -> torch.Tensor:
        side = min(t.shape[-2:])
        return resize_longer(center_crop(t, [side, side]), 256)

    save_grid([torch.cat([square(t) for t in cols[k]]) for k in ("content", "style", "standard", "robust")], path)


if __name__ == "__main__":
    sys.exit(main())
