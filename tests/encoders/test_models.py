import copy

import pytest
import torch

from encoders import RFIError, create_encoder, list_encoders
from encoders.nets.models import IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.parametrize("arch", list_encoders())
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


def model_path_output(enc, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The tapped module's output captured (with a forward hook) while the classifier path ``enc.logits`` runs."""
    captured = []
    handle = enc.model.get_submodule(enc.taps[layer]).register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        enc.logits(x)
    finally:
        handle.remove()
    return captured[0]


def test_features_share_weights_with_classifier_and_state_dict_has_no_copies():
    enc = create_encoder("resnet18", width=0.125, small_input=True, layers=["layer2"]).eval()
    x = torch.rand(2, 3, 16, 16)
    before = enc(x)["layer2"]
    torch.testing.assert_close(before, model_path_output(enc, "layer2", x), rtol=0, atol=0)
    # The feature extractor holds the classifier's parameter and buffer tensors themselves, not copies ...
    extractor = enc._extractor(("layer2",))
    model_tensors = {id(t) for t in [*enc.model.parameters(), *enc.model.buffers()]}
    tapped = [*extractor.parameters(), *extractor.buffers()]
    assert tapped and all(id(t) in model_tensors for t in tapped)
    assert all(k.startswith(("model.", "normalizer.")) for k in enc.state_dict())  # ... and saves none
    # ... so a change to the classifier's weights shows in the features, for the same input.
    with torch.no_grad():
        enc.model.layer1[0].conv1.weight.add_(1.0)
    after = enc(x)["layer2"]
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, model_path_output(enc, "layer2", x), rtol=0, atol=0)
    # A deep copy taps its own weights: changing the original leaves the copy's features alone.
    twin = copy.deepcopy(enc)
    with torch.no_grad():
        enc.model.layer1[0].conv1.weight.mul_(-1.0)
        torch.testing.assert_close(twin(x)["layer2"], after, rtol=0, atol=0)
        assert (enc(x)["layer2"] - after).abs().max() > 1e-3


def test_exception_unknown_architecture_lists_valid():
    with pytest.raises(RFIError, match="resnet18"):
        create_encoder("resnet19")


def test_exception_unknown_layer_lists_valid():
    with pytest.raises(RFIError, match="layer3"):
        create_encoder("resnet18", width=0.125, layers=["layer5"])


def test_input_gradient_through_a_feature_tap_is_the_model_paths():
    """Attacks and inversion differentiate features w.r.t. the image: the tap's input gradient must be the one
    of the same activation computed on the classifier path."""
    enc = create_encoder("vgg16", width=0.125, small_input=True, layers=["relu2_1"]).eval()
    x = torch.rand(1, 3, 32, 32, requires_grad=True)  # the classifier path needs 32 px (5 poolings)
    (grad,) = torch.autograd.grad(enc(x)["relu2_1"].sum(), x)
    (expected,) = torch.autograd.grad(model_path_output(enc, "relu2_1", x).sum(), x)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected)


def test_float64_input_is_computed_in_the_weights_dtype(tiny_encoder_net):
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    feats = tiny_encoder_net(x)
    assert all(v.dtype == torch.float32 for v in feats.values())
    torch.testing.assert_close(feats["layer3"], tiny_encoder_net(x.float())["layer3"])
    assert tiny_encoder_net.logits(x).dtype == torch.float32
