import pytest
import torch
import torchvision

from encoders import ARCHITECTURES, RFIError, create_encoder
from encoders.checkpoints import load_encoder, save_encoder

LAYERS = {"alexnet": [f"conv{i}" for i in range(1, 6)],
          "vgg16": ["relu1_1", "relu1_2", "relu2_1", "relu3_3", "relu4_1", "relu5_3"],
          "vgg19": ["relu1_1", "relu3_4", "relu5_1", "relu5_4"],
          "resnet18": [f"layer{i}" for i in range(1, 5)], "resnet50": [f"layer{i}" for i in range(1, 5)]}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_small_encoders_return_named_features_for_any_size(arch):
    enc = create_encoder(arch, width=0.125, small_input=True, num_classes=8).eval()
    assert set(LAYERS[arch]) <= set(enc.layer_names)
    for h, w in [(32, 32), (40, 56)]:
        with torch.no_grad():
            feats = enc(torch.rand(2, 3, h, w))
        assert list(feats) == enc.layer_names and all(f.shape[0] == 2 for f in feats.values())
        assert enc.logits(torch.rand(1, 3, h, w)).shape == (1, 8)
    info = enc.feature_info(32)
    assert [s for _, s in info.values()] == sorted(s for _, s in info.values())  # strides grow with depth
    assert list(enc(torch.rand(1, 3, 32, 32), layers=[LAYERS[arch][-1], LAYERS[arch][0]])) == \
        [LAYERS[arch][0], LAYERS[arch][-1]]  # shallow to deep


@pytest.mark.parametrize("arch", ["alexnet", "resnet18", "resnet50"])
def test_full_size_encoders_are_torchvision_definitions_with_normalisation_inside(arch):
    torch.manual_seed(0)
    enc = create_encoder(arch, num_classes=10).eval()
    tv = getattr(torchvision.models, arch)(num_classes=10).eval()
    assert {k: v.shape for k, v in enc.model.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    tv.load_state_dict(enc.model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    norm = torchvision.transforms.v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        torch.testing.assert_close(enc.logits(x), tv(norm(x)))


def test_width_and_small_input_shrink_the_model():
    small = create_encoder("resnet18", width=0.25, small_input=True, num_classes=8)
    assert small.feature_info(32)["layer1"] == (16, 1) and small.feature_info(32)["layer4"] == (128, 8)
    assert create_encoder("resnet18", num_classes=8).feature_info(224)["layer1"] == (64, 4)


def test_saved_encoder_loads_back_with_the_same_outputs(tmp_path):
    enc = create_encoder("vgg16", width=0.125, small_input=True, batch_norm=True, num_classes=3).eval()
    path = save_encoder(enc, tmp_path / "enc.pt", note="hello")
    back = load_encoder(path, layers=["relu3_1"])
    assert back.config() == enc.config() and back.layers == ["relu3_1"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x)["relu3_1"], enc(x, layers=["relu3_1"])["relu3_1"])
    with pytest.raises(RFIError, match="name or a checkpoint"):
        create_encoder()
    with pytest.raises(RFIError, match="width must be positive"):
        create_encoder("resnet18", width=0)
