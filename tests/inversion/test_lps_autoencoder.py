"""LPS encoder + LPU decoder: exact circular-shift equivariance of the reconstruction."""

from __future__ import annotations

import pytest
import torch

from encoders import RFIError, create_encoder
from encoders.nets.downsample import polyphase, select_phase
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder, load_decoder, save_decoder
from inversion.upsample import LPU, polyphase_options
from tests.inversion.conftest import equivariance_errors

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFTS = torch.tensor([[1, 0], [0, 1], [3, 5], [-7, 2], [15, 9]])


def autoencoder(downsample: str, layer: str = "layer3", skips=(), **kw) -> RobustAutoencoder:
    torch.manual_seed(0)
    kw.setdefault("small_input", True)
    enc = create_encoder("resnet18", width=0.125, num_classes=8, downsample=downsample, **kw)
    info = enc.feature_info()
    channels, stride = info[layer]
    dec = Decoder(
        channels,
        stride,
        layer,
        channels=16,
        min_channels=8,
        skips={s: info[s] for s in skips},
        **polyphase_options(enc, layer, "reflect"),
    )
    return RobustAutoencoder(enc, dec)


@pytest.mark.parametrize("kw", [{"skips": ("layer1",)}, {"layer": "layer2", "small_input": False}])
def test_lps_encoder_decoder_pair_is_exactly_shift_equivariant(kw):
    x = torch.rand(2, 3, 32, 32)
    assert (equivariance_errors(autoencoder("lps", **kw), x, SHIFTS) <= 1e-5).all()
    assert (equivariance_errors(autoencoder("stride", **kw), x, SHIFTS) > 1e-3).all()  # the failure it fixes


def test_lpu_puts_values_back_at_the_chosen_phase():
    x = torch.rand(3, 2, 8, 8)
    weights = torch.eye(4)[torch.tensor([0, 2, 3])]  # phases (0,0), (1,0), (1,1)
    y = select_phase(polyphase(x, 2), weights)
    up = LPU(2)(y, weights)
    for b, (i, j) in enumerate([(0, 0), (1, 0), (1, 1)]):
        assert torch.equal(up[b, :, i::2, j::2], y[b])  # the kept pixels are where they came from
        assert torch.equal(up[b].roll((-1, -1), (1, 2))[:, i::2, j::2], y[b])  # and held over the next pixels


def test_lps_decoder_checkpoint_round_trip_and_reconstruct(tmp_path):
    ae = autoencoder("lps")
    save_decoder(ae.decoders["layer3"], tmp_path / "dec.pt", ae.encoder.config())
    dec, _ = load_decoder(tmp_path / "dec.pt")
    assert dec.upsample == "lps" and dec.phase_from == ["layer3.0.conv1.1", "layer2.0.conv1.1"]
    again = RobustAutoencoder(ae.encoder, dec)
    x = torch.rand(1, 3, 32, 48)
    assert torch.equal(again.reconstruct(x), ae.reconstruct(x))
    assert again.reconstruct(x, tile=16, overlap=4).shape == x.shape  # tiles each carry their own phases
    ae.save(tmp_path / "ae.pt")
    assert torch.equal(RobustAutoencoder.load(tmp_path / "ae.pt").reconstruct(x), ae.reconstruct(x))


def test_default_decoder_unchanged():
    dec = autoencoder("stride").decoders["layer3"]
    assert "upsample" not in dec.config() and "phase_from" not in dec.config()
    assert list(Decoder(**{**dec.config(), "skips": {}}).state_dict()) == list(dec.state_dict())


def test_lps_decoder_errors():
    ae = autoencoder("lps")
    feats = ae.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(RFIError, match="needs the phases"):
        ae.decode(feats["layer3"])  # a bare tensor carries no phases
    assert ae.decode(feats["layer3"], phases=feats.phases).shape == (1, 3, 32, 32)
    with pytest.raises(RFIError, match="downsample='lps'"):
        RobustAutoencoder(
            create_encoder("resnet18", width=0.125, num_classes=8, small_input=True), ae.decoders["layer3"]
        )
    with pytest.raises(RFIError, match="padding_mode='circular'"):
        Decoder(32, 4, "layer3", upsample="lps", phase_from=["a", "b"])
