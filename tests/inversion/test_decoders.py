"""The fully convolutional ``Decoder`` and the ``RobustAutoencoder`` core (multiscale, tiling, fit checks)."""

from __future__ import annotations

import re

import pytest
import torch

from encoders import create_encoder
from encoders.core.errors import RFIError
from encoders.core.serialization import load_checkpoint, save_checkpoint
from encoders.data.embedded import embedded_image, region
from encoders.weights.checkpoints import encoder_fingerprint, save_encoder
from inversion import (
    Decoder,
    RobustAutoencoder,
    check_images,
    load_decoder,
    save_decoder,
)
from inversion.autoencoder import model_kind
from inversion.decoders import decoder_from_checkpoint
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    return tiny_net()


@pytest.mark.parametrize("stride,h,w", [(4, 4, 4), (4, 8, 8), (4, 16, 16), (4, 5, 7), (2, 6, 3), (1, 9, 9)])
def test_decoder_output_is_stride_times_features(stride, h, w):
    dec = Decoder(32, stride=stride, layer="layer3", channels=16, min_channels=8).eval()
    out = dec(torch.randn(2, 32, h, w))
    assert out.shape == (2, 3, h * stride, w * stride)
    assert out.min() >= 0 and out.max() <= 1
    assert dec.upsampling == stride


def test_decoder_skips_and_their_checks():
    dec = Decoder(
        32, stride=4, layer="layer3", channels=16, min_channels=8, skips={"layer1": (8, 1), "layer2": (16, 2)}
    )
    assert dec.input_layers == ["layer3", "layer1", "layer2"]
    feats = {
        "layer3": torch.randn(1, 32, 4, 6),
        "layer2": torch.randn(1, 16, 8, 12),
        "layer1": torch.randn(1, 8, 16, 24),
    }
    assert dec(feats).shape == (1, 3, 16, 24)
    with pytest.raises(RFIError, match="skip features"):
        dec(feats["layer3"])
    with pytest.raises(RFIError, match="no matching resolution"):
        Decoder(32, stride=4, layer="layer3", skips={"layer4": (64, 8)})
    with pytest.raises(RFIError, match="expects 32 channels"):
        Decoder(32, stride=4, layer="layer3")(torch.randn(1, 31, 4, 4))


def test_image_level_skip_shares_a_stage_and_carries_the_input(encoder):
    """``input`` (the image itself, stride 1) is a skip like any layer, next to ``layer1`` at stride 1."""
    info = encoder.feature_info()
    assert info["input"] == (3, 1) and "input" not in encoder.layer_names
    torch.manual_seed(0)
    dec = Decoder(
        *info["layer3"], "layer3", channels=16, min_channels=8, skips={"input": info["input"], "layer1": info["layer1"]}
    ).eval()
    ae = RobustAutoencoder(encoder, dec)
    x = torch.rand(2, 3, 32, 32)
    feats = ae.encode(x)
    assert list(feats) == ["layer3", "input", "layer1"]
    assert torch.equal(feats["input"], x)
    y = ae.reconstruct(x)
    assert y.shape == x.shape
    # The output depends on the pixels through the skip, not only through the features.
    changed = dict(feats, input=feats["input"] + 1.0)
    assert not torch.allclose(ae.decode(changed), ae.decode(feats))
    with pytest.raises(RFIError, match="unknown layer 'inputs'"):
        encoder(x, layers=["inputs"])


def test_residual_decoder_starts_as_identity_and_learns_a_correction(encoder, tmp_path):
    info = encoder.feature_info()
    with pytest.raises(RFIError, match="needs the 'input' skip"):
        Decoder(*info["layer3"], "layer3", residual=True, skips={"layer1": info["layer1"]})
    torch.manual_seed(0)
    dec = Decoder(
        *info["layer3"],
        "layer3",
        channels=16,
        min_channels=8,
        residual=True,
        skips={"input": info["input"], "layer1": info["layer1"]},
    )
    ae = RobustAutoencoder(encoder, dec)
    x = torch.rand(2, 3, 24, 40)
    assert torch.equal(ae.reconstruct(x), x)  # zero correction at initialisation
    # One gradient step on a target moves it away from the identity (gradients reach the correction).
    dec.train()
    loss = (dec(encoder(x, layers=dec.input_layers)) - x.flip(-1)).pow(2).mean()
    loss.backward()
    assert dec.tail.weight.grad.abs().sum() > 0
    with torch.no_grad():
        dec.tail.weight -= 10 * dec.tail.weight.grad
    dec.eval()
    assert not torch.equal(ae.reconstruct(x), x)
    loaded, _ = load_decoder(save_decoder(dec, tmp_path / "res.pt", encoder.config()))
    assert loaded.config()["residual"] is True
    assert torch.equal(RobustAutoencoder(encoder, loaded).reconstruct(x), ae.reconstruct(x))


