"""Shared fixtures for the app tests: a dummy MVTec AD tree, a tiny encoder, a tiny anomaly model.

The dummy tree follows anomalib's dummy-dataset idea: small synthetic images (48 px
stripes + noise) for two categories, with anomalous test images carrying a drawn defect
and its ground-truth mask, in the MVTec AD layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import single_threaded, tiny_net

SIZE = 48
# Category -> (normal training images, normal test images, {defect: anomalous test images}).
DUMMY_CATEGORIES = {"widget": (10, 3, {"blot": 3, "crack": 2}), "gadget": (4, 2, {"blot": 2})}
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "apps" / "anomaly.yaml"
# The shipped config shrunk to a fit of a few seconds: 16-px crops, a 16-channel decoder, 6 steps.
TINY_FIT = [
    "train.steps=6",
    "train.batch_size=8",
    "train.data.size=16",
    "train.data.repeat=2",
    "train.decoder.channels=16",
    "train.decoder.min_channels=8",
    "train.sample_every=0",
    "train.log_every=2",
    "train.device=cpu",
    "device=cpu",
    "batch_size=4",
    "benchmark.train=6",
    "benchmark.test_good=3",
    "benchmark.test_defect=2",
    "benchmark.size=32",
]


def _normal(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    period, phase = rng.uniform(7, 9), rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.25 * np.sin(2 * np.pi * x / period + phase) + 0.05 * rng.standard_normal((SIZE, SIZE))
    return np.repeat(base[..., None], 3, axis=2).clip(0, 1)


def _defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((SIZE, SIZE), bool)
    top, left = rng.integers(4, SIZE - 16, 2)
    if kind == "blot":
        mask[top : top + 10, left : left + 10] = True
        img[mask] = [0.9, 0.1, 0.1]
    else:
        mask[top : top + 12, left : left + 2] = True
        img[mask] = 0.0
    return img, mask


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == bool:
        Image.fromarray(arr.astype(np.uint8) * 255).save(path)
    else:
        Image.fromarray((arr * 255).round().astype(np.uint8)).save(path)


def write_dummy_mvtec(root: Path, seed: int = 0) -> Path:
    """Write the dummy MVTec AD tree (:data:`DUMMY_CATEGORIES`) under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for cat, (n_train, n_good, defects) in DUMMY_CATEGORIES.items():
        for i in range(n_train):
            _save(_normal(rng), root / cat / "train" / "good" / f"{i:03d}.png")
        for i in range(n_good):
            _save(_normal(rng), root / cat / "test" / "good" / f"{i:03d}.png")
        for kind, n in defects.items():
            for i in range(n):
                img, mask = _defect(_normal(rng), kind, rng)
                _save(img, root / cat / "test" / kind / f"{i:03d}.png")
                _save(mask, root / cat / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def anomaly_config() -> Path:
    """The shipped ``configs/apps/anomaly.yaml``."""
    return CONFIG


@pytest.fixture(scope="session")
def tiny_fit() -> list[str]:
    """Overrides that shrink the shipped anomaly config to a fit of a few seconds."""
    return list(TINY_FIT)


@pytest.fixture(scope="session")
def dummy_categories() -> dict:
    """What the dummy MVTec tree holds: ``{category: (train, test good, {defect: n})}``."""
    return DUMMY_CATEGORIES


@pytest.fixture(scope="session")
def dummy_mvtec(tmp_path_factory) -> Path:
    """A read-only dummy MVTec AD root with categories ``widget`` and ``gadget`` (copy it to modify)."""
    return write_dummy_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """The suite's untrained tiny encoder (:func:`tests.conftest.tiny_net`) as a checkpoint: plumbing tests need
    no training."""
    from encoders.weights.checkpoints import save_encoder

    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    save_encoder(tiny_net(), path)
    return path


@pytest.fixture(scope="session")
def tiny_model(dummy_mvtec, tiny_encoder, tmp_path_factory) -> Path:
    """An anomaly model fitted (6 decoder steps) on the dummy ``widget`` category."""
    from apps.anomaly.config import load_anomaly_config
    from apps.anomaly.fitting import fit

    cfg = load_anomaly_config(CONFIG, [*TINY_FIT, f"encoder={tiny_encoder}"])
    with single_threaded():
        return fit(cfg, str(dummy_mvtec / "widget"), tmp_path_factory.mktemp("model") / "widget.pt")
