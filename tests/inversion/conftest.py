"""Fixtures for decoder tests: a tiny random encoder checkpoint and tiny training configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from encoders.core.config import load_config
from encoders.data.embedded import EmbeddedCrops
from encoders.weights.checkpoints import save_encoder
from inversion.train import TrainDecoderConfig, train_decoder
from tests.conftest import tiny_net

# A tiny run: 16-px crops, 128 training crops, batch 16 -> 8 steps per epoch.
TINY = [
    "encoder.layer=layer3",
    "data.size=16",
    "data.train_crops=128",
    "data.val_crops=16",
    "batch_size=16",
    "epochs=2",
    "decoder.channels=16",
    "decoder.min_channels=8",
    "loss.disc_channels=8",
    "optim.lr=0.005",
    "sample_every=4",
    "log_every=2",
    "device=cpu",
]


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory) -> Path:
    """An RFI checkpoint of a random ResNet-18 (width 0.125, 3x3 stem): layer3 has 32 channels at stride 4."""
    encoder = tiny_net()
    # Batch-norm statistics measured on real crops, so the random encoder's features are well scaled.
    crops = EmbeddedCrops("train", 16, 128, seed=1)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        encoder.train().logits(torch.stack([crops[i][0] for i in range(len(crops))]))
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return save_encoder(encoder.eval(), tmp_path_factory.mktemp("encoder") / "encoder.pt")


@pytest.fixture(scope="session")
def tiny_decoder_path(tiny_encoder_path, tmp_path_factory) -> Path:
    """A tiny decoder for layer3 of the tiny encoder, trained briefly (reconstructs coarse structure)."""
    out = tmp_path_factory.mktemp("decoder")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(
        TrainDecoderConfig,
        None,
        [
            f"encoder.checkpoint={tiny_encoder_path}",
            *TINY,
            "steps=40",
            "data.train_crops=640",
            "sample_every=0",
            f"out={out}",
        ],
    )
    try:
        return train_decoder(cfg).path
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_config(tiny_encoder_path, tmp_path) -> Callable[..., TrainDecoderConfig]:
    """``tiny_config("loss.feature=0", out=...)``: the tiny run's config with overrides."""

    def make(*overrides: str, out: str | Path | None = None) -> TrainDecoderConfig:
        return load_config(
            TrainDecoderConfig,
            None,
            [f"encoder.checkpoint={tiny_encoder_path}", *TINY, f"out={out or tmp_path / 'run'}", *overrides],
        )

    return make


@pytest.fixture(scope="session")
def fake_lpips_weights(tmp_path_factory) -> Path:
    """A local stand-in for torchvision's AlexNet file (random conv weights, ``features.*`` keys only),
    so the LPIPS term can be exercised without the real backbone (which cannot be downloaded here)."""
    import warnings

    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lpips.pretrained_networks.alexnet(requires_grad=False, pretrained=False)
    state = {f"features.{k.split('.', 1)[1]}": v for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("lpips") / "alexnet-features.pth"
    torch.save(state, path)
    return path


def equivariance_errors(ae, x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Largest |D(E(T_s x)) - T_s D(E(x))| for each circular shift s (rows of ``shifts``, (dy, dx))."""
    from encoders.robust.shift import circular_shift

    with torch.no_grad():
        rec = ae.decode(ae.encode(x))
        return torch.stack(
            [
                (
                    ae.decode(ae.encode(circular_shift(x, s.expand(len(x), 2))))
                    - circular_shift(rec, s.expand(len(x), 2))
                )
                .abs()
                .max()
                for s in shifts
            ]
        )