def test_decoder_checkpoint_round_trip(tmp_path, encoder):
    torch.manual_seed(1)
    dec = Decoder(
        32, stride=4, layer="layer3", channels=16, min_channels=8, skips={"layer1": (8, 1)}, padding_mode="replicate"
    ).eval()
    path = save_decoder(dec, tmp_path / "d.pt", encoder.config(), note="x")
    loaded, ckpt = load_decoder(path)
    assert ckpt["note"] == "x" and ckpt["encoder"]["arch"] == "resnet18"
    assert loaded.config() == dec.config()
    feats = {"layer3": torch.randn(2, 32, 4, 4), "layer1": torch.randn(2, 8, 16, 16)}
    assert torch.equal(loaded(feats), dec(feats))
    with pytest.raises(RFIError, match="not an RFI decoder"):
        decoder_from_checkpoint({"format": "rfi-encoder"}, "x.pt")


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (64, 64), (45, 70), (17, 3)])
def test_reconstruct_any_size(encoder, size):
    ae = RobustAutoencoder(encoder, Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    x = torch.rand(2, 3, *size)
    out = ae.reconstruct(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    feats = ae.encode(torch.rand(1, 3, 32, 32))
    assert list(feats) == ["layer3"] and feats["layer3"].shape == (1, 32, 8, 8)
    assert ae.decode(feats).shape == (1, 3, 32, 32)


def _max_jump_ratio(tiled: torch.Tensor, whole: torch.Tensor) -> float:
    """Worst ratio, over rows and columns, of the mean step between neighbouring pixels in the tiled
    output to the same step in the whole-image output: ~1 without seams, >> 1 at a visible seam."""
    ratios = []
    for dim in (2, 3):
        n = tiled.shape[dim] - 1
        other = tuple(d for d in range(4) if d != dim)
        step_t = (tiled.narrow(dim, 1, n) - tiled.narrow(dim, 0, n)).abs().mean(other)
        step_w = (whole.narrow(dim, 1, n) - whole.narrow(dim, 0, n)).abs().mean(other)
        ratios.append(float((step_t / step_w.clamp_min(1e-4)).max()))
    return max(ratios)


def test_tiles_blend_without_seams(tiny_encoder_path, tiny_decoder_path):
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, tiny_decoder_path)
    x = region(embedded_image("chelsea"), "val")[None, :, :96, :96].contiguous()
    whole = ae.reconstruct(x)
    error = (whole - x).abs().mean()
    blended = ae.reconstruct(x, tile=48)  # default overlap: tile // 4
    hard = ae.reconstruct(x, tile=48, overlap=0)  # abutting tiles: what a seam looks like
    assert blended.shape == x.shape
    assert (blended - whole).abs().mean() < 0.25 * error  # tiling changes far less than the decoder's own error
    assert _max_jump_ratio(blended, whole) < 2.0
    assert _max_jump_ratio(hard, whole) > 4.0  # the measure does see seams


def test_encoder_decoder_fit_is_checked(encoder, tmp_path, tiny_encoder_path, tiny_decoder_path):
    with pytest.raises(RFIError, match="do not fit"):
        RobustAutoencoder(encoder, Decoder(99, stride=4, layer="layer3"))
    with pytest.raises(RFIError, match="valid: layer1, layer2, layer3, layer4"):
        RobustAutoencoder(encoder, Decoder(32, stride=4, layer="relu3_1"))
    with pytest.raises(RFIError, match="is an encoder checkpoint"):
        RobustAutoencoder.from_checkpoints(tiny_encoder_path, tiny_encoder_path)
    ckpt = load_checkpoint(tiny_decoder_path)
    ckpt["encoder"]["arch"] = "vgg16"
    save_checkpoint(ckpt, tmp_path / "vgg_decoder.pt")
    with pytest.raises(RFIError, match="trained for a vgg16 encoder"):
        RobustAutoencoder.from_checkpoints(tiny_encoder_path, tmp_path / "vgg_decoder.pt")
    wide = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
    with pytest.raises(RFIError, match=r"trained on another resnet18 encoder .*differs in width 0.125 vs 0.25"):
        RobustAutoencoder.from_checkpoints(wide, tiny_decoder_path)
    with pytest.raises(RFIError, match="do not fit"):  # a deliberate mismatch still has to fit
        RobustAutoencoder.from_checkpoints(wide, tiny_decoder_path, allow_mismatch=True)


def test_bad_images_are_refused_and_files_round_trip(encoder, tmp_path):
    ae = RobustAutoencoder(encoder, Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    bad = torch.rand(1, 3, 16, 16)
    bad[0, 0, 0, 0] = float("nan")
    for x, match in ((bad, "NaN"), (torch.rand(1, 3, 16, 16) * 2, r"\[0, 1\]"), (torch.rand(3, 16, 16), "B, 3, H, W")):
        with pytest.raises(RFIError, match=match):
            ae.reconstruct(x)
    with pytest.raises(RFIError, match="NaN"):
        check_images(bad)
    ae.save(tmp_path / "ae.pt")
    again = RobustAutoencoder.load(tmp_path / "ae.pt")
    x = torch.rand(1, 3, 24, 24)
    assert torch.equal(again.reconstruct(x), ae.reconstruct(x))


# ----------------------------------------------------------------------------- issue 21: pairs, kinds, layers
def test_a_decoder_records_its_encoder_and_refuses_another(encoder, tmp_path):
    dec = Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8)
    path = save_decoder(dec, tmp_path / "d.pt", encoder, encoder_path="runs/robust/checkpoint.pt")
    assert load_decoder(path)[1]["encoder_sha256"] == encoder_fingerprint(encoder)
    other = tiny_net(seed=1)  # the same settings, other weights: a "standard" encoder for a "robust" decoder
    save_encoder(other, tmp_path / "standard.pt")
    with pytest.raises(
        RFIError,
        match=r"d.pt was trained on another resnet18 encoder than .*standard.pt \(differs "
        r"in its weights; it was trained on runs/robust/checkpoint.pt\): "
        r".*--allow-mismatch",
    ):
        RobustAutoencoder.from_checkpoints(tmp_path / "standard.pt", path)
    assert RobustAutoencoder.from_checkpoints(tmp_path / "standard.pt", path, allow_mismatch=True).layer == "layer3"
    assert RobustAutoencoder.from_checkpoints(encoder, path).layer == "layer3"
    settings_only = save_decoder(dec, tmp_path / "old.pt", encoder.config())  # as files written before
    assert "encoder_sha256" not in load_decoder(settings_only)[1]
    assert RobustAutoencoder.from_checkpoints(other, settings_only).layer == "layer3"


def test_a_decoder_with_nan_weights_is_refused(tmp_path):
    dec = Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8)
    with torch.no_grad():
        dec.tail.bias.fill_(float("inf"))
    with pytest.raises(RFIError, match=r"d.pt holds NaN or Inf values \(first in 'state_dict/tail.bias'\)"):
        load_decoder(save_decoder(dec, tmp_path / "d.pt"))


