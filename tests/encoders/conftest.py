"""Shared fixtures for the encoder tests: tiny configs and one tiny trained encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "encoder"
ROBUST = CONFIGS / "resnet18_robust.yaml"
STANDARD = CONFIGS / "resnet18_standard.yaml"

# A few seconds of CPU: ResNet-18 at width 0.125 on 16-px crops.
TINY = [
    "data.size=16",
    "data.train_crops=256",
    "data.val_crops=64",
    "model.width=0.125",
    "epochs=1",
    "batch_size=64",
    "eval.max_images=64",
    "eval.steps=2",
    "log_every=2",
]


def tiny_config(out: Path, *overrides: str, config: Path = STANDARD):
    """The default config shrunk to a few seconds, writing to ``out`` (also importable: ``from conftest import``)."""
    from encoders.core.config import load_config
    from encoders.robust.train import TrainEncoderConfig

    return load_config(TrainEncoderConfig, config, [*TINY, f"out={out}", *overrides])


@pytest.fixture
def tiny_cfg():
    """:func:`tiny_config` as a fixture: ``tiny_cfg(out, *overrides, config=...)``."""
    return tiny_config


@pytest.fixture
def train_argv():
    """``train_argv(out, *overrides)``: ``rfi train-encoder`` arguments for a tiny run of the robust default."""
    return lambda out, *overrides: ["train-encoder", "--config", str(ROBUST), "--out", str(out), *TINY, *overrides]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny standard ResNet-18 trained for 2 epochs on 16-px embedded crops (a few seconds)."""
    from encoders.robust.train import train_encoder

    out = tmp_path_factory.mktemp("trained")
    return train_encoder(tiny_config(out, "epochs=2", "data.train_crops=1024", "data.val_crops=256")).path
