"""Standard and adversarial (PGD) training of encoders (``rfi train-encoder``: :mod:`apps.commands.train_encoder`).

One config (:class:`TrainEncoderConfig`, YAML in ``configs/encoder/``) describes a run.
Every epoch (and every ``checkpoint_every`` steps) writes ``<out>/checkpoint.pt``
atomically: an RFI encoder checkpoint (load it with
``encoders.create_encoder(checkpoint=...)``) that also holds the step, optimizer,
scheduler, grad-scaler and RNG state, so ``--resume`` continues exactly where the run
stopped, mid-epoch included (same seed and config give bit-identical weights to an
uninterrupted run on CPU). A run also writes ``metrics.jsonl`` (loss, accuracy, images/s)
and the resolved ``config.yaml``; at the end it evaluates clean and PGD accuracy on the
validation split (``eval.json``).

Under ``torchrun --nproc_per_node N`` the N processes train one model with
``DistributedDataParallel`` (NCCL on GPU, gloo on CPU): ``batch_size`` is the global batch,
each rank takes its slice of every batch (:func:`shard_positions`), attacks it itself (PGD
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
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from encoders.robust.attacks import NORMS, check_attack, pgd
from encoders.weights.checkpoints import ENCODER_FORMAT, encoder_checkpoint, load_state_dict_checked
from encoders.core.config import config_to_dict, yaml_dataclass
from encoders.data.build import DataConfig, build_dataset
from encoders.data.folders import resolve_num_workers
from encoders.core.errors import RFIError
from encoders.nets.models import Encoder
from encoders.nets.swin import encoder_options
from encoders.core.rundir import RunDir, TrainResult, run_trainer, step_seed
from encoders.core.runtime import (PRECISIONS, DistContext, MetricsLog, autocast, grad_scaler, progress, rng_state,
                              seed_everything, set_rng_state)
from encoders.core.serialization import load_checkpoint, save_checkpoint, write_json

log = logging.getLogger("rfi")

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
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
    num_classes: int | None
    batch_norm: bool
    downsample: str
    options: dict[str, Any]


@yaml_dataclass("encoder/defaults.yaml", "optim")
class OptimConfig:
    """Optimizer (``sgd`` with Nesterov momentum, or ``adamw``) and learning-rate schedule.

    ``schedule``: ``onecycle`` (warm-up for ``warmup`` of the steps, then cosine decay),
    ``cosine`` or ``constant``; ``lr`` is the peak learning rate.
    """

    name: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    warmup: float


@yaml_dataclass("encoder/defaults.yaml", "adv")
class AdvConfig:
    """Adversarial training: PGD examples replace the clean ones when ``enabled``.

    ``norm``: ``l2`` or ``linf``; ``eps``: radius; ``steps``; ``step_size`` (default
    ``2.5 * eps / steps``); ``random_start``; ``mix``: fraction of each batch kept clean.
    """

    enabled: bool
    norm: str
    eps: float
    steps: int
    step_size: float | None
    random_start: bool
    mix: float


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
    """Reject values no run could use, naming the key (architecture names are checked by the encoder)."""
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
    if cfg.optim.name not in OPTIMIZERS:
        problems.append(f"unknown optim.name '{cfg.optim.name}' (valid: {', '.join(OPTIMIZERS)})")
    if cfg.optim.schedule not in SCHEDULES:
        problems.append(f"unknown optim.schedule '{cfg.optim.schedule}' (valid: {', '.join(SCHEDULES)})")
    if not 0 < cfg.optim.warmup < 1:
        problems.append(f"optim.warmup must be in (0, 1), got {cfg.optim.warmup}")
    for key, norm in (("adv.norm", cfg.adv.norm), ("eval.norm", cfg.eval.norm)):
        if norm is not None and norm not in NORMS:
            problems.append(f"unknown {key} '{norm}' (valid: {', '.join(NORMS)})")
    for key, (eps, steps, step_size, min_steps) in {
            "adv": (cfg.adv.eps, cfg.adv.steps, cfg.adv.step_size, 1 if cfg.adv.enabled else 0),
            "eval": (cfg.eval.eps if cfg.eval.eps is not None else cfg.adv.eps, cfg.eval.steps, None, 1)}.items():
        try:
            check_attack(eps, steps, step_size, min_steps)
        except RFIError as e:
            problems.append(f"{key}: {e}")
    if not cfg.optim.lr > 0 or not 0 <= cfg.optim.momentum < 1 or not cfg.optim.weight_decay >= 0:
        problems.append(f"optim.lr must be > 0, optim.momentum in [0, 1) and optim.weight_decay >= 0, got "
                        f"{cfg.optim.lr}, {cfg.optim.momentum}, {cfg.optim.weight_decay}")
    if not 0 <= cfg.adv.mix < 1:
        problems.append(f"adv.mix (fraction of clean examples) must be in [0, 1), got {cfg.adv.mix}")
    if problems:
        raise RFIError("; ".join(problems))


def default_out(cfg: TrainEncoderConfig) -> Path:
    return Path("runs/encoders") / f"{cfg.model.arch}_{'robust' if cfg.adv.enabled else 'standard'}"


def build_optimizer(cfg: OptimConfig, params, total_steps: int):
    """The optimizer and its per-step learning-rate scheduler."""
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                    pct_start=cfg.warmup, cycle_momentum=False)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    return opt, sched


def adversarial_batch(encoder: Encoder, x: Tensor, y: Tensor, adv: AdvConfig, precision: str = "fp32") -> Tensor:
    """The batch the encoder trains on: PGD examples (computed in eval mode), the first ``mix`` kept clean.

    ``precision``: autocast for the attack's forward passes (its steps stay in fp32).
    """
    if not adv.enabled:
        return x
    keep = int(round(adv.mix * x.shape[0]))
    if keep == x.shape[0]:
        return x
    was_training = encoder.training
    encoder.eval()  # as the robustness library: BN uses running statistics during the attack
    x_adv = pgd(encoder.logits, x[keep:], y[keep:], adv.eps, adv.steps, adv.step_size, adv.norm,
                adv.random_start, precision=precision)
    encoder.train(was_training)
    return torch.cat([x[:keep], x_adv]) if keep else x_adv


@torch.no_grad()
def clean_accuracy(encoder: Encoder, dataset: Dataset, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy on ``dataset`` in eval mode."""
    encoder.eval()
    correct = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += (encoder.logits(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / max(len(dataset), 1)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of the ``n`` training items in ``epoch``: a pure function of (n, seed, epoch).

    It is the order the one-process trainer had before DDP and mid-epoch resume existed, so
    its runs keep their batches (and weights): that of ``DataLoader(shuffle=True,
    generator=torch.Generator().manual_seed(seed * 100_003 + epoch))`` iterated through
    ``tqdm.auto``, which opens the loader's iterator twice (each draws a worker base seed
    from the generator) before the permutation is drawn.

    Example:
        >>> epoch_order(5, seed=0, epoch=0).sort().values.tolist()
        [0, 1, 2, 3, 4]
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    for _ in range(2):  # the two worker base seeds of the former loader's two iterators
        torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g)


