"""Training an ``rfi ssl`` run: :class:`SSLTrainer` (its step, data and checkpoint on the training
scaffold) and :func:`run_ssl` (train, then probe), the entry point of :mod:`apps.commands.ssl`.

The backbone comes from :func:`encoders.create_encoder` (any architecture, ``width``,
``small_input``) and trains on unlabelled crops of the embedded photos (or the images of an
ImageNet-style folder, ``data.root``) with SimCLR or MoCo v2 (:mod:`apps.ssl.methods`) on the views
of :mod:`apps.ssl.views`, with StyleAugment where the config says. The scaffold
(:class:`encoders.core.trainer.Trainer`) runs the loop, the run folder, ``--resume``, metrics,
checkpoint cadence and DDP (``torchrun``: the global batch split over the processes, gradients
averaged over them, rank 0 writes); the data order is a pure function of (seed, epoch) and every
view of a step of (seed, step, rank), so a resumed run is bit-identical to an uninterrupted one on
CPU. The trained backbone is written as an RFI encoder checkpoint (``<out>/checkpoint.pt``, with the
training state for ``--resume``), so ``rfi eval-encoder``, the decoders and the apps take it; the
linear probes of :mod:`apps.ssl.probes` score it.

Example:
    >>> from encoders.core.config import load_config
    >>> cfg = load_config(SSLConfig, "configs/apps/ssl.yaml", ["method=mocov2", "steps=2"])  # doctest: +SKIP
    >>> result = run_ssl(cfg)                                                                # doctest: +SKIP
    >>> result["probe"]["texture"], result["step_ms"]                                        # doctest: +SKIP
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from apps.ssl.config import SSLConfig
from apps.ssl.methods import MoCo, SimCLR, build_model
from apps.ssl.probes import linear_probe
from apps.ssl.views import Views, build_style
from apps.style.augment import StyleAugment
from apps.style.loader import StyledLoader
from encoders.core.config import check_config, config_to_dict
from encoders.core.errors import RFIError
from encoders.core.optim import build_optimizer
from encoders.core.rundir import TrainResult
from encoders.core.runtime import DistContext, autocast
from encoders.core.serialization import save_checkpoint, write_json
from encoders.core.trainer import Trainer, run_trainer
from encoders.data.embedded import EmbeddedCrops
from encoders.data.folders import ImageFiles, resolve_num_workers
from encoders.weights.checkpoints import ENCODER_FORMAT, encoder_checkpoint

log = logging.getLogger("rfi")

# Keys that may differ between a run and its --resume: they change neither the weights nor the views.
RESUME_FREE_KEYS = (
    "out",
    "device",
    "log_every",
    "checkpoint_every",
    "snapshot_steps",
    "data.num_workers",
    "style.background",
    "style.prefetch",
    "style.threads",
    "probe",
)


@functools.lru_cache(maxsize=4)
def training_images(crop_size: int, crops: int, seed: int) -> Tensor:
    """The unlabelled training crops of the embedded photos' training regions.

    Shape: (crops, 3, crop_size, crop_size) in [0, 1].
    """
    data = EmbeddedCrops("train", crop_size, crops, seed)
    return torch.stack([data[i][0] for i in range(len(data))])


RANK_SEED_STRIDE = 1_000_003
"""Rank ``r`` of a DDP run draws its views from ``seed + r * RANK_SEED_STRIDE`` (rank 0: the seed itself)."""


def training_set(cfg: SSLConfig) -> Dataset | Tensor:
    """The run's unlabelled training images: the embedded crops (:func:`training_images`), or the training
    images of ``data.root`` (short side resized to ``crop_size``, random square crop and flip; items
    ``(image, label)``, the label unused).

    Raises:
        RFIError: ``data.root`` holds no image files.
    """
    d = cfg.data
    if d.root is None:
        return training_images(d.crop_size, d.crops, d.seed)
    return ImageFiles(d.root, "train", d.crop_size, resize=d.crop_size, crop="random")


def _images(batches: Any) -> Any:
    """The image tensors of a loader's batches (a folder's batches also carry labels)."""
    for batch in batches:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def default_out(cfg: SSLConfig) -> Path:
    """The run folder when ``out`` is not set: ``runs/ssl/<method>`` or ``runs/ssl/<method>_style``."""
    return Path("runs/ssl") / (cfg.method + ("_style" if cfg.style.enabled else ""))


@torch.no_grad()
def _warm_up(model: SimCLR | MoCo, size: int, device: torch.device) -> None:
    """Run the backbones once (eval mode: no statistics change) so their torch.fx feature extractors
    are built before a background stylisation thread starts (tracing patches torch process-wide)."""
    model.eval()
    x = torch.zeros(2, 3, size, size, device=device)
    model.embed(x)
    if isinstance(model, MoCo):
        model.key_backbone(x)


def _clock(device: torch.device) -> tuple[float, float]:
    """(wall, training-thread CPU) seconds, after the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.thread_time()


