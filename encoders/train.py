"""Standard and adversarial (PGD) training of encoders: ``rfi train-encoder``.

One config (:class:`TrainEncoderConfig`, YAML in ``configs/encoder/``) describes a run.
Every epoch writes ``<out>/checkpoint.pt`` atomically: an RFI encoder checkpoint (load it
with ``encoders.create_encoder(checkpoint=...)``) that also holds the optimizer,
scheduler and RNG state, so ``--resume`` continues exactly where the run stopped (same
seed and config give the same final weights as an uninterrupted run on CPU). A run also
writes ``metrics.jsonl`` (loss, accuracy, images/s) and the resolved ``config.yaml``; at
the end it evaluates clean and PGD accuracy on the validation split (``eval.json``).

Example:
    >>> from encoders.config import load_config
    >>> cfg = load_config(TrainEncoderConfig, "configs/encoder/resnet18_robust.yaml",
    ...                   ["epochs=1", "out=/tmp/rfi-doc-run"])  # doctest: +SKIP
    >>> path = train_encoder(cfg)                                  # doctest: +SKIP
    >>> encoder = create_encoder(checkpoint=path)                  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from encoders.attacks import NORMS, pgd
from encoders.checkpoints import ENCODER_FORMAT, load_state_dict_checked, save_encoder
from encoders.config import add_job_arguments, config_to_dict, load_config
from encoders.data import DataConfig, build_dataset
from encoders.errors import RFIError
from encoders.models import Encoder
from encoders.runtime import MetricsLog, progress, resolve_device, rng_state, seed_everything, set_rng_state
from encoders.serialization import atomic_write, load_checkpoint, save_checkpoint

log = logging.getLogger("rfi")

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
# Keys that may differ between a run and its ``--resume`` (they do not change the result).
RESUME_FREE_KEYS = ("out", "device", "log_every", "num_workers", "eval")


@dataclass
class ModelConfig:
    """The encoder (see :class:`encoders.models.Encoder`); ``num_classes`` defaults to the dataset's.

    ``downsample``: ``stride``, ``blurpool`` or ``lps`` (see :mod:`encoders.downsample`; LPS
    anneals its Gumbel-softmax temperature over the run).
    """

    arch: str = "resnet18"
    width: float = 0.25
    small_input: bool = True
    num_classes: int | None = None
    batch_norm: bool = False
    downsample: str = "stride"


@dataclass
class OptimConfig:
    """Optimizer (``sgd`` with Nesterov momentum, or ``adamw``) and learning-rate schedule.

    ``schedule``: ``onecycle`` (warm-up for ``warmup`` of the steps, then cosine decay),
    ``cosine`` or ``constant``; ``lr`` is the peak learning rate.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.2