@pytest.mark.parametrize(
    "recorded, wanted, message",
    [
        ({"app": "style"}, "denoise", "is not a denoiser (rfi denoise train): it is a style pyramid (rfi style train)"),
        ({"app": "denoise"}, "style", "is not a style pyramid (rfi style train): it is a denoiser (rfi denoise train)"),
        ({"anomaly": {"threshold": 1.0}}, "denoise", "is not a denoiser (rfi denoise train): it is an anomaly model"),
    ],
)
def test_a_model_file_of_another_kind_is_refused(recorded, wanted, message, encoder, tmp_path):
    ae = RobustAutoencoder(encoder, Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    path = ae.save(tmp_path / "m.pt", **recorded)
    with pytest.raises(RFIError, match=re.escape(f"m.pt {message}")):
        RobustAutoencoder.load(path, kind=wanted)
    assert RobustAutoencoder.load(path).kind == model_kind(recorded)
    assert RobustAutoencoder.load(ae.save(tmp_path / "plain.pt"), kind=wanted).kind is None  # a plain file serves any


def test_an_unknown_layer_names_the_decoders_it_has(encoder):
    ae = RobustAutoencoder(encoder, Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    for call in (
        lambda: ae.reconstruct(torch.rand(1, 3, 16, 16), layer="layer1"),
        lambda: ae.reconstruct(torch.rand(1, 3, 16, 16), layer="layer1", tile=8),
        lambda: ae.pad(torch.rand(1, 3, 16, 16), layer="layer1"),
    ):
        with pytest.raises(RFIError, match=r"no decoder for layer 'layer1' \(have: layer3\)"):
            call()
