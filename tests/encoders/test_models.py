import copy

import pytest
import torch

from encoders import ARCHITECTURES, RFIError, create_encoder
from encoders.models import IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_smoke_feature_taps(arch):
    enc = create_encoder(arch, num_classes=5, width=0.125, small_input=True).eval()
    x = torch.rand(2, 3, 32, 32)
    feats = enc(x)
    assert list(feats) == enc.layer_names
    info = enc.feature_info(size=32)
    for name, f in feats.items():
        channels, stride = info[name]
        assert f.shape == (2, channels, 32 // stride, 32 // stride)
    assert enc.logits(x).shape == (2, 5)


def test_expected_layer_names():
    assert create_encoder("alexnet", width=0.125).layer_names == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert create_encoder("resnet18", width=0.125).layer_names == ["layer1", "layer2", "layer3", "layer4"]
    vgg = create_encoder("vgg16", width=0.125).layer_names
    assert vgg[0] == "relu1_1" and "relu5_1" in vgg and len(vgg) == 13
    assert len(create_encoder("vgg19", width=0.125).layer_names) == 16


def test_thin_resnet18_widths_and_any_size():
    enc = create_encoder("resnet18", width=0.25, small_input=True, layers=["layer1", "layer4"]).eval()
    feats = enc(torch.rand(1, 3, 40, 56))
    assert feats["layer1"].shape == (1, 16, 40, 56)
    assert feats["layer4"].shape == (1, 128, 5, 7)


def test_normalisation_is_inside():
    enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=3).eval()
    x = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(enc.logits(x), enc.model((x - mean) / std))


def test_features_share_weights_with_classifier_and_state_dict_has_no_copies():
    enc = create_encoder("resnet18", width=0.125, small_input=True, layers=["layer2"])
    enc(torch.rand(1, 3, 16, 16))
    keys = list(enc.state_dict())
    assert all(k.startswith(("model.", "normalizer.")) for k in keys)
    before = enc(torch.rand(1, 3, 16, 16))["layer2"].sum()
    with torch.no_grad():
        enc.model.layer1[0].conv1.weight.add_(1.0)
    enc.eval()
    after = enc(torch.rand(1, 3, 16, 16))["layer2"].sum()
    assert not torch.equal(before, after)
    copy.deepcopy(enc)(torch.rand(1, 3, 16, 16))


def test_exception_unknown_architecture_lists_valid():
    with pytest.raises(RFIError, match="resnet18"):
        create_encoder("resnet19")


def test_exception_unknown_layer_lists_valid():
    with pytest.raises(RFIError, match="layer3"):
        create_encoder("resnet18", width=0.125, layers=["layer5"])


def test_gradcheck_input_gradient_flows():
    enc = create_encoder("vgg16", width=0.125, small_input=True, layers=["relu2_1"]).eval()
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    enc(x)["relu2_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
