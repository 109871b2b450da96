"""Equivariant Swin encoder + LPU decoder: exact circular-shift equivariance of the reconstruction."""

from __future__ import annotations

import pytest
import torch

from encoders import RFIError, create_encoder
from encoders.robust.shift import shift_consistency
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder, save_decoder
from inversion.upsample import polyphase_options
from tests.inversion.conftest import equivariance_errors

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, patch_size=4)
SHIFTS = torch.tensor([[1, 0], [0, 1], [3, 5], [-7, 2], [15, 9], [4, 8]])


def autoencoder(arch: str, equivariant: bool, layer: str = "stage1", **kw) -> RobustAutoencoder:
    torch.manual_seed(0)
    enc = create_encoder(arch, num_classes=5, equivariant=equivariant, small_input=True, **{**TINY, **kw})
    channels, stride = enc.feature_info()[layer]
    dec = Decoder(channels, stride, layer, channels=16, min_channels=8, **polyphase_options(enc, layer, "reflect"))
    return RobustAutoencoder(enc, dec)


@pytest.mark.parametrize("arch", ["swin_t", "swin_v2_t"])
@pytest.mark.parametrize("layer", ["stage1", "stage2"])
def test_equivariant_swin_autoencoder_is_exactly_shift_equivariant(arch, layer):
    x = torch.rand(2, 3, 32, 32)
    assert (equivariance_errors(autoencoder(arch, True, layer), x, SHIFTS) <= 1e-5).all()
    assert (equivariance_errors(autoencoder(arch, False, layer), x, SHIFTS) > 1e-3).all()  # the failure it fixes


def test_decoder_anchors_at_the_encoder_phases_and_round_trips(tmp_path):
    ae = autoencoder("swin_t", True, "stage2")
    dec = ae.decoders["stage2"]
    # coarse to fine: the patch merging, then the tokenizer's stride-4 phase as two stride-2 choices
    assert dec.upsample == "lps" and dec.phase_from == ["features.2", "features.0.0.level1", "features.0.0.level0"]
    save_decoder(dec, tmp_path / "dec.pt", ae.encoder.config())
    again = RobustAutoencoder.from_checkpoints(ae.encoder, tmp_path / "dec.pt")
    x = torch.rand(1, 3, 32, 64)
    assert torch.equal(again.reconstruct(x), ae.reconstruct(x))
    ae.save(tmp_path / "ae.pt")
    assert torch.equal(RobustAutoencoder.load(tmp_path / "ae.pt").reconstruct(x), ae.reconstruct(x))
    # sizes the encoder cannot take are padded to its multiple (32) and cropped back
    assert ae.reconstruct(torch.rand(1, 3, 45, 70)).shape == (1, 3, 45, 70)
    with pytest.raises(RFIError, match="needs the phases"):
        ae.decode(ae.encode(x)["stage2"])


def test_plain_decoder_refused_for_mismatched_phase_source():
    ae = autoencoder("swin_t", True, "stage1")
    plain = create_encoder("swin_t", num_classes=5, **TINY)
    with pytest.raises(RFIError, match="equivariant=True Swin"):
        RobustAutoencoder(plain, ae.decoders["stage1"])


def test_shift_consistency_reports_vit_autoencoders():
    from encoders.data.embedded import EmbeddedCrops

    ae = autoencoder("swin_v2_t", True, "stage1")
    r = shift_consistency(ae.encoder, EmbeddedCrops("val", 32, num=6), layer="stage1", reconstruct=ae.reconstruct)
    assert r["consistency"] == 1.0 and r["feature_equiv_error"] < 1e-5 and r["recon_exact"] == 1.0
    plain = autoencoder("swin_v2_t", False, "stage1")
    r = shift_consistency(plain.encoder, EmbeddedCrops("val", 32, num=6), layer="stage1", reconstruct=plain.reconstruct)
    assert r["recon_exact"] == 0.0 and r["feature_equiv_error"] > 1e-3
