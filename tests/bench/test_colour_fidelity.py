"""bench/colour_fidelity.py: the colour error of a reconstruction, and of a linear read-out of the features."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import colour_fidelity

    return colour_fidelity


class Pixels:
    """A stand-in pair: its features are the pixels; it reconstructs them as they are, or in grey (``grey``)."""

    layers = ["layer3"]

    def __init__(self, grey: bool = False) -> None:
        self.grey = grey

    def encode(self, x: torch.Tensor, layer: str) -> dict[str, torch.Tensor]:
        return {layer: x}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True).expand_as(x) if self.grey else x


def test_tiles_are_seeded_coloured_and_textured(bench):
    tiles = bench.colour_tiles(6, seed=3)
    assert tiles.shape == (6, 3, 64, 64) and 0 <= tiles.min() and tiles.max() <= 1
    assert torch.equal(tiles, bench.colour_tiles(6, seed=3)) and not torch.equal(tiles, bench.colour_tiles(6, seed=4))
    assert (tiles.std((2, 3)) > 0).all()  # textured, not flat


def test_mean_lab_of_pure_red(bench):
    red = torch.zeros(1, 3, 64, 64)
    red[:, 0] = 1
    assert bench.mean_lab(red)[0] == pytest.approx([53.24, 80.09, 67.20], abs=0.05)
    assert bench.mean_lab(red, block=32).shape == (4, 3)


def test_a_perfect_pair_has_no_error_and_a_colour_blind_one_a_large_one(bench):
    tiles = bench.colour_tiles(60, seed=0)
    perfect = bench.tile_fidelity(Pixels(), tiles)
    assert perfect["decoder_delta_e"] == pytest.approx(0, abs=1e-4) and perfect["decoder_r2_ab"] == [1.0, 1.0]
    assert perfect["probe_delta_e"] < 10  # the mean colour is linear in the pooled pixels, bar Lab's curvature
    assert perfect["decoder_local_delta_e"] == pytest.approx(0, abs=1e-4) and perfect["probe_local_delta_e"] < 10
    grey = bench.tile_fidelity(Pixels(grey=True), tiles)
    assert grey["decoder_delta_e"] > 20 and max(grey["decoder_r2_ab"]) < 0  # no hue at all
    assert grey["probe_delta_e"] == pytest.approx(perfect["probe_delta_e"])  # the features still hold it
    assert grey["decoder_local_delta_e"] > 20
    photo = [bench.colour_tiles(1, seed=1)[0].repeat(1, 2, 3)]  # (3, 128, 192)
    assert bench.photo_fidelity(Pixels(), photo) == {"flat_delta_e": 0.0, "textured_delta_e": 0.0, "blocks": 24}
    assert np.isfinite(list(bench.photo_fidelity(Pixels(grey=True), photo).values())).all()
