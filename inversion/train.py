"""Decoder training, on one process or many (DDP through ``torchrun``).

``rfi train-decoder`` is :mod:`apps.commands.train_decoder`.

One config (:class:`TrainDecoderConfig`, YAML in ``configs/decoder/``) describes a run: a
frozen encoder checkpoint and the layer to invert, the decoder's shape, the data and the
loss weights (pixel, feature, LPIPS, adversarial; 0 switches a term off). A run writes to
``<out>/``:

- ``decoder.pt``: written atomically at the end of every epoch (and every
  ``checkpoint_every`` steps); a decoder checkpoint that
  ``inversion.RobustAutoencoder.from_checkpoints(encoder, decoder)`` loads, which also
  holds the training state (optimisers, discriminator, step, RNG), so ``--resume``
  continues exactly where a killed run stopped (same seed and config give bit-identical
  weights to an uninterrupted run on CPU).
- ``metrics.jsonl``: loss terms, learning rate and images/s every ``log_every`` steps, and
  the validation PSNR on held-out crops after every epoch.
- ``samples/step_XXXXXX.png``: fixed validation images | reconstructions (with an input
  transform: clean | corrupted input | reconstruction) every ``sample_every`` steps.
- ``config.yaml``: the resolved config.

:class:`DecoderTrainer` is the step, validation, samples and checkpoint of a run on the training
scaffold (:class:`encoders.core.trainer.Trainer`: loop, resume, data order, logging). Under
``torchrun --nproc_per_node N`` each process trains on its slice of every global batch with
``DistributedDataParallel`` over NCCL (GPU) or gloo (CPU); ``batch_size`` is the global batch.
Only rank 0 writes files.

Example:
    >>> from encoders.core.config import load_config
    >>> cfg = load_config(TrainDecoderConfig, "configs/decoder/resnet18_robust_layer3.yaml",
    ...                   ["epochs=1", "out=/tmp/rfi-doc-decoder"])    # doctest: +SKIP
    >>> result = train_decoder(cfg)                                     # doctest: +SKIP
    >>> ae = RobustAutoencoder.from_checkpoints(cfg.encoder.checkpoint, result.path)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from encoders.core.budget import FLOAT_BYTES, TRAINING_COPIES, check_memory, meta_parameters
from encoders.core.config import config_to_dict, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.optim import lr_scheduler
from encoders.core.rundir import TrainResult, step_seed
from encoders.core.runtime import DistContext, autocast, check_precision, memory_format, save_grid
from encoders.core.trainer import Trainer, run_trainer
from encoders.data.build import DataConfig, build_dataset
from encoders.data.folders import resolve_num_workers
from encoders.nets.models import INPUT_TAP, Encoder
from encoders.weights.checkpoints import encoder_fingerprint, load_encoder, load_state_dict_checked
from encoders.weights.shipped import resolve_checkpoint
from inversion.decoders import CPU_PRESET, DECODER_FORMAT, Decoder, decoder_checkpoint, decoder_preset
from inversion.discriminator import build_discriminator
from inversion.losses import DecoderLoss, term_weights
from inversion.metrics import psnr
from inversion.upsample import polyphase_options

log = logging.getLogger("rfi")

InputTransform = Callable[[Tensor, torch.Generator], Tensor]
"""``transform(clean_images, generator) -> corrupted_images``: applied before encoding (e.g. noise)."""

CHECKPOINT_NAME = "decoder.pt"
TRAIN_ENCODER_HINT = "rfi train-encoder --config configs/encoder/resnet18_robust.yaml"
# Keys that may differ between a run and its ``--resume`` (they do not change the result).
RESUME_FREE_KEYS = ("out", "device", "num_workers", "log_every", "sample_every", "checkpoint_every", "deterministic")
SAMPLE_ROWS = 8


@yaml_dataclass("decoder/defaults.yaml", "encoder")
class EncoderSection:
    """The frozen encoder: a checkpoint and the layer the decoder inverts.

    ``checkpoint``: an RFI encoder checkpoint, a ``robustness``-library checkpoint (e.g.
    ``imagenet_l2_3_0.pt``) or a torchvision state dict; the last two need ``arch`` (e.g.
    ``encoder.arch=resnet50``), which is checked against an RFI checkpoint's own.
    """

    checkpoint: str
    layer: str
    arch: str | None


@yaml_dataclass("decoder/defaults.yaml", "decoder")
class DecoderSection:
    """The decoder's shape (see :class:`inversion.decoders.Decoder`).

    ``skips``: shallower encoder layers concatenated at their resolution (U-Net style);
    ``input`` is the image itself. ``residual``: the decoder outputs the ``input`` skip
    plus a learnt correction (for restoration, e.g. denoising).

    ``preset``: ``cpu`` (these defaults) or ``paper`` (the robust-inversion paper's
    generator capacity, see :func:`inversion.decoders.decoder_preset`): the preset sets
    ``channels, min_channels, blocks, stage_blocks, spectral_norm``; a key given a value
    other than its ``cpu`` default here overrides the preset's.
    """

    preset: Literal["cpu", "paper"]
    channels: int
    min_channels: int
    blocks: int
    skips: list[str]
    padding_mode: Literal["reflect", "zeros", "replicate", "circular"]
    norm: bool
    residual: bool
    stage_blocks: int
    spectral_norm: bool
    refine_blocks: int  # full-resolution residual blocks before the output conv (denoising)


@yaml_dataclass("decoder/defaults.yaml", "loss")
class LossSection:
    """Loss weights (0 switches a term off) and their options.

    ``feature``: relative squared error of the encoder's features at the inverted layer.
    ``lpips``: needs the backbone weights locally (``lpips_weights`` = a torchvision
    state-dict file, default: the torch hub cache; nothing downloads). ``adversarial``:
    a ``deepsim`` (image + features) or ``patch`` discriminator of width
    ``disc_channels``, trained alternately with the ``gan_loss`` objective
    (``disc_spectral_norm``: spectral normalisation of its layers). ``reduction``: ``mean``
    (default; the feature term is a relative error) or ``sum`` (every term summed over the
    batch, the feature term a plain squared error: the robust-inversion paper's recipe,
    ``configs/paper/``).
    """

    pixel: float
    pixel_type: Literal["l1", "l2"]
    feature: float
    lpips: float
    lpips_net: Literal["alex", "vgg"]
    lpips_weights: str | None
    adversarial: float
    discriminator: Literal["deepsim", "patch"]
    gan_loss: Literal["hinge", "nonsaturating"]
    disc_channels: int
    disc_spectral_norm: bool
    reduction: Literal["mean", "sum"]


@yaml_dataclass("decoder/defaults.yaml", "optim")
class OptimSection:
    """Adam for the decoder (``lr``, cosine decay to 0 after ``warmup_steps`` linear warm-up,
    or ``constant``) and for the discriminator (``disc_lr``, ``disc_betas``, constant)."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    schedule: Literal["cosine", "constant"]
    warmup_steps: int
    disc_lr: float
    disc_betas: tuple[float, float]


