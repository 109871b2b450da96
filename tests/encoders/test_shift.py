"""Shift-consistency metrics and the ``rfi shift-consistency`` command."""

from __future__ import annotations

import json

import pytest
import torch

from encoders import create_encoder
from encoders.data.embedded import EmbeddedCrops
from encoders.robust.shift import circular_shift, feature_equivariance_error, random_offsets, shift_consistency
from encoders.weights.checkpoints import save_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(downsample: str):
    from inversion.autoencoder import RobustAutoencoder
    from inversion.decoders import Decoder
    from inversion.upsample import polyphase_options

    torch.manual_seed(0)
    enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8, downsample=downsample)
    dec = Decoder(32, 4, "layer3", channels=16, min_channels=8, **polyphase_options(enc, "layer3"))
    return enc, RobustAutoencoder(enc, dec)


def test_feature_equivariance_error_finds_the_circular_shift():
    fa = torch.rand(3, 4, 6, 5)
    offsets = torch.tensor([[0, 0], [2, 4], [-1, 3]])
    assert feature_equivariance_error(fa, circular_shift(fa, offsets)).max() == 0
    assert (feature_equivariance_error(fa, torch.rand(3, 4, 6, 5)) > 0.1).all()
    g = torch.Generator().manual_seed(0)
    o = random_offsets(1000, 6, 5, g)
    assert o[:, 0].min() == 0 and o[:, 0].max() == 5 and o[:, 1].max() == 4


def test_shift_consistency_lps_exact_stride_not():
    data = EmbeddedCrops("val", 16, num=16)
    results = {}
    for mode in ("lps", "stride"):
        enc, ae = pair(mode)
        results[mode] = shift_consistency(enc, data, "layer3", ae.reconstruct, batch_size=8)
    lps, stride = results["lps"], results["stride"]
    assert lps["consistency"] == 1.0 and lps["feature_equiv_error"] < 1e-5
    assert lps["recon_exact"] == 1.0 and lps["recon_equiv_error"] <= 1e-5
    assert stride["feature_equiv_error"] > 1e-3 and stride["recon_exact"] == 0.0
    assert stride["recon_equiv_error"] > 1e-3 and 0 < stride["psnr"] < 60


def test_cli_writes_table_and_json(tmp_path, capsys):
    from apps.cli import main
    from inversion.decoders import save_decoder

    enc, ae = pair("lps")
    save_encoder(enc, tmp_path / "enc.pt")
    save_decoder(ae.decoders["layer3"], tmp_path / "dec.pt", enc.config())
    out = tmp_path / "shift.json"
    code = main(
        [
            "shift-consistency",
            "--encoder",
            str(tmp_path / "enc.pt"),
            "--decoder",
            str(tmp_path / "dec.pt"),
            "--size",
            "16",
            "--max-images",
            "8",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "consistency" in printed and "100.0%" in printed
    result = json.loads(out.read_text())
    assert result["downsample"] == "lps" and result["consistency"] == 1.0 and result["recon_exact"] == 1.0
    assert result["layer"] == "layer3" and result["images"] == 8


def test_cli_refuses_sizes_the_lps_encoder_cannot_split(tmp_path, capsys):
    from apps.cli import main

    enc, _ = pair("lps")
    save_encoder(enc, tmp_path / "enc.pt")
    code = main(["shift-consistency", "--encoder", str(tmp_path / "enc.pt"), "--size", "18", "--max-images", "2"])
    assert code == 2
    assert "9x9" in capsys.readouterr().err  # layer2 halves 18 to 9, which layer3's LPD cannot split
