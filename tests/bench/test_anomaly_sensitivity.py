"""bench/anomaly_sensitivity.py: how far each photo defect moves an encoder's patch features (tiny set)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
TINY_SET = ["benchmark.size=32", "benchmark.train=6", "benchmark.test_good=2", "benchmark.test_defect=3"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import anomaly_sensitivity

    return anomaly_sensitivity


class Features(nn.Module):
    """A stand-in encoder whose two memory taps are its input (``blind``: a constant, whatever the input)."""

    layer_names = ("layer2", "layer3")

    def __init__(self, blind: bool = False) -> None:
        super().__init__()
        self.blind = blind

    def forward(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        return {name: torch.ones_like(x) if self.blind else x for name in layers}


@pytest.fixture(scope="module")
def photo_set(bench, tmp_path_factory):
    """The camera photo's tiny set: normal training crops, defect images and their clean twins."""
    from apps.anomaly.benchmark import make_benchmark, photo_controls
    from apps.anomaly.config import load_anomaly_config
    from apps.anomaly.data import load_anomaly_data, readable_images
    from encoders.core.imageio import read_image
    from encoders.data.unseen import unseen_folder

    work = tmp_path_factory.mktemp("sensitivity")
    cfg = load_anomaly_config("configs/apps/anomaly.yaml", TINY_SET)
    photos = unseen_folder(work / "photos")
    data = load_anomaly_data(make_benchmark(work / "set", cfg.benchmark, photos=photos), category="camera")
    defects, twins = bench.defect_twins(data, photo_controls(photos, "camera", cfg.benchmark)[1])
    return [read_image(p) for p in readable_images(data.train)], defects, twins


def test_pixels_as_features_see_every_defect_and_a_blind_encoder_none(bench, photo_set):
    train, defects, twins = photo_set
    seeing = bench.photo_sensitivity(Features(), train, defects, twins, pool=3, bank=512)
    for defect, measures in seeing.items():
        assert len(measures["shift"]) == 3 and all(v > 0 for v in measures["shift"]), defect
    assert sum(seeing["pasted_patch"]["rise"]) > 0 and all(v in (0.0, 1.0) for v in seeing["tinted_disk"]["above"])
    blind = bench.photo_sensitivity(Features(blind=True), train, defects, twins, pool=3, bank=512)
    assert all(v == 0 for measures in blind.values() for v in measures["above"])  # no defect raises its score


def test_main_writes_the_table_for_two_encoders(bench, tmp_path, one_thread, capsys):
    from bench.anomaly_unseen import tiny_encoder

    enc = str(tiny_encoder(tmp_path / "enc.pt"))
    out = tmp_path / "sensitivity.json"
    argv = ["--robust", enc, "--standard", enc, "--categories", "camera", "--bank", "256", "--work", str(tmp_path)]
    assert bench.main([*argv, "--out", str(out), *TINY_SET]) == 0
    result = json.loads(out.read_text())
    assert set(result["table"]) == {"robust", "standard"} and result["table"]["robust"] == result["table"]["standard"]
    assert set(result["table"]["robust"]) == {"pasted_patch", "blurred_disk", "tinted_disk"}
    assert "tinted_disk" in capsys.readouterr().out
