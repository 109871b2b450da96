"""Linear probes: how well frozen SSL features solve downstream tasks, and the colour-statistics floor.

A probe is logistic regression on the frozen, globally pooled features of a backbone
(:meth:`apps.ssl.methods.SSLModel.embed`), trained on crops of the first two thirds of each
image (:func:`encoders.data.embedded.region`) and scored on crops of the last third, so no
validation pixel was seen by the probe. :data:`PROBE_TASKS` lists the tasks: one is partly
solved by colour statistics, two are not (histogram-equalised grey crops, :func:`grey_equalised`),
one transfers to images the SSL run never saw (``unseen``), and ``folder`` is the linear evaluation
of a labelled image folder (``data.root``); :func:`colour_statistics` gives the features of the
colour floor.
"""

from __future__ import annotations

import functools

import kornia.color
import torch
from torch import Tensor

from apps.ssl.config import ProbeTask, SSLConfig
from apps.ssl.methods import SSLModel
from encoders.core.errors import RFIError
from encoders.data.embedded import EmbeddedCrops, Split, embedded_image, region
from encoders.data.folders import ImageFiles
from encoders.data.unseen import UNSEEN_IMAGES, unseen_image

PROBE_TASKS: dict[ProbeTask, str] = {
    "photo": "8-way 'which photo': colour crops of the embedded photos (encoders.data.embedded.EMBEDDED_PHOTOS: "
    "astronaut, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina, "
    "stereo_motorcycle), the SSL training photos, probed on held-out regions",
    "photo_grey": "the same 8-way task on grey crops, each histogram-equalised (grey_equalised): every crop has "
    "the same grey-level histogram and no colour, so colour statistics are at chance; only "
    "structure is left",
    "texture": "8-way grey texture/scene task never seen in SSL training: scikit-image's textures brick, grass, "
    "gravel and the unseen grey images camera, coins, moon, page, text (encoders.data.unseen; used for "
    "evaluation only), crops histogram-equalised as photo_grey",
    "unseen": "10-way transfer task 'which unseen image does this crop come from': colour crops of the images of "
    "encoders.data.unseen.UNSEEN_IMAGES (china, flower, grace_hopper, camera, coins, moon, page, text, cell, "
    "clock_motion), never seen in SSL training",
    "folder": "linear evaluation on data.root's labels: images of its train split -> its val split (ImageNet "
    "transforms at data.view_size; train_crops / val_crops images, spread evenly over each split)",
}
"""Linear-probe tasks: name -> what it is. Every task trains its probe on crops of the first 2/3
of each image (:func:`encoders.data.embedded.region`) and scores it on crops of the last third."""

TEXTURE_IMAGES = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "text")


def grey_equalised(x: Tensor) -> Tensor:
    """Grey crops whose grey levels are replaced by their ranks: every crop has the same histogram.

    Each crop's grey image is histogram-equalised exactly (the k-th darkest of N pixels becomes
    ``(k + 0.5) / N``, ties broken by position), so mean, sd, histogram and colour are identical
    for all crops: only the spatial arrangement of grey levels (structure, texture) is left.

    Shape: (B, 3, H, W) -> (B, 3, H, W) with three equal channels.

    Example:
        >>> y = grey_equalised(torch.rand(2, 3, 4, 4))
        >>> torch.equal(y[0].flatten().sort().values, y[1].flatten().sort().values)
        True
    """
    grey = kornia.color.rgb_to_grayscale(x).flatten(1)
    ranks = grey.argsort(dim=1, stable=True).argsort(dim=1).to(x.dtype)
    out = ((ranks + 0.5) / grey.shape[1]).view(x.shape[0], 1, *x.shape[2:])
    return out.expand(-1, 3, -1, -1).contiguous()