@yaml_dataclass("decoder/defaults.yaml")
class TrainDecoderConfig:
    """A run of ``rfi train-decoder`` (YAML: ``configs/decoder/*.yaml``; defaults: ``defaults.yaml`` there).

    ``epochs`` over ``data.train_crops`` crops, or exactly ``steps`` steps when > 0.
    ``batch_size`` is global (split over DDP processes). ``out`` defaults to
    ``runs/decoders/<config name>`` on the command line (in Python: :func:`default_out`).
    ``sample_every`` /
    ``log_every`` / ``checkpoint_every``: in steps (0: off; checkpoints are also written
    after every epoch). ``precision`` (``fp32 | bf16 | fp16``: autocast around the encoder,
    decoder, discriminator and losses; fp16 adds a grad scaler), ``channels_last`` (NHWC
    memory format) and ``deterministic`` (deterministic kernels; costs speed on GPU only):
    see ``docs/training_at_scale.md``.
    """

    encoder: EncoderSection
    decoder: DecoderSection
    data: DataConfig
    loss: LossSection
    optim: OptimSection
    epochs: int
    steps: int
    batch_size: int
    seed: int
    device: str
    out: str | None
    sample_every: int
    log_every: int
    checkpoint_every: int
    num_workers: int | None
    precision: str
    channels_last: bool
    deterministic: bool


