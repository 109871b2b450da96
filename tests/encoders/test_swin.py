"""Swin / SwinV2 encoders, plain and truly shift-equivariant (encoders/nets/swin.py, encoders/nets/models.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import swin_transformer as tv_swin

from encoders import RFIError, create_encoder
from encoders.nets.models import Encoder
from encoders.robust.shift import feature_equivariance_error
from encoders.weights.checkpoints import load_encoder, load_state_dict_checked, save_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, patch_size=4)  # multiple: 8 x 4 = 32
ARCHS = ["swin_t", "swin_v2_t"]


def tiny(arch: str, equivariant: bool, seed: int = 0, **kw) -> Encoder:
    torch.manual_seed(seed)
    return create_encoder(arch, num_classes=5, equivariant=equivariant, **{**TINY, **kw}).eval()


def random_shifts(n: int, size: int, seed: int = 1) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    shifts = [tuple(torch.randint(size, (2,), generator=g).tolist()) for _ in range(n)]
    return shifts + [(1, 0), (0, 3), (5, 2)]  # always some that are multiples of neither patch nor window


@pytest.mark.parametrize("arch", ARCHS)
def test_equivariant_swin_logits_are_invariant_to_any_circular_shift(arch):
    x = torch.rand(4, 3, 32, 32)
    shifts = random_shifts(8, 32)
    assert any(dy % 4 or dx % 4 for dy, dx in shifts)
    with torch.no_grad():
        for equivariant in (True, False):
            enc = tiny(arch, equivariant)
            ref = enc.logits(x)
            worst = max((enc.logits(x.roll(s, (2, 3))) - ref).abs().max().item() for s in shifts)
            if equivariant:
                assert worst <= 1e-5, worst
            else:
                assert worst > 1e-3, worst  # the plain model is not: the failure being fixed


@pytest.mark.parametrize("arch", ARCHS)
def test_equivariant_swin_stage_maps_shift_with_the_input(arch):
    enc = tiny(arch, True)
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        feats = enc(x)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {"stage1": (2, 16, 16, 8), "stage2": (2, 32, 8, 4)}
        assert list(feats.phases) == ["features.0.0.level0", "features.0.0.level1", "features.2"]
        for s in [(3, 5), (17, 1), (8, 24)]:
            shifted = enc(x.roll(s, (2, 3)))
            for layer in feats:
                assert feature_equivariance_error(feats[layer], shifted[layer]).max() <= 1e-5

            # the phases say by how much: stride-4 map shift r with 4 r + phase' = s + phase (mod size)
            def offset(phases):
                fine, coarse = phases["features.0.0.level0"].argmax(1), phases["features.0.0.level1"].argmax(1)
                return torch.stack([fine // 2 + 2 * (coarse // 2), fine % 2 + 2 * (coarse % 2)], 1)

            a, b = offset(feats.phases), offset(shifted.phases)
            for i in range(2):
                r = ((torch.tensor(s) + a[i] - b[i]) // 4).tolist()
                assert torch.allclose(shifted["stage1"][i], feats["stage1"][i].roll(r, (1, 2)), atol=1e-5)


def test_plain_swin_taps_match_torchvision_and_load_its_state_dict(tmp_path):
    torch.manual_seed(0)
    ref = tv_swin.SwinTransformer(
        [4, 4],
        16,
        [2, 2],
        [2, 4],
        [4, 4],
        num_classes=7,
        block=tv_swin.SwinTransformerBlockV2,
        downsample_layer=tv_swin.PatchMergingV2,
    ).eval()
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    enc = create_encoder("swin_v2_t", checkpoint=str(tmp_path / "tv.pth"))  # options read off the weights
    assert enc.config() == {
        "arch": "swin_v2_t",
        "num_classes": 7,
        "width": 1.0,
        "small_input": False,
        "embed_dim": 16,
        "depths": [2, 2],
        "num_heads": [2, 4],
        "window_size": 4,
        "patch_size": 4,
        "stochastic_depth": 0.2,
        "equivariant": False,
    }
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.logits(x), ref(enc.normalizer(x)), atol=1e-6)
        stage2 = ref.features[:4](enc.normalizer(x)).permute(0, 3, 1, 2)
        assert torch.allclose(enc(x, layers=["stage2"])["stage2"], stage2, atol=1e-6)


@pytest.mark.slow  # builds two 28M-parameter models (about 20 s on a loaded 2-core machine)
def test_full_size_torchvision_swin_t_file_loads_with_its_architecture(tmp_path):
    full = tv_swin.swin_t()  # torchvision's definition, random weights (nothing downloads)
    torch.save(full.state_dict(), tmp_path / "swin_t.pth")
    enc = create_encoder("swin_t", checkpoint=str(tmp_path / "swin_t.pth"), layers=["stage4"])
    assert (enc.options["window_size"], enc.options["depths"], enc.layer_names) == (
        7,
        [2, 2, 6, 2],
        ["stage1", "stage2", "stage3", "stage4"],
    )


@pytest.mark.parametrize("selection", ["norm", "learned"])
def test_config_round_trip_and_checkpoint(tmp_path, selection):
    enc = tiny("swin_t", True, selection=selection)
    cfg = enc.config()
    assert cfg["equivariant"] is True and cfg["selection"] == selection and cfg["window_size"] == 4
    save_encoder(enc, tmp_path / "e.pt")
    back = load_encoder(tmp_path / "e.pt")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.logits(x), enc.logits(x))
    assert Encoder(**cfg).config() == cfg


def test_plain_checkpoint_into_equivariant_model_names_the_keys():
    plain, eq = tiny("swin_t", False), tiny("swin_t", True)
    with pytest.raises(
        RFIError,
        match=r"plain.pt does not fit Encoder swin_t: missing keys: model\.features\.0\.0"
        r"\.proj\.bias, model\.features\.0\.0\.proj\.weight; unexpected keys: "
        r"model\.features\.0\.0\.bias, model\.features\.0\.0\.weight$",
    ):
        load_state_dict_checked(eq, plain.state_dict(), "plain.pt")
    with pytest.raises(RFIError, match=r"missing keys: model\.features\.0\.0\.bias, model\.features\.0\.0\.weight"):
        load_state_dict_checked(plain, eq.state_dict(), "equivariant.pt")


def test_bad_sizes_and_options_are_refused_in_one_line():
    enc = tiny("swin_v2_t", True)
    with pytest.raises(
        RFIError,
        match=r"image size 40x32 does not fit the equivariant swin_v2_t: height and width "
        r"must be multiples of 32 \(total stride 8 x window 4\), e\.g\. 64x32",
    ):
        enc.logits(torch.rand(1, 3, 40, 32))
    with pytest.raises(RFIError, match="multiples of 32"):
        enc(torch.rand(1, 3, 32, 48))
    assert tiny("swin_v2_t", False).logits(torch.rand(1, 3, 40, 36)).shape == (1, 5)  # plain: any size
    with pytest.raises(
        RFIError, match="equivariant=True: only for swin_t / swin_v2_t / mvit_v2_t / cvt_13, not resnet18"
    ):
        create_encoder("resnet18", width=0.125, equivariant=True)
    with pytest.raises(RFIError, match="window_size: only for swin_t / swin_v2_t, not vgg16"):
        create_encoder("vgg16", window_size=4)
    with pytest.raises(RFIError, match=r"downsample='lps': only for alexnet / .* / resnet50, not swin_t \(use equi"):
        create_encoder("swin_t", downsample="lps", **TINY)
    with pytest.raises(RFIError, match=r"stage 2 has 32 channels.*num_heads\[1\]=3"):
        create_encoder("swin_t", **{**TINY, "num_heads": [2, 3]})
    from encoders.nets.registry import encoder_options

    with pytest.raises(RFIError, match="unknown model.options windows"):
        encoder_options({"windows": 4}, "model.options")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("selection", ["norm", "learned"])
def test_gradients_flow_in_training_mode(arch, selection):
    enc = tiny(arch, True, selection=selection).train()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    F.cross_entropy(enc.logits(x), torch.tensor([0, 3])).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert x.grad.abs().sum() > 0  # what PGD needs
    learned = [n for n, p in enc.named_parameters() if "scorer" in n]
    assert bool(learned) == (selection == "learned")
    assert all(enc.get_parameter(n).grad.abs().sum() > 0 for n in learned)


def test_learned_selection_is_equivariant_in_eval_mode_and_feature_info():
    enc = tiny("swin_t", True, selection="learned", seed=3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc.logits(x)
        assert max((enc.logits(x.roll(s, (2, 3))) - ref).abs().max() for s in random_shifts(4, 32)) <= 1e-5
    assert enc.feature_info() == {"input": (3, 1), "stage1": (16, 4), "stage2": (32, 8)}
    assert enc.size_multiple() == 32 and tiny("swin_t", False).size_multiple() == 1


def test_train_encoder_config_builds_and_trains_an_equivariant_swin(tmp_path, tiny_cfg):
    from pathlib import Path

    from encoders.robust.train import train_encoder

    config = Path(__file__).resolve().parents[2] / "configs" / "encoder" / "swin_t_tiny_robust_equivariant.yaml"
    cfg = tiny_cfg(
        tmp_path / "run",
        "data.size=32",
        "data.train_crops=48",
        "data.val_crops=16",
        "batch_size=24",
        "adv.steps=1",
        "eval.steps=1",
        "eval.max_images=8",
        "model.options.selection=learned",
        "model.arch=swin_v2_t",
        config=config,
    )
    path = train_encoder(cfg)
    enc = load_encoder(path)
    assert enc.arch == "swin_v2_t" and enc.equivariant and enc.options["selection"] == "learned"
    assert enc.config()["embed_dim"] == 48 and enc.width == 0.125  # the test's width override scales it to 6
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (enc.logits(x.roll((7, 3), (2, 3))) - enc.logits(x)).abs().max() <= 1e-5
    with pytest.raises(RFIError, match="unknown model.options heads"):
        train_encoder(tiny_cfg(tmp_path / "bad", "model.arch=swin_t", "model.options={heads: 2}"))
