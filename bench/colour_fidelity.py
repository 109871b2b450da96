"""Colour fidelity of inversion: does an image's colour come back from its features, and do the features hold it?

For each inversion pair (an encoder and its decoder; default the shipped robust and standard pairs), two
measurements, with the same images for every pair:

- **tiles**: ``--tiles`` 64-px tiles, each of one random colour (HSV: any hue, saturation 0.2-1, value 0.15-0.9)
  carrying the luminance texture of a random crop of the unseen photos (:mod:`encoders.data.unseen`) at a random
  contrast (5-40 %). ``decoder``: the CIE Lab colour difference (delta E 1976) between a tile's mean colour and its
  reconstruction's. ``probe``: the same error for a linear read-out of the mean colour from the decoder's layer's
  features averaged over the tile (ridge regression, scikit-learn; fitted on the first two thirds of the tiles,
  measured on the rest, like ``decoder``). A probe much better than the decoder means the colour is in the
  features and the decoder does not draw it. Also the R^2 of the a* and b* channels (the hue plane) of both, and
  the same two errors cell by cell (``_local``): each feature location's colour read from that location's own
  features (a probe fitted on 40000 locations) against the colour of the image cell it covers, and the decoder's
  colour of that cell. A local probe much worse than the pooled one means the colour is spread over the image's
  features rather than held at each location.
- **photos**: the same delta E per 32-px block of the unseen *colour* photos, whole photos reconstructed;
  medians over the flat blocks (grey-level standard deviation below the median block's) and the textured ones.

    OMP_NUM_THREADS=1 python bench/colour_fidelity.py          # about 2 minutes on one core
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoders.core.serialization import write_json  # noqa: E402
from encoders.data.unseen import UNSEEN_IMAGES, unseen_image  # noqa: E402
from inversion.autoencoder import RobustAutoencoder  # noqa: E402

PAIRS = {
    "robust": ("shipped:rfi_resnet18_robust", "shipped:rfi_resnet18_robust_layer3"),
    "standard": ("shipped:rfi_resnet18_standard", "shipped:rfi_resnet18_standard_layer3"),
}
TILE = 64
BLOCK = 32


def colour_tiles(n: int, seed: int) -> torch.Tensor:
    """``n`` (3, 64, 64) tiles in [0, 1]: one random colour each, textured by a crop of a random unseen photo.

    Shape:
        -> (n, 3, 64, 64).
    """
    from skimage.color import hsv2rgb

    g = np.random.default_rng(seed)
    greys = [unseen_image(name).mean(0).numpy() for name in UNSEEN_IMAGES]
    tiles = []
    for _ in range(n):
        grey = greys[g.integers(len(greys))]
        top, left = g.integers(0, grey.shape[0] - TILE), g.integers(0, grey.shape[1] - TILE)
        lum = grey[top : top + TILE, left : left + TILE]
        rgb = hsv2rgb(np.array([g.random(), g.uniform(0.2, 1.0), g.uniform(0.15, 0.9)]))
        texture = g.uniform(0.05, 0.4) * (lum - lum.mean()) / (lum.std() + 1e-6)
        tiles.append(np.clip(rgb[None, None] * (1 + texture[..., None]), 0, 1))
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float()


def mean_lab(x: torch.Tensor, block: int | None = None) -> np.ndarray:
    """Mean CIE Lab colour of each image of (B, 3, H, W) ``x`` in [0, 1], or of each ``block`` x ``block`` block:
    (B, 3) or (B * blocks, 3)."""
    from skimage.color import rgb2lab

    lab = torch.from_numpy(rgb2lab(x.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
    if block is None:
        return lab.mean((2, 3)).numpy()
    return F.avg_pool2d(lab, block).permute(0, 2, 3, 1).reshape(-1, 3).numpy()


def delta_e(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIE 1976 colour difference of (N, 3) Lab colours."""
    return np.sqrt(((a - b) ** 2).sum(1))


def r2(pred: np.ndarray, true: np.ndarray) -> list[float]:
    """R^2 of the a* and b* channels of (N, 3) Lab predictions."""
    return [
        float(1 - ((pred[:, j] - true[:, j]) ** 2).sum() / ((true[:, j] - true[:, j].mean()) ** 2).sum())
        for j in (1, 2)
    ]