def check_config(cfg: TrainDecoderConfig) -> None:
    """Reject values no run could use, naming the key."""
    problems = []
    if cfg.epochs < 1 and cfg.steps < 1:
        problems.append(f"epochs or steps must be >= 1, got epochs={cfg.epochs}, steps={cfg.steps}")
    if cfg.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {cfg.batch_size}")
    try:
        check_precision(cfg.precision)
    except RFIError as e:
        problems.append(str(e))
    for key in ("sample_every", "log_every", "checkpoint_every", "num_workers"):
        if (getattr(cfg, key) or 0) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("pixel", "feature", "lpips", "adversarial"):
        if not getattr(cfg.loss, key) >= 0:
            problems.append(f"loss.{key} must be >= 0, got {getattr(cfg.loss, key)}")
    if not any(getattr(cfg.loss, k) > 0 for k in ("pixel", "feature", "lpips")):
        problems.append("at least one of loss.pixel, loss.feature, loss.lpips must be > 0")
    if not cfg.optim.lr > 0 or not cfg.optim.disc_lr > 0:
        problems.append(f"optim.lr and optim.disc_lr must be > 0, got {cfg.optim.lr} and {cfg.optim.disc_lr}")
    for key in ("betas", "disc_betas"):
        betas = getattr(cfg.optim, key)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            problems.append(f"optim.{key} must be two numbers in [0, 1), got {list(betas)}")
    if cfg.optim.warmup_steps < 0 or cfg.optim.weight_decay < 0:
        problems.append(
            f"optim.warmup_steps and optim.weight_decay must be >= 0, got {cfg.optim.warmup_steps} "
            f"and {cfg.optim.weight_decay}"
        )
    if cfg.decoder.preset not in ("cpu", "paper"):
        problems.append(f"decoder.preset must be cpu or paper, got '{cfg.decoder.preset}'")
    if cfg.decoder.refine_blocks < 0:
        problems.append(f"decoder.refine_blocks must be >= 0, got {cfg.decoder.refine_blocks}")
    if cfg.decoder.stage_blocks < 0:
        problems.append(f"decoder.stage_blocks must be >= 0, got {cfg.decoder.stage_blocks}")
    if cfg.decoder.channels < 1 or cfg.decoder.min_channels < 1 or cfg.decoder.blocks < 0:
        problems.append("decoder.channels and decoder.min_channels must be >= 1, decoder.blocks >= 0")
    if problems:
        raise RFIError("; ".join(problems))


def default_out(cfg: TrainDecoderConfig) -> Path:
    """``runs/decoders/<encoder run>_<layer>``, e.g. ``runs/decoders/resnet18_robust_layer3`` for
    ``runs/encoders/resnet18_robust/checkpoint.pt`` (the default configs' names)."""
    return Path("runs/decoders") / f"{Path(cfg.encoder.checkpoint).parent.name or 'encoder'}_{cfg.encoder.layer}"


