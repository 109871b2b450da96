"""The segmentation app's settings: ``configs/apps/segment.yaml`` as typed classes.

:class:`SegmentConfig` is the whole file. ``rfi segment train`` reads its ``train:`` section
(:class:`SegmentTrainConfig`: the encoder and layer, the decoder, the data, the optimiser,
the evaluation, the run) and writes the model file ``model``; ``rfi segment apply`` reads its
``apply:`` section (:class:`SegmentApplyConfig`) and that model file. The defaults are the
shipped YAML's.

Example:
    >>> from encoders.core.config import load_config
    >>> cfg = load_config(SegmentConfig, None, ["train.data.source=voc", "train.data.root=/data/VOC2012"])
    >>> cfg.train.data.source, cfg.train.encoder.layer, model_file(cfg).as_posix()
    ('voc', 'layer3', 'runs/segment/segmenter.pt')
    >>> load_config(SegmentConfig, None, ["train.data.source=voc"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    encoders.core.errors.RFIError: train.data.source=voc needs train.data.root (the VOC folder) (in ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from encoders.core.config import bounded, yaml_dataclass
from encoders.core.errors import RFIError
from inversion.train import DecoderSection, EncoderSection

DEFAULT_CONFIG = "configs/apps/segment.yaml"
CHECKPOINT_NAME = "segmenter.pt"


@yaml_dataclass("apps/segment.yaml", "train.data")
class SegmentDataConfig:
    """The labelled images (the ``train.data`` section).

    ``source``: ``scenes`` (:class:`encoders.data.scenes.SceneSegmentation`: procedurally
    labelled scenes, no download; ``train_items`` / ``val_items`` of them, drawn by ``seed``) or
    ``voc`` (:class:`encoders.data.voc.VOCSegmentation`: a PASCAL VOC tree at ``root``;
    ``resize`` its shorter sides first). ``num_classes``: ``null`` for the source's own (scenes
    6, VOC 21). ``size``: the crop side.
    """

    source: Literal["scenes", "voc"]
    root: str | None
    num_classes: int | None = bounded(low=2, high=255)
    size: int = bounded(low=8)
    resize: int | None = bounded(low=1)
    train_items: int = bounded(low=1)
    val_items: int = bounded(low=1)
    seed: int

    def check(self) -> None:
        if self.source == "voc" and not self.root:
            raise RFIError("train.data.source=voc needs train.data.root (the VOC folder)")


@yaml_dataclass("apps/segment.yaml", "train.optim")
class SegmentOptimConfig:
    """Adam for the decoder (``lr``) and, with ``train.finetune``, the encoder (``encoder_lr``): linear
    warm-up over ``warmup_steps``, then ``cosine`` decay to 0 or ``constant``."""

    lr: float = bounded(low=0, low_open=True)
    encoder_lr: float = bounded(low=0, low_open=True)
    betas: tuple[float, float] = bounded(low=0, high=0.9999)
    weight_decay: float = bounded(low=0)
    schedule: Literal["cosine", "constant"]
    warmup_steps: int = bounded(low=0)


@yaml_dataclass("apps/segment.yaml", "train.eval")
class SegmentEvalConfig:
    """The evaluation after training (:func:`apps.segment.metrics.evaluate_segmenter`): ``images``
    validation images, crop shifts of up to ``max_crop_shift`` px, random shifts drawn by ``seed``."""

    images: int = bounded(low=1)
    max_crop_shift: int = bounded(low=1)
    seed: int


@yaml_dataclass("apps/segment.yaml", "train")
class SegmentTrainConfig:
    """A segmenter training run (the ``train:`` section; :func:`apps.segment.train.train_segmenter`).

    ``encoder``: the encoder checkpoint and the layer the decoder starts from (any registered
    architecture). ``finetune``: train the encoder too (else it stays frozen, in eval mode).
    ``decoder``: the decoder's shape (:class:`inversion.train.DecoderSection`; ``residual`` must
    stay false). ``epochs`` passes, or exactly ``steps`` steps when > 0, of ``batch_size``
    (global, split over DDP processes) crops. ``out``: the run folder (its ``segmenter.pt`` is
    the checkpoint ``--resume`` continues). ``checkpoint_every``: in steps (0: after every epoch).
    """

    encoder: EncoderSection
    finetune: bool
    decoder: DecoderSection
    data: SegmentDataConfig
    optim: SegmentOptimConfig
    eval: SegmentEvalConfig
    epochs: int = bounded(low=0)
    steps: int = bounded(low=0)
    batch_size: int = bounded(low=1)
    seed: int
    device: str
    out: str | None
    log_every: int = bounded(low=0)
    checkpoint_every: int = bounded(low=0)
    num_workers: int | None = bounded(low=0)
    precision: Literal["fp32", "bf16", "fp16"]
    deterministic: bool

    def check(self) -> None:
        if self.epochs < 1 and self.steps < 1:
            raise RFIError(f"train.epochs or train.steps must be >= 1, got {self.epochs} and {self.steps}")
        if self.decoder.residual:
            raise RFIError("train.decoder.residual must be false: a segmenter's decoder outputs class logits")


@yaml_dataclass("apps/segment.yaml", "apply")
class SegmentApplyConfig:
    """How ``rfi segment apply`` runs (the ``apply:`` section; flags of the same names win).

    ``overlay``: also write ``<out>/<name>_overlay.png``, the image tinted with its label colours.
    ``device``: ``auto``, ``cpu``, ``cuda``, ...
    """

    overlay: bool
    device: str


@yaml_dataclass("apps/segment.yaml")
class SegmentConfig:
    """A segmenter: how to train it and how to apply it (YAML: ``configs/apps/segment.yaml``).

    ``train``: :class:`SegmentTrainConfig`. ``model``: the model file training writes and
    ``apply`` reads (``null``: ``<train.out>/segmenter.pt``, see :func:`model_file`).
    ``apply``: :class:`SegmentApplyConfig`.
    """

    train: SegmentTrainConfig
    model: str | None
    apply: SegmentApplyConfig


def run_folder(cfg: SegmentTrainConfig) -> Path:
    """The run folder: ``out``, else ``runs/segment``."""
    return Path(cfg.out or "runs/segment")


def model_file(cfg: SegmentConfig) -> Path:
    """The model file of a config: ``model``, else the run's checkpoint ``<train.out>/segmenter.pt``."""
    return Path(cfg.model) if cfg.model else run_folder(cfg.train) / CHECKPOINT_NAME
