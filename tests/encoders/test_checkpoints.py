import pytest
import torch
import torchvision
from torchvision.transforms import v2

from encoders import RFIError, create_encoder
from encoders.core.serialization import save_checkpoint
from encoders.weights.checkpoints import (
    encoder_checkpoint,
    encoder_fingerprint,
    encoder_from_checkpoint,
    load_encoder,
    save_encoder,
)
from tests.conftest import tiny_net


@pytest.mark.parametrize("arch", ["alexnet", "resnet18", "resnet50"])
def test_full_size_encoders_are_torchvision_definitions(arch):
    torch.manual_seed(0)
    enc = create_encoder(arch, num_classes=10).eval()
    tv = getattr(torchvision.models, arch)(num_classes=10).eval()
    assert {k: v.shape for k, v in enc.model.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    tv.load_state_dict(enc.model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    norm = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        torch.testing.assert_close(enc.logits(x), tv(norm(x)))


def test_saved_encoder_loads_back_with_the_same_outputs(tmp_path):
    enc = create_encoder("vgg16", width=0.125, small_input=True, batch_norm=True, num_classes=3).eval()
    path = save_encoder(enc, tmp_path / "enc.pt", note="hello")
    assert torch.load(path, weights_only=True)["note"] == "hello"
    back = load_encoder(path, layers=["relu3_1"])
    assert back.config() == enc.config() and back.layers == ["relu3_1"] and not back.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x)["relu3_1"], enc(x, layers=["relu3_1"])["relu3_1"])
    with pytest.raises(RFIError, match="holds a vgg16 encoder, not vgg19"):
        load_encoder(path, name="vgg19")
    with pytest.raises(RFIError, match="name or a checkpoint"):
        create_encoder()


# ----------------------------------------------------------------------------- issue 21: NaN weights, unknown formats
def test_an_encoder_with_nan_weights_is_refused_by_name(tmp_path):
    enc = tiny_net()
    with torch.no_grad():
        enc.model.fc.weight.fill_(float("nan"))
    path = save_encoder(enc, tmp_path / "nan.pt")
    with pytest.raises(RFIError, match=r"nan.pt holds NaN or Inf values \(first in 'state_dict/model.fc.weight'\)"):
        load_encoder(path)


def test_an_unknown_format_is_not_read_as_a_foreign_file(tmp_path):
    state = {f"module.model.{k}": v for k, v in tiny_net().model.state_dict().items()}
    save_checkpoint({"format": "rfi-classifier", "model": state}, tmp_path / "other.pt")
    with pytest.raises(RFIError, match="other.pt has an unknown checkpoint format 'rfi-classifier'"):
        load_encoder(tmp_path / "other.pt", "resnet18")
    with pytest.raises(RFIError, match=r"x.pt \(encoder\) is an rfi-encoder file of version 2"):
        encoder_from_checkpoint({**encoder_checkpoint(tiny_net()), "version": 2}, "x.pt (encoder)")


def test_the_fingerprint_tells_two_encoders_of_the_same_settings_apart():
    a, b = tiny_net(seed=0), tiny_net(seed=1)
    assert a.config() == b.config()
    assert encoder_fingerprint(a) == encoder_fingerprint(tiny_net(seed=0)) != encoder_fingerprint(b)
