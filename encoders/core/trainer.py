"""The training scaffold every RFI trainer subclasses (``rfi train-encoder``, ``train-decoder`` and the
jobs built on it): what a run does besides its own step.

:class:`Trainer` owns the run folder (:class:`~encoders.core.rundir.RunDir`, locked by
:func:`run_trainer`), the "checkpoint exists: pass --resume" guard and the config-diff check on
``--resume``, ``config.yaml``, ``metrics.jsonl`` and its logging window, the progress bar, the step
loop over per-epoch loaders, ``checkpoint_every`` and end-of-epoch checkpoints, the optimiser /
scheduler / grad-scaler / RNG state (per rank under DDP) and the barriers between ranks. A trainer
implements its :meth:`Trainer.train_step`, its end-of-epoch validation, its checkpoint payload and
its final evaluation (see the hooks below).

Data order, one way: the items of epoch ``e`` are visited in :meth:`Trainer.epoch_order` (a pure
function of the seed and ``e``); global batch ``i`` is positions ``[i * batch, (i + 1) * batch)``
of that order, and each DDP rank takes its slice of every global batch (:func:`shard_positions`),
so a run resumed at step ``s`` skips exactly the batches already done. With DataLoader workers
each item's random transform is seeded by its position (:class:`_SeededItems`); without them it
draws from the main process's RNG, whose state the checkpoint holds. Same seed and config: a
resumed run ends bit-identical to an uninterrupted one on CPU.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Job:
    ...     epochs: int = 2
    ...     steps: int = 0
    ...     batch_size: int = 4
    ...     seed: int = 0
    ...     log_every: int = 0
    ...     checkpoint_every: int = 0
    >>> class Mean(Trainer):
    ...     def __init__(self, cfg, ctx, device, out):
    ...         super().__init__(cfg, ctx, device, out, torch.arange(8.0))
    ...         self.module = nn.Linear(1, 1)
    ...         self.optimizers = {"optimizer": torch.optim.SGD(self.module.parameters(), lr=0.1)}
    ...         self.scheduler = torch.optim.lr_scheduler.ConstantLR(self.optimizers["optimizer"], 1.0)
    ...     def train_step(self, x):
    ...         loss = (self.module(x[:, None]) - x[:, None]).pow(2).mean()
    ...         loss.backward()
    ...         self.optimizers["optimizer"].step()
    ...         self.scheduler.step()
    ...         self.step += 1
    ...         return {"loss": loss.detach()}
    ...     def checkpoint(self, train):
    ...         return {"state_dict": self.module.state_dict(), "train": train}
    ...     def training_state(self, ckpt):
    ...         return ckpt["train"], {}
    ...     def load_payload(self, ckpt):
    ...         self.module.load_state_dict(ckpt["state_dict"])
    ...     def result(self):
    ...         return TrainResult(self.ckpt_path, self.module, {"step": self.step})
    >>> import tempfile
    >>> run_trainer(lambda ctx, device: Mean(Job(), ctx, device, Path(tempfile.mkdtemp())), "cpu").metrics
    {'step': 4}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from encoders.core.config import config_to_dict
from encoders.core.errors import RFIError
from encoders.core.rundir import RunDir, TrainResult, lock_for_run, step_seed
from encoders.core.runtime import (
    DistContext,
    MetricsLog,
    check_precision,
    grad_scaler,
    progress,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
)
from encoders.core.serialization import load_checkpoint, save_checkpoint

log = logging.getLogger("rfi")


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of the ``n`` training items in ``epoch``: a pure function of (n, seed, epoch).

    It is the order encoder training had before DDP and mid-epoch resume existed, so its runs
    keep their batches (and weights): that of ``DataLoader(shuffle=True,
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


def shard_positions(
    n: int, batch_size: int, world: int = 1, rank: int = 0, skip: int = 0, drop_last: bool = False
) -> list[int]:
    """Positions (in the epoch's order) this rank trains on, from global batch ``skip`` on.

    Global batch ``i`` is positions ``[i * batch_size, (i + 1) * batch_size)``; rank ``r`` of
    ``world`` takes the ``r``-th of its ``world`` equal slices, so the global batch is the
    same set of items for any number of processes. One process keeps the last, partial
    batch unless ``drop_last``; several always drop it (every rank needs a full, equal share
    for DDP's gradient mean).

    Example:
        >>> shard_positions(10, batch_size=4, world=2, rank=1)
        [2, 3, 6, 7]
        >>> shard_positions(10, batch_size=4, skip=2)
        [8, 9]
    """
    if world == 1 and not drop_last:
        return list(range(skip * batch_size, n))
    local = batch_size // world
    return [i * batch_size + rank * local + j for i in range(skip, n // batch_size) for j in range(local)]


class _SeededItems(Dataset):
    """Items at given positions of an epoch's order, each drawn with torch's global RNG seeded from
    (seed, epoch, position).

    Used with DataLoader workers: random transforms (crops, flips of folder data) then depend
    neither on the number of workers nor on where a resumed run restarted, so mid-epoch
    resume stays bit-identical with workers too.
    """

    def __init__(self, dataset: Dataset, order: Tensor, positions: list[int], seed: int, epoch: int):
        self.dataset, self.order, self.positions = dataset, order, positions
        self.base = (seed * 1_000_003 + epoch) * 10_000_019

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:
        pos = self.positions[i]
        torch.manual_seed((self.base + pos) % (2**63))  # in a worker process: its own RNG
        return self.dataset[int(self.order[pos])]


class Trainer:
    """One training run (state + loop) on one process of a (possibly one-process) DDP job.

    The config ``cfg`` is read for ``epochs``, ``steps`` (> 0: exactly that many steps, else
    ``epochs`` passes), ``batch_size`` (global), ``seed``, ``log_every``, ``checkpoint_every`` and,
    when it has them, ``deterministic`` (default true) and ``precision`` (the grad scaler's,
    default ``fp32``); ``config_to_dict(cfg)`` is what ``config.yaml`` and the resume check see.

    A subclass calls ``super().__init__`` (which seeds torch) before building its models, then sets
    ``module`` (the trained module: its buffers end as rank 0's), ``optimizers`` (``{checkpoint
    key: optimizer}``) and ``scheduler`` (stepped by its ``train_step``), and implements:

    - :meth:`train_step` ``(*inputs) -> {name: per-step sum}``: one step, ``self.step += 1``;
    - :meth:`checkpoint` ``(train) -> payload``; :meth:`training_state` ``(payload) -> (train,
      config)``; :meth:`load_payload` ``(payload)``: its checkpoint format around the scaffold's
      ``train`` state;
    - :meth:`result` ``() -> TrainResult``;

    and may override :meth:`step_inputs`, :meth:`epoch_order`, :meth:`log_values`,
    :meth:`after_step`, :meth:`end_epoch`, :meth:`finish`, :meth:`final_evaluation`,
    :meth:`finished`, :meth:`rebuild_scheduler` and :meth:`describe`.

    Args:
        cfg: the run's config (a dataclass).
        ctx: the process group, from :func:`encoders.core.runtime.setup_distributed`.
        device: this process's device.
        out: the run folder.
        train_set: the training items (a dataset; batches are collated by a ``DataLoader``).
        num_workers: DataLoader worker processes.
    """

    name = "train"
    """The progress bar's label."""
    checkpoint_name = "checkpoint.pt"
    resume_free_keys: tuple[str, ...] = ()
    """Config keys that may differ between a run and its ``--resume`` (and every key below them)."""
    drop_last = True
    """One process also drops an epoch's last, partial batch (several processes always do)."""

    def __init__(
        self, cfg: Any, ctx: DistContext, device: torch.device, out: Path, train_set: Dataset, num_workers: int = 0
    ):
        self.cfg, self.ctx, self.device, self.out = cfg, ctx, device, Path(out)
        self.run_dir = RunDir(self.out, self.checkpoint_name, ctx.main)
        self.ckpt_path = self.run_dir.checkpoint
        self.train_set, self.num_workers = train_set, num_workers
        if cfg.batch_size % ctx.world:
            raise RFIError(
                f"batch_size={cfg.batch_size} (the global batch) must be divisible by the {ctx.world} processes"
            )
        self.local_batch = cfg.batch_size // ctx.world
        n = len(train_set)
        whole = self.drop_last or ctx.world > 1
        self.steps_per_epoch = n // cfg.batch_size if whole else -(-n // cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise RFIError(f"batch_size={cfg.batch_size} is larger than the {n} training items")
        self.total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * self.steps_per_epoch
        seed_everything(cfg.seed, getattr(cfg, "deterministic", True))  # same initial weights on every rank
        self.scaler = grad_scaler(device, getattr(cfg, "precision", "fp32"))  # enabled for fp16 only
        self.module: nn.Module
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        self.step = 0
        # Per-rank sums of train_step's values since the last log line and since the epoch began (float64;
        # in checkpoints summed over ranks, so a resumed run logs what an uninterrupted one would).
        self.window: dict[str, Tensor] = {}
        self.window_steps = 0
        self.epoch_sums: dict[str, Tensor] = {}
        self.last_log: dict[str, float] = {}  # the last metrics line's values
        self.saved: dict[str, Any] | None = None  # rank 0: the last checkpoint written
        # Wall seconds of training over every session of the run (checkpointed), counted from step
        # ``timed_from_step`` (0, or where a checkpoint written before runs were timed was resumed).
        self.train_seconds, self.timed_from_step = 0.0, 0
        self._clock = time.perf_counter()
        self.metrics: MetricsLog
        self.bar: Any = None  # rank 0's progress bar, during run()

    def elapsed(self) -> float:
        """Wall seconds of training so far, over every session of the run (see ``timed_from_step``)."""
        return self.train_seconds + time.perf_counter() - self._clock

    @property
    def epochs(self) -> int:
        """The number of (started) epochs of the run."""
        return -(-self.total_steps // self.steps_per_epoch)

    def info(self, msg: str, *args: Any) -> None:
        """Log on rank 0 only."""
        if self.ctx.main:
            log.info(msg, *args)

    # ------------------------------------------------------------------ hooks
    def train_step(self, *inputs: Tensor) -> dict[str, Tensor]:
        """One optimisation step on this rank's share of a global batch; returns per-step sums for the metrics
        window (e.g. ``{"loss": loss}``). Steps the scheduler and increments ``self.step``."""
        raise NotImplementedError

    def step_inputs(self, batch: Any) -> tuple[Tensor, ...]:
        """The arguments of :meth:`train_step` from a collated batch (default: its items)."""
        return tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)

    def epoch_order(self, epoch: int) -> Tensor:
        """The order of the training items in ``epoch``: a pure function of the seed and ``epoch``."""
        return epoch_order(len(self.train_set), self.cfg.seed, epoch)

    def log_values(self, sums: Mapping[str, float], steps: int) -> dict[str, float]:
        """A metrics line's values from the window's sums over ranks and ``steps`` steps (default: the means)."""
        return {k: v / (steps * self.ctx.world) for k, v in sums.items()}

    def after_step(self) -> None:
        """Called after every step and its logging (e.g. sample images)."""

    def end_epoch(self, epoch: int, sums: Mapping[str, float], images_per_s: float) -> None:
        """Called on every rank at the end of ``epoch`` (0-based) with the epoch's sums over ranks:
        validation and the epoch's metrics line."""

    def finish(self) -> None:
        """Called once the last step is done, before the final checkpoint (e.g. the final samples)."""

    def final_evaluation(self) -> None:
        """Called after the final checkpoint (e.g. an evaluation added to it)."""

    def finished(self, ckpt: dict[str, Any]) -> bool:
        """Whether a checkpoint at the run's last step needs nothing more (default: true)."""
        return True

    def rebuild_scheduler(self) -> None:
        """Make ``self.scheduler`` for ``self.step`` of ``self.total_steps``, for a checkpoint without
        scheduler state or with another number of steps (an extended run)."""
        raise RFIError(
            f"{self.ckpt_path} holds no scheduler state for a run of {self.total_steps} steps: "
            f"cannot resume it (choose another --out)"
        )

    def describe(self) -> str:
        """The log line that says what the run trains."""
        return f"{self.name}: {self.total_steps} steps of {self.cfg.batch_size} items -> {self.out}"

    def checkpoint(self, train: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint to write, holding the scaffold's ``train`` state (step, optimisers, RNG, ...)."""
        raise NotImplementedError

    def training_state(self, ckpt: dict[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
        """``(train state, the run's config)`` of a checkpoint :meth:`checkpoint` wrote.

        Raises:
            RFIError: the file is not a training checkpoint of this trainer.
        """
        raise NotImplementedError

    def load_payload(self, ckpt: dict[str, Any]) -> None:
        """Load the weights (and whatever else the trainer keeps) from a checkpoint being resumed."""
        raise NotImplementedError

    def result(self) -> TrainResult:
        """The run's checkpoint, trained module (eval mode) and final metrics."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data
    def batches(self, epoch: int, skip: int) -> DataLoader:
        """This rank's batches of ``epoch`` (order :meth:`epoch_order`), from global batch ``skip`` on."""
        cfg, ctx = self.cfg, self.ctx
        order = self.epoch_order(epoch)
        positions = shard_positions(len(order), cfg.batch_size, ctx.world, ctx.rank, skip, self.drop_last)
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # worker base seed
        if self.num_workers > 0:
            dataset, sampler = _SeededItems(self.train_set, order, positions, cfg.seed, epoch), None
        else:
            dataset, sampler = self.train_set, order[positions].tolist()
        return DataLoader(
            dataset,
            batch_size=self.local_batch,
            sampler=sampler,
            num_workers=self.num_workers,
            generator=g,
            pin_memory=self.device.type == "cuda",
        )

    # ------------------------------------------------------------------ state
    def _add(self, sums: dict[str, Tensor], values: Mapping[str, Tensor | float]) -> None:
        for k, v in values.items():
            v = torch.as_tensor(v, device=self.device).detach().double()
            sums[k] = sums[k] + v if k in sums else v

    def _totals(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """``sums`` summed over ranks (collective: every rank has the same keys)."""
        if not sums:
            return {}
        names = sorted(sums)
        return dict(zip(names, self.ctx.sum(torch.stack([sums[k] for k in names])).tolist()))

    def _restart(self, totals: Mapping[str, float]) -> dict[str, Tensor]:
        """Restored sums: rank 0 carries the totals, the other ranks start from 0."""
        return {
            k: torch.tensor(v if self.ctx.main else 0.0, dtype=torch.float64, device=self.device)
            for k, v in totals.items()
        }

    def save(self) -> None:
        """Write the checkpoint (rank 0) with everything ``--resume`` needs (collective)."""
        window, epoch_sums = self._totals(self.window), self._totals(self.epoch_sums)
        rngs = self.ctx.all_gather(rng_state())
        if self.ctx.main:
            train = {
                "step": self.step,
                "epoch": self.step // self.steps_per_epoch,
                "total_steps": self.total_steps,
                "complete": self.step >= self.total_steps,
                "world_size": self.ctx.world,
                **{key: opt.state_dict() for key, opt in self.optimizers.items()},
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs[0],
                "log_window": {"steps": self.window_steps, "sums": window},
                "epoch_sums": epoch_sums,
                "seconds": self.elapsed(),
                "timed_from_step": self.timed_from_step,
            }
            if self.ctx.world > 1:
                train["rng_ranks"] = rngs
            if self.scaler.is_enabled():
                train["scaler"] = self.scaler.state_dict()
            self.saved = self.checkpoint(train)
            save_checkpoint(self.saved, self.ckpt_path)
        self.ctx.barrier()

    def restore(self) -> dict[str, Any]:
        """Load the checkpoint being resumed (after checking that its config is the run's); returns it."""
        ckpt = load_checkpoint(self.ckpt_path)
        train, config = self.training_state(ckpt)
        self.run_dir.check_resume(
            config, config_to_dict(self.cfg), self.resume_free_keys, config_to_dict(type(self.cfg)())
        )
        self.load_payload(ckpt)
        for key, opt in self.optimizers.items():
            opt.load_state_dict(train[key])
        if self.scaler.is_enabled() and "scaler" in train:
            self.scaler.load_state_dict(train["scaler"])
        self.step = train["step"] if "step" in train else train["epoch"] * self.steps_per_epoch  # epoch-only files
        if "scheduler" in train and train["total_steps"] == self.total_steps:
            self.scheduler.load_state_dict(train["scheduler"])
        else:
            self.rebuild_scheduler()
        rngs = train.get("rng_ranks") or [train["rng"]]
        if len(rngs) == self.ctx.world:
            set_rng_state(rngs[self.ctx.rank])
        else:
            self.info(
                "resuming a %d-process run on %d processes: data order and random draws change from here on",
                len(rngs),
                self.ctx.world,
            )
            set_rng_state(train["rng"])
            if self.ctx.world > 1:
                torch.manual_seed(step_seed(self.cfg.seed, self.step, self.ctx.rank + 1))
        window = train.get("log_window", {"steps": 0, "sums": {}})
        self.window, self.window_steps = self._restart(window["sums"]), window["steps"]
        self.epoch_sums = self._restart(train.get("epoch_sums", {}))
        self.train_seconds = float(train.get("seconds", 0.0))
        self.timed_from_step = int(train.get("timed_from_step", 0 if "seconds" in train else self.step))
        return ckpt

    # ------------------------------------------------------------------ loop
    def _log(self, epoch: int, lr: float, seconds: float, images: int) -> None:
        """Write the metrics line of the window that ends at this step (collective)."""
        values = self.log_values(self._totals(self.window), self.window_steps)
        self.last_log = {"lr": lr, "images_per_s": images / max(seconds, 1e-9), **values}
        timed = {"train_seconds": round(self.elapsed(), 1)}
        if self.timed_from_step:
            timed["timed_from_step"] = self.timed_from_step
        self.metrics.write(step=self.step, epoch=epoch + 1, **self.last_log, **timed)
        if self.bar is not None:
            self.bar.set_postfix(
                {**{k: f"{v:.4f}" for k, v in values.items()}, "img/s": f"{self.last_log['images_per_s']:.0f}"},
                refresh=False,
            )
        self.window, self.window_steps = {}, 0

    def run(self, resume: bool) -> TrainResult:
        """Train (or resume) to the end, checkpointing and logging on the way; then the final evaluation."""
        cfg, ctx = self.cfg, self.ctx
        resumed = self.run_dir.has_checkpoint(resume)
        if resumed:
            ckpt = self.restore()
            if self.step >= self.total_steps and self.finished(ckpt):
                self.info("%s is already complete (%d steps)", self.ckpt_path, self.step)
                return self.result()
            self.info(
                "resuming %s at step %d of %d (epoch %d of %d)",
                self.ckpt_path,
                self.step,
                self.total_steps,
                self.step // self.steps_per_epoch + 1,
                self.epochs,
            )
        elif ctx.world > 1:
            torch.manual_seed(step_seed(cfg.seed, 0, ctx.rank + 1))  # each rank its own random draws
        ctx.barrier()  # every rank has read the checkpoint before rank 0 may overwrite it
        self.run_dir.write_config(config_to_dict(cfg))
        self.metrics = self.run_dir.metrics(resume_step=self.step if resumed else None)
        self.info("%s", self.describe())

        self._clock = time.perf_counter()  # this session's training starts now (restored seconds before it)
        self.bar = progress(total=self.total_steps, initial=self.step, desc=self.name) if ctx.main else None
        window_start, window_images = time.perf_counter(), 0
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            epoch_start, epoch_images = time.perf_counter(), 0
            for batch in self.batches(epoch, offset):
                inputs = self.step_inputs(batch)
                lr = self.scheduler.get_last_lr()[0]  # the step's learning rate
                values = self.train_step(*inputs)
                images = len(inputs[0]) * ctx.world
                epoch_images += images
                window_images += images
                self._add(self.window, values)
                self._add(self.epoch_sums, values)
                self.window_steps += 1
                if self.bar is not None:
                    self.bar.update(1)
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    self._log(epoch, lr, time.perf_counter() - window_start, window_images)
                    window_start, window_images = time.perf_counter(), 0
                self.after_step()
                end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not end_of_epoch:
                    self.save()
                if self.step >= self.total_steps:
                    break
            seconds = time.perf_counter() - epoch_start
            sums, self.epoch_sums = self._totals(self.epoch_sums), {}
            self.end_epoch(epoch, sums, epoch_images / max(seconds, 1e-9))
            if self.step < self.total_steps:
                self.save()
        if self.bar is not None:
            self.bar.close()
        ctx.broadcast_buffers(self.module)  # every rank ends with rank 0's buffers (the checkpoint's)
        self.finish()
        self.save()
        self.final_evaluation()
        ctx.barrier()
        return self.result()


def run_trainer(
    build: Callable[[DistContext, torch.device], Trainer], device: str, precision: str = "fp32", resume: bool = False
) -> TrainResult:
    """Run a trainer as every ``train_*`` function does: on this process of a (possibly one-process) DDP
    job, with its folder locked (:func:`~encoders.core.rundir.lock_for_run`).

    Args:
        build: ``build(ctx, device)`` makes the trainer.
        device: the config's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...).
        precision: the config's ``precision`` (checked against the device).
        resume: passed to :meth:`Trainer.run`.

    Returns:
        What the trainer's ``run`` returns. The process group is destroyed at the end if this
        call created it (see :func:`encoders.core.runtime.setup_distributed`).
    """
    ctx, dev = setup_distributed(device)
    try:
        check_precision(precision, dev)  # e.g. bf16 on a GPU without it
        trainer = build(ctx, dev)
        with lock_for_run(trainer.out, ctx):  # one run per folder
            return trainer.run(resume)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()
