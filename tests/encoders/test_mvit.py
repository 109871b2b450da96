"""MViTv2 encoders, plain and truly shift-equivariant (encoders/nets/mvit.py) and their autoencoders."""

from __future__ import annotations

import pytest
import torch
from timm.models.mvitv2 import MultiScaleBlock

from encoders import RFIError, create_encoder
from encoders.nets.equivariant_vit import polyphase_anchor
from encoders.nets.models import Encoder
from encoders.nets.mvit import AdaptiveMultiScaleBlock, AdaptivePatchEmbed, AdaptivePoolingAttention, to_map
from encoders.robust.shift import feature_equivariance_error
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder
from inversion.upsample import polyphase_options
from tests.inversion.conftest import equivariance_errors

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=16, depths=[1, 2], num_heads=[1, 2], patch_size=4, img_size=64)  # multiple 16
SHIFTS = [(1, 0), (0, 3), (5, 7), (-3, 2), (13, 9)]  # not multiples of the patch size or any pooling stride


def tiny(equivariant: bool, seed: int = 0, **kw) -> Encoder:
    torch.manual_seed(seed)
    return create_encoder(
        "mvit_v2_t", num_classes=5, equivariant=equivariant, small_input=True, **{**TINY, **kw}
    ).eval()


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
        assert {k: tuple(v.shape) for k, v in feats.items()} == {"stage1": (2, 16, 16, 8), "stage2": (2, 32, 8, 4)}
        assert list(feats.phases) == ["patch_embed.level0", "patch_embed.level1", "stages.1.blocks.0"]
        assert enc.phase_names("stage1") == ["patch_embed.level0", "patch_embed.level1"]
        shifted = enc(x.roll((3, 5), (2, 3)))
        for layer in feats:
            assert feature_equivariance_error(feats[layer], shifted[layer]).max() <= 1e-5
    plain = tiny(False)
    assert {k: tuple(v.shape) for k, v in plain(torch.rand(1, 3, 40, 36)).items()} == {
        "stage1": (1, 16, 10, 9),
        "stage2": (1, 32, 5, 5),
    }  # plain: any size up to img_size


def test_adaptive_patch_embed_is_equivariant_alone():
    torch.manual_seed(0)
    tok = AdaptivePatchEmbed(3, 8, 4, kernel_size=7, padding=3).eval()
    x = torch.rand(2, 3, 16, 16)
    y, size = tok(x)
    assert y.shape == (2, 16, 8) and size == [4, 4]
    for s in SHIFTS:
        assert feature_equivariance_error(to_map(y, size), to_map(tok(x.roll(s, (2, 3)))[0], size)).max() == 0


@pytest.mark.parametrize("stride_q", [1, 2])
def test_adaptive_block_is_equivariant_alone_and_keeps_timm_keys(stride_q):
    torch.manual_seed(0)
    timm_block = MultiScaleBlock(
        16,
        32,
        2,
        (8, 8),
        kernel_q=(3, 3),
        kernel_kv=(3, 3),
        stride_q=(stride_q,) * 2,
        stride_kv=(4, 4),
        has_cls_token=False,
        expand_attn=True,
    )
    keys = set(timm_block.state_dict())
    block = AdaptiveMultiScaleBlock(timm_block).eval()
    assert set(block.state_dict()) == keys
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        y, size = block(x, (8, 8))
        assert size == [8 // stride_q] * 2
        for s in [(1, 0), (3, 5), (6, 2)]:
            ys, _ = block(to_map(x, (8, 8)).roll(s, (2, 3)).flatten(2).transpose(1, 2), (8, 8))
            assert feature_equivariance_error(to_map(y, size), to_map(ys, size)).max() <= 1e-5


def test_anchor_moves_with_the_content():
    energy = torch.rand(2, 8, 8)
    a = polyphase_anchor(energy, 4)
    assert torch.equal(polyphase_anchor(energy.roll((1, 6), (1, 2)), 4), (a + torch.tensor([1, 6])) % 4)


def test_gradcheck_of_the_adaptive_pooling_attention():
    torch.manual_seed(0)
    timm_block = MultiScaleBlock(
        4,
        4,
        1,
        (4, 4),
        kernel_q=(3, 3),
        kernel_kv=(3, 3),
        stride_q=(2, 2),
        stride_kv=(2, 2),
        has_cls_token=False,
        expand_attn=True,
    )
    attn = AdaptivePoolingAttention(timm_block.attn).double().eval()
    anchor = torch.tensor([[1, 0]])
    x = torch.randn(1, 16, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t, (4, 4), anchor)[0], (x,))