@torch.no_grad()
def tile_fidelity(ae: RobustAutoencoder, tiles: torch.Tensor) -> dict[str, Any]:
    """``decoder`` and ``probe`` errors (module docstring) of one pair on ``tiles``."""
    from sklearn.linear_model import RidgeCV

    layer = ae.layers[0]
    batches = tiles.split(100)
    feats = torch.cat([ae.encode(x, layer)[layer] for x in batches])
    out = torch.cat([ae.reconstruct(x).clamp(0, 1) for x in batches])
    true, drawn = mean_lab(tiles), mean_lab(out)
    n = 2 * len(tiles) // 3  # tiles [0, n) fit the probes, the rest measure everything
    pooled = feats.mean((2, 3)).numpy()
    probe = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(pooled[:n], true[:n]).predict(pooled[n:])
    # the local read-out: each feature location's own vector -> the mean colour of the cell it covers
    cell = tiles.shape[-1] // feats.shape[-1]
    rows = feats.permute(0, 2, 3, 1).reshape(len(tiles), -1, feats.shape[1])
    cells = torch.from_numpy(mean_lab(tiles, cell)).view(len(tiles), -1, 3)
    drawn_cells = torch.from_numpy(mean_lab(out, cell)).view(len(tiles), -1, 3)
    sample = torch.randperm(n * rows.shape[1], generator=torch.Generator().manual_seed(0))[:40000]
    local = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(
        rows[:n].reshape(-1, rows.shape[2])[sample].numpy(), cells[:n].reshape(-1, 3)[sample].numpy()
    )
    test_cells = cells[n:].reshape(-1, 3).numpy()
    return {
        "layer": layer,
        "decoder_delta_e": float(np.median(delta_e(drawn[n:], true[n:]))),
        "probe_delta_e": float(np.median(delta_e(probe, true[n:]))),
        "decoder_r2_ab": r2(drawn[n:], true[n:]),
        "probe_r2_ab": r2(probe, true[n:]),
        "decoder_local_delta_e": float(np.median(delta_e(drawn_cells[n:].reshape(-1, 3).numpy(), test_cells))),
        "probe_local_delta_e": float(
            np.median(delta_e(local.predict(rows[n:].reshape(-1, rows.shape[2]).numpy()), test_cells))
        ),
    }


@torch.no_grad()
def photo_fidelity(ae: RobustAutoencoder, photos: list[torch.Tensor]) -> dict[str, float]:
    """Median delta E of the 32-px blocks' mean colours over ``photos`` ((3, H, W) each), flat and textured."""
    errors, textures = [], []
    for x in photos:
        x = x[:, : x.shape[1] // BLOCK * BLOCK, : x.shape[2] // BLOCK * BLOCK][None]
        errors.append(delta_e(mean_lab(ae.reconstruct(x).clamp(0, 1), BLOCK), mean_lab(x, BLOCK)))
        grey = x.mean(1, keepdim=True)
        textures.append((F.avg_pool2d(grey**2, BLOCK) - F.avg_pool2d(grey, BLOCK) ** 2).clamp_min(0).sqrt().flatten())
    error, texture = np.concatenate(errors), torch.cat(textures).numpy()
    flat = texture <= np.median(texture)
    return {
        "flat_delta_e": float(np.median(error[flat])),
        "textured_delta_e": float(np.median(error[~flat])),
        "blocks": int(len(error)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", nargs=3, action="append", metavar=("NAME", "ENCODER", "DECODER"), help="default: shipped")
    p.add_argument("--tiles", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photos", nargs="+", help="unseen photos for the block measurement (default: the colour ones)")
    p.add_argument("--out", default="bench/results/colour_fidelity.json")
    args = p.parse_args(argv)
    pairs = {name: (enc, dec) for name, enc, dec in args.pair} if args.pair else PAIRS
    tiles = colour_tiles(args.tiles, args.seed)
    loaded = {n: unseen_image(n) for n in args.photos or UNSEEN_IMAGES}
    names = args.photos or [n for n, x in loaded.items() if not torch.equal(x[0], x[1])]  # R != G: a colour photo
    photos = [loaded[n] for n in names]
    rows = {}
    for name, (enc, dec) in pairs.items():
        ae = RobustAutoencoder.from_checkpoints(enc, dec).eval()
        rows[name] = {"encoder": enc, "decoder": dec, **tile_fidelity(ae, tiles), **photo_fidelity(ae, photos)}
    cols = (
        *("decoder_delta_e", "probe_delta_e", "decoder_r2_ab", "probe_r2_ab"),
        *("decoder_local_delta_e", "probe_local_delta_e", "flat_delta_e", "textured_delta_e"),
    )
    print("median delta E (CIE 1976) of mean colours; R^2 of a*, b* on the held-out tiles")
    print(f"{'pair':<10}" + "".join(f" | {c:>21}" for c in cols))
    for name, row in rows.items():
        cells = ["/".join(f"{v:.2f}" for v in row[c]) if isinstance(row[c], list) else f"{row[c]:.1f}" for c in cols]
        print(f"{name:<10}" + "".join(f" | {c:>21}" for c in cells))
    result = {
        "command": " ".join(["python", "bench/colour_fidelity.py", *(argv if argv is not None else sys.argv[1:])]),
        "tiles": args.tiles,
        "seed": args.seed,
        "photos": names,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