class SSLTrainer(Trainer):
    """One ``rfi ssl`` run on the training scaffold, on one process or each process of a ``torchrun`` job.

    Batches of :func:`training_set` in the scaffold's order become two views each in a
    :class:`~apps.style.loader.StyledLoader` (in a background thread when ``style.background``; on
    CUDA its kernels run on a side stream): batch ``i`` of the run draws its crops, colours and
    StyleAugment from generators seeded with (seed, ``i``) (rank ``r``: seed + ``r`` *
    :data:`RANK_SEED_STRIDE`). The checkpoint is an encoder checkpoint of the backbone whose
    ``ssl_train`` entry holds the whole model (head, key encoder, queue) and the scaffold's training state.

    DDP: each process trains on its share of the global ``batch_size``; the gradients are averaged over
    the processes (one all-reduce after the backward pass) before every optimiser step, so the weights
    stay equal; MoCo shuffles its keys across processes and enqueues all of them
    (:meth:`apps.ssl.methods.MoCo.keys`); batch-norm statistics are each process's own and rank 0's at
    the end; only rank 0 writes files.

    Args:
        cfg: the run's config (checked).
        ctx: the process group.
        device: this process's device.
        style: a ready StyleAugment to use instead of building one from ``cfg.style``.

    Raises:
        RFIError: a style model that cannot be loaded; a ``batch_size`` the processes cannot share.
    """

    name = "ssl"
    resume_free_keys = RESUME_FREE_KEYS

    def __init__(self, cfg: SSLConfig, ctx: DistContext, device: torch.device, style: StyleAugment | None = None):
        images = training_set(cfg)
        workers = 0 if isinstance(images, Tensor) else resolve_num_workers(cfg.data.num_workers, images)
        super().__init__(cfg, ctx, device, Path(cfg.out) if cfg.out else default_out(cfg), images, workers)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = self.module = build_model(cfg).to(device, memory_format=self.memory_format)
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.model.parameters_to_train(), self.total_steps)
        self.optimizers = {"optimizer": self.optimizer}
        self.style = style if style is not None else build_style(cfg.style, device)
        self.background = bool(self.style is not None and cfg.style.background)
        self.before, self.after = Views(cfg.views, cfg.data.view_size).stages(cfg.style.position)
        _warm_up(self.model, cfg.data.view_size, device)
        self.model.train()
        self.loaders: list[StyledLoader] = []  # one per epoch (their style and wait times)
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # the training thread's CPU time per step
        self.clock = (0.0, 0.0)

    def describe(self) -> str:
        cfg = self.cfg
        return (
            f"training {cfg.method}{'+style' if self.style is not None else ''} ({cfg.model.arch} width "
            f"{cfg.model.width:g}) for {self.total_steps} steps of {cfg.batch_size} images -> {self.out}"
        )

    # ------------------------------------------------------------------ data and steps
    def batches(self, epoch: int, skip: int) -> StyledLoader:
        """The epoch's batches as two views each, batch ``i`` of the run drawing from (seed, ``i``)."""
        cfg, s = self.cfg, self.cfg.style
        # Up to the run's last step: a background worker would otherwise stylise batches no step takes.
        batches = itertools.islice(_images(super().batches(epoch, skip)), self.total_steps - self.step)
        loader = StyledLoader(
            batches,
            self.style,
            before=self.before,
            after=self.after,
            views=2,
            seed=cfg.seed + RANK_SEED_STRIDE * self.ctx.rank,
            start=self.step,
            prefetch=s.prefetch,
            background=self.background,
            device=self.device,
            threads=s.threads,
        )
        self.loaders.append(loader)
        self.clock = _clock(self.device)
        return loader

    def train_step(self, v1: Tensor, v2: Tensor) -> dict[str, Tensor]:
        """One step on the two views of this process's share of a batch; shuffle BN draws from a generator
        seeded with (seed, step), the same on every process.

        Shape: ``v1``, ``v2``: (B / processes, 3, view_size, view_size).
        """
        v1, v2 = v1.contiguous(memory_format=self.memory_format), v2.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.cfg.precision):
            loss = self.model.loss(v1, v2, torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._average_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.losses.append(loss.item())
        return {"loss": loss.detach()}

    def _average_gradients(self) -> None:
        """The mean of every gradient over the processes (one all-reduce of all of them); nothing on one."""
        if self.ctx.world == 1:
            return
        grads = [p.grad for p in self.model.parameters_to_train() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.ctx.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def after_step(self) -> None:
        """Time the step (views included unless they are made in the background); keep the backbone at the
        ``snapshot_steps`` (rank 0)."""
        now = _clock(self.device)
        self.step_seconds.append(now[0] - self.clock[0])
        self.cpu_seconds.append(now[1] - self.clock[1])
        self.clock = now
        if self.step in self.cfg.snapshot_steps and self.ctx.main:
            save_checkpoint(self.snapshot(), snapshot_path(self.out, self.step))

    def snapshot(self) -> dict[str, Any]:
        """The backbone now, as an encoder checkpoint (no training state: for probing, not for ``--resume``)."""
        cfg = self.cfg
        return encoder_checkpoint(
            self.model.backbone, ssl={"method": cfg.method, "layer": self.model.layer, "steps": self.step}
        )

    def finish(self) -> None:
        """The run's summary line in ``metrics.jsonl``."""
        self.metrics.write(step=self.step, summary=True, **{k: v for k, v in self.stats().items() if k != "steps"})

    # ------------------------------------------------------------------ checkpoint
    def checkpoint(self, train: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        return encoder_checkpoint(
            self.model.backbone,
            ssl_train={**train, "config": config_to_dict(cfg), "method": cfg.method, "model": self.model.state_dict()},
            ssl={"method": cfg.method, "layer": self.model.layer, "steps": self.step},
        )

    def training_state(self, ckpt: dict[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
        if ckpt.get("format") != ENCODER_FORMAT or "ssl_train" not in ckpt:
            raise RFIError(f"{self.ckpt_path} is not a training checkpoint of rfi ssl: cannot resume from it")
        train = ckpt["ssl_train"]
        return train, train["config"]

    def load_payload(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["ssl_train"]["model"])

    # ------------------------------------------------------------------ result
    def stats(self) -> dict[str, Any]:
        """The run's statistics: ``step_ms`` (median step, views included unless made in the background),
        ``style_ms`` (median StyleAugment time per step, both views), ``wait_ms`` (median wait for the views),
        ``main_cpu_ms`` (median CPU time of the training thread per step: the work on the critical path,
        whatever else runs on the machine), ``images_per_s`` (all processes), ``background``, ``steps``,
        ``rank`` (this process's: 0 writes the files), ``loss_first``,
        ``loss_last`` (the mean of the last tenth of the steps). Timings leave out the first step; ``step_ms``,
        ``loss_first`` and ``loss_last`` are ``None`` when no step ran (a finished run resumed)."""
        timed = slice(1, None) if len(self.step_seconds) > 1 else slice(None)  # the first step pays set-up costs

        def median_ms(seconds: list[float]) -> float:
            return 1000 * statistics.median(seconds[timed]) if seconds else 0.0

        step_ms = median_ms(self.step_seconds) if self.step_seconds else None
        losses = self.losses
        return {
            "method": self.cfg.method,
            "steps": self.step,
            "rank": self.ctx.rank,
            "step_ms": step_ms,
            "style_ms": median_ms([t for loader in self.loaders for t in loader.style_seconds]),
            "wait_ms": median_ms([t for loader in self.loaders for t in loader.wait_seconds]),
            "main_cpu_ms": median_ms(self.cpu_seconds),
            "images_per_s": 1000 * self.cfg.batch_size / step_ms if step_ms else 0.0,
            "background": self.background,
            "loss_first": losses[0] if losses else None,
            "loss_last": statistics.mean(losses[-max(1, len(losses) // 10) :]) if losses else None,
        }

    def result(self) -> TrainResult:
        """The checkpoint, the model (eval mode) and :meth:`stats`."""
        return TrainResult(self.ckpt_path, self.model.eval(), self.stats())


def snapshot_path(out: str | os.PathLike, step: int) -> Path:
    """Where a run keeps its backbone at ``step`` (``snapshot_steps``): ``<out>/checkpoint_step<step>.pt``."""
    return Path(out) / f"checkpoint_step{step}.pt"


def train_ssl(cfg: SSLConfig, resume: bool = False, style: StyleAugment | None = None) -> TrainResult:
    """Train as ``cfg`` says, in the run folder ``out`` (default :func:`default_out`), on this process or on
    each process of a ``torchrun`` job.

    The run locks the folder and writes ``config.yaml``, ``metrics.jsonl`` (loss and learning
    rate every ``log_every`` steps, a final ``summary`` line) and ``checkpoint.pt`` (an RFI encoder
    checkpoint of the backbone plus the training state) at each epoch's end, every
    ``checkpoint_every`` steps and at the end, and :func:`snapshot_path` at each of ``snapshot_steps``.

    Args:
        cfg: the run's config.
        resume: continue from ``<out>/checkpoint.pt`` (same config except
            :data:`RESUME_FREE_KEYS`); bit-identical to an uninterrupted run on CPU.
        style: a ready StyleAugment to use instead of building one from ``cfg.style``.

    Returns:
        A :class:`~encoders.core.rundir.TrainResult`: the checkpoint, the model (eval mode) and
        :meth:`SSLTrainer.stats` as ``metrics``.

    Raises:
        RFIError: bad config values, an existing checkpoint without ``resume``, a locked folder.
    """
    cfg = check_config(cfg)
    return run_trainer(lambda ctx, device: SSLTrainer(cfg, ctx, device, style), cfg.device, cfg.precision, resume)


def run_ssl(cfg: SSLConfig, resume: bool = False, style: StyleAugment | None = None) -> dict[str, Any]:
    """Train (:func:`train_ssl`), then probe.

    Args:
        cfg: the run's config.
        resume: continue from ``<out>/checkpoint.pt`` (see :func:`train_ssl`).
        style: a ready StyleAugment to use instead of building one from ``cfg.style``.

    Returns:
        The statistics of :func:`train_ssl` plus ``probe`` ({task: accuracy}, empty unless
        ``probe.enabled``); also written to ``<out>/result.json``. Under DDP only rank 0 probes and writes
        (the other ranks return an empty ``probe``).

    Raises:
        RFIError: as :func:`train_ssl`.
    """
    trained = train_ssl(cfg, resume, style=style)
    main = trained.metrics["rank"] == 0
    result = {**trained.metrics, "probe": linear_probe(trained.model, cfg) if cfg.probe.enabled and main else {}}
    if main:
        write_json({"config": config_to_dict(cfg), **result}, trained.path.parent / "result.json")
    return result