# ----------------------------------------------------------------------------- building blocks
def load_frozen_encoder(
    section: EncoderSection, skips: list[str] | tuple[str, ...] = (), encoder: Encoder | None = None
) -> Encoder:
    """The encoder of ``section.checkpoint`` in eval mode with frozen weights, checked for its layers.

    ``encoder``, when given, is that checkpoint's encoder already in memory (for example the model
    :func:`encoders.robust.train.train_encoder` returned): it is checked and frozen instead of reading the file.

    Raises:
        RFIError: the file is missing (says how to train one), unreadable, or the encoder
            lacks ``section.layer`` or a skip layer (lists the valid ones), or a skip layer
            is not shallower than the inverted layer.
    """
    path = Path(resolve_checkpoint(section.checkpoint, flag="encoder.checkpoint", kind="encoder"))
    if not path.is_file():
        raise RFIError(
            f"encoder checkpoint not found: {path} (encoder.checkpoint); train one with "
            f"`{TRAIN_ENCODER_HINT}` or set encoder.checkpoint=PATH"
        )
    if encoder is None:
        encoder = load_encoder(path, section.arch, arch_key="encoder.arch")
    names = [INPUT_TAP, *encoder.layer_names]  # skips may take the image itself
    for key, layer, valid in (
        ("encoder.layer", section.layer, names[1:]),
        *(("decoder.skips", s, names) for s in skips),
    ):
        if layer not in valid:
            raise RFIError(f"{key}: {encoder.arch} in {path} has no layer '{layer}' (valid: {', '.join(valid)})")
    deep = [s for s in skips if names.index(s) >= names.index(section.layer)]
    if deep:
        raise RFIError(
            f"decoder.skips {deep} must be shallower than encoder.layer '{section.layer}' (order: {', '.join(names)})"
        )
    return encoder.eval().requires_grad_(False)


def decoder_capacity(section: DecoderSection, in_channels: int) -> dict[str, Any]:
    """``channels, min_channels, blocks, stage_blocks, spectral_norm`` of ``section``: its preset's,
    except keys set to other values than their ``cpu`` defaults, which win."""
    values = decoder_preset(section.preset, in_channels)
    for key, default in CPU_PRESET.items():
        if getattr(section, key) != default:
            values[key] = getattr(section, key)
    return values


def build_decoder(encoder: Encoder, layer: str, section: DecoderSection) -> Decoder:
    """A decoder for ``layer`` of ``encoder`` (channels and stride measured on the encoder;
    capacity from ``section.preset``, see :func:`decoder_capacity`).

    Its parameters are first counted on the ``meta`` device: a decoder whose training (weights,
    gradients, optimiser state) would not fit in memory is refused, naming ``decoder.channels``.

    Raises:
        RFIError: the decoder is too large for this machine (:func:`~encoders.core.budget.check_memory`).
    """
    info = encoder.feature_info()
    channels, stride = info[layer]
    capacity = decoder_capacity(section, channels)

    def build() -> Decoder:
        return Decoder(
            channels,
            stride,
            layer,
            skips={s: info[s] for s in section.skips},
            norm=section.norm,
            residual=section.residual,
            refine_blocks=section.refine_blocks,
            **capacity,
            **polyphase_options(encoder, layer, section.padding_mode),
        )  # LPU for LPS encoders

    size = meta_parameters(build)
    check_memory(
        size * FLOAT_BYTES * TRAINING_COPIES,
        f"decoder.channels={capacity['channels']} (a decoder of {size / 1e9:,.1f} G parameters, trained)",
        "lower decoder.channels (or decoder.blocks, decoder.preset)",
    )
    return build()