def _region_crops(images: list[Tensor], split: Split, size: int, num: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num`` crops of the ``split`` regions of ``images``, the labels cycling over the images (seeded)."""
    regions = [region(img, split) for img in images]
    g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
    y = torch.arange(num) % len(regions)
    u = torch.rand(num, 2, generator=g)
    crops = []
    for label, (a, b) in zip(y.tolist(), u.tolist()):
        r = regions[label]
        top, left = int(a * (r.shape[1] - size + 1)), int(b * (r.shape[2] - size + 1))
        crops.append(r[:, top : top + size, left : left + size])
    return torch.stack(crops), y


def _folder_images(root: str, split: Split, size: int, num: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num`` images of a labelled folder's ``split``, spread evenly over it (ImageNet transforms, seeded)."""
    data = ImageFiles(root, split, size, transforms="imagenet")
    picks = torch.linspace(0, len(data) - 1, min(num, len(data))).round().long().unique().tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        items = [data[i] for i in picks]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@functools.lru_cache(maxsize=16)
def probe_data(
    task: str, split: Split, size: int, num: int, seed: int = 0, root: str | None = None
) -> tuple[Tensor, Tensor]:
    """The crops and labels of one probe task's split (deterministic, cached).

    Args:
        task: a name of :data:`PROBE_TASKS`.
        split: ``train`` (the first 2/3 of each image; ``folder``: the train split) or ``val`` (the last
            third; ``folder``: the val split).
        size: side of the square crops.
        num: number of crops (``folder``: at most this many images).
        seed: which crops (``data.seed``).
        root: the labelled folder of the ``folder`` task (``data.root``).

    Returns:
        ``(crops, labels)``: (num, 3, size, size) in [0, 1] and (num,) class indices.

    Raises:
        RFIError: unknown task; ``folder`` without ``root`` or with a folder that holds no images.
    """
    if task not in PROBE_TASKS:
        raise RFIError(f"unknown probe task '{task}' (valid: {', '.join(PROBE_TASKS)})")
    if task in ("photo", "photo_grey"):
        data = EmbeddedCrops(split, size, num, seed * 2 + (split == "train"))
        x = torch.stack([data[i][0] for i in range(len(data))])
        y = data.labels.clone()
        return (grey_equalised(x) if task == "photo_grey" else x), y
    if task == "unseen":
        return _region_crops([unseen_image(n) for n in UNSEEN_IMAGES], split, size, num, seed)
    if task == "folder":
        if root is None:
            raise RFIError("the 'folder' probe task needs data.root (a labelled image folder)")
        return _folder_images(root, split, size, num, seed)
    images = [embedded_image(n) if n in ("brick", "grass", "gravel") else unseen_image(n) for n in TEXTURE_IMAGES]
    x, y = _region_crops(images, split, size, num, seed)
    return grey_equalised(x), y


def colour_statistics(x: Tensor, bins: int = 8) -> Tensor:
    """Per-channel mean, sd and a ``bins``-bin histogram of each crop.

    The features a probe that only sees colour statistics gets (:func:`linear_probe` with
    ``model=None``: the floor every backbone should beat).

    Shape: (B, 3, H, W) in [0, 1] -> (B, 3 * (2 + bins)).
    """
    flat = x.flatten(2)
    hist = torch.stack([torch.stack([torch.histc(c, bins, 0, 1) for c in img]) for img in flat]) / flat.shape[-1]
    return torch.cat([flat.mean(-1), flat.std(-1), hist.flatten(1)], dim=1)


@torch.no_grad()
def embed(model: SSLModel, x: Tensor, batch_size: int = 256) -> Tensor:
    """Frozen pooled features of crops, ``batch_size`` at a time on the model's device.

    Shape: (N, 3, H, W) -> (N, C) on the CPU, float32.
    """
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [model.embed(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    )


def fit_probe(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], C: float = 1.0) -> float:
    """Validation accuracy in [0, 1] of logistic regression (standardised features) fitted on ``train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    # A problem this small gains nothing from BLAS threads; their spin-waits cost a lot on a busy machine.
    with threadpool_limits(1):
        clf.fit(train[0].double().numpy(), train[1].numpy())
        return float(clf.score(val[0].double().numpy(), val[1].numpy()))


def linear_probe(model: SSLModel | None, cfg: SSLConfig) -> dict[str, float]:
    """Probe accuracy per task of ``cfg.probe.tasks``.

    Args:
        model: the backbone to probe (frozen), or ``None`` for the colour-statistics floor.
        cfg: the run's config (``probe`` section; crops of ``data.view_size`` from ``data.seed``; ``data.root``
            for the ``folder`` task).

    Returns:
        ``{task: validation accuracy in [0, 1]}``.
    """
    p, size = cfg.probe, cfg.data.view_size
    out = {}
    for task in p.tasks:
        train = probe_data(task, "train", size, p.train_crops, cfg.data.seed, cfg.data.root)
        val = probe_data(task, "val", size, p.val_crops, cfg.data.seed, cfg.data.root)
        feats = colour_statistics if model is None else (lambda x: embed(model, x))
        out[task] = fit_probe((feats(train[0]), train[1]), (feats(val[0]), val[1]), p.C)
    return out
