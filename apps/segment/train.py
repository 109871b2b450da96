"""Segmenter training (``rfi segment train``): cross-entropy on labelled crops, on the training scaffold.

:class:`SegmenterTrainer` is the step, validation and checkpoint of a run on
:class:`encoders.core.trainer.Trainer` (loop, ``--resume``, data order, logging, DDP): the
decoder (and, with ``train.finetune``, the encoder) learns per-pixel cross-entropy, pixels
labelled 255 left out. A run writes to ``train.out``:

- ``segmenter.pt``: the model file (:func:`apps.segment.model.load_segmenter` reads it), which
  also holds the training state (optimiser, step, RNG), written at the end of every epoch
  (and every ``checkpoint_every`` steps), so ``--resume`` continues a killed run exactly where
  it stopped (same seed and config: bit-identical weights to an uninterrupted run on CPU);
  after the last step it gets the evaluation (``eval``: mIoU and circular / crop mASC on the
  validation set, :func:`apps.segment.metrics.evaluate_segmenter`);
- ``metrics.jsonl``: loss and pixel accuracy every ``log_every`` steps, validation mIoU after
  every epoch, the evaluation at the end;
- ``config.yaml``: the resolved ``train:`` section.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from apps.segment.config import CHECKPOINT_NAME, SegmentConfig, SegmentTrainConfig, model_file, run_folder
from apps.segment.data import segmentation_dataset
from apps.segment.metrics import confusion_matrix, evaluate_segmenter, mean_iou
from apps.segment.model import SEGMENTER_FORMAT, build_segmenter, save_segmenter, segmenter_checkpoint
from encoders.core.config import check_config, config_to_dict
from encoders.core.errors import RFIError
from encoders.core.optim import lr_scheduler
from encoders.core.rundir import TrainResult
from encoders.core.runtime import DistContext, autocast
from encoders.core.serialization import load_checkpoint, save_checkpoint
from encoders.core.trainer import Trainer, run_trainer
from encoders.data.folders import resolve_num_workers
from encoders.data.voc import IGNORE_INDEX
from encoders.nets.downsample import TAU_END, set_temperature
from encoders.weights.checkpoints import load_state_dict_checked
from inversion.train import decoder_capacity, load_frozen_encoder

log = logging.getLogger("rfi")

RESUME_FREE_KEYS = (
    "out",
    "device",
    "num_workers",
    "log_every",
    "checkpoint_every",
    "deterministic",
    "eval",
    "epochs",
    "steps",
)
"""``train:`` keys that may differ between a run and its ``--resume`` (a run may also be extended)."""
MODEL_KEYS = ("encoder_path", "layer", "train_size", "val_miou", "eval", "config")
"""What a model file written apart from its run (``model: PATH``) keeps of the run's checkpoint besides the weights."""


