"""The ``rfi ssl`` config (``configs/apps/ssl.yaml``): :class:`SSLConfig` and its sections.

Defaults live in the YAML only (:func:`encoders.core.config.yaml_dataclass`). Choices are
``Literal`` types and fixed numeric ranges :func:`encoders.core.config.bounded` fields, so
:func:`encoders.core.config.load_config` refuses them naming the key; :meth:`SSLConfig.check`
holds the rules that tie keys together.

Example:
    >>> from encoders.core.config import load_config
    >>> cfg = load_config(SSLConfig, "configs/apps/ssl.yaml", ["method=mocov2", "batch_size=64", "moco.queue=512"])
    >>> cfg.check()
    >>> cfg.moco.queue // cfg.batch_size
    8
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from encoders.core.config import bounded, value_range, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.imageio import list_images
from encoders.core.optim import OptimConfig

Method = Literal["simclr", "mocov2"]
StylePosition = Literal["before_crop", "after_crop", "after_jitter"]
ProbeTask = Literal["photo", "photo_grey", "texture", "unseen", "folder"]  # described in apps.ssl.probes.PROBE_TASKS
Precision = Literal["fp32", "bf16", "fp16"]


@yaml_dataclass("apps/ssl.yaml", "data")
class SSLDataConfig:
    """The unlabelled training images, cut into ``view_size`` views.

    ``root`` null: ``crops`` ``crop_size`` crops of the training regions of the embedded photos. ``root`` a
    folder (ImageNet style: ``train/<class>/*`` and ``val/<class>/*``, or class folders with every fifth file
    held out): its training images, short side resized to ``crop_size`` and randomly cropped square (with a
    flip), streamed by ``num_workers`` DataLoader workers (null: a default for the machine); ``crops`` is
    then unused.
    """

    root: str | None
    crops: int = bounded(low=1)
    crop_size: int = bounded(low=1)
    view_size: int = bounded(low=1)
    num_workers: int | None = bounded(low=0)
    seed: int


@yaml_dataclass("apps/ssl.yaml", "model")
class SSLModelConfig:
    """Backbone (:func:`encoders.create_encoder`) and projection head.

    ``layer``: the pooled feature tap (default: the architecture's last). ``hidden_dim``: the
    head's hidden width (default: the backbone's feature width). ``num_classes``: size of the
    (untrained) classifier the encoder checkpoint carries.
    """

    arch: str
    width: float = bounded(low=0, low_open=True)
    small_input: bool
    layer: str | None
    proj_dim: int = bounded(low=1)
    hidden_dim: int | None = bounded(low=1)
    num_classes: int = bounded(low=1)


@yaml_dataclass("apps/ssl.yaml", "moco")
class MocoConfig:
    """MoCo v2: ``queue`` negatives (a multiple of ``batch_size``), key encoder EMA ``momentum`` (1: the key
    encoder stays as initialised), ``symmetric`` loss (both views as queries), ``bn_splits`` batch-norm
    chunks (shuffle BN; 1: off)."""

    queue: int = bounded(low=1)
    momentum: float = bounded(low=0, high=1)
    symmetric: bool
    bn_splits: int = bounded(low=1)


@yaml_dataclass("apps/ssl.yaml", "views")
class ViewConfig:
    """The standard contrastive views: crop scale/ratio range ``[lo, hi]``, flip, colour jitter, grayscale."""

    crop_scale: list[float] = bounded(low=0, high=1)
    crop_ratio: list[float] = bounded(low=0, low_open=True)
    flip_p: float = bounded(low=0, high=1)
    jitter: float = bounded(low=0)  # brightness, contrast and saturation strength
    hue: float = bounded(low=0, high=0.5)
    jitter_p: float = bounded(low=0, high=1)
    gray_p: float = bounded(low=0, high=1)


@yaml_dataclass("apps/ssl.yaml", "style")
class StyleConfig:
    """StyleAugment in the views (SASSL); off unless ``enabled``.

    ``model``: autoencoder file (or ``shipped:NAME``); else ``encoder`` + ``decoder``; else StyleAugment's
    default (:func:`apps.style.augment.load_style_model`).
    ``p``, ``alpha``, ``beta``: see :class:`apps.style.augment.StyleAugment` (SASSL: alpha, beta in
    [0.1, 0.3]). ``styles``: ``batch`` or a style folder. ``position``: where StyleAugment sits
    in the views (:meth:`apps.ssl.views.Views.stages`). ``background``: stylise the next batches in
    a worker thread (:class:`apps.style.loader.StyledLoader`) with ``threads`` torch threads,
    ``prefetch`` batches ahead; the results are the same either way.
    """

    enabled: bool
    model: str | None
    encoder: str | None
    decoder: str | None
    p: float = bounded(low=0, high=1)
    alpha: list[float] = bounded(low=0, high=1)
    beta: list[float] = bounded(low=0, high=1)
    styles: str
    style_size: int = bounded(low=1)
    work_size: int | None = bounded(low=1)
    position: StylePosition
    background: bool
    prefetch: int = bounded(low=1)
    threads: int | None = bounded(low=1)


@yaml_dataclass("apps/ssl.yaml", "probe")
class ProbeConfig:
    """Linear probes after training: logistic regression (inverse regularisation ``C``) on frozen pooled
    features, trained on ``train_crops`` and scored on ``val_crops`` crops (or images, for ``folder``: the
    labelled ``data.root``, train split -> val split) per task."""

    enabled: bool
    tasks: list[ProbeTask]
    train_crops: int = bounded(low=1)
    val_crops: int = bounded(low=1)
    C: float = bounded(low=0, low_open=True)


@yaml_dataclass("apps/ssl.yaml")
class SSLConfig:
    """An ``rfi ssl`` run (YAML: ``configs/apps/ssl.yaml``).

    ``steps``: stop after this many steps (0: ``epochs`` full passes over ``data.crops``).
    ``checkpoint_every``: also checkpoint every N steps (0: at each epoch's end and the run's end only).
    ``snapshot_steps``: also keep the backbone at these steps as ``checkpoint_step<N>.pt`` (an encoder
    checkpoint, for a learning curve from one run). ``precision``: autocast of the training step (``fp32``
    on CPU). ``out``: the run folder (default: :func:`apps.ssl.train.default_out`). Under ``torchrun``
    ``batch_size`` is the global batch, split over the processes.
    """

    method: Method
    data: SSLDataConfig
    model: SSLModelConfig
    moco: MocoConfig
    optim: OptimConfig
    epochs: int = bounded(low=0)
    steps: int = bounded(low=0)
    batch_size: int = bounded(low=2)
    temperature: float = bounded(low=0, low_open=True)
    seed: int
    device: str
    precision: Precision
    channels_last: bool
    out: str | None
    log_every: int = bounded(low=0)
    checkpoint_every: int = bounded(low=0)
    snapshot_steps: list[int] = bounded(low=1)
    views: ViewConfig
    style: StyleConfig
    probe: ProbeConfig

    def check(self) -> None:
        """The rules between keys (ranges and choices are checked when the config is loaded).

        Raises:
            RFIError: ``batch_size`` above ``data.crops``; neither ``epochs`` nor ``steps``;
                ``data.view_size`` above ``data.crop_size``; ``moco.queue`` not a multiple of
                ``batch_size`` or ``moco.bn_splits`` not dividing it (``method: mocov2``); a range
                ``[lo, hi]`` with lo > hi; a missing or empty ``style.styles`` folder; ``style.encoder``
                without ``style.decoder`` (or the reverse).
        """
        if self.data.root is not None and not Path(self.data.root).is_dir():
            raise RFIError(f"data.root: image folder not found: {self.data.root} (an ImageNet-style folder, or null)")
        if "folder" in self.probe.tasks and self.probe.enabled and self.data.root is None:
            raise RFIError("probe.tasks: the 'folder' task probes data.root's labels: set data.root or drop it")
        if self.data.root is None and self.batch_size > self.data.crops:
            raise RFIError(f"batch_size must be <= data.crops={self.data.crops}, got {self.batch_size}")
        if self.epochs < 1 and self.steps < 1:
            raise RFIError(f"epochs or steps must be >= 1, got epochs={self.epochs}, steps={self.steps}")
        if self.data.view_size > self.data.crop_size:
            raise RFIError(f"data.view_size must be <= data.crop_size={self.data.crop_size}, got {self.data.view_size}")
        if self.method == "mocov2":
            m = self.moco
            if m.queue % self.batch_size:
                raise RFIError(f"moco.queue must be a positive multiple of batch_size={self.batch_size}, got {m.queue}")
            if self.batch_size % m.bn_splits:
                raise RFIError(f"moco.bn_splits must divide batch_size={self.batch_size}, got {m.bn_splits}")
        for key, value in (
            ("views.crop_scale", self.views.crop_scale),
            ("views.crop_ratio", self.views.crop_ratio),
            ("style.alpha", self.style.alpha),
            ("style.beta", self.style.beta),
        ):
            value_range(value, key)  # one number or [lo, hi] with lo <= hi (the bounds are the fields' own)
        s = self.style
        if s.enabled and s.styles != "batch":
            folder = Path(s.styles)
            if not folder.is_dir():
                raise RFIError(f"style.styles: style folder not found: {folder} (a folder of images, or 'batch')")
            try:
                list_images([folder])
            except RFIError:
                raise RFIError(f"style.styles: style folder {folder} holds no image files") from None
        if s.enabled and bool(s.encoder) != bool(s.decoder):
            raise RFIError("style.encoder and style.decoder go together (or set style.model)")