def test_checkpoint_round_trip(tmp_path):
    from encoders.weights.checkpoints import save_encoder

    enc = tiny(True, selection="learned")
    save_encoder(enc, tmp_path / "e.pt")
    back = create_encoder(checkpoint=tmp_path / "e.pt").eval()
    assert back.config() == enc.config() and back.config()["selection"] == "learned"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.logits(x), enc.logits(x))
    assert Encoder(**enc.config()).config() == enc.config()


def test_plain_weights_say_their_options(tmp_path):
    enc = tiny(False)
    torch.save(
        {k.removeprefix("model."): v for k, v in enc.state_dict().items() if k.startswith("model.")},
        tmp_path / "timm.pth",
    )
    back = create_encoder("mvit_v2_t", checkpoint=str(tmp_path / "timm.pth")).eval()
    assert {k: back.options[k] for k in TINY} == TINY and back.num_classes == 5


def test_bad_sizes_and_options_are_refused_in_one_line():
    enc = tiny(True)
    with pytest.raises(
        RFIError,
        match=r"^image size 40x32 does not fit the equivariant mvit_v2_t: height and width "
        r"must be multiples of 16 \(the largest pooling stride it reaches\), e\.g\. "
        r"48x32$",
    ):
        enc.logits(torch.rand(1, 3, 40, 32))
    with pytest.raises(RFIError, match=r"^image size 96x96 is larger than the img_size 64 .* img_size >= 96"):
        tiny(False)(torch.rand(1, 3, 96, 96))
    with pytest.raises(RFIError, match=r"stage 2 has 32 channels.*num_heads\[1\]=3"):
        create_encoder("mvit_v2_t", **{**TINY, "num_heads": [1, 3]})
    with pytest.raises(RFIError, match="^selection='learned' needs equivariant=True$"):
        create_encoder("mvit_v2_t", selection="learned", **TINY)
    with pytest.raises(RFIError, match="^img_size: only for mvit_v2_t, not resnet18$"):
        create_encoder("resnet18", width=0.125, img_size=64)
    with pytest.raises(RFIError, match=r"downsample='lps': only for .*, not mvit_v2_t \(use equivariant=True\)"):
        create_encoder("mvit_v2_t", downsample="lps", **TINY)


def test_gradients_flow_in_training_mode():
    enc = tiny(True).train()
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
        "adv.steps=1",
        "model.options.img_size=32",
        "eval.max_images=16",
        "eval.steps=1",
        config=CONFIGS / "mvit_v2_tiny_robust_equivariant.yaml",
    )
    enc = load_encoder(train_encoder(cfg).path)
    assert enc.arch == "mvit_v2_t" and enc.equivariant and enc.options["embed_dim"] == 32


@pytest.mark.parametrize("equivariant", [False, True])
def test_feature_info_probes_within_img_size(equivariant):
    # A large-input MViTv2 (small_input=False) built for 64-px images: the default 224-px probe would be refused.
    enc = create_encoder("mvit_v2_t", num_classes=3, equivariant=equivariant, **TINY)  # img_size 64
    assert not enc.small_input
    info = enc.feature_info()
    assert [stride for _, stride in info.values()] == [1, 4, 8]
    with pytest.raises(RFIError, match="img_size 64"):
        enc.feature_info(224)  # an explicit size above img_size is still refused