class SegmenterTrainer(Trainer):
    """One segmenter training run on one process of a (possibly one-process) DDP job.

    :func:`train_segmenter` is the entry point for a whole run; the trainer is public so that
    benchmarks time its real :meth:`train_step`.

    Args:
        cfg: the ``train:`` section.
        ctx: the process group, from :func:`encoders.core.runtime.setup_distributed`.
        device: this process's device.
        datasets: ``(train, val)`` datasets to use instead of those ``cfg.data`` names (items
            ``(image, labels)``; the train set's ``classes`` name the classes).
    """

    name = "segment-train"
    checkpoint_name = CHECKPOINT_NAME
    resume_free_keys = RESUME_FREE_KEYS

    def __init__(
        self,
        cfg: SegmentTrainConfig,
        ctx: DistContext,
        device: torch.device,
        datasets: tuple[Dataset, Dataset] | None = None,
    ):
        encoder = load_frozen_encoder(cfg.encoder, cfg.decoder.skips)
        encoder.check_input_size(cfg.data.size, "train.data.size")
        if cfg.finetune:  # LPS selects phases by Gumbel-softmax in train mode: go on at the temperature its
            set_temperature(encoder, TAU_END)  # training ended at, not the 1.0 a freshly built LPD starts from
        train_set, self.val_set = datasets or (
            segmentation_dataset(cfg.data, "train"),
            segmentation_dataset(cfg.data, "val"),
        )
        super().__init__(cfg, ctx, device, run_folder(cfg), train_set, resolve_num_workers(cfg.num_workers, train_set))
        d = cfg.decoder
        self.segmenter = self.module = (
            build_segmenter(
                encoder,
                cfg.encoder.layer,
                train_set.classes,
                d.skips,
                cfg.finetune,
                d.padding_mode,
                norm=d.norm,
                refine_blocks=d.refine_blocks,
                **decoder_capacity(d, encoder.feature_info()[cfg.encoder.layer][0]),
            )
            .to(device)
            .train()
        )  # a fine-tuned encoder trains in train mode, a frozen one stays in eval mode
        o = cfg.optim
        groups = [{"params": list(self.segmenter.decoder.parameters()), "lr": o.lr}]
        if cfg.finetune:
            groups.append({"params": list(self.segmenter.encoder.parameters()), "lr": o.encoder_lr})
        self.optimizer = torch.optim.Adam(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.optimizers = {"optimizer": self.optimizer}
        self.rebuild_scheduler()
        self.ddp: torch.nn.Module = self.segmenter
        if ctx.world > 1:
            self.ddp = DistributedDataParallel(
                self.segmenter, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.val_miou: float | None = None
        self.evaluation: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.segmenter.classes)

    # ------------------------------------------------------------------ scaffold hooks
    def rebuild_scheduler(self) -> None:
        """Warm-up then cosine (or constant), each parameter group from its own learning rate."""
        o = self.cfg.optim
        self.scheduler = lr_scheduler(
            self.optimizer, None, lambda: self.total_steps, o.warmup_steps, o.schedule, step=self.step
        )

    def describe(self) -> str:
        cfg = self.cfg
        params = sum(p.numel() for p in self.segmenter.decoder.parameters())
        kind = "LPU (phase-equivariant)" if self.segmenter.decoder.upsample == "lps" else "nearest"
        return (
            f"training a {self.num_classes}-class segmenter on {cfg.encoder.layer} of {cfg.encoder.checkpoint} "
            f"({'fine-tuned' if cfg.finetune else 'frozen'} encoder; decoder {params / 1e6:.2f}M parameters, "
            f"{kind} up-sampling) on {len(self.train_set)} {cfg.data.source} images of {cfg.data.size} px, "
            f"{self.total_steps} steps of {cfg.batch_size} -> {self.out}"
        )

    def checkpoint(self, train: dict[str, Any]) -> dict[str, Any]:
        return segmenter_checkpoint(
            self.segmenter,
            encoder_path=str(self.cfg.encoder.checkpoint),
            layer=self.cfg.encoder.layer,
            train_size=self.cfg.data.size,
            val_miou=self.val_miou,
            eval=self.evaluation,
            config=config_to_dict(self.cfg),
            train=train,
        )

    def training_state(self, ckpt: dict[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
        if ckpt.get("format") != SEGMENTER_FORMAT or "train" not in ckpt:
            raise RFIError(f"{self.ckpt_path} is not a training checkpoint of rfi segment train: cannot resume")
        return ckpt["train"], ckpt.get("config", {})

    def load_payload(self, ckpt: dict[str, Any]) -> None:
        source = str(self.ckpt_path)
        load_state_dict_checked(self.segmenter.encoder, ckpt["encoder"]["state_dict"], f"{source} (encoder)")
        load_state_dict_checked(self.segmenter.decoder, ckpt["decoder"]["state_dict"], f"{source} (decoder)")
        self.val_miou, self.evaluation = ckpt.get("val_miou"), ckpt.get("eval")

    def finished(self, ckpt: dict[str, Any]) -> bool:
        return ckpt.get("eval") is not None

    # ------------------------------------------------------------------ steps
    def train_step(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """One optimisation step on per-pixel cross-entropy; returns the loss and the pixel accuracy."""
        x, labels = x.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.cfg.precision):
            logits = self.ddp(x)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        counted = labels != IGNORE_INDEX
        correct = ((logits.detach().argmax(1) == labels) & counted).sum() / counted.sum().clamp_min(1)
        return {"loss": loss.detach(), "pixel_acc": correct}

    def end_epoch(self, epoch: int, sums: Mapping[str, float], images_per_s: float) -> None:
        """Validation mIoU (rank 0) and its metrics line."""
        if self.ctx.main:
            self.val_miou = self.validate()
            self.metrics.write(step=self.step, epoch=epoch + 1, val_miou=self.val_miou)
            self.info(
                "epoch %d (step %d/%d): validation mIoU %.1f%%",
                epoch + 1,
                self.step,
                self.total_steps,
                100 * self.val_miou,
            )

    @torch.no_grad()
    def validate(self) -> float:
        """mIoU over the whole validation set (rank 0 only)."""
        self.segmenter.eval()
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        for x, labels in DataLoader(self.val_set, batch_size=self.cfg.batch_size):
            confusion += confusion_matrix(self.segmenter.predict(x.to(self.device)).cpu(), labels, self.num_classes)
        self.segmenter.train()
        return mean_iou(confusion)

    def final_evaluation(self) -> None:
        """mIoU and circular / crop mASC on the validation set, added to the checkpoint and the metrics (rank 0)."""
        if not self.ctx.main:
            return
        e = self.cfg.eval
        self.segmenter.eval()
        self.evaluation = evaluate_segmenter(
            self.segmenter.predict,
            self.val_set,
            self.num_classes,
            e.images,
            e.max_crop_shift,
            self.segmenter.size_multiple,
            self.cfg.batch_size,
            e.seed,
            self.device,
        )
        self.metrics.write(step=self.step, **{k: v for k, v in self.evaluation.items() if k != "class_iou"})
        self.info(
            "validation (%d images): mIoU %.1f%%, circular mASC %.2f%%, crop mASC %.2f%%",
            self.evaluation["images"],
            100 * self.evaluation["miou"],
            100 * self.evaluation["masc_circular"],
            100 * self.evaluation["masc_crop"],
        )
        if self.saved is not None:  # the final checkpoint, now with its evaluation
            self.saved["eval"] = self.evaluation
            save_checkpoint(self.saved, self.ckpt_path)

    def result(self) -> TrainResult:
        """The checkpoint, the segmenter (eval mode) and ``step``, ``val_miou``, the evaluation, the last log line."""
        return TrainResult(
            self.ckpt_path,
            self.segmenter.eval(),
            {**self.last_log, "step": self.step, "val_miou": self.val_miou, **(self.evaluation or {})},
        )


def train_segmenter(
    cfg: SegmentConfig, resume: bool = False, datasets: tuple[Dataset, Dataset] | None = None
) -> TrainResult:
    """Train a segmenter as ``cfg.train`` says and write the model file :func:`~apps.segment.config.model_file`.

    Runs on one process, or on each process of a ``torchrun`` job (DDP).

    Args:
        cfg: the config (its ``train:`` section and ``model``).
        resume: continue the run in ``train.out`` (same config, except the keys of
            :data:`RESUME_FREE_KEYS`); without it a checkpoint there is an error, never overwritten.
        datasets: ``(train, val)`` to use instead of those ``train.data`` names.

    Returns:
        A :class:`~encoders.core.rundir.TrainResult`: ``path`` the model file, ``model`` the
        :class:`~apps.segment.model.Segmenter` (eval mode), ``metrics`` the run's (``miou``,
        ``masc_circular``, ``masc_crop``, ...).

    Raises:
        RFIError: bad config values, a missing encoder checkpoint, layer or data, or a checkpoint in the way.
    """
    train = check_config(cfg.train)
    result = run_trainer(
        lambda ctx, device: SegmenterTrainer(train, ctx, device, datasets), train.device, train.precision, resume
    )
    path = model_file(cfg)
    if path.resolve() != Path(result.path).resolve() and int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes
        run = load_checkpoint(result.path)
        save_segmenter(result.model, path, **{k: run[k] for k in MODEL_KEYS if k in run})
        log.info("segmenter written to %s", path)
    return TrainResult(path, result.model, result.metrics)
