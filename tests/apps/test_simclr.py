"""The small SimCLR run and its linear probe, a few steps on tiny crops."""
from __future__ import annotations

import os

import pytest
import torch

from apps.simclr import SSLConfig, SimCLR, nt_xent, run_ssl
from encoders.config import load_config
from encoders.errors import RFIError
from encoders.models import Encoder
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder

pytestmark = pytest.mark.usefixtures("one_thread")

os.environ.setdefault("RFI_NO_PROGRESS", "1")

TINY = ["crops=32", "crop_size=20", "view_size=16", "width=0.125", "batch_size=16", "steps=2",
        "probe.train_crops=48", "probe.val_crops=32", "device=cpu"]


@pytest.fixture(scope="module")
def ae_file(tmp_path_factory):
    torch.manual_seed(0)
    enc = Encoder("resnet18", num_classes=8, width=0.125, small_input=True)
    ae = RobustAutoencoder(enc, Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    return ae.save(tmp_path_factory.mktemp("model") / "ae.pt")


def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    matched = nt_xent(z, z + 0.01 * torch.randn_like(z))
    shuffled = nt_xent(z, z.roll(1, dims=0))
    assert matched < shuffled
    assert torch.isfinite(matched)


def test_simclr_shapes():
    model = SimCLR(width=0.125, proj_dim=8)
    x = torch.rand(3, 3, 16, 16)
    assert model.embed(x).shape == (3, 64) and model(x).shape == (3, 8)


def test_tiny_runs_with_and_without_style(ae_file):
    plain = run_ssl(load_config(SSLConfig, "configs/apps/ssl.yaml", TINY))
    styled = run_ssl(load_config(SSLConfig, "configs/apps/ssl.yaml",
                                 [*TINY, "style.enabled=true", f"style.model={ae_file}", "style.p=1"]))
    for result in (plain, styled):
        assert 0 <= result["probe_acc"] <= 1
        assert result["steps"] == 2 and result["step_ms"] > 0
    assert plain["style_ms"] == 0 and styled["style_ms"] > 0


def test_bad_batch_size():
    with pytest.raises(RFIError, match="batch_size"):
        run_ssl(load_config(SSLConfig, None, [*TINY, "batch_size=1"]))