@dataclass
class AdvConfig:
    """Adversarial training: PGD examples replace the clean ones when ``enabled``.

    ``norm``: ``l2`` or ``linf``; ``eps``: radius; ``steps``; ``step_size`` (default
    ``2.5 * eps / steps``); ``random_start``; ``mix``: fraction of each batch kept clean.
    """

    enabled: bool = False
    norm: str = "l2"
    eps: float = 0.5
    steps: int = 3
    step_size: float | None = None
    random_start: bool = True
    mix: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation on the validation split after training (``eps``/``norm`` default to ``adv``'s)."""

    enabled: bool = True
    eps: float | None = None
    norm: str | None = None
    steps: int = 10
    max_images: int | None = 1000


@dataclass
class TrainEncoderConfig:
    """A training run of ``rfi train-encoder`` (YAML: ``configs/encoder/*.yaml``).

    ``out`` defaults to ``runs/encoders/<config name>`` on the command line (in Python:
    ``runs/encoders/<arch>_<robust|standard>``). ``flip``: random horizontal flips.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    epochs: int = 4
    batch_size: int = 128
    flip: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    out: str | None = None
    log_every: int = 20


def check_config(cfg: TrainEncoderConfig) -> None:
    """Reject values no run could use, naming the key (architecture names are checked by the encoder)."""
    problems = []
    if cfg.epochs < 1:
        problems.append(f"epochs must be >= 1, got {cfg.epochs}")
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
    if cfg.adv.eps < 0 or cfg.adv.steps < 0 or (cfg.eval.eps is not None and cfg.eval.eps < 0):
        problems.append("adv.eps, adv.steps and eval.eps must be non-negative")
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


def adversarial_batch(encoder: Encoder, x: Tensor, y: Tensor, adv: AdvConfig) -> Tensor:
    """The batch the encoder trains on: PGD examples (computed in eval mode), the first ``mix`` kept clean."""
    if not adv.enabled:
        return x
    keep = int(round(adv.mix * x.shape[0]))
    if keep == x.shape[0]:
        return x
    was_training = encoder.training
    encoder.eval()  # as the robustness library: BN uses running statistics during the attack
    x_adv = pgd(encoder.logits, x[keep:], y[keep:], adv.eps, adv.steps, adv.step_size, adv.norm,
                adv.random_start)
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


def _loader(dataset: Dataset, cfg: TrainEncoderConfig, epoch: int, device: torch.device) -> DataLoader:
    # Data order is a pure function of (seed, epoch), so a resumed run sees the same batches.
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=g,
                      num_workers=cfg.num_workers, pin_memory=device.type == "cuda")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _resume_state(path: Path, cfg: TrainEncoderConfig) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != ENCODER_FORMAT or "train" not in ckpt:
        raise RFIError(f"{path} is not a training checkpoint of rfi train-encoder: cannot resume from it")
    old, new = _flat(ckpt["train"]["config"]), _flat(config_to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new))
               if k.split(".")[0] not in RESUME_FREE_KEYS and old.get(k) != new.get(k)]
    if changed:
        raise RFIError(f"cannot resume {path}: the config differs in {', '.join(changed)} "
                       f"(use the run's {path.parent / 'config.yaml'} or another --out)")
    return ckpt


def train_encoder(cfg: TrainEncoderConfig, resume: bool = False) -> Path:
    """Train an encoder as ``cfg`` says; returns the final checkpoint's path.

    Args:
        cfg: the run's config.
        resume: continue from ``<out>/checkpoint.pt`` if present (same config required);
            without it, an existing checkpoint there is an error, never overwritten.

    Returns:
        ``<out>/checkpoint.pt``, loadable with ``encoders.create_encoder(checkpoint=path)``.

    Raises:
        RFIError: bad config values, data that cannot be read, or a checkpoint in the way.
    """
    check_config(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    ckpt_path = out / "checkpoint.pt"
    device = resolve_device(cfg.device)
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    num_classes = cfg.model.num_classes or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise RFIError(f"model.num_classes={num_classes} but the data has {train_set.num_classes} classes")

    seed_everything(cfg.seed)
    m = cfg.model
    encoder = Encoder(m.arch, num_classes=num_classes, width=m.width, small_input=m.small_input,
                      batch_norm=m.batch_norm, downsample=m.downsample).to(device)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    optimizer, scheduler = build_optimizer(cfg.optim, encoder.parameters(), cfg.epochs * steps_per_epoch)

    start_epoch, ckpt = 0, None
    if ckpt_path.exists():
        if not resume:
            raise RFIError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
        ckpt = _resume_state(ckpt_path, cfg)
        load_state_dict_checked(encoder, ckpt["state_dict"], str(ckpt_path))
        optimizer.load_state_dict(ckpt["train"]["optimizer"])
        scheduler.load_state_dict(ckpt["train"]["scheduler"])
        set_rng_state(ckpt["train"]["rng"])
        start_epoch = ckpt["train"]["epoch"]
        log.info("resuming %s after epoch %d of %d", ckpt_path, start_epoch, cfg.epochs)
    elif resume:
        log.info("nothing to resume in %s: starting a new run", out)
    if ckpt is not None and start_epoch >= cfg.epochs and (ckpt.get("eval") or not cfg.eval.enabled):
        return ckpt_path

    out.mkdir(parents=True, exist_ok=True)
    resolved = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(resolved))
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_epoch * steps_per_epoch if ckpt else None)

    kind = f"adversarial ({cfg.adv.norm} eps={cfg.adv.eps}, {cfg.adv.steps} steps)" if cfg.adv.enabled else "standard"
    log.info("training %s %s encoder on %d %s images for %d epochs -> %s",
             kind, m.arch, len(train_set), cfg.data.source, cfg.epochs, out)
    for epoch in range(start_epoch, cfg.epochs):
        encoder.train()
        step = epoch * steps_per_epoch
        sums = {"loss": 0.0, "correct": 0, "seen": 0}
        window = dict(sums)
        bar = progress(_loader(train_set, cfg, epoch, device), total=steps_per_epoch,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}")
        start = time.perf_counter()
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.flip:
                x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
            if m.downsample == "lps":  # Gumbel-softmax temperature: a pure function of the step (resume-exact)
                from encoders.downsample import annealed_temperature, set_temperature

                set_temperature(encoder, annealed_temperature(step / (cfg.epochs * steps_per_epoch)))
            x_train = adversarial_batch(encoder, x, y, cfg.adv)
            logits = encoder.logits(x_train)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            batch = {"loss": loss.item() * y.shape[0], "correct": (logits.argmax(1) == y).sum().item(),
                     "seen": y.shape[0]}
            for acc in (sums, window):
                for k, v in batch.items():
                    acc[k] += v
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}",
                            acc=f"{sums['correct'] / sums['seen']:.3f}", refresh=False)
            if cfg.log_every > 0 and step % cfg.log_every == 0:
                metrics.write(step=step, epoch=epoch + 1, lr=scheduler.get_last_lr()[0],
                              loss=window["loss"] / window["seen"], acc=window["correct"] / window["seen"])
                window = {k: 0 for k in window}
        seconds = time.perf_counter() - start
        bar.close()
        val_acc = clean_accuracy(encoder, val_set, 2 * cfg.batch_size, device)
        record = {"step": step, "epoch": epoch + 1, "train_loss": sums["loss"] / max(sums["seen"], 1),
                  "train_acc": sums["correct"] / max(sums["seen"], 1), "val_acc": val_acc,
                  "images_per_s": sums["seen"] / seconds, "epoch_seconds": seconds}
        metrics.write(**record)
        log.info("epoch %d/%d: train loss %.3f, train acc %.3f, val acc %.3f (%.0f images/s)", epoch + 1,
                 cfg.epochs, record["train_loss"], record["train_acc"], val_acc, record["images_per_s"])
        save_encoder(encoder, ckpt_path, train={
            "epoch": epoch + 1, "config": config_to_dict(cfg), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state()}, metrics=record)

    if cfg.eval.enabled:
        _final_eval(encoder, val_set, cfg, ckpt_path, metrics, cfg.epochs * steps_per_epoch, device)
    return ckpt_path


def _final_eval(encoder: Encoder, val_set: Dataset, cfg: TrainEncoderConfig, ckpt_path: Path,
                metrics: MetricsLog, step: int, device: torch.device) -> None:
    from encoders.evaluate import evaluate_encoder, write_json

    eps = cfg.adv.eps if cfg.eval.eps is None else cfg.eval.eps
    result = evaluate_encoder(encoder, val_set, eps=eps, steps=cfg.eval.steps, norm=cfg.eval.norm or cfg.adv.norm,
                              batch_size=2 * cfg.batch_size, max_images=cfg.eval.max_images, device=device)
    metrics.write(step=step, epoch=cfg.epochs, eval=result)
    write_json(result, ckpt_path.parent / "eval.json")
    ckpt = load_checkpoint(ckpt_path)
    ckpt["eval"] = result
    save_checkpoint(ckpt, ckpt_path)
    log.info("validation: clean acc %.3f, PGD-%d (%s, eps=%g) acc %.3f", result["clean_acc"], result["steps"],
             result["norm"], result["eps"], result["pgd_acc"])


def register_train_encoder(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, None, "epochs=2 adv.eps=1.0 data.source=folder data.root=imgs",
                      "output folder (default: runs/encoders/<config name>)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TrainEncoderConfig, args.config, args.overrides)
    if args.out:
        cfg.out = args.out
    elif not cfg.out:
        cfg.out = str(Path("runs/encoders") / Path(args.config).stem)
    path = train_encoder(cfg, resume=args.resume)
    print(path)
    return 0
