"""Standard and adversarial training of encoders (``rfi train-encoder``: :mod:`apps.commands.train_encoder`).

Adversarial training uses PGD or one of the fast methods (FGSM-RS, free training, N-FGSM,
optionally with GradAlign; ``adv.method``, :mod:`encoders.robust.fast`, ``docs/fast_robust.md``).
Every epoch of an adversarial run also probes one fixed validation batch for catastrophic
overfitting (:func:`encoders.robust.evaluate.overfitting_probe`): the training attack's accuracy
next to PGD-10's, in the log and ``metrics.jsonl``, with a one-line warning when they diverge.

One config (:class:`TrainEncoderConfig`, YAML in ``configs/encoder/``) describes a run;
:class:`EncoderTrainer` is its step, validation and checkpoint on the training scaffold
(:class:`encoders.core.trainer.Trainer`: loop, resume, data order, logging). Every epoch
(and every ``checkpoint_every`` steps) writes ``<out>/checkpoint.pt`` atomically: an RFI
encoder checkpoint (load it with ``encoders.create_encoder(checkpoint=...)``) that also
holds the step, optimizer, scheduler, grad-scaler and RNG state, so ``--resume`` continues
exactly where the run stopped, mid-epoch included (same seed and config give bit-identical
weights to an uninterrupted run on CPU). A run also writes ``metrics.jsonl`` (loss,
accuracy, images/s) and the resolved ``config.yaml``; at the end it evaluates clean and PGD
accuracy on the validation split (``eval.json``).

Under ``torchrun --nproc_per_node N`` the N processes train one model with
``DistributedDataParallel`` (NCCL on GPU, gloo on CPU): ``batch_size`` is the global batch,
each rank takes its slice of every batch (:func:`encoders.core.trainer.shard_positions`), attacks it itself (PGD
on the encoder, not the DDP wrapper, so the attack's backward passes sync nothing) and
only the training step's gradients are averaged. Only rank 0 writes files. Batch norm:
each rank normalises with its own batch's statistics (as DDP does by default) and the
running statistics are rank 0's, broadcast before every step; ``sync_batch_norm: true``
(GPU only) uses global batch statistics instead. ``precision`` (``fp32 | bf16 | fp16``) and
``channels_last`` choose the compute precision and memory format; ``deterministic``
toggles deterministic kernels. See ``docs/training_at_scale.md``.

Example:
    >>> from encoders.core.config import load_config
    >>> cfg = load_config(TrainEncoderConfig, "configs/encoder/resnet18_robust.yaml",
    ...                   ["epochs=1", "out=/tmp/rfi-doc-run"])  # doctest: +SKIP
    >>> result = train_encoder(cfg)                                # doctest: +SKIP
    >>> encoder = create_encoder(checkpoint=result.path)           # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from encoders.core.budget import FLOAT_BYTES, TRAINING_COPIES, check_memory, meta_parameters
from encoders.core.config import bounded, config_to_dict, yaml_dataclass
from encoders.core.config import check_config as check_declared_rules
from encoders.core.errors import RFIError
from encoders.core.optim import OptimConfig, build_optimizer
from encoders.core.rundir import TrainResult
from encoders.core.runtime import PRECISIONS, DistContext, autocast
from encoders.core.serialization import save_checkpoint, write_json
from encoders.core.trainer import Trainer, run_trainer
from encoders.data.build import DataConfig, build_dataset
from encoders.data.folders import resolve_num_workers
from encoders.nets.models import Encoder
from encoders.nets.registry import encoder_options
from encoders.robust.attacks import NORMS, check_attack
from encoders.robust.evaluate import evaluate_encoder, overfitting_probe, overfitting_warning
from encoders.robust.fast import AdvMethod, FreeReplay, Method, grad_align_penalty
from encoders.weights.checkpoints import ENCODER_FORMAT, encoder_checkpoint, load_state_dict_checked

log = logging.getLogger("rfi")

# Keys that may differ between a run and its ``--resume`` (they do not change the result, or,
# for ``deterministic``, only the choice of GPU kernels).
RESUME_FREE_KEYS = ("out", "device", "log_every", "num_workers", "eval", "checkpoint_every", "deterministic")


@yaml_dataclass("encoder/defaults.yaml", "model")
class ModelConfig:
    """The encoder (see :class:`encoders.nets.models.Encoder`); ``num_classes`` defaults to the dataset's.

    ``downsample``: ``stride``, ``blurpool`` or ``lps`` (see :mod:`encoders.nets.downsample`; LPS
    anneals its Gumbel-softmax temperature over the run). ``options``: further keyword
    arguments of the encoder, for Swin (``swin_t``, ``swin_v2_t``): ``equivariant``,
    ``selection``, ``embed_dim``, ``depths``, ``num_heads``, ``window_size``, ``patch_size``,
    ``stochastic_depth`` (see :mod:`encoders.nets.swin`).
    """

    arch: str
    width: float
    small_input: bool
    num_classes: int | None = bounded(low=1)
    batch_norm: bool
    downsample: str
    options: dict[str, Any]


@yaml_dataclass("encoder/defaults.yaml", "adv")
class AdvConfig:
    """Adversarial training: the training method's examples replace the clean ones when ``enabled``.

    ``method``: ``pgd``, or a fast method: ``fgsm_rs``, ``free``, ``n_fgsm`` (each described,
    with its paper's settings, in :mod:`encoders.robust.fast` and ``docs/fast_robust.md``).
    ``norm``: ``l2`` or ``linf``; ``eps``: radius; ``steps`` and ``random_start``: PGD's;
    ``step_size``: null for the method's default (PGD ``2.5 * eps / steps``, FGSM-RS
    ``1.25 * eps``, free and N-FGSM ``eps``); ``mix``: fraction of each batch kept clean (not
    with ``free``); ``noise``: N-FGSM's noise radius (null: ``2 * eps``); ``replays``: free
    training's replays of each minibatch (``epochs`` then means optimiser steps worth
    ``epochs`` passes, made in ``epochs / replays`` passes); ``grad_align``: GradAlign's
    weight (0: off; ``fgsm_rs`` and ``n_fgsm``).
    """

    enabled: bool
    method: Method
    norm: str
    eps: float
    steps: int
    step_size: float | None
    random_start: bool
    mix: float
    noise: float | None
    replays: int = bounded(low=1)
    grad_align: float = bounded(low=0)

    def training_method(self) -> AdvMethod:
        """The checked method these settings describe (what the trainer attacks with).

        Raises:
            RFIError: settings no run could use (:func:`encoders.robust.fast.check_method`).
        """
        return AdvMethod(
            self.method,
            self.norm,
            self.eps,
            self.steps,
            self.step_size,
            self.random_start,
            self.noise,
            self.replays,
            self.grad_align,
        )

    def check(self) -> None:
        """The rules across keys: the attack's numbers, and the method's own settings when ``enabled``.

        Raises:
            RFIError: the first bad setting, naming its key.
        """
        try:
            check_attack(self.eps, self.steps, self.step_size, 1 if self.enabled and self.method == "pgd" else 0)
        except RFIError as e:
            raise RFIError(f"adv: {e}") from None
        if self.enabled:
            self.training_method()
        if self.method == "free" and self.mix > 0:
            raise RFIError(
                f"adv.mix={self.mix} is not available with adv.method=free (every replay of a minibatch "
                "carries the perturbation): set adv.mix=0"
            )


@yaml_dataclass("encoder/defaults.yaml", "eval")
class EvalConfig:
    """Evaluation on the validation split after training (``eps``/``norm`` default to ``adv``'s)."""

    enabled: bool
    eps: float | None
    norm: str | None
    steps: int
    max_images: int | None


@yaml_dataclass("encoder/defaults.yaml")
class TrainEncoderConfig:
    """A training run of ``rfi train-encoder`` (YAML: ``configs/encoder/*.yaml``; defaults: ``defaults.yaml`` there).

    ``out`` defaults to ``runs/encoders/<config name>`` on the command line (in Python:
    ``runs/encoders/<arch>_<robust|standard>``). ``flip``: random horizontal flips.

    Scale (see ``docs/training_at_scale.md``):

    - ``epochs``, or exactly ``steps`` optimisation steps when ``steps > 0`` (the learning-rate
      schedule spans the run's steps); ``checkpoint_every``: also checkpoint every N steps
      (0: after each epoch only), for bit-identical ``--resume`` from the middle of an epoch.
    - ``batch_size``: the global batch, split evenly over DDP processes (``torchrun``).
    - ``precision``: ``fp32`` (default), ``bf16`` or ``fp16`` (``torch.autocast`` around the
      forward passes; fp16 adds a ``GradScaler``). PGD keeps its iterates, steps and
      projections in fp32 (:mod:`encoders.robust.attacks`).
    - ``channels_last``: NHWC memory format for the model and batches (faster convolutions
      on GPU tensor cores).
    - ``deterministic``: deterministic kernels (default; costs speed on GPU only, see
      :func:`encoders.core.runtime.set_deterministic`).
    - ``sync_batch_norm``: DDP on GPU only: batch-norm statistics over the global batch.
    """

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    adv: AdvConfig
    eval: EvalConfig
    epochs: int
    batch_size: int
    flip: bool
    seed: int
    device: str
    num_workers: int | None
    out: str | None
    log_every: int
    steps: int
    checkpoint_every: int
    precision: str
    channels_last: bool
    deterministic: bool
    sync_batch_norm: bool


def check_config(cfg: TrainEncoderConfig) -> None:
    """Reject values no run could use, naming the key (architecture names are checked by the encoder).

    First the rules the config classes declare (types, choices, ranges, each section's
    ``check()``, as for a loaded file), then the ones below, all reported in one line.
    """
    check_declared_rules(cfg)
    problems = []
    if cfg.epochs < 1 and cfg.steps < 1:
        problems.append(f"epochs or steps must be >= 1, got epochs={cfg.epochs}, steps={cfg.steps}")
    for key in ("steps", "checkpoint_every", "num_workers"):
        if (getattr(cfg, key) or 0) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.precision not in PRECISIONS:
        problems.append(f"unknown precision '{cfg.precision}' (valid: {', '.join(PRECISIONS)})")
    if cfg.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not 0 < cfg.optim.warmup < 1:
        problems.append(f"optim.warmup must be in (0, 1), got {cfg.optim.warmup}")
    for key, norm in (("adv.norm", cfg.adv.norm), ("eval.norm", cfg.eval.norm)):
        if norm is not None and norm not in NORMS:
            problems.append(f"unknown {key} '{norm}' (valid: {', '.join(NORMS)})")
    try:
        check_attack(cfg.eval.eps if cfg.eval.eps is not None else cfg.adv.eps, cfg.eval.steps)
    except RFIError as e:
        problems.append(f"eval: {e}")
    if cfg.adv.enabled and cfg.adv.method == "free" and cfg.steps % cfg.adv.replays:
        problems.append(
            f"steps={cfg.steps} (optimiser steps) must be a multiple of adv.replays={cfg.adv.replays} "
            "for adv.method=free: each minibatch is replayed that many times"
        )
    if not cfg.optim.lr > 0 or not 0 <= cfg.optim.momentum < 1 or not cfg.optim.weight_decay >= 0:
        problems.append(
            f"optim.lr must be > 0, optim.momentum in [0, 1) and optim.weight_decay >= 0, got "
            f"{cfg.optim.lr}, {cfg.optim.momentum}, {cfg.optim.weight_decay}"
        )
    if not 0 <= cfg.adv.mix < 1:
        problems.append(f"adv.mix (fraction of clean examples) must be in [0, 1), got {cfg.adv.mix}")
    if problems:
        raise RFIError("; ".join(problems))


def default_out(cfg: TrainEncoderConfig) -> Path:
    return Path("runs/encoders") / f"{cfg.model.arch}_{'robust' if cfg.adv.enabled else 'standard'}"


def adversarial_batch(
    encoder: Encoder, x: Tensor, y: Tensor, method: AdvMethod | None, mix: float = 0.0, precision: str = "fp32"
) -> Tensor:
    """The batch the encoder trains on: the method's examples (computed in eval mode), the first ``mix`` kept clean.

    Args:
        encoder: the model being trained (its mode is restored).
        x: clean images in [0, 1].
        y: integer labels.
        method: the training method (:meth:`AdvConfig.training_method`); ``None``: standard training, ``x`` itself.
        mix: fraction of the batch kept clean.
        precision: autocast for the attack's forward passes (its steps stay in fp32).

    Returns:
        The batch, ``x``'s first ``round(mix * B)`` images then the examples of the others.

    Shape:
        - x: (B, C, H, W); y: (B,); output: (B, C, H, W).
    """
    if method is None:
        return x
    keep = int(round(mix * x.shape[0]))
    if keep == x.shape[0]:
        return x
    was_training = encoder.training
    encoder.eval()  # as the robustness library: BN uses running statistics during the attack
    x_adv = method.examples(encoder.logits, x[keep:], y[keep:], precision=precision)
    encoder.train(was_training)
    return torch.cat([x[:keep], x_adv]) if keep else x_adv


def probe_batch(dataset: Dataset, size: int) -> tuple[Tensor, Tensor]:
    """The fixed batch the overfitting probe watches: ``size`` items evenly spread over ``dataset`` (every class).

    Shape:
        - output: images (N, C, H, W) and labels (N,), ``N = min(size, len(dataset))``.
    """
    n = max(1, min(size, len(dataset)))
    items = [dataset[i] for i in torch.linspace(0, len(dataset) - 1, n).round().long().tolist()]
    return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


@torch.no_grad()
def clean_accuracy(encoder: Encoder, dataset: Dataset, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy on ``dataset`` in eval mode."""
    encoder.eval()
    correct = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += (encoder.logits(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / max(len(dataset), 1)


class _Logits(nn.Module):
    """``encoder.logits`` as a module's forward: what ``DistributedDataParallel`` wraps."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder.logits(x)


# DDP without its buffer broadcast at every forward (train_step broadcasts earlier, before the attack);
# the keyword is ``forward_sync_buffers`` in newer torch, ``broadcast_buffers`` before.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)

# The metrics train_step sums: loss x images, correct predictions, images.
_SUMS = ("loss", "correct", "seen")


class EncoderTrainer(Trainer):
    """One encoder training run on one process of a (possibly one-process) DDP job (:class:`Trainer`'s loop).

    :func:`train_encoder` is the entry point for a whole run (it also locks the folder); the
    trainer itself is public so that benchmarks time its real :meth:`train_step`.

    Args:
        cfg: the run's config (checked with :func:`check_config`).
        ctx: the process group, from :func:`encoders.core.runtime.setup_distributed`.
        device: the device (ditto).

    Example:
        >>> from encoders.core.config import load_config
        >>> from encoders.core.runtime import setup_distributed
        >>> cfg = load_config(TrainEncoderConfig, None, ["model.width=0.125", "data.size=16", "data.train_crops=8",
        ...                   "data.val_crops=8", "batch_size=4", "device=cpu", "out=/tmp/rfi-doc-step"])
        >>> trainer = EncoderTrainer(cfg, *setup_distributed(cfg.device))
        >>> x, y = next(iter(DataLoader(trainer.train_set, batch_size=4)))
        >>> sorted(trainer.train_step(x, y)), trainer.step
        (['correct', 'loss', 'seen'], 1)
    """

    name = "train-encoder"
    resume_free_keys = RESUME_FREE_KEYS
    drop_last = False  # one process keeps the last, partial batch (as before DDP existed)

    def __init__(self, cfg: TrainEncoderConfig, ctx: DistContext, device: torch.device):
        train_set, self.val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
        super().__init__(
            cfg,
            ctx,
            device,
            Path(cfg.out) if cfg.out else default_out(cfg),
            train_set,
            resolve_num_workers(cfg.num_workers, train_set),
        )  # None: 0 in memory, CPUs for files
        m = cfg.model
        num_classes = train_set.num_classes if m.num_classes is None else m.num_classes
        if num_classes < train_set.num_classes:
            raise RFIError(f"model.num_classes={num_classes} but the data has {train_set.num_classes} classes")
        options = dict(
            num_classes=num_classes,
            width=m.width,
            small_input=m.small_input,
            batch_norm=m.batch_norm,
            downsample=m.downsample,
            **encoder_options(m.options, "model.options"),
        )
        size = meta_parameters(lambda: Encoder(m.arch, **options))
        check_memory(
            size * FLOAT_BYTES * TRAINING_COPIES,
            f"model.arch={m.arch} with model.width={m.width:g} (an encoder of {size / 1e9:,.1f} G parameters, trained)",
            "lower model.width (or model.options)",
        )
        encoder = Encoder(m.arch, **options).to(device)
        encoder.check_input_size(cfg.data.size)
        if cfg.sync_batch_norm and ctx.world > 1:
            if device.type != "cuda":
                raise RFIError(
                    "sync_batch_norm=true needs CUDA (torch's SyncBatchNorm has no CPU kernel); "
                    "on CPU each process keeps its own batch statistics (sync_batch_norm=false)"
                )
            encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
            encoder.reset_extractors()
        if cfg.channels_last:
            encoder = encoder.to(memory_format=torch.channels_last)
        self.encoder = self.module = encoder
        self.method = cfg.adv.training_method() if cfg.adv.enabled else None
        # Free training: each scaffold step is one minibatch replayed `replays` times, one optimiser step each.
        self.replay: FreeReplay | None = None
        self.replays = 1
        if self.method is not None and self.method.method == "free":
            self.replay, self.replays = self.method.replay(), self.method.replays
            self.total_steps = -(-self.total_steps // self.replays)
        self.replay_states: list[dict[str, Any]] = []  # every rank's replay state, gathered by save()
        self.optimizer, self.scheduler = build_optimizer(
            cfg.optim, encoder.parameters(), self.total_steps * self.replays
        )
        self.optimizers = {"optimizer": self.optimizer}
        self.model: nn.Module = _Logits(encoder)
        if ctx.world > 1:
            # Buffers (batch-norm statistics) are broadcast from rank 0 by train_step itself, before
            # the attack, so every rank attacks with the same statistics (DDP would only do it later).
            self.model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, **_NO_FORWARD_BUFFER_SYNC
            )
        self.record: dict[str, Any] | None = None  # the last epoch's metrics
        self.evaluation: dict[str, Any] | None = None  # the final evaluation
        # The overfitting probe's fixed validation batch (rank 0) and its records, one per epoch.
        self.probe = probe_batch(self.val_set, cfg.batch_size) if self.method is not None and ctx.main else None
        self.probes: list[dict[str, float]] = []

    def describe(self) -> str:
        cfg, a, m = self.cfg, self.cfg.adv, self.method
        if m is None:
            kind = "standard"
        elif m.method == "pgd":
            kind = f"adversarial ({a.norm} eps={a.eps}, {a.steps} steps)"
        else:
            settings = {
                "fgsm_rs": f"FGSM-RS, step {m.step:g}",
                "free": f"free, {m.replays} replays of step {m.step:g}",
                "n_fgsm": f"N-FGSM, noise {2 * m.eps if m.noise is None else m.noise:g}, step {m.step:g}",
            }
            align = f", GradAlign {m.grad_align:g}" if m.grad_align > 0 else ""
            kind = f"adversarial ({a.norm} eps={a.eps}, {settings[m.method]}{align})"
        steps = (
            f"{self.total_steps} minibatches x {self.replays} replays ({self.total_steps * self.replays} "
            f"optimiser steps, {self.epochs} epochs)"
            if self.replay is not None
            else f"{self.total_steps} steps ({self.epochs} epochs)"
        )
        return (
            f"training {kind} {cfg.model.arch} encoder on {len(self.train_set)} {cfg.data.source} images for "
            f"{steps} of {cfg.batch_size} images"
            f"{f' on {self.ctx.world} processes' if self.ctx.world > 1 else ''}"
            f"{f', {cfg.precision}' if cfg.precision != 'fp32' else ''} -> {self.out}"
        )

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> None:
        """The scaffold's checkpoint (collective), holding every rank's free-training perturbation."""
        if self.replay is not None:
            self.replay_states = self.ctx.all_gather(self.replay.state_dict())
        super().save()

    def checkpoint(self, train: dict[str, Any]) -> dict[str, Any]:
        extra = {
            **({"probes": self.probes} if self.method is not None else {}),
            **({"free_replay": self.replay_states} if self.replay is not None else {}),
        }
        return encoder_checkpoint(
            self.encoder,
            train={**train, "config": config_to_dict(self.cfg), **extra},
            **({"metrics": self.record} if self.record is not None else {}),
            **({"eval": self.evaluation} if self.evaluation is not None else {}),
        )

    def training_state(self, ckpt: dict[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
        if ckpt.get("format") != ENCODER_FORMAT or "train" not in ckpt:
            raise RFIError(f"{self.ckpt_path} is not a training checkpoint of rfi train-encoder: cannot resume from it")
        train = ckpt["train"]
        if isinstance(train.get("log_window"), Tensor):  # written before the training scaffold: sums as tensors
            train["log_window"] = {"steps": 0, "sums": dict(zip(_SUMS, train["log_window"].tolist()))}
            train["epoch_sums"] = dict(zip(_SUMS, train["epoch_sums"].tolist()))
        return train, train["config"]

    def load_payload(self, ckpt: dict[str, Any]) -> None:
        load_state_dict_checked(self.encoder, ckpt["state_dict"], str(self.ckpt_path))
        self.record, self.evaluation = ckpt.get("metrics"), ckpt.get("eval")
        self.probes = list(ckpt["train"].get("probes", []))
        states = ckpt["train"].get("free_replay") or []
        if self.replay is not None and len(states) == self.ctx.world:  # another world size: δ restarts at 0
            self.replay.load_state_dict(states[self.ctx.rank])

    def finished(self, ckpt: dict[str, Any]) -> bool:
        return self.evaluation is not None or not self.cfg.eval.enabled

    # ------------------------------------------------------------------ steps
    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One step on this rank's share of the global batch (the method's examples if adversarial; free
        training: the minibatch replayed ``adv.replays`` times, one optimiser step each); returns the step's
        sums: ``loss`` (cross-entropy) x images, ``correct`` predictions and images ``seen`` (x replays)."""
        cfg, device = self.cfg, self.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.flip:
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        m = cfg.model
        if m.downsample == "lps" or m.options.get("selection") == "learned":  # Gumbel-softmax tau (resume-exact)
            from encoders.nets.downsample import annealed_temperature, set_temperature

            set_temperature(self.encoder, annealed_temperature(self.step / self.total_steps))
        sums = {"loss": torch.zeros((), dtype=torch.float64, device=device), "correct": 0, "seen": 0}
        for _ in range(self.replays):
            self.ctx.broadcast_buffers(self.encoder)  # every rank attacks and trains from rank 0's statistics
            if self.replay is not None:  # free training: the perturbation persists; this step's backward moves it
                x_train = self.replay.perturb(x)
            else:  # the attack runs on the encoder itself (eval mode, no gradient sync); only the step syncs
                x_train = adversarial_batch(self.encoder, x, y, self.method, cfg.adv.mix, cfg.precision)
            loss, logits = self._optimise(x_train, x, y)
            if self.replay is not None:
                self.replay.update(x_train)
            sums["loss"] = sums["loss"] + loss.double() * y.shape[0]
            sums["correct"] = sums["correct"] + (logits.argmax(1) == y).sum()
            sums["seen"] += y.shape[0]
        self.step += 1
        return sums

    def _optimise(self, x_train: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimiser step on ``x_train`` (GradAlign's term on the clean ``x`` when ``adv.grad_align > 0``);
        returns the cross-entropy and the logits, detached."""
        cfg = self.cfg
        if cfg.channels_last:
            x_train = x_train.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, cfg.precision):
            logits = self.model(x_train)
        loss = F.cross_entropy(logits.float(), y)
        total = loss
        if self.method is not None and self.method.grad_align > 0:  # train mode, before the one backward
            total = loss + self.method.grad_align * grad_align_penalty(
                self.encoder.logits, x, y, self.method.eps, self.method.norm, precision=cfg.precision
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), logits.detach()

    def log_values(self, sums: Mapping[str, float], steps: int) -> dict[str, float]:
        return {"loss": sums["loss"] / sums["seen"], "acc": sums["correct"] / sums["seen"]}

    def end_epoch(self, epoch: int, sums: Mapping[str, float], images_per_s: float) -> None:
        """Validation accuracy and, for adversarial runs, the overfitting probe (rank 0); the epoch's metrics line."""
        if self.ctx.main:
            seen = max(sums.get("seen", 0), 1)
            val_acc = clean_accuracy(self.encoder, self.val_set, 2 * self.cfg.batch_size, self.device)
            self.record = {
                "step": self.step,
                "epoch": epoch + 1,
                "train_loss": sums.get("loss", 0) / seen,
                "train_acc": sums.get("correct", 0) / seen,
                "val_acc": val_acc,
                "images_per_s": images_per_s,
            }
            if self.replay is not None:
                self.record["optimizer_steps"] = self.step * self.replays
            warning = None
            if self.method is not None:
                probe = overfitting_probe(
                    self.encoder, *self.probe, self.method, seed=self.cfg.seed, precision=self.cfg.precision
                )
                self.probes.append(probe)
                self.record["probe"] = probe
                warning = overfitting_warning(self.probes)
                if warning is not None:
                    self.record["overfitting_warning"] = warning
            self.metrics.write(**self.record)
            log.info(
                "epoch %d/%d: train loss %.3f, train acc %.3f, val acc %.3f (%.0f images/s)%s",
                epoch + 1,
                self.epochs,
                self.record["train_loss"],
                self.record["train_acc"],
                val_acc,
                images_per_s,
                ""
                if self.method is None
                else f"; probe on {len(self.probe[1])} val images: training attack acc "
                f"{self.probes[-1]['train_attack_acc']:.3f}, PGD-10 acc {self.probes[-1]['pgd_acc']:.3f}",
            )
            if warning is not None:
                log.warning("%s", warning)
        self.encoder.train()

    def final_evaluation(self) -> None:
        """Clean and PGD accuracy on the validation split (rank 0), added to the checkpoint and ``eval.json``."""
        cfg = self.cfg
        if not (cfg.eval.enabled and self.ctx.main):
            return
        eps = cfg.adv.eps if cfg.eval.eps is None else cfg.eval.eps
        self.evaluation = evaluate_encoder(
            self.encoder,
            self.val_set,
            eps=eps,
            steps=cfg.eval.steps,
            norm=cfg.eval.norm or cfg.adv.norm,
            batch_size=2 * cfg.batch_size,
            max_images=cfg.eval.max_images,
            device=self.device,
        )
        self.metrics.write(step=self.step, epoch=self.epochs, eval=self.evaluation)
        write_json(self.evaluation, self.out / "eval.json")
        self.saved["eval"] = self.evaluation
        save_checkpoint(self.saved, self.ckpt_path)
        r = self.evaluation
        log.info(
            "validation: clean acc %.3f, PGD-%d (%s, eps=%g) acc %.3f",
            r["clean_acc"],
            r["steps"],
            r["norm"],
            r["eps"],
            r["pgd_acc"],
        )

    def result(self) -> TrainResult:
        """The run's :class:`~encoders.core.rundir.TrainResult`: the checkpoint, the encoder (eval mode) and the
        last epoch's metrics (``eval``: the final evaluation, when there was one)."""
        metrics = {**(self.record or {}), **({"eval": self.evaluation} if self.evaluation else {})}
        return TrainResult(self.ckpt_path, self.encoder.eval(), metrics)


def train_encoder(cfg: TrainEncoderConfig, resume: bool = False) -> TrainResult:
    """Train an encoder as ``cfg`` says; returns the checkpoint's path, the encoder and its metrics.

    Runs on one process, or on each process of a ``torchrun`` job (DDP: the process group
    is created from torchrun's environment, NCCL on GPU and gloo on CPU, or an existing
    group is used); ``cfg.batch_size`` is then the global batch and only rank 0 writes.

    Args:
        cfg: the run's config.
        resume: continue from ``<out>/checkpoint.pt`` if present (same config required,
            except the keys in ``RESUME_FREE_KEYS``); the checkpoint may be an epoch's or a
            ``checkpoint_every`` one from the middle of an epoch. Without it, an existing
            checkpoint there is an error, never overwritten.

    Returns:
        A :class:`~encoders.core.rundir.TrainResult`: ``path`` is ``<out>/checkpoint.pt`` (loadable
        with ``encoders.create_encoder(checkpoint=path)``; the result itself stands for it where
        a path is expected), ``model`` the trained encoder (eval mode), ``metrics`` the last
        epoch's record (``train_loss``, ``train_acc``, ``val_acc``, ``images_per_s``, ...) and
        ``eval`` (clean and PGD accuracy) when ``eval.enabled``; empty on non-zero DDP ranks.

    Raises:
        RFIError: bad config values, data that cannot be read, or a checkpoint in the way.
    """
    check_config(cfg)
    return run_trainer(lambda ctx, device: EncoderTrainer(cfg, ctx, device), cfg.device, cfg.precision, resume)
