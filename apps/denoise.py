"""Image denoising on robust features: ``rfi denoise train`` and ``rfi denoise apply``.

A denoiser is a :class:`~inversion.autoencoder.RobustAutoencoder` whose decoder was trained
to map the robust features of a *noisy* image (Gaussian noise, see :func:`add_noise`) to the
*clean* image. Training reuses :func:`inversion.train.train_decoder` with
:class:`GaussianNoise` as its ``input_transform`` (the losses target the clean image), and
the decoder usually takes skip connections from shallow encoder layers (``layer1``,
``layer2``) so fine detail survives. The result is one self-contained model file
(encoder + decoder + the noise levels it was trained for) that ``rfi denoise apply`` reads.
Both read :class:`DenoiseConfig` (``configs/apps/denoise.yaml``): training its top level,
applying its ``apply:`` section.

Noise levels ``sigma`` are in 0-255 units (as in the denoising literature) for images in
[0, 1]: ``sigma=25`` adds noise of standard deviation 25/255. One value trains for that
level; a range ``[lo, hi]`` draws a level per image (a *blind* denoiser).

Example:
    >>> x = torch.rand(2, 3, 16, 16)
    >>> g = torch.Generator().manual_seed(0)
    >>> y = add_noise(x, 25, g)
    >>> bool(y.min() >= 0 and y.max() <= 1), tuple(y.shape)
    (True, (2, 3, 16, 16))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from encoders.core.config import bounded, config_to_dict, load_config, value_range, yaml_dataclass
from encoders.core.errors import RFIError
from encoders.core.files import FileBatch, check_output_file, check_output_folder
from encoders.core.rundir import RunDir, TrainResult
from encoders.core.serialization import atomic_write
from encoders.weights.checkpoints import load_encoder
from encoders.weights.shipped import resolve_checkpoint
from inversion.autoencoder import RobustAutoencoder
from inversion.metrics import psnr
from inversion.train import CHECKPOINT_NAME, TrainDecoderConfig, train_decoder

log = logging.getLogger("rfi")

DENOISER_APP = "denoise"
DEFAULT_CONFIG = "configs/apps/denoise.yaml"


# ----------------------------------------------------------------------------- noise model
def add_noise(images: Tensor, sigma: float | Sequence[float], generator: torch.Generator | None = None) -> Tensor:
    """Add white Gaussian noise and clip to [0, 1].

    Args:
        images: (B, 3, H, W) or (3, H, W) in [0, 1].
        sigma: noise standard deviation in 0-255 units, or a range ``[lo, hi]``: each image
            then gets its own level drawn uniformly from it (blind denoising).
        generator: torch generator (the same seed gives the same noise); ``None`` uses
            torch's global RNG. A CPU generator also works for images on another device.

    Returns:
        Noisy images, same shape and device, values in [0, 1] (clipped like a real sensor
        would, so the result is a valid image; the noise is not exactly Gaussian where the
        clean value is near 0 or 1).

    Example:
        >>> x = torch.full((1, 3, 8, 8), 0.5)
        >>> a = add_noise(x, [5, 50], torch.Generator().manual_seed(1))
        >>> torch.equal(a, add_noise(x, [5, 50], torch.Generator().manual_seed(1)))
        True
    """
    lo, hi = value_range(sigma, "noise sigma (0-255 units)", low=0)
    batched = images.dim() == 4
    x = images if batched else images.unsqueeze(0)
    gen_device = generator.device if generator is not None else x.device
    levels = lo + (hi - lo) * torch.rand(x.shape[0], generator=generator, device=gen_device)
    noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
    noisy = (x + noise.to(x.device) * (levels.to(x.device, x.dtype) / 255).view(-1, 1, 1, 1)).clamp(0, 1)
    return noisy if batched else noisy[0]


class GaussianNoise:
    """The ``input_transform`` of denoiser training: ``(clean batch, generator) -> noisy batch``.

    Args:
        sigma: one level or a range ``[lo, hi]`` (0-255 units), see :func:`add_noise`.

    Example:
        >>> t = GaussianNoise([0, 50])
        >>> tuple(t(torch.rand(4, 3, 8, 8), torch.Generator().manual_seed(0)).shape)
        (4, 3, 8, 8)
    """

    def __init__(self, sigma: float | Sequence[float]):
        self.sigma = value_range(sigma, "noise sigma (0-255 units)", low=0)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return add_noise(images, self.sigma, generator)

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={list(self.sigma)})"


# ----------------------------------------------------------------------------- configuration
@yaml_dataclass("apps/denoise.yaml", "noise")
class NoiseSection:
    """The noise the denoiser learns to remove: ``sigma`` = one level or ``[lo, hi]`` (0-255 units)."""

    sigma: list[float]

    def check(self) -> None:
        value_range(self.sigma, "noise.sigma (0-255 units)", low=0)


@yaml_dataclass("apps/denoise.yaml", "apply")
class DenoiseApplyConfig:
    """How ``rfi denoise apply`` runs (the ``apply:`` section; flags of the same names win).

    ``model``: the denoiser it applies: ``shipped:rfi_denoiser`` (RFI's shipped blind denoiser,
    the default), a file, or ``null`` for the one training writes (:func:`model_file`). ``sigma``: a
    demonstration on clean pictures: first add Gaussian noise of this level (0-255 units), then
    denoise (``null``: denoise the inputs as they are). ``seed``: seed of that noise (image ``i``
    uses ``seed + i``). ``save_noisy``: with ``sigma``, also write the noisy input as
    ``<out>/noisy/<name>.png``. ``tile``: tile side in px for large images (``null``: the whole
    image up to the model's ``max_pixels``, else tiles of its square root). ``device``: ``auto``,
    ``cpu``, ``cuda``, ...
    """

    model: str | None
    sigma: float | None = bounded(low=0)
    seed: int
    save_noisy: bool
    tile: int | None = bounded(low=1)
    device: str


@yaml_dataclass("apps/denoise.yaml")
class DenoiseConfig:
    """A denoiser: how to train it and how to apply it (YAML: ``configs/apps/denoise.yaml``).

    ``noise``: the training noise. ``train``: a full ``rfi train-decoder`` config (encoder
    checkpoint and layer, decoder shape and ``skips``, data, losses, steps, ``out``).
    ``model``: the model file training writes and ``apply`` reads (``null``:
    ``<train.out>/denoiser.pt``; see :func:`model_file`). ``apply``: :class:`DenoiseApplyConfig`.
    """

    noise: NoiseSection
    train: TrainDecoderConfig
    model: str | None
    apply: DenoiseApplyConfig


def load_denoiser_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DenoiseConfig:
    """Read a denoise YAML (+ ``key=value`` overrides such as ``train.steps=200``).

    Raises:
        RFIError: unknown keys (also inside ``train``), wrong types, a bad ``noise.sigma``.
    """
    return load_config(DenoiseConfig, path, overrides)


def model_file(cfg: DenoiseConfig) -> Path:
    """The denoiser file of a config: ``model``, else ``<train.out>/denoiser.pt`` (no ``train.out``: ``runs/denoise``).

    Example:
        >>> model_file(load_config(DenoiseConfig, None, ["train.out=runs/d1"])).as_posix()
        'runs/d1/denoiser.pt'
    """
    return Path(cfg.model) if cfg.model else Path(cfg.train.out or "runs/denoise") / "denoiser.pt"


def train_denoiser(cfg: DenoiseConfig, resume: bool = False) -> TrainResult:
    """Train a denoising decoder and write one self-contained model file.

    Clean training crops are corrupted by :class:`GaussianNoise` before encoding (through
    ``input_transform`` of :func:`inversion.train.train_decoder`, which does all the
    training: checkpoints, ``--resume``, samples, metrics in ``train.out``); the losses
    compare with the clean crops.

    Args:
        cfg: the run's config.
        resume: continue a killed run in ``cfg.train.out`` (same config required).

    Returns:
        A :class:`~encoders.core.rundir.TrainResult`: ``path`` is the model file (:func:`model_file`;
        the result stands for it where a path is expected),
        loadable with :func:`load_denoiser` / ``RobustAutoencoder.load``, which records the noise
        range (``sigma``) it was trained for; ``model`` the denoiser (a ``RobustAutoencoder``, eval
        mode); ``metrics`` the decoder training's (see :func:`inversion.train.train_decoder`).

    Raises:
        RFIError: bad config, missing encoder checkpoint, a finished run in the way, an output
            that cannot be written (an empty name, a folder named as ``model``, a read-only place:
            checked before any work).
    """
    sigma = value_range(cfg.noise.sigma, "noise.sigma", low=0)
    enc = cfg.train.encoder
    if enc.arch is None and Path(enc.checkpoint).is_file():  # a foreign file needs train.encoder.arch=NAME
        load_encoder(enc.checkpoint, arch_key="train.encoder.arch")
    if cfg.train.out is None:
        cfg.train.out = "runs/denoise"
    out = check_output_folder(cfg.train.out, flag="train.out (--out)")  # before any work, as the model file:
    model_path = check_output_file(model_file(cfg) if cfg.model is None else cfg.model, flag="model (--model)")
    # The decoder trainer checks its own config on --resume; the noise is ours to check.
    noise_file = out / "noise.yaml"
    noise = {"sigma": list(sigma)}
    if resume and noise_file.is_file():
        old = yaml.safe_load(noise_file.read_text())
        if old != noise:
            raise RFIError(
                f"cannot resume {out}: it was trained with noise {old}, not {noise} "
                f"(use the same noise.sigma or another --out)"
            )
    elif not resume:  # before noise.yaml is written: a run in the way is an error (with --resume, the trainer
        RunDir(out, CHECKPOINT_NAME).has_checkpoint(resume=False)  # alone says whether it resumes)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, only rank 0 writes files
    if main_process:
        atomic_write(noise_file, lambda tmp: Path(tmp).write_text(yaml.safe_dump(noise)))
    kind = f"sigma {sigma[0]:g}" if sigma[0] == sigma[1] else f"blind, sigma {sigma[0]:g}-{sigma[1]:g}"
    log.info(
        "training a denoiser (%s) on %s of %s, skips %s",
        kind,
        cfg.train.encoder.layer,
        cfg.train.encoder.checkpoint,
        list(cfg.train.decoder.skips) or "none",
    )
    decoder = train_decoder(cfg.train, resume=resume, input_transform=GaussianNoise(sigma))
    model = RobustAutoencoder.from_checkpoints(
        enc.checkpoint, decoder.path, arch=enc.arch, arch_key="train.encoder.arch"
    )
    if main_process:
        model.save(
            model_path,
            app=DENOISER_APP,
            sigma=list(sigma),
            layer=model.layer,
            config={"noise": noise, "train": config_to_dict(cfg.train)},
        )
        log.info("denoiser written to %s", model_path)
    return TrainResult(model_path, model.eval(), decoder.metrics)


# ----------------------------------------------------------------------------- using a denoiser
def load_denoiser(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[RobustAutoencoder, dict[str, Any]]:
    """Load a model file written by ``rfi denoise train``, or RFI's shipped denoiser (``shipped:rfi_denoiser``).

    Returns:
        ``(autoencoder, info)``: the :class:`~inversion.autoencoder.RobustAutoencoder`, and
        what the file records about its training (``sigma``: the trained noise range in
        0-255 units; empty for a plain autoencoder file, which still loads).

    Raises:
        RFIError: missing or unreadable file, not an autoencoder file, or one written for another
            app (a style pyramid, an anomaly model), naming both kinds; a shipped denoiser not in this
            build or damaged (naming ``--model``).
    """
    path = Path(resolve_checkpoint(path, flag="--model", kind=DENOISER_APP))
    if not path.is_file():
        raise RFIError(f"denoiser model not found: {path} (train one with rfi denoise train)")
    model = RobustAutoencoder.load(path, device, kind=DENOISER_APP)  # read once: the noise levels are in metadata
    info = {k: model.metadata[k] for k in ("app", "sigma", "layer", "config") if k in model.metadata}
    if info.get("app") != DENOISER_APP:
        log.warning("%s is an autoencoder file, but not one written by rfi denoise train", path)
    return model.eval(), info


def denoise_files(
    model: RobustAutoencoder,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    sigma: float | None = None,
    tile: int | None = None,
    seed: int = 0,
    save_noisy: bool = False,
) -> int:
    """Denoise image files into ``out`` as PNGs with the same names (the policy of :mod:`encoders.core.files`).

    Args:
        model: a denoiser (:func:`load_denoiser`).
        inputs: image files and folders (a folder's image files, not recursive).
        out: output folder (created); no output may overwrite an input.
        sigma: add synthetic Gaussian noise of this level (0-255 units) before denoising,
            to demonstrate the model on clean pictures; ``None`` denoises the files as they are.
        tile: tile side in pixels for large images (default: whole image up to the model's
            ``max_pixels``, then tiles of its square root, equal to a whole pass; see
            :meth:`~inversion.autoencoder.RobustAutoencoder.reconstruct`).
        seed: seed of the synthetic noise (image ``i`` uses ``seed + i``).
        save_noisy: with ``sigma``, also write the noisy input as ``<out>/noisy/<name>.png``.

    Returns:
        The exit code: 0, or :data:`encoders.core.files.EXIT_PARTIAL` when some inputs could not
        be read or processed (each named; the others are written).

    Raises:
        RFIError: no readable inputs, output names that collide or would overwrite an input,
            an output folder that cannot be written.
    """
    if sigma is not None:
        value_range(sigma, "sigma (0-255 units)", low=0)
    noisy = sigma is not None and save_noisy
    batch = FileBatch(inputs, out, names=lambda p: [f"{p.stem}.png"] + [f"noisy/{p.stem}.png"] * noisy, desc="denoise")
    device = next(model.parameters()).device
    index = {src: i for i, src in enumerate(batch.files)}

    def process(src: Path, image: Tensor) -> list[Tensor]:
        clean = image.unsqueeze(0).to(device)
        x = clean
        if sigma is not None:
            x = add_noise(clean, sigma, torch.Generator(device=device).manual_seed(seed + index[src]))
        y = model.reconstruct(x, tile=tile)
        if sigma is not None:
            log.info(
                "%s: noisy %.2f dB -> denoised %.2f dB (sigma %g)",
                src.name,
                float(psnr(clean, x)),
                float(psnr(clean, y)),
                sigma,
            )
        return [y[0], x[0]] if noisy else [y[0]]

    return batch.run(process)
