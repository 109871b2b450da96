"""The registry of encoder architectures (encoders/nets/registry.py): listing, a family registered here, filters."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from encoders import Encoder, RFIError, create_encoder, list_encoders
from encoders.nets import registry
from encoders.nets.downsample import PhasedFeatures
from encoders.nets.registry import Built, EncoderFamily, encoder_family, encoder_options, register_encoder, scaled
from encoders.weights.checkpoints import load_encoder, save_encoder
from encoders.weights.interop import checkpoint_filter_fn, export_robustness, robustness_state_dict
from tests.conftest import tiny_net

BUILT_IN = ["alexnet", "vgg16", "vgg19", "resnet18", "resnet50", "swin_t", "swin_v2_t", "mvit_v2_t", "cvt_13"]


class ToyFamily(EncoderFamily):
    """A two-block CNN: what a new architecture's module holds (build, taps, options, filter, down-sampling)."""

    architectures = ("toynet",)
    options = {"toy_blocks": 1}
    classifier = "classifier"

    def build(self, arch, num_classes, width, small_input, toy_blocks=1, **options):
        c = scaled(16, width)
        layers = [nn.Conv2d(3, c, 3, 1 if small_input else 2, 1), nn.ReLU(), nn.MaxPool2d(2)]
        layers += [m for _ in range(toy_blocks) for m in (nn.Conv2d(c, c, 3, padding=1), nn.ReLU())]
        model = nn.Sequential(
            OrderedDict(
                features=nn.Sequential(*layers),
                pool=nn.AdaptiveAvgPool2d(1),
                flat=nn.Flatten(),
                classifier=nn.Linear(c, num_classes),
            )
        )
        taps = OrderedDict([("block1", "features.1"), ("block2", f"features.{len(layers) - 1}")])
        return Built(model, taps, {"toy_blocks": toy_blocks})

    def infer_kwargs(self, state):
        stem = state["model.features.0.weight"]
        return {"width": stem.shape[0] / 16}

    def checkpoint_filter_fn(self, state):  # the foreign library calls the classifier "head"
        return {k.replace("model.head.", "model.classifier."): v for k, v in state.items()}

    def downsample_layers(self, down, model, small_input):
        down.sequential(model, small_input)


@pytest.fixture
def toy(monkeypatch):
    """The toy family, registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    register_encoder(ToyFamily)
    return "toynet"


def test_listing_in_order_and_each_name_has_its_family():
    assert list_encoders() == BUILT_IN
    for name in list_encoders():
        assert name in encoder_family(name).architectures
    assert [encoder_family(n).convolutional for n in ("resnet18", "swin_t")] == [True, False]


def test_unknown_name_is_one_line_listing_the_valid_ones():
    with pytest.raises(RFIError) as err:
        create_encoder("resnet19")
    assert str(err.value) == f"unknown architecture 'resnet19' (valid: {', '.join(BUILT_IN)})"
    with pytest.raises(RFIError, match="unknown architecture 'vit'"):
        checkpoint_filter_fn({"w": torch.zeros(1)}, "vit")


def test_a_family_registered_here_is_created_by_name_and_round_trips(toy, tmp_path):
    assert list_encoders() == [*BUILT_IN, toy]
    torch.manual_seed(0)
    enc = create_encoder(toy, num_classes=3, width=0.5, small_input=True, toy_blocks=2).eval()
    feats = enc(torch.rand(2, 3, 16, 16))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"block1": (2, 8, 16, 16), "block2": (2, 8, 8, 8)}
    assert enc.config() == {"arch": toy, "num_classes": 3, "width": 0.5, "small_input": True, "toy_blocks": 2}
    back = load_encoder(save_encoder(enc, tmp_path / "toy.pt"))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.logits(x), enc.logits(x))
    lps = create_encoder(toy, num_classes=3, small_input=True, downsample="lps").eval()
    assert isinstance(lps(x), PhasedFeatures) and lps.phase_names("block2") == ["features.2.2"]


def test_options_belong_to_their_family(toy):
    with pytest.raises(RFIError, match="^toy_blocks: only for toynet, not resnet18$"):
        create_encoder("resnet18", toy_blocks=2)
    assert create_encoder("resnet18", width=0.125, toy_blocks=1, batch_norm=False).config()["arch"] == "resnet18"
    with pytest.raises(RFIError, match=r"^window_size: only for swin_t / swin_v2_t, not toynet$"):
        create_encoder(toy, window_size=4)
    with pytest.raises(RFIError, match=r"^unknown Encoder settings bogus for toynet \(valid: .*toy_blocks\)$"):
        create_encoder(toy, bogus=1)
    with pytest.raises(RFIError, match=r"^unknown model\.options bogus \(valid: .*toy_blocks.*\)$"):
        encoder_options({"bogus": 1}, "model.options")


def test_registering_a_taken_name_or_a_clashing_default_is_refused(toy):
    class Other(ToyFamily):
        pass

    with pytest.raises(ValueError, match="'toynet' is registered by ToyFamily already"):
        register_encoder(Other)

    class Clash(EncoderFamily):
        architectures = ("clash",)
        options = {"batch_norm": True}

    with pytest.raises(ValueError, match="batch_norm"):
        register_encoder(Clash)
    assert "clash" not in list_encoders()


def test_a_foreign_file_goes_through_its_familys_filter(toy, tmp_path):
    torch.manual_seed(0)
    ours = create_encoder(toy, num_classes=4, width=0.5).eval()
    foreign = {k.replace("classifier.", "head."): v for k, v in ours.model.state_dict().items()}
    assert "head.weight" in foreign
    torch.save(foreign, tmp_path / "foreign.pth")
    back = create_encoder(toy, checkpoint=str(tmp_path / "foreign.pth"))  # num_classes and width read off it
    assert (back.num_classes, back.width) == (4, 0.5)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.logits(x), ours.logits(x))


def test_alexnet_filter_renames_the_robustness_librarys_last_layer(tmp_path):
    enc = tiny_net(arch="alexnet")
    theirs = robustness_state_dict(enc)
    assert "module.model.last_layer.weight" in theirs and "module.model.classifier.6.weight" not in theirs
    state = checkpoint_filter_fn({"model": theirs, "epoch": 3}, "alexnet")
    assert torch.equal(state["model.classifier.6.weight"], enc.model.classifier[6].weight)
    back = create_encoder("alexnet", checkpoint=str(export_robustness(enc, tmp_path / "alex.pt")))
    assert back.config() == enc.config()


def test_encoder_is_built_from_the_registry_entry(tiny_encoder_net):
    assert tiny_encoder_net.family is encoder_family("resnet18")
    assert isinstance(Encoder(**tiny_encoder_net.config()), Encoder)