def _images(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class DecoderTrainer(Trainer):
    """One decoder training run on one process of a (possibly one-process) DDP job (:class:`Trainer`'s loop).

    :func:`train_decoder` is the entry point for a whole run (it also locks the folder); the
    trainer itself is public so that benchmarks time its real :meth:`train_step`.

    Args:
        cfg: the run's config (checked with :func:`check_config`).
        input_transform: see :func:`train_decoder`.
        ctx: the process group, from :func:`encoders.core.runtime.setup_distributed`.
        device: the device (ditto).
        encoder, datasets: see :func:`train_decoder`.
    """

    name = "train-decoder"
    checkpoint_name = CHECKPOINT_NAME
    resume_free_keys = (*RESUME_FREE_KEYS, "epochs", "steps")  # a run may also be extended

    def __init__(
        self,
        cfg: TrainDecoderConfig,
        input_transform: InputTransform | None,
        ctx: DistContext,
        device: torch.device,
        encoder: Encoder | None = None,
        datasets: tuple[Dataset, Dataset] | None = None,
    ):
        self.transform, self.layer = input_transform, cfg.encoder.layer
        self.encoder = load_frozen_encoder(cfg.encoder, cfg.decoder.skips, encoder).to(device)
        self.encoder.check_input_size(cfg.data.size)
        self.encoder_sha256 = encoder_fingerprint(self.encoder)  # recorded: from_checkpoints refuses another encoder
        train_set, self.val_set = datasets or (build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val"))
        super().__init__(
            cfg,
            ctx,
            device,
            Path(cfg.out) if cfg.out else default_out(cfg),
            train_set,
            resolve_num_workers(cfg.num_workers, train_set),
        )
        self.decoder = self.module = build_decoder(self.encoder, self.layer, cfg.decoder).to(device)
        if cfg.channels_last:
            self.encoder.to(memory_format=memory_format(True))
            self.decoder.to(memory_format=memory_format(True))
        o = cfg.optim
        self.optimizer = torch.optim.Adam(
            self.decoder.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )
        self.optimizers = {"optimizer": self.optimizer}
        self.rebuild_scheduler()
        self.disc: nn.Module | None = None
        lpips_model = None
        if cfg.loss.lpips > 0:
            from inversion.perceptual import load_lpips

            lpips_model = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_weights, device)
            try:  # AlexNet's stride-4 stem and pools need crops of about 32 px or more
                lpips_model(*torch.zeros(2, 1, 3, cfg.data.size, cfg.data.size, device=device))
            except RuntimeError:
                raise RFIError(
                    f"loss.lpips: the {cfg.loss.lpips_net} LPIPS network cannot compare "
                    f"{cfg.data.size}-px crops (data.size); use larger crops or loss.lpips=0"
                ) from None
        if cfg.loss.adversarial > 0:
            self.disc = build_discriminator(
                cfg.loss.discriminator, self.decoder.in_channels, cfg.loss.disc_channels, cfg.loss.disc_spectral_norm
            ).to(device)
            self.optimizers["disc_optimizer"] = torch.optim.Adam(
                self.disc.parameters(), lr=o.disc_lr, betas=tuple(o.disc_betas)
            )
        w = cfg.loss
        self.loss = DecoderLoss(
            self.encoder,
            self.layer,
            pixel=w.pixel,
            feature=w.feature,
            lpips=w.lpips,
            adversarial=w.adversarial,
            pixel_type=w.pixel_type,
            lpips_model=lpips_model,
            discriminator=self.disc,
            gan_loss=w.gan_loss,
            reduction=w.reduction,
        )
        self.ddp_decoder: nn.Module = self.decoder
        self.ddp_disc: nn.Module | None = self.disc
        if ctx.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_decoder = DistributedDataParallel(self.decoder, device_ids=ids)
            if self.disc is not None:
                self.ddp_disc = DistributedDataParallel(self.disc, device_ids=ids)
        self.val_psnr: float | None = None
        self.samples = torch.stack([_images(self.val_set[i]) for i in range(min(SAMPLE_ROWS, len(self.val_set)))])

    # ------------------------------------------------------------------ scaffold hooks
    def epoch_order(self, epoch: int) -> Tensor:
        """``DistributedSampler``'s shuffle (a generator seeded with seed + epoch), which decoder runs have had
        since they exist: their batches, and so their weights, stay the same."""
        return torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def step_inputs(self, batch: Any) -> tuple[Tensor]:
        return (_images(batch),)

    def rebuild_scheduler(self) -> None:
        o = self.cfg.optim
        self.scheduler = lr_scheduler(
            self.optimizer, o.lr, lambda: self.total_steps, o.warmup_steps, o.schedule, self.step
        )

    def describe(self) -> str:
        cfg, ctx = self.cfg, self.ctx
        params = sum(p.numel() for p in self.decoder.parameters())
        return (
            f"training a decoder for {self.layer} of {cfg.encoder.checkpoint} ({params / 1e6:.2f}M parameters; "
            f"loss {term_weights(self.loss.weights)}) on {len(self.train_set)} {cfg.data.source} crops of "
            f"{cfg.data.size} px, {self.total_steps} steps of {cfg.batch_size} images"
            f"{f' on {ctx.world} processes' if ctx.world > 1 else ''} -> {self.out}"
        )

    def checkpoint(self, train: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "encoder_path": str(self.cfg.encoder.checkpoint),
            "train_size": self.cfg.data.size,
            "layer": self.layer,
            "input_transform": self.transform is not None,
            "val_psnr": self.val_psnr,
            "config": config_to_dict(self.cfg),
            "train": train,
        }
        if self.disc is not None:
            extra["discriminator"] = {"config": self.disc.config(), "state_dict": self.disc.state_dict()}
        return decoder_checkpoint(self.decoder, self.encoder.config(), encoder_sha256=self.encoder_sha256, **extra)

    def training_state(self, ckpt: dict[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
        if ckpt.get("format") != DECODER_FORMAT or "train" not in ckpt:
            raise RFIError(f"{self.ckpt_path} is not a training checkpoint of rfi train-decoder: cannot resume")
        return ckpt["train"], ckpt.get("config", {})

    def load_payload(self, ckpt: dict[str, Any]) -> None:
        load_state_dict_checked(self.decoder, ckpt["state_dict"], str(self.ckpt_path))
        if self.disc is not None:
            load_state_dict_checked(self.disc, ckpt["discriminator"]["state_dict"], f"{self.ckpt_path} (discriminator)")
        self.val_psnr = ckpt.get("val_psnr")

    # ------------------------------------------------------------------ steps
    def _generator(self, step: int, rank: int) -> torch.Generator:
        # A pure function of (seed, step, rank): a resumed run draws the same corruption.
        return torch.Generator().manual_seed(step_seed(self.cfg.seed, step, rank))

    def _corrupt(self, x: Tensor, g: torch.Generator) -> Tensor:
        return x if self.transform is None else self.transform(x, g)

    def train_step(self, x: Tensor) -> dict[str, Tensor]:
        """One optimisation step of the decoder (and of the discriminator); returns the loss terms."""
        x = x.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=memory_format(True))
        inputs = self._corrupt(x, self._generator(self.step, self.ctx.rank))
        amp = autocast(self.device, self.cfg.precision)  # fp32: a no-op
        with torch.no_grad(), amp:
            feats = self.encoder(inputs, layers=self.decoder.input_layers)
            target = feats[self.layer] if inputs is x else self.encoder(x, layers=[self.layer])[self.layer]
        with autocast(self.device, self.cfg.precision):
            rec = self.ddp_decoder(feats, size=tuple(x.shape[-2:]))  # exactly the input size, any stride
            total, terms = self.loss(rec, x, condition=feats[self.layer], target_features=target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total.float()).backward()
        self.scaler.step(self.optimizer)
        if self.disc is not None:
            disc_optimizer = self.optimizers["disc_optimizer"]
            with autocast(self.device, self.cfg.precision):
                d_loss = self.loss.discriminator_step_loss(x, rec, feats[self.layer], self.ddp_disc)
            disc_optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(d_loss.float()).backward()
            self.scaler.step(disc_optimizer)
            terms["disc"] = d_loss.detach()
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return terms

    def after_step(self) -> None:
        if self.ctx.main and self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
            self.write_samples()

    def end_epoch(self, epoch: int, sums: Mapping[str, float], images_per_s: float) -> None:
        """Validation PSNR (rank 0) and its metrics line."""
        if self.ctx.main:
            self.val_psnr = self.validate()
            self.metrics.write(step=self.step, epoch=epoch + 1, val_psnr=self.val_psnr)
            self.info(
                "epoch %d (step %d/%d): validation PSNR %.2f dB", epoch + 1, self.step, self.total_steps, self.val_psnr
            )

    def finish(self) -> None:
        if self.ctx.main and self.cfg.sample_every and self.step % self.cfg.sample_every:  # the final state, too
            self.write_samples()

    @torch.no_grad()
    def validate(self) -> float:
        """Mean PSNR (dB) of the reconstructions of all validation crops (rank 0 only)."""
        self.decoder.eval()
        values = []
        loader = DataLoader(self.val_set, batch_size=self.cfg.batch_size)
        for i, batch in enumerate(loader):
            x = _images(batch).to(self.device)
            inputs = self._corrupt(x, torch.Generator().manual_seed(self.cfg.seed * 7919 + i))
            rec = self.decoder(self.encoder(inputs, layers=self.decoder.input_layers), size=tuple(x.shape[-2:]))
            values.append(psnr(rec.clamp(0, 1), x))
        self.decoder.train()
        return float(torch.cat(values).mean())

    @torch.no_grad()
    def write_samples(self) -> Path:
        """The sample grid of this step: input | reconstruction (clean | corrupted | reconstruction)."""
        self.decoder.eval()
        x = self.samples.to(self.device)
        inputs = self._corrupt(x, torch.Generator().manual_seed(self.cfg.seed * 7919))
        rec = self.decoder(self.encoder(inputs, layers=self.decoder.input_layers), size=tuple(x.shape[-2:]))
        self.decoder.train()
        columns = [x, rec] if self.transform is None else [x, inputs.clamp(0, 1), rec]
        return save_grid(columns, self.out / "samples" / f"step_{self.step:06d}.png")

    def result(self) -> TrainResult:
        """The run's :class:`~encoders.core.rundir.TrainResult`: the checkpoint, the decoder (eval mode) and the
        metrics: ``step``, ``val_psnr`` and the last training-log record (loss terms, ``lr``, ``images_per_s``)."""
        return TrainResult(
            self.ckpt_path, self.decoder.eval(), {**self.last_log, "step": self.step, "val_psnr": self.val_psnr}
        )


def train_decoder(
    cfg: TrainDecoderConfig,
    resume: bool = False,
    input_transform: InputTransform | None = None,
    encoder: Encoder | None = None,
    datasets: tuple[Dataset, Dataset] | None = None,
) -> TrainResult:
    """Train a decoder for ``cfg.encoder.layer`` of the frozen encoder ``cfg.encoder.checkpoint``.

    Runs on one process, or on each process of a ``torchrun`` job (DDP; the process group
    is created from torchrun's environment, or an existing one is used).

    Args:
        cfg: the run's config.
        resume: continue from ``<out>/decoder.pt`` (same config, except ``epochs``/``steps``
            which may grow); without it an existing checkpoint there is an error, never
            overwritten. A complete run is returned as is.
        input_transform: ``f(clean, generator) -> corrupted`` applied to each batch before
            it is encoded (e.g. Gaussian noise for a denoiser); ``generator`` is a seeded CPU
            ``torch.Generator`` (a pure function of seed, step and rank), so runs and resumes
            reproduce. The losses always compare with the clean images.
        encoder: the encoder of ``cfg.encoder.checkpoint`` already in memory (e.g. ``train_encoder(...).model``),
            so that the file is not read again; ``None`` reads it.
        datasets: ``(train, val)`` datasets of (3, size, size) images to use instead of those ``cfg.data``
            names (e.g. crops of images decoded once, as ``rfi anomaly fit`` passes); ``cfg.data.size`` is still
            the crop side the encoder is checked against.

    Returns:
        A :class:`~encoders.core.rundir.TrainResult`: ``path`` is ``<out>/decoder.pt`` (loadable with
        ``RobustAutoencoder.from_checkpoints(encoder, path)``; the result itself stands for it
        where a path is expected), ``model`` the trained decoder (eval mode), ``metrics`` its
        ``step``, ``val_psnr`` and last training-log record (loss terms, ``lr``, ``images_per_s``).

    Raises:
        RFIError: bad config values, a missing encoder checkpoint or layer, LPIPS weights
            not present locally, or a checkpoint in the way.

    Example:
        >>> result = train_decoder(load_config(TrainDecoderConfig, None, ["steps=10", "out=/tmp/d"]))  # doctest: +SKIP
    """
    check_config(cfg)
    return run_trainer(
        lambda ctx, device: DecoderTrainer(cfg, input_transform, ctx, device, encoder, datasets),
        cfg.device,
        cfg.precision,
        resume,
    )
