"""CvT encoders, plain and truly shift-equivariant (encoders/nets/cvt.py) and their autoencoders."""

from __future__ import annotations

import pytest
import torch

from encoders import RFIError, create_encoder
from encoders.nets.cvt import AdaptiveKVProjection, KVProjection
from encoders.nets.equivariant_vit import AdaptiveTokenizer
from encoders.nets.models import Encoder
from encoders.robust.shift import feature_equivariance_error
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder
from inversion.upsample import polyphase_options
from tests.inversion.conftest import equivariance_errors

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=16, depths=[1, 2], num_heads=[1, 3], patch_size=4)  # multiple 16
SHIFTS = [(1, 0), (0, 3), (5, 7), (-3, 2), (13, 9)]  # not multiples of any stride


def tiny(equivariant: bool, seed: int = 0, **kw) -> Encoder:
    torch.manual_seed(seed)
    return create_encoder("cvt_13", num_classes=5, equivariant=equivariant, small_input=True, **{**TINY, **kw}).eval()


def test_equivariant_logits_are_invariant_to_any_circular_shift_and_plain_ones_are_not():
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        for equivariant in (True, False):
            enc = tiny(equivariant)
            ref = enc.logits(x)
            worst = max((enc.logits(x.roll(s, (2, 3))) - ref).abs().max().item() for s in SHIFTS)
            assert (worst <= 1e-5) if equivariant else (worst > 1e-3), (equivariant, worst)


def test_stage_taps_shapes_and_phases():
    enc = tiny(True)
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        feats = enc(x)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {"stage1": (2, 16, 16, 8), "stage2": (2, 48, 8, 4)}
        assert list(feats.phases) == ["stages.0.0.proj.level0", "stages.0.0.proj.level1", "stages.1.0.proj"]
        shifted = enc(x.roll((3, 5), (2, 3)))
        for layer in feats:
            assert feature_equivariance_error(feats[layer], shifted[layer]).max() <= 1e-5
    default = create_encoder("cvt_13", num_classes=5).eval()  # CvT-13: 64-192-384 channels at strides 4, 8, 16
    assert [tuple(v.shape) for v in default(torch.rand(1, 3, 64, 64)).values()] == [
        (1, 64, 16, 16),
        (1, 192, 8, 8),
        (1, 384, 4, 4),
    ]


def test_adaptive_modules_are_equivariant_alone():
    torch.manual_seed(0)
    tok = AdaptiveTokenizer(8, 8, 2, kernel_size=3, padding=1).eval()  # a later stage's token embedding
    kv = AdaptiveKVProjection(8).eval()
    x = torch.rand(2, 8, 16, 16)
    with torch.no_grad():
        y, (k, v) = tok(x), kv(x)
        for s in SHIFTS:
            xs = x.roll(s, (2, 3))
            assert feature_equivariance_error(y, tok(xs)).max() == 0
            ks, vs = kv(xs)
            # keys and values move together (the same phase): one shift explains both
            both = feature_equivariance_error(torch.cat([k, v], 1), torch.cat([ks, vs], 1))
            assert both.max() <= 1e-6
    assert set(kv.state_dict()) - {k for k in kv.state_dict() if "selector" in k} == set(KVProjection(8).state_dict())


def test_gradcheck_of_the_adaptive_kv_projection():
    torch.manual_seed(0)
    kv = AdaptiveKVProjection(3).double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.cat(kv(t), 1), (x,))


@pytest.mark.parametrize("selection", ["norm", "learned"])
def test_checkpoint_round_trip(tmp_path, selection):
    from encoders.weights.checkpoints import save_encoder

    enc = tiny(True, selection=selection)
    save_encoder(enc, tmp_path / "e.pt")
    back = create_encoder(checkpoint=tmp_path / "e.pt").eval()
    assert back.config() == enc.config()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.logits(x), enc.logits(x))


def test_bad_sizes_and_options_are_refused_in_one_line():
    with pytest.raises(
        RFIError,
        match=r"^image size 40x32 does not fit the equivariant cvt_13: height and width "
        r"must be multiples of 16 \(last stage stride 8 x key/value stride 2\), "
        r"e\.g\. 48x32$",
    ):
        tiny(True).logits(torch.rand(1, 3, 40, 32))
    assert tiny(False).logits(torch.rand(1, 3, 40, 36)).shape == (1, 5)  # plain: any size
    with pytest.raises(RFIError, match=r"stage 2 has 48 channels.*num_heads\[1\]=5"):
        create_encoder("cvt_13", **{**TINY, "num_heads": [1, 5]})
    with pytest.raises(RFIError, match=r"must have the same length, 1 to 3"):
        create_encoder("cvt_13", **{**TINY, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})
    with pytest.raises(RFIError, match=r"^equivariant=True: only for swin_t / .*cvt_13, not vgg16$"):
        create_encoder("vgg16", width=0.125, equivariant=True)


@pytest.mark.parametrize("selection", ["norm", "learned"])
def test_gradients_flow_in_training_mode(selection):
    enc = tiny(True, selection=selection).train()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    torch.nn.functional.cross_entropy(enc.logits(x), torch.tensor([0, 3])).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing and x.grad.abs().sum() > 0


@pytest.mark.parametrize("layer", ["stage1", "stage2"])
def test_equivariant_autoencoder_reconstruction_shifts_exactly(layer):
    shifts = torch.tensor([[1, 0], [3, 5], [-7, 2]])
    x = torch.rand(2, 3, 32, 32)
    for equivariant in (True, False):
        enc = tiny(equivariant)
        channels, stride = enc.feature_info(32)[layer]
        dec = Decoder(channels, stride, layer, channels=16, min_channels=8, **polyphase_options(enc, layer))
        errors = equivariance_errors(RobustAutoencoder(enc, dec.eval()), x, shifts)
        assert (errors <= 1e-5).all() if equivariant else (errors > 1e-3).all(), (equivariant, errors)


def test_a_tiny_training_run(tmp_path):
    from encoders.robust.train import train_encoder
    from encoders.weights.checkpoints import load_encoder
    from tests.encoders.conftest import CONFIGS, tiny_config

    cfg = tiny_config(
        tmp_path,
        "model.width=1.0",
        "data.train_crops=64",
        "batch_size=32",
        "eval.max_images=16",
        "eval.steps=1",
        config=CONFIGS / "cvt_13_tiny_standard_equivariant.yaml",
    )
    enc = load_encoder(train_encoder(cfg).path)
    assert enc.arch == "cvt_13" and enc.equivariant and enc.options["embed_dim"] == 32