def shard_positions(n: int, batch_size: int, world: int = 1, rank: int = 0, skip: int = 0) -> list[int]:
    """Positions (in the epoch's order) this rank trains on, from global batch ``skip`` on.

    Global batch ``i`` is positions ``[i * batch_size, (i + 1) * batch_size)``; rank ``r`` of
    ``world`` takes the ``r``-th of its ``world`` equal slices, so the global batch is the
    same set of images for any number of processes. One process keeps the last, partial
    batch; several drop it (every rank needs a full, equal share for DDP's gradient mean).

    Example:
        >>> shard_positions(10, batch_size=4, world=2, rank=1)
        [2, 3, 6, 7]
        >>> shard_positions(10, batch_size=4, skip=2)
        [8, 9]
    """
    if world == 1:
        return list(range(skip * batch_size, n))
    local = batch_size // world
    return [i * batch_size + rank * local + j for i in range(skip, n // batch_size) for j in range(local)]


class _SeededItems(Dataset):
    """Items at given positions of an epoch's order, each drawn with torch's global RNG seeded from
    (seed, epoch, position).

    Used with DataLoader workers: random transforms (crops, flips of folder data) then depend
    neither on the number of workers nor on where a resumed run restarted, so mid-epoch
    resume stays bit-identical with workers too. (Without workers the transforms draw from
    the main process's RNG, whose state the checkpoint holds.)
    """

    def __init__(self, dataset: Dataset, order: Tensor, positions: list[int], seed: int, epoch: int):
        self.dataset, self.order, self.positions = dataset, order, positions
        self.base = (seed * 1_000_003 + epoch) * 10_000_019

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:
        pos = self.positions[i]
        torch.manual_seed((self.base + pos) % (2 ** 63))  # in a worker process: its own RNG
        return self.dataset[int(self.order[pos])]


class _Logits(nn.Module):
    """``encoder.logits`` as a module's forward: what ``DistributedDataParallel`` wraps."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder.logits(x)


# DDP without its buffer broadcast at every forward (train_step broadcasts earlier, before the attack);
# the keyword is ``forward_sync_buffers`` in newer torch, ``broadcast_buffers`` before.
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})

# Running sums of (loss x images, correct, images): per epoch and per log window.
_SUMS = ("loss", "correct", "seen")


class EncoderTrainer:
    """One training run (state + loop) on one process of a (possibly one-process) DDP job.

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
        >>> trainer.train_step(x, y), trainer.step
        (4, 1)
    """

    def __init__(self, cfg: TrainEncoderConfig, ctx: DistContext, device: torch.device):
        self.cfg, self.ctx, self.device = cfg, ctx, device
        self.out = Path(cfg.out) if cfg.out else default_out(cfg)
        self.run_dir = RunDir(self.out, "checkpoint.pt", ctx.main)
        self.ckpt_path = self.run_dir.checkpoint
        train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
        self.train_set, self.val_set = train_set, val_set
        num_classes = cfg.model.num_classes or train_set.num_classes
        if num_classes < train_set.num_classes:
            raise RFIError(f"model.num_classes={num_classes} but the data has {train_set.num_classes} classes")
        if cfg.batch_size % ctx.world:
            raise RFIError(f"batch_size={cfg.batch_size} (the global batch) must be divisible by the "
                           f"{ctx.world} processes")
        self.local_batch = cfg.batch_size // ctx.world
        n = len(train_set)
        self.steps_per_epoch = -(-n // cfg.batch_size) if ctx.world == 1 else n // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise RFIError(f"batch_size={cfg.batch_size} is larger than the {n} training images")
        self.total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * self.steps_per_epoch
        self.epochs = -(-self.total_steps // self.steps_per_epoch)

        seed_everything(cfg.seed, cfg.deterministic)  # same initial weights on every rank
        m = cfg.model
        encoder = Encoder(m.arch, num_classes=num_classes, width=m.width, small_input=m.small_input,
                          batch_norm=m.batch_norm, downsample=m.downsample,
                          **encoder_options(m.options, "model.options")).to(device)
        encoder.check_input_size(cfg.data.size)
        if cfg.sync_batch_norm and ctx.world > 1:
            if device.type != "cuda":
                raise RFIError("sync_batch_norm=true needs CUDA (torch's SyncBatchNorm has no CPU kernel); "
                               "on CPU each process keeps its own batch statistics (sync_batch_norm=false)")
            encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
            encoder.reset_extractors()
        if cfg.channels_last:
            encoder = encoder.to(memory_format=torch.channels_last)
        self.encoder = encoder
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, encoder.parameters(), self.total_steps)
        self.scaler = grad_scaler(device, cfg.precision)
        self.model: nn.Module = _Logits(encoder)
        if ctx.world > 1:
            # Buffers (batch-norm statistics) are broadcast from rank 0 by train_step itself, before
            # the attack, so every rank attacks with the same statistics (DDP would only do it later).
            self.model = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda"
                                                 else None, **_NO_FORWARD_BUFFER_SYNC)
            torch.manual_seed(step_seed(cfg.seed, 0, ctx.rank + 1))  # each rank its own flips, random starts, dropout
        self.step = 0
        self.epoch_sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        self.window = torch.zeros_like(self.epoch_sums)
        self.record: dict[str, Any] | None = None  # the last epoch's metrics

    def info(self, msg: str, *args: Any) -> None:
        if self.ctx.main:
            log.info(msg, *args)

    def _loader(self, epoch: int, skip: int) -> DataLoader:
        """This rank's batches of ``epoch`` (order a pure function of seed and epoch), from global batch ``skip`` on."""
        cfg, ctx = self.cfg, self.ctx
        order = epoch_order(len(self.train_set), cfg.seed, epoch)
        positions = shard_positions(len(order), cfg.batch_size, ctx.world, ctx.rank, skip)
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # worker base seed
        workers = resolve_num_workers(cfg.num_workers, self.train_set)  # None: 0 in memory, CPUs for files
        if workers > 0:
            dataset, sampler = _SeededItems(self.train_set, order, positions, cfg.seed, epoch), None
        else:
            dataset, sampler = self.train_set, order[positions].tolist()
        return DataLoader(dataset, batch_size=self.local_batch, sampler=sampler, num_workers=workers,
                          generator=g, pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        """Write ``checkpoint.pt`` (rank 0) with everything ``--resume`` needs (collective)."""
        epoch_sums, window = self.ctx.sum(self.epoch_sums), self.ctx.sum(self.window)
        rngs = self.ctx.all_gather(rng_state())
        if self.ctx.main:
            train = {"epoch": self.step // self.steps_per_epoch, "step": self.step, "total_steps": self.total_steps,
                     "world_size": self.ctx.world, "config": config_to_dict(self.cfg),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rngs[0], "epoch_sums": epoch_sums.cpu(), "log_window": window.cpu()}
            if self.ctx.world > 1:
                train["rng_ranks"] = rngs
            if self.scaler.is_enabled():
                train["scaler"] = self.scaler.state_dict()
            # Kept so that the final evaluation adds its result without reading the file back.
            self.saved = encoder_checkpoint(self.encoder, train=train,
                                            **({"metrics": self.record} if self.record is not None else {}))
            save_checkpoint(self.saved, self.ckpt_path)
        self.ctx.barrier()

    def restore(self) -> dict[str, Any]:
        ckpt = load_checkpoint(self.ckpt_path)
        if ckpt.get("format") != ENCODER_FORMAT or "train" not in ckpt:
            raise RFIError(f"{self.ckpt_path} is not a training checkpoint of rfi train-encoder: cannot resume from it")
        self.run_dir.check_resume(ckpt["train"]["config"], config_to_dict(self.cfg), RESUME_FREE_KEYS,
                                  config_to_dict(TrainEncoderConfig()))
        train, self.saved = ckpt["train"], ckpt
        load_state_dict_checked(self.encoder, ckpt["state_dict"], str(self.ckpt_path))
        self.optimizer.load_state_dict(train["optimizer"])
        self.scheduler.load_state_dict(train["scheduler"])
        if self.scaler.is_enabled() and "scaler" in train:
            self.scaler.load_state_dict(train["scaler"])
        self.step = train.get("step", train["epoch"] * self.steps_per_epoch)  # epoch-only checkpoints
        rngs = train.get("rng_ranks") or [train["rng"]]
        if len(rngs) == self.ctx.world:
            set_rng_state(rngs[self.ctx.rank])
        else:
            self.info("resuming a %d-process run on %d processes: data order and random draws change from here on",
                      len(rngs), self.ctx.world)
            set_rng_state(train["rng"])
            if self.ctx.world > 1:
                torch.manual_seed(step_seed(self.cfg.seed, self.step, self.ctx.rank + 1))
        if self.ctx.main and "epoch_sums" in train:  # rank 0 carries the (global) sums, the others start at 0
            self.epoch_sums = train["epoch_sums"].to(self.device, torch.float64)
            self.window = train["log_window"].to(self.device, torch.float64)
        self.record = ckpt.get("metrics")
        return ckpt

    # ------------------------------------------------------------------ steps
    def train_step(self, x: Tensor, y: Tensor) -> int:
        """One optimisation step on this rank's share of the global batch (PGD examples if adversarial);
        returns the number of images."""
        cfg, device = self.cfg, self.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.flip:
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        m = cfg.model
        if m.downsample == "lps" or m.options.get("selection") == "learned":  # Gumbel-softmax tau (resume-exact)
            from encoders.nets.downsample import annealed_temperature, set_temperature

            set_temperature(self.encoder, annealed_temperature(self.step / self.total_steps))
        self.ctx.broadcast_buffers(self.encoder)  # every rank attacks and trains from rank 0's statistics
        # The attack runs on the encoder itself (eval mode, no gradient sync); only the step below syncs.
        x_train = adversarial_batch(self.encoder, x, y, cfg.adv, cfg.precision)
        if cfg.channels_last:
            x_train = x_train.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.precision):
            logits = self.model(x_train)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        n = y.shape[0]
        batch = torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=device)])
        self.epoch_sums += batch
        self.window += batch
        return n

    # ------------------------------------------------------------------ loop
    def result(self, evaluation: dict[str, Any] | None = None) -> TrainResult:
        """The run's :class:`~encoders.core.rundir.TrainResult`: the checkpoint, the encoder (eval mode) and the
        last epoch's metrics (``eval``: the final evaluation, when there was one)."""
        metrics = {**(self.record or {}), **({"eval": evaluation} if evaluation else {})}
        return TrainResult(self.ckpt_path, self.encoder.eval(), metrics)

    def run(self, resume: bool) -> TrainResult:
        """Train (or resume) to the end, checkpointing and logging on the way; evaluate at the end."""
        cfg, ctx = self.cfg, self.ctx
        resumed = self.run_dir.has_checkpoint(resume)
        if resumed:
            ckpt = self.restore()
            if self.step >= self.total_steps and (ckpt.get("eval") or not cfg.eval.enabled):
                return self.result(ckpt.get("eval"))
            self.info("resuming %s at step %d of %d (epoch %d of %d)", self.ckpt_path, self.step, self.total_steps,
                      self.step // self.steps_per_epoch + 1, self.epochs)
        ctx.barrier()  # every rank has read the checkpoint before rank 0 may overwrite it
        self.run_dir.write_config(config_to_dict(cfg))
        metrics = self.run_dir.metrics(resume_step=self.step if resumed else None)

        a, m = cfg.adv, cfg.model
        kind = f"adversarial ({a.norm} eps={a.eps}, {a.steps} steps)" if a.enabled else "standard"
        self.info("training %s %s encoder on %d %s images for %d steps (%d epochs) of %d images%s%s -> %s", kind,
                  m.arch, len(self.train_set), cfg.data.source, self.total_steps, self.epochs, cfg.batch_size,
                  f" on {ctx.world} processes" if ctx.world > 1 else "",
                  f", {cfg.precision}" if cfg.precision != "fp32" else "", self.out)
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.encoder.train()
            bar = progress(total=self.steps_per_epoch, initial=offset,
                           desc=f"epoch {epoch + 1}/{self.epochs}") if ctx.main else None
            start, timed = time.perf_counter(), 0
            for x, y in self._loader(epoch, offset):
                timed += self.train_step(x, y) * ctx.world
                if bar is not None:
                    bar.update(1)
                if cfg.log_every > 0 and self.step % cfg.log_every == 0:
                    loss, correct, seen = ctx.sum(self.window).tolist()
                    metrics.write(step=self.step, epoch=epoch + 1, lr=self.scheduler.get_last_lr()[0],
                                  loss=loss / seen, acc=correct / seen)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
                    self.window.zero_()
                end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not end_of_epoch:
                    self.save()
                if self.step >= self.total_steps:
                    break
            seconds = time.perf_counter() - start
            if bar is not None:
                bar.close()
            loss, correct, seen = ctx.sum(self.epoch_sums).tolist()
            self.epoch_sums.zero_()
            if ctx.main:
                val_acc = clean_accuracy(self.encoder, self.val_set, 2 * cfg.batch_size, self.device)
                self.record = {"step": self.step, "epoch": epoch + 1, "train_loss": loss / max(seen, 1),
                               "train_acc": correct / max(seen, 1), "val_acc": val_acc,
                               "images_per_s": timed / seconds, "epoch_seconds": seconds}
                metrics.write(**self.record)
                log.info("epoch %d/%d: train loss %.3f, train acc %.3f, val acc %.3f (%.0f images/s)", epoch + 1,
                         self.epochs, self.record["train_loss"], self.record["train_acc"], val_acc,
                         self.record["images_per_s"])
            self.save()

        # Every rank ends with rank 0's batch-norm statistics (the checkpoint's).
        ctx.broadcast_buffers(self.encoder)
        evaluation = None
        if cfg.eval.enabled and ctx.main:
            evaluation = _final_eval(self.encoder, self.val_set, cfg, self.saved, self.ckpt_path, metrics,
                                     self.total_steps, self.device, self.epochs)
        ctx.barrier()
        return self.result(evaluation)


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


def _final_eval(encoder: Encoder, val_set: Dataset, cfg: TrainEncoderConfig, ckpt: dict[str, Any], ckpt_path: Path,
                metrics: MetricsLog, step: int, device: torch.device, epochs: int | None = None) -> dict[str, Any]:
    from encoders.robust.evaluate import evaluate_encoder

    eps = cfg.adv.eps if cfg.eval.eps is None else cfg.eval.eps
    result = evaluate_encoder(encoder, val_set, eps=eps, steps=cfg.eval.steps, norm=cfg.eval.norm or cfg.adv.norm,
                              batch_size=2 * cfg.batch_size, max_images=cfg.eval.max_images, device=device)
    metrics.write(step=step, epoch=epochs or cfg.epochs, eval=result)
    write_json(result, ckpt_path.parent / "eval.json")
    ckpt["eval"] = result
    save_checkpoint(ckpt, ckpt_path)
    log.info("validation: clean acc %.3f, PGD-%d (%s, eps=%g) acc %.3f", result["clean_acc"], result["steps"],
             result["norm"], result["eps"], result["pgd_acc"])
    return result
