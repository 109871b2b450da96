"""Self-supervised pre-training with SimCLR or MoCo v2, style augmentation (SASSL) and linear probes.

``rfi ssl`` (:mod:`apps.commands.ssl`) trains a backbone from :func:`encoders.create_encoder`
(any architecture, ``width``, ``small_input``) on unlabelled crops of the embedded photos:

- **SimCLR** (Chen et al., 2020): two views of each image, a 2-layer MLP projection head,
  the NT-Xent loss over the 2B views of a batch (:func:`nt_xent`).
- **MoCo v2** (He et al., 2020; Chen et al., 2020): a query encoder (backbone + 2-layer MLP
  head) trained by gradient, a key encoder that is its exponential moving average
  (``moco.momentum``), and a queue of the last ``moco.queue`` keys as negatives; InfoNCE at
  ``temperature`` 0.2, optionally symmetric. Single-device "shuffle BN": queries and
  shuffled keys go through batch norm in ``moco.bn_splits`` separate chunks, so a query
  and its key never share batch statistics (MoCo's multi-GPU trick, on one device).

Views are random resized crop + flip, colour jitter + grayscale (:class:`Views`), drawn from
explicit per-batch generators, so every batch's views are a pure function of (seed, step):
a resumed run continues bit-identically, the views can be made in a background thread, and
a run with StyleAugment sees the same crops and jitter as one without. StyleAugment
(:class:`apps.style.augment.StyleAugment`) sits where ``style.position`` says (``before_crop``,
``after_crop`` or ``after_jitter``) and runs in a background thread
(:class:`apps.style.augment.StyledLoader`) when ``style.background`` is true.

The trained backbone is written as an RFI encoder checkpoint (``<out>/checkpoint.pt``, with the
training state for ``--resume``), so ``rfi eval-encoder``, the decoders and the apps take it.
Linear probes (logistic regression on frozen pooled features, train-region crops -> held-out
region crops) measure it on several tasks (:data:`PROBE_TASKS`), one that colour statistics
cannot solve.

Example:
    >>> cfg = load_config(SSLConfig, "configs/apps/ssl.yaml", ["method=mocov2", "steps=2"])  # doctest: +SKIP
    >>> result = run_ssl(cfg)                                                                # doctest: +SKIP
    >>> result["probe"]["texture"], result["step_ms"]                                        # doctest: +SKIP
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kornia.color
import kornia.enhance
import torch
import torch.nn.functional as F
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from apps.style.augment import StyleAugment, StyledLoader, load_style_model, unit_range
from encoders.weights.checkpoints import ENCODER_FORMAT, save_encoder
from encoders.core.config import config_to_dict, yaml_dataclass
from encoders.data.embedded import EmbeddedCrops, embedded_image, region
from encoders.core.errors import RFIError
from encoders.core.imageio import list_images
from encoders import Encoder, create_encoder
from encoders.core.rundir import RunDir, RunLock
from encoders.core.runtime import (
    progress,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from encoders.core.serialization import load_checkpoint
from encoders.robust.train import OptimConfig, build_optimizer, epoch_order

log = logging.getLogger("rfi")

METHODS = ("simclr", "mocov2")
POSITIONS = ("before_crop", "after_crop", "after_jitter")
# Keys that may differ between a run and its --resume: they change neither the weights nor the views.
RESUME_FREE_KEYS = ("out", "device", "log_every", "checkpoint_every", "style.background", "style.prefetch",
                    "style.threads", "probe")


# ----------------------------------------------------------------------------- configuration
@yaml_dataclass("apps/ssl.yaml", "data")
class DataConfig:
    """``crops`` unlabelled ``crop_size`` crops of the training regions of the embedded photos."""

    crops: int
    crop_size: int
    view_size: int
    seed: int


@yaml_dataclass("apps/ssl.yaml", "model")
class ModelConfig:
    """Backbone (:func:`encoders.create_encoder`) and projection head.

    ``layer``: the pooled feature tap (default: the architecture's last). ``hidden_dim``: the
    head's hidden width (default: the backbone's feature width). ``num_classes``: size of the
    (untrained) classifier the encoder checkpoint carries.
    """

    arch: str
    width: float
    small_input: bool
    layer: str | None
    proj_dim: int
    hidden_dim: int | None
    num_classes: int


@yaml_dataclass("apps/ssl.yaml", "moco")
class MocoConfig:
    """MoCo v2: ``queue`` negatives (a multiple of ``batch_size``), key encoder EMA ``momentum``,
    ``symmetric`` loss (both views as queries), ``bn_splits`` batch-norm chunks (shuffle BN; 1: off)."""

    queue: int
    momentum: float
    symmetric: bool
    bn_splits: int


@yaml_dataclass("apps/ssl.yaml", "views")
class ViewConfig:
    """The standard contrastive views: crop scale/ratio range, flip, colour jitter, grayscale."""

    crop_scale: list[float]
    crop_ratio: list[float]
    flip_p: float
    jitter: float  # brightness, contrast and saturation strength
    hue: float
    jitter_p: float
    gray_p: float


@yaml_dataclass("apps/ssl.yaml", "style")
class StyleConfig:
    """StyleAugment in the views (SASSL); off unless ``enabled``.

    ``model``: autoencoder file; else ``encoder`` + ``decoder``; else the default robust one.
    ``p``, ``alpha``, ``beta``: see :class:`apps.style.augment.StyleAugment` (SASSL: alpha, beta in
    [0.1, 0.3]). ``styles``: ``batch`` or a style folder. ``position``: ``before_crop``,
    ``after_crop`` or ``after_jitter``. ``background``: stylise the next batches in a worker
    thread (:class:`apps.style.augment.StyledLoader`) with ``threads`` torch threads, ``prefetch``
    batches ahead; the results are the same either way.
    """

    enabled: bool
    model: str | None
    encoder: str | None
    decoder: str | None
    p: float
    alpha: list[float]
    beta: list[float]
    styles: str
    style_size: int
    work_size: int | None
    position: str
    background: bool
    prefetch: int
    threads: int | None


@yaml_dataclass("apps/ssl.yaml", "probe")
class ProbeConfig:
    """Linear probes after training: logistic regression on frozen pooled features, per task."""

    enabled: bool
    tasks: list[str]
    train_crops: int
    val_crops: int
    C: float


@yaml_dataclass("apps/ssl.yaml")
class SSLConfig:
    """An ``rfi ssl`` run (YAML: ``configs/apps/ssl.yaml``).

    ``steps``: stop after this many steps (0: ``epochs`` full passes over ``data.crops``).
    ``checkpoint_every``: also checkpoint every N steps (0: at the end only).
    """

    method: str
    data: DataConfig
    model: ModelConfig
    moco: MocoConfig
    optim: OptimConfig
    epochs: int
    steps: int
    batch_size: int
    temperature: float
    seed: int
    device: str
    channels_last: bool
    out: str | None
    log_every: int
    checkpoint_every: int
    views: ViewConfig
    style: StyleConfig
    probe: ProbeConfig


def _unit(value: float, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise RFIError(f"{key} must be a probability in [0, 1], got {value!r}")


def check_config(cfg: SSLConfig) -> None:
    """Refuse values no run could use, with one line naming the key (before any model is built).

    Raises:
        RFIError: unknown ``method`` / ``style.position`` / probe task; ``moco.queue`` not a
            multiple of ``batch_size``; ``style.p`` or a range outside [0, 1]; a missing or
            empty ``style.styles`` folder; sizes that do not fit.
    """
    if cfg.method not in METHODS:
        raise RFIError(f"unknown method '{cfg.method}' (valid: {', '.join(METHODS)})")
    if cfg.batch_size < 2 or cfg.batch_size > cfg.data.crops:
        raise RFIError(f"batch_size must be in [2, data.crops={cfg.data.crops}], got {cfg.batch_size}")
    if cfg.epochs < 1 and cfg.steps < 1:
        raise RFIError(f"epochs or steps must be >= 1, got epochs={cfg.epochs}, steps={cfg.steps}")
    for key in ("steps", "checkpoint_every", "log_every"):
        if getattr(cfg, key) < 0:
            raise RFIError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.temperature <= 0:
        raise RFIError(f"temperature must be > 0, got {cfg.temperature}")
    if not 1 <= cfg.data.view_size <= cfg.data.crop_size:
        raise RFIError(f"data.view_size must be in [1, data.crop_size={cfg.data.crop_size}], got {cfg.data.view_size}")
    if cfg.method == "mocov2":
        m = cfg.moco
        if m.queue < cfg.batch_size or m.queue % cfg.batch_size:
            raise RFIError(f"moco.queue must be a positive multiple of batch_size={cfg.batch_size}, got {m.queue}")
        if not 0 <= m.momentum < 1:
            raise RFIError(f"moco.momentum must be in [0, 1), got {m.momentum}")
        if m.bn_splits < 1 or cfg.batch_size % m.bn_splits:
            raise RFIError(f"moco.bn_splits must divide batch_size={cfg.batch_size}, got {m.bn_splits}")
    v = cfg.views
    for key in ("flip_p", "jitter_p", "gray_p"):
        _unit(getattr(v, key), f"views.{key}")
    unit_range(v.crop_scale, "views.crop_scale")
    if len(v.crop_ratio) != 2 or not 0 < v.crop_ratio[0] <= v.crop_ratio[1]:
        raise RFIError(f"views.crop_ratio must be (lo, hi) with 0 < lo <= hi, got {v.crop_ratio}")
    if v.jitter < 0 or not 0 <= v.hue <= 0.5:
        raise RFIError(f"views.jitter must be >= 0 and views.hue in [0, 0.5], got {v.jitter}, {v.hue}")
    s = cfg.style
    _unit(s.p, "style.p")
    unit_range(s.alpha, "style.alpha")
    unit_range(s.beta, "style.beta")
    if s.position not in POSITIONS:
        raise RFIError(f"unknown style.position '{s.position}' (valid: {', '.join(POSITIONS)})")
    if s.prefetch < 1 or (s.threads is not None and s.threads < 1):
        raise RFIError(f"style.prefetch and style.threads must be >= 1, got {s.prefetch}, {s.threads}")
    if s.enabled and s.styles != "batch":
        folder = Path(s.styles)
        if not folder.is_dir():
            raise RFIError(f"style.styles: style folder not found: {folder}")
        try:
            list_images([folder])
        except RFIError:
            raise RFIError(f"style.styles: style folder {folder} holds no image files") from None
    if s.enabled and bool(s.encoder) != bool(s.decoder):
        raise RFIError("style.encoder and style.decoder go together (or set style.model)")
    bad = [t for t in cfg.probe.tasks if t not in PROBE_TASKS]
    if bad:
        raise RFIError(f"unknown probe.tasks {bad} (valid: {', '.join(PROBE_TASKS)})")


# ----------------------------------------------------------------------------- views
def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


class Views:
    """Contrastive views whose every random draw comes from the generator passed in.

    ``geometry``: random resized crop (torchvision's area-scale / log-aspect sampling; a crop
    larger than the image is clipped instead of re-drawn) to ``size`` and horizontal flip.
    ``colour``: colour jitter with probability ``jitter_p`` (kornia's torchvision-formula
    brightness, contrast, saturation, hue, in that fixed order) and grayscale with
    probability ``gray_p``. Both draw the same number of numbers whatever the data, so the
    draws of a run with StyleAugment and one without are the same.

    Example:
        >>> views = Views(ViewConfig(), size=16)
        >>> g = torch.Generator().manual_seed(0)
        >>> tuple(views.colour(views.geometry(torch.rand(4, 3, 24, 24), g), g).shape)
        (4, 3, 16, 16)
    """

    def __init__(self, cfg: ViewConfig, size: int):
        self.cfg, self.size = cfg, size

    def geometry(self, x: Tensor, g: torch.Generator) -> Tensor:
        b, _, h, w = x.shape
        c = self.cfg
        area = h * w * _uniform(b, *c.crop_scale, g)
        ratio = torch.exp(_uniform(b, math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1]), g))
        cw = torch.sqrt(area * ratio).clamp(1, w)
        ch = torch.sqrt(area / ratio).clamp(1, h)
        x0 = torch.rand(b, generator=g) * (w - cw)
        y0 = torch.rand(b, generator=g) * (h - ch)
        flip = torch.rand(b, generator=g) < c.flip_p
        x1, y1 = x0 + cw - 1, y0 + ch - 1
        boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                             torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], 1)
        out = crop_and_resize(x, boxes.to(x.device, x.dtype), (self.size, self.size), align_corners=True)
        return torch.where(flip.to(x.device).view(-1, 1, 1, 1), out.flip(-1), out)

    def colour(self, x: Tensor, g: torch.Generator) -> Tensor:
        b = x.shape[0]
        c = self.cfg
        lo = max(0.0, 1 - c.jitter)
        factors = [_uniform(b, lo, 1 + c.jitter, g) for _ in range(3)]
        hue = _uniform(b, -c.hue, c.hue, g)
        apply = (torch.rand(b, generator=g) < c.jitter_p).to(x.device).view(-1, 1, 1, 1)
        gray = (torch.rand(b, generator=g) < c.gray_p).to(x.device).view(-1, 1, 1, 1)
        f = [t.to(x.device, x.dtype) for t in factors]
        y = kornia.enhance.adjust_brightness_accumulative(x, f[0])
        y = kornia.enhance.adjust_contrast_with_mean_subtraction(y, f[1])
        y = kornia.enhance.adjust_saturation_with_gray_subtraction(y, f[2])
        y = kornia.enhance.adjust_hue(y, (2 * math.pi * hue).to(x.device, x.dtype)).clamp(0, 1)
        x = torch.where(apply, y, x)
        return torch.where(gray, kornia.color.rgb_to_grayscale(x).expand_as(x), x)

    def stages(self, position: str) -> tuple[Any, Any]:
        """``(before, after)`` StyleAugment for ``style.position`` (each ``fn(x, g)``)."""
        if position == "before_crop":
            return None, lambda x, g: self.colour(self.geometry(x, g), g)
        if position == "after_jitter":
            return lambda x, g: self.colour(self.geometry(x, g), g), None
        return self.geometry, self.colour


def build_style(cfg: SSLConfig, device: torch.device) -> StyleAugment | None:
    """The run's StyleAugment (``None`` unless ``style.enabled``)."""
    s = cfg.style
    if not s.enabled:
        return None
    model = s.model or ((s.encoder, s.decoder) if s.encoder else None)
    return StyleAugment(load_style_model(model, device), p=s.p, alpha=s.alpha, beta=s.beta, styles=s.styles,
                        style_size=s.style_size, work_size=s.work_size).to(device)


