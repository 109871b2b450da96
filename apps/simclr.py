"""A small SimCLR run with a linear probe: does :class:`~apps.augment.StyleAugment` help?

SimCLR (Chen et al., 2020): two augmented views of each image go through a backbone and a
projection head; the NT-Xent loss pulls the two views of an image together and pushes the
other 2B - 2 images of the batch away. The backbone is a small ResNet-18
(:func:`encoders.create_encoder`, width 0.25, 3x3 stem) trained on unlabelled crops of the
embedded photos. A linear probe (logistic regression on frozen, pooled ``layer4`` features)
then measures the representation on the labelled 8-way "which photo" task, training crops
from the training region and validation crops from the held-out region of each photo.

Views: kornia's random resized crop and flip, then (if ``style.enabled``) StyleAugment, then
colour jitter and grayscale. StyleAugment draws from its own generator, so a run with it and
a run without it see the same crops, colour jitter, initialisation and data order.

Example:
    >>> cfg = load_config(SSLConfig, "configs/apps/ssl.yaml", ["epochs=1"])  # doctest: +SKIP
    >>> result = run_ssl(cfg)                                                # doctest: +SKIP
    >>> result["probe_acc"], result["step_ms"]                               # doctest: +SKIP

Command line: ``python -m apps.simclr --config configs/apps/ssl.yaml style.enabled=true``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from apps.augment import StyleAugment
from encoders.config import config_to_dict, load_config
from encoders.data import EmbeddedCrops
from encoders.errors import RFIError
from encoders.models import create_encoder
from encoders.runtime import progress, resolve_device, seed_everything


@dataclass
class ViewConfig:
    """The standard SimCLR views (kornia): crop scale range, flip, colour jitter, grayscale."""

    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    jitter: float = 0.4          # brightness, contrast and saturation strength
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2


@dataclass
class StyleConfig:
    """StyleAugment in the views (see :class:`apps.augment.StyleAugment`); off unless ``enabled``.

    ``model``: autoencoder file; else ``encoder`` + ``decoder``; else the default robust one.
    ``alpha``/``beta`` are milder than StyleAugment's defaults: (0.2, 0.6) gave a better probe
    than (0.5, 1) in ``bench/augment.py``.
    """

    enabled: bool = False
    model: str | None = None
    encoder: str | None = None
    decoder: str | None = None
    p: float = 0.5
    alpha: list[float] = field(default_factory=lambda: [0.2, 0.6])
    beta: list[float] = field(default_factory=lambda: [0.2, 0.6])
    styles: str = "batch"


@dataclass
class ProbeConfig:
    """Linear probe: logistic regression on frozen features (train region -> validation region)."""

    train_crops: int = 2000
    val_crops: int = 1000
    C: float = 1.0


@dataclass
class SSLConfig:
    """A SimCLR run (YAML: ``configs/apps/ssl.yaml``).

    ``crops`` unlabelled ``crop_size`` crops of the embedded photos are cut into ``view_size``
    views. ``width``: ResNet-18 channel multiplier. ``steps``: stop after this many steps
    (``null``: ``epochs`` full passes).
    """

    crops: int = 4096
    crop_size: int = 40
    view_size: int = 32
    data_seed: int = 0
    width: float = 0.25
    proj_dim: int = 64
    epochs: int = 4
    steps: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    seed: int = 0
    device: str = "cpu"
    views: ViewConfig = field(default_factory=ViewConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's normalised-temperature cross entropy (hand-written: a few lines, no extra dependency).

    Args:
        z1, z2: (B, D) projections of the two views; row i of each comes from the same image.

    Returns:
        The mean loss over the 2B anchors: the other view of an anchor's image is its positive,
        the remaining 2B - 2 projections its negatives.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


class SimCLR(nn.Module):
    """Backbone (pooled ``layer4`` features) + 2-layer projection head."""

    def __init__(self, width: float = 0.25, proj_dim: int = 64):
        super().__init__()
        self.backbone = create_encoder("resnet18", width=width, small_input=True, num_classes=8,
                                       layers=["layer4"])
        dim = self.backbone.feature_info()["layer4"][0]
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

    def embed(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C) globally pooled features."""
        return self.backbone(x)["layer4"].mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def build_views(cfg: SSLConfig, device: torch.device) -> tuple[nn.Module, StyleAugment | None, nn.Module]:
    """The view pipeline in three parts: geometry (crop, flip), StyleAugment (or None), colour."""
    v = cfg.views
    geometry = K.AugmentationSequential(
        K.RandomResizedCrop((cfg.view_size, cfg.view_size), scale=tuple(v.crop_scale)),
        K.RandomHorizontalFlip())
    colour = K.AugmentationSequential(
        K.ColorJitter(v.jitter, v.jitter, v.jitter, v.hue, p=v.jitter_p),
        K.RandomGrayscale(p=v.gray_p))
    style = None
    if cfg.style.enabled:
        s = cfg.style
        model = s.model or ((s.encoder, s.decoder) if s.encoder else None)
        style = StyleAugment(model, p=s.p, alpha=s.alpha, beta=s.beta, styles=s.styles,
                             generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    return geometry.to(device), style, colour.to(device)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_ssl(cfg: SSLConfig) -> tuple[SimCLR, dict[str, float]]:
    """Train SimCLR; returns the model and timings (medians over steps, first step excluded).

    Timings: ``step_ms`` (views + forward + backward + update), ``style_ms`` (StyleAugment's
    part of it, both views), ``images_per_s`` (source images per second).
    """
    if cfg.batch_size < 2 or cfg.batch_size > cfg.crops:
        raise RFIError(f"batch_size must be in [2, crops={cfg.crops}], got {cfg.batch_size}")
    g = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = EmbeddedCrops("train", cfg.crop_size, cfg.crops, cfg.data_seed)
    images = torch.stack([data[i][0] for i in range(len(data))])  # labels are never used here
    geometry, style, colour = build_views(cfg, device)
    # NHWC (channels_last) convolutions are faster on CPU (oneDNN) and recent GPUs; StyleAugment uses them too.
    model = SimCLR(cfg.width, cfg.proj_dim).to(device, memory_format=torch.channels_last)
    per_epoch = len(images) // cfg.batch_size
    total = cfg.steps or cfg.epochs * per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total, pct_start=0.1)
    step_s, style_s, losses = [], [], []
    bar = progress(total=total, desc="simclr" + ("+style" if style else ""), unit="step")
    step = 0
    while step < total:
        for idx in torch.randperm(len(images), generator=g)[:per_epoch * cfg.batch_size].view(per_epoch, -1):
            if step == total:
                break
            t0 = _sync(device)
            x = images[idx].to(device)
            views, t_style = [], 0.0
            for _ in range(2):
                v = geometry(x)
                if style is not None:
                    t1 = _sync(device)
                    v = style(v)
                    t_style += _sync(device) - t1
                views.append(colour(v))
            both = torch.cat(views).contiguous(memory_format=torch.channels_last)
            loss = nt_xent(*model(both).chunk(2), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_s.append(_sync(device) - t0)
            style_s.append(t_style)
            losses.append(loss.item())
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    timed = slice(1, None) if len(step_s) > 1 else slice(None)  # the first step pays one-off set-up costs
    step_med = statistics.median(step_s[timed])
    return model.eval(), {
        "step_ms": 1000 * step_med, "style_ms": 1000 * statistics.median(style_s[timed]),
        "images_per_s": cfg.batch_size / step_med, "steps": step,
        "loss_first": losses[0], "loss_last": statistics.mean(losses[-max(1, len(losses) // 10):])}


@torch.no_grad()
def embed_dataset(model: SimCLR, dataset: EmbeddedCrops, device: torch.device,
                  batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Frozen pooled features and labels of a whole dataset."""
    model.eval()
    feats, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        feats.append(model.embed(torch.stack([x for x, _ in items]).to(device)).cpu())
        labels.append(torch.tensor([y for _, y in items]))
    return torch.cat(feats), torch.cat(labels)


def linear_probe(model: SimCLR, cfg: SSLConfig) -> float:
    """Validation accuracy in [0, 1] of logistic regression on frozen features (8-way "which photo")."""
    device = next(model.parameters()).device
    train = EmbeddedCrops("train", cfg.view_size, cfg.probe.train_crops, cfg.data_seed + 1)
    val = EmbeddedCrops("val", cfg.view_size, cfg.probe.val_crops, cfg.data_seed)
    x_train, y_train = embed_dataset(model, train, device)
    x_val, y_val = embed_dataset(model, val, device)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.probe.C, max_iter=2000))
    # A problem this small gains nothing from BLAS threads; their spin-waits cost up to 100x on a busy machine.
    with threadpool_limits(1):
        clf.fit(x_train.double().numpy(), y_train.numpy())
        return float(clf.score(x_val.double().numpy(), y_val.numpy()))


def run_ssl(cfg: SSLConfig) -> dict[str, float]:
    """Train SimCLR, then probe it: timings of :func:`train_ssl` plus ``probe_acc``."""
    model, stats = train_ssl(cfg)
    return {**stats, "probe_acc": linear_probe(model, cfg)}


def main(argv: list[str] | None = None) -> int:
    """``python -m apps.simclr --config configs/apps/ssl.yaml [key=value ...]``: prints the result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m apps.simclr", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML (configs/apps/ssl.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. style.enabled=true epochs=2")
    args = parser.parse_args(argv)
    cfg = load_config(SSLConfig, args.config, args.overrides)
    print(json.dumps({"config": config_to_dict(cfg), **run_ssl(cfg)}, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except RFIError as e:
        print(f"apps.simclr: error: {e}", file=sys.stderr)
        sys.exit(2)