# ----------------------------------------------------------------------------- models and losses
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's normalised-temperature cross entropy.

    Args:
        z1, z2: (B, D) projections of the two views; row i of each comes from the same image.
        temperature: softmax temperature.

    Returns:
        The mean loss over the 2B anchors: the other view of an anchor's image is its positive,
        the remaining 2B - 2 projections its negatives.

    Example:
        >>> z = torch.randn(4, 8)
        >>> bool(nt_xent(z, z) < nt_xent(z, z.roll(1, 0)))
        True
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


def projection_head(dim: int, hidden: int, out: int) -> nn.Sequential:
    """The 2-layer MLP head of SimCLR and MoCo v2: Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class SSLModel(nn.Module):
    """Backbone (pooled features of one layer) + projection head; the base of :class:`SimCLR` and :class:`MoCo`.

    Shape:
        - :meth:`embed`: (B, 3, H, W) in [0, 1] -> (B, C) globally pooled features.
        - forward: (B, 3, H, W) -> (B, proj_dim) projections.
    """

    def __init__(self, backbone: Encoder, layer: str | None = None, proj_dim: int = 64, hidden_dim: int | None = None):
        super().__init__()
        self.layer = layer or backbone.layer_names[-1]
        backbone.layers = backbone.check_layers([self.layer])
        self.backbone = backbone
        dim = backbone.feature_info()[self.layer][0]
        self.head = projection_head(dim, hidden_dim or dim, proj_dim)

    def embed(self, x: Tensor) -> Tensor:
        return self.backbone(x)[self.layer].mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


class SimCLR(SSLModel):
    """SimCLR: NT-Xent over the two views of a batch.

    Example:
        >>> model = SimCLR(create_encoder("resnet18", width=0.125, small_input=True, num_classes=8), proj_dim=8)
        >>> x1, x2 = torch.rand(2, 4, 3, 16, 16)
        >>> bool(torch.isfinite(model.loss(x1, x2)))
        True
    """

    def __init__(self, backbone: Encoder, layer: str | None = None, proj_dim: int = 64,
                 hidden_dim: int | None = None, temperature: float = 0.2):
        super().__init__(backbone, layer, proj_dim, hidden_dim)
        self.temperature = temperature

    def loss(self, x1: Tensor, x2: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """NT-Xent of the two views (one forward pass through both)."""
        return nt_xent(*self(torch.cat([x1, x2])).chunk(2), self.temperature)


class MoCo(SSLModel):
    """MoCo v2: query encoder, momentum key encoder and a queue of negative keys.

    Args:
        backbone: the query backbone (the key backbone is a copy of it).
        layer, proj_dim, hidden_dim: see :class:`SSLModel`.
        queue_size: number of negative keys kept (MoCo: a multiple of the batch size).
        momentum: key encoder update ``k = m * k + (1 - m) * q`` before each step's keys.
        temperature: InfoNCE temperature (MoCo v2: 0.2).
        symmetric: both views serve as queries (and both key batches are enqueued).
        bn_splits: queries and (shuffled) keys go through batch norm in this many chunks.

    Buffers: ``queue`` (queue_size, proj_dim) of unit keys, ``queue_ptr`` (where the next keys go).

    Example:
        >>> model = MoCo(create_encoder("resnet18", width=0.125, small_input=True, num_classes=8), proj_dim=8,
        ...              queue_size=8)
        >>> x1, x2 = torch.rand(2, 4, 3, 16, 16)
        >>> loss = model.loss(x1, x2, torch.Generator().manual_seed(0))
        >>> int(model.queue_ptr)
        4
    """

    def __init__(self, backbone: Encoder, layer: str | None = None, proj_dim: int = 64,
                 hidden_dim: int | None = None, queue_size: int = 4096, momentum: float = 0.99,
                 temperature: float = 0.2, symmetric: bool = False, bn_splits: int = 1):
        super().__init__(backbone, layer, proj_dim, hidden_dim)
        self.momentum, self.temperature, self.symmetric, self.bn_splits = momentum, temperature, symmetric, bn_splits
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.head.parameters()]

    def key_parameters(self) -> list[nn.Parameter]:
        return [*self.key_backbone.parameters(), *self.key_head.parameters()]

    def parameters_to_train(self) -> list[nn.Parameter]:
        return self.query_parameters()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``key = momentum * key + (1 - momentum) * query`` for every parameter."""
        torch._foreach_lerp_(self.key_parameters(), self.query_parameters(), 1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (N, D) over the oldest entries, from ``queue_ptr`` on, wrapping around."""
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise RFIError(f"cannot enqueue {n} keys in a queue of {size}")
        idx = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + n) % size))

    def _chunked(self, fn: Any, x: Tensor) -> Tensor:
        if self.bn_splits <= 1:
            return fn(x)
        return torch.cat([fn(c) for c in x.chunk(self.bn_splits)])

    def queries(self, x: Tensor) -> Tensor:
        return F.normalize(self._chunked(self, x), dim=1)

    @torch.no_grad()
    def keys(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Unit keys of the key encoder; with ``bn_splits`` > 1 the batch is shuffled first (shuffle BN)."""
        key_fn = lambda c: self.key_head(self.key_backbone(c)[self.layer].mean(dim=(2, 3)))
        if self.bn_splits <= 1:
            return F.normalize(key_fn(x), dim=1)
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        k = self._chunked(key_fn, x[perm])
        return F.normalize(k[torch.argsort(perm)], dim=1)

    def contrast(self, q: Tensor, k: Tensor) -> Tensor:
        """InfoNCE: the key of the same image against the queue's keys (the queue as it was before this step)."""
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ self.queue.clone().t()
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    def loss(self, x1: Tensor, x2: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One step's loss: momentum update, keys, InfoNCE against the queue, then the keys are enqueued."""
        self.momentum_update()
        self.key_backbone.train(self.training)
        k2 = self.keys(x2, generator)
        loss = self.contrast(self.queries(x1), k2)
        if self.symmetric:
            k1 = self.keys(x1, generator)
            loss = (loss + self.contrast(self.queries(x2), k1)) / 2
            self.enqueue(torch.cat([k1, k2]))
        else:
            self.enqueue(k2)
        return loss


def build_model(cfg: SSLConfig) -> SimCLR | MoCo:
    """The run's model (weights drawn from torch's global generator: seed first)."""
    m = cfg.model
    backbone = create_encoder(m.arch, width=m.width, small_input=m.small_input, num_classes=m.num_classes)
    if cfg.method == "simclr":
        return SimCLR(backbone, m.layer, m.proj_dim, m.hidden_dim, cfg.temperature)
    c = cfg.moco
    return MoCo(backbone, m.layer, m.proj_dim, m.hidden_dim, c.queue, c.momentum, cfg.temperature, c.symmetric,
                c.bn_splits)


# ----------------------------------------------------------------------------- training
@functools.lru_cache(maxsize=4)
def training_images(crop_size: int, crops: int, seed: int) -> Tensor:
    """The unlabelled training crops (N, 3, S, S) of the embedded photos' training regions."""
    data = EmbeddedCrops("train", crop_size, crops, seed)
    return torch.stack([data[i][0] for i in range(len(data))])


class _Batches:
    """Batches of ``images`` for steps ``start`` .. ``total - 1``; the order is a pure function of (seed, epoch)."""

    def __init__(self, images: Tensor, batch_size: int, seed: int, start: int, total: int):
        self.images, self.batch_size, self.seed, self.start, self.total = images, batch_size, seed, start, total
        self.per_epoch = len(images) // batch_size

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[Tensor]:
        order, order_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(self.images), self.seed, epoch), epoch
            yield self.images[order[k * self.batch_size:(k + 1) * self.batch_size]]


@torch.no_grad()
def _warm_up(model: SimCLR | MoCo, size: int, device: torch.device) -> None:
    """Run the backbones once (eval mode: no statistics change) so their torch.fx feature extractors
    are built before a background stylisation thread starts (tracing patches torch process-wide)."""
    model.eval()
    x = torch.zeros(2, 3, size, size, device=device)
    model.embed(x)
    if isinstance(model, MoCo):
        model.key_backbone(x)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_ssl(cfg: SSLConfig, resume: bool = False, stop_at: int | None = None,
              style: StyleAugment | None = None) -> tuple[SimCLR | MoCo, dict[str, Any]]:
    """Train as ``cfg`` says; returns the model (eval mode) and statistics.

    With ``cfg.out`` set, the run locks the folder (:class:`encoders.core.rundir.RunLock`), writes
    ``config.yaml``, ``metrics.jsonl`` and ``checkpoint.pt`` (an RFI encoder checkpoint of the
    backbone plus the training state) every ``checkpoint_every`` steps and at the end.

    Args:
        cfg: the run's config.
        resume: continue from ``<out>/checkpoint.pt`` (same config except
            :data:`RESUME_FREE_KEYS`); bit-identical to an uninterrupted run on CPU.
        stop_at: stop (and checkpoint) after this step, as if interrupted there (tests).
        style: a ready StyleAugment to use instead of building one from ``cfg.style``.

    Returns:
        ``(model, stats)``: stats holds ``step_ms`` (median step, views included unless made in
        the background), ``style_ms`` (median StyleAugment time per step, both views),
        ``wait_ms`` (median time the step waited for its views), ``main_cpu_ms`` (median CPU time
        of the training thread per step: the work on the critical path, whatever else runs on the
        machine), ``images_per_s``, ``steps``,
        ``loss_first``, ``loss_last``.

    Raises:
        RFIError: bad config values, an existing checkpoint without ``resume``, a locked folder.
    """
    check_config(cfg)
    out = Path(cfg.out) if cfg.out else None
    lock = RunLock(out) if out is not None else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(cfg, out, resume, stop_at, style)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: SSLConfig, out: Path | None, resume: bool, stop_at: int | None,
           style: StyleAugment | None) -> tuple[SimCLR | MoCo, dict[str, Any]]:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    images = training_images(cfg.data.crop_size, cfg.data.crops, cfg.data.seed)
    per_epoch = len(images) // cfg.batch_size
    total = cfg.steps or cfg.epochs * per_epoch
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg).to(device, memory_format=fmt)
    params = model.parameters_to_train() if isinstance(model, MoCo) else list(model.parameters())
    opt, sched = build_optimizer(cfg.optim, params, total)
    if style is None:
        style = build_style(cfg, device)
    run_dir = RunDir(out) if out is not None else None
    step, ckpt_path = 0, run_dir.checkpoint if run_dir is not None else None
    if run_dir is not None and run_dir.has_checkpoint(resume):
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("format") != ENCODER_FORMAT or "ssl_train" not in ckpt:
            raise RFIError(f"{ckpt_path} is not a training checkpoint of rfi ssl: cannot resume from it")
        run_dir.check_resume(ckpt["ssl_train"]["config"], config_to_dict(cfg), RESUME_FREE_KEYS,
                             config_to_dict(SSLConfig()))
        train = ckpt["ssl_train"]
        model.load_state_dict(train["model"])
        opt.load_state_dict(train["optimizer"])
        sched.load_state_dict(train["scheduler"])
        set_rng_state(train["rng"])
        step = train["step"]
        log.info("resuming %s at step %d of %d", ckpt_path, step, total)
    if run_dir is not None:
        run_dir.write_config(config_to_dict(cfg))
    metrics = run_dir.metrics(resume_step=step if step else None) if run_dir is not None else None

    def save(losses_so_far: list[float]) -> None:
        if ckpt_path is None:
            return
        train = {"step": step, "total_steps": total, "config": config_to_dict(cfg), "method": cfg.method,
                 "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": rng_state()}
        save_encoder(model.backbone, ckpt_path, ssl_train=train,
                     ssl={"method": cfg.method, "layer": model.layer, "steps": step})

    views = Views(cfg.views, cfg.data.view_size)
    before, after = views.stages(cfg.style.position)
    s = cfg.style
    loader = StyledLoader(_Batches(images, cfg.batch_size, cfg.seed, step, total), style, before=before,
                          after=after, views=2, seed=cfg.seed, start=step, prefetch=s.prefetch,
                          background=bool(style is not None and s.background), device=device, threads=s.threads)
    name = cfg.method + ("+style" if style is not None else "")
    log.info("training %s (%s width %g) for %d steps of %d images%s", name, cfg.model.arch, cfg.model.width,
             total, cfg.batch_size, f" -> {out}" if out else "")
    _warm_up(model, cfg.data.view_size, device)
    model.train()
    step_s, cpu_s, losses, window = [], [], [], []
    bar = progress(total=total, initial=step, desc=name, unit="step")
    t0, c0 = _sync(device), time.thread_time()
    with loader:
        for v1, v2 in loader:
            v1, v2 = v1.contiguous(memory_format=fmt), v2.contiguous(memory_format=fmt)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # shuffle BN: a pure function of the step
            loss = model.loss(v1, v2, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            window.append(losses[-1])
            t1, c1 = _sync(device), time.thread_time()
            step_s.append(t1 - t0)
            cpu_s.append(c1 - c0)
            t0, c0 = t1, c1
            bar.update()
            if metrics is not None and cfg.log_every and step % cfg.log_every == 0:
                metrics.write(step=step, loss=statistics.mean(window), lr=sched.get_last_lr()[0],
                              step_ms=1000 * statistics.median(step_s[-len(window):]))
                bar.set_postfix(loss=f"{statistics.mean(window):.3f}", refresh=False)
                window = []
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                save(losses)
            if stop_at is not None and step >= stop_at:
                break
    bar.close()
    save(losses)
    timed = slice(1, None) if len(step_s) > 1 else slice(None)  # the first step pays one-off set-up costs
    step_med = statistics.median(step_s[timed]) if step_s else float("nan")
    med = lambda xs: 1000 * statistics.median(xs[timed]) if xs else 0.0
    stats = {"method": cfg.method, "steps": step, "step_ms": 1000 * step_med, "style_ms": med(loader.style_seconds),
             "wait_ms": med(loader.wait_seconds), "main_cpu_ms": med(cpu_s), "images_per_s": cfg.batch_size / step_med if step_s else 0.0,
             "background": loader.background,
             "loss_first": losses[0] if losses else float("nan"),
             "loss_last": statistics.mean(losses[-max(1, len(losses) // 10):]) if losses else float("nan")}
    if metrics is not None and step >= total:  # the run's summary (not for a run stopped early)
        metrics.write(step=step, summary=True, **{k: v for k, v in stats.items() if k != "steps"})
    return model.eval(), stats


# ----------------------------------------------------------------------------- linear probes
PROBE_TASKS: dict[str, str] = {
    "photo": "8-way 'which photo': colour crops of the embedded photos (encoders.data.embedded.EMBEDDED_PHOTOS: "
             "astronaut, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina, "
             "stereo_motorcycle), the SSL training photos, probed on held-out regions",
    "photo_grey": "the same 8-way task on grey crops, each histogram-equalised (grey_equalised): every crop has "
                  "the same grey-level histogram and no colour, so colour statistics are at chance; only "
                  "structure is left",
    "texture": "8-way grey texture/scene task never seen in SSL training: scikit-image's textures brick, grass, "
               "gravel and the unseen grey images camera, coins, moon, page, text (encoders.data.unseen; used for "
               "evaluation only), crops histogram-equalised as photo_grey",
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


@functools.lru_cache(maxsize=16)
def probe_data(task: str, split: str, size: int, num: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The crops (N, 3, size, size) and labels (N,) of one probe task's split (deterministic).

    Raises:
        RFIError: unknown task.
    """
    if task not in PROBE_TASKS:
        raise RFIError(f"unknown probe task '{task}' (valid: {', '.join(PROBE_TASKS)})")
    if task in ("photo", "photo_grey"):
        data = EmbeddedCrops(split, size, num, seed * 2 + (split == "train"))
        x = torch.stack([data[i][0] for i in range(len(data))])
        y = data.labels.clone()
        return (grey_equalised(x) if task == "photo_grey" else x), y
    from encoders.data.unseen import unseen_image

    regions = [region(embedded_image(n) if n in ("brick", "grass", "gravel") else unseen_image(n), split)
               for n in TEXTURE_IMAGES]
    g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
    y = torch.arange(num) % len(regions)
    u = torch.rand(num, 2, generator=g)
    crops = []
    for label, (a, b) in zip(y.tolist(), u.tolist()):
        r = regions[label]
        top, left = int(a * (r.shape[1] - size + 1)), int(b * (r.shape[2] - size + 1))
        crops.append(r[:, top:top + size, left:left + size])
    return grey_equalised(torch.stack(crops)), y


def colour_statistics(x: Tensor, bins: int = 8) -> Tensor:
    """Per-channel mean, sd and a ``bins``-bin histogram of each crop: (B, 3 * (2 + bins)) features.

    The features a probe that only sees colour statistics gets (the floor of
    :func:`linear_probe`'s ``colour_stats`` baseline).
    """
    flat = x.flatten(2)
    hist = torch.stack([torch.stack([torch.histc(c, bins, 0, 1) for c in img]) for img in flat]) / flat.shape[-1]
    return torch.cat([flat.mean(-1), flat.std(-1), hist.flatten(1)], dim=1)


@torch.no_grad()
def embed(model: SSLModel, x: Tensor, batch_size: int = 256) -> Tensor:
    """Frozen pooled features (N, C) of crops (N, 3, H, W)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.embed(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


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
    """Probe accuracy per task of ``cfg.probe.tasks`` (``model=None``: the colour-statistics baseline)."""
    p, size = cfg.probe, cfg.data.view_size
    out = {}
    for task in p.tasks:
        train = probe_data(task, "train", size, p.train_crops, cfg.data.seed)
        val = probe_data(task, "val", size, p.val_crops, cfg.data.seed)
        feats = colour_statistics if model is None else (lambda x: embed(model, x))
        out[task] = fit_probe((feats(train[0]), train[1]), (feats(val[0]), val[1]), p.C)
    return out


def run_ssl(cfg: SSLConfig, resume: bool = False, style: StyleAugment | None = None) -> dict[str, Any]:
    """Train, then probe: the statistics of :func:`train_ssl` plus ``probe`` ({task: accuracy}).

    With ``cfg.out`` set, the result is also written to ``<out>/result.json``.
    """
    model, stats = train_ssl(cfg, resume, style=style)
    result = {**stats, "probe": linear_probe(model, cfg) if cfg.probe.enabled else {}}
    if cfg.out:
        from encoders.core.serialization import write_json

        write_json({"config": config_to_dict(cfg), **result}, Path(cfg.out) / "result.json")
    return result
