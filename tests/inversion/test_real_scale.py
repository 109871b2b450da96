"""Real scale: decoders at any stride and size, robustness-library encoders as they come, the paper preset.

Everything is tiny (encoders at width 0.125 in their full-size layout, so the strides are
the real ones: AlexNet 4 / 8 / 17, VGG and ResNet powers of two) and runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.cli import main
from encoders import create_encoder
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from encoders.core.serialization import load_checkpoint
from encoders.weights.checkpoints import save_encoder
from encoders.weights.interop import export_robustness
from inversion import Decoder, RobustAutoencoder, load_decoder, save_decoder
from inversion.decoders import decoder_preset, stage_sizes
from inversion.discriminator import build_discriminator, discriminator_from_config
from inversion.losses import DecoderLoss
from inversion.train import (
    DecoderSection,
    TrainDecoderConfig,
    build_decoder,
    decoder_capacity,
    train_decoder,
)
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(224, 224), (201, 201), (227, 190)]
LAYERS = {
    "alexnet": ["conv1", "conv2", "conv3", "conv4", "conv5"],
    "vgg16": ["relu1_2", "relu2_1", "relu4_1", "relu5_1"],
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
}
BASE = "configs/decoder/resnet18_robust_layer3.yaml"
TINY = [
    "data.size=16",
    "data.train_crops=32",
    "data.val_crops=4",
    "batch_size=8",
    "decoder.channels=8",
    "decoder.min_channels=8",
    "sample_every=0",
    "log_every=1",
    "device=cpu",
    "encoder.layer=layer3",
]


def _encoder(arch: str):
    torch.manual_seed(0)
    return create_encoder(arch, width=0.125, num_classes=10).eval()  # full-size layout (small_input=False)


@pytest.mark.parametrize("arch", list(LAYERS))
def test_decoders_give_exactly_the_input_size(arch):
    """Every layer of every architecture, at 224 px and odd sizes: the issue's 208-vs-224 failure."""
    enc = _encoder(arch)
    info = enc.feature_info()
    for layer in LAYERS[arch]:
        channels, stride = info[layer]
        ae = RobustAutoencoder(enc, Decoder(channels, stride, layer, channels=8, min_channels=4))
        for size in SIZES:
            x = torch.rand(1, 3, *size)
            feats = ae.encode(x)
            assert tuple(ae.decode(feats, size=size).shape[-2:]) == size, (layer, size)
            rec = ae.reconstruct(x)
            assert rec.shape == x.shape, (layer, size)
            assert 0 <= rec.min() and rec.max() <= 1
    # AlexNet's strides really are not powers of two
    if arch == "alexnet":
        assert [info[k][1] for k in LAYERS["alexnet"]] == [4, 8, 17, 17, 17]


def test_stage_sizes_hit_every_anchor():
    assert stage_sizes(13, 4, {3: 224}) == [26, 54, 110, 224]  # AlexNet conv5 at 224 px: ~x2 per stage
    assert stage_sizes(7, 5, {}) == [14, 28, 56, 112, 224]  # no anchor: the plain x2 ladder
    assert stage_sizes(6, 4, {0: 13, 1: 27, 3: 111}) == [13, 27, 55, 111]
    assert stage_sizes(7, 5, {4: 201}) == sorted(stage_sizes(7, 5, {4: 201}))


def test_alexnet_skips_land_at_their_resolution():
    enc = _encoder("alexnet")
    info = enc.feature_info()
    dec = Decoder(
        info["conv5"][0],
        info["conv5"][1],
        "conv5",
        channels=8,
        min_channels=4,
        skips={"conv2": info["conv2"], "conv1": info["conv1"], "input": info["input"]},
    ).eval()
    assert dec.skip_at == {0: ["conv2"], 1: ["conv1"], 3: ["input"]}
    ae = RobustAutoencoder(enc, dec)
    for size in SIZES:
        x = torch.rand(2, 3, *size)
        feats = ae.encode(x)
        sizes = dec.stage_sizes(feats["conv5"], feats, size)
        assert sizes[0] == tuple(feats["conv2"].shape[-2:]) and sizes[1] == tuple(feats["conv1"].shape[-2:])
        assert sizes[-1] == size
        assert ae.decode(feats).shape == x.shape  # the input skip alone sets the size
    with pytest.raises(RFIError, match="differs from its stride-1 skip"):
        dec(feats, size=(100, 100))


def test_power_of_two_strides_are_unchanged(tmp_path):
    """Existing decoders: same parameter names, same config, same output with or without ``size``."""
    torch.manual_seed(0)
    dec = Decoder(32, 4, "layer3", channels=16, min_channels=8, skips={"layer1": (8, 1)}).eval()
    assert list(dec.state_dict()) == [
        "head.0.0.weight",
        "head.0.1.weight",
        "head.0.1.bias",
        "head.0.1.running_mean",
        "head.0.1.running_var",
        "head.0.1.num_batches_tracked",
        "head.1.body.0.0.weight",
        "head.1.body.0.1.weight",
        "head.1.body.0.1.bias",
        "head.1.body.0.1.running_mean",
        "head.1.body.0.1.running_var",
        "head.1.body.0.1.num_batches_tracked",
        "head.1.body.1.weight",
        "head.1.body.2.weight",
        "head.1.body.2.bias",
        "head.1.body.2.running_mean",
        "head.1.body.2.running_var",
        "head.1.body.2.num_batches_tracked",
        "stages.0.0.weight",
        "stages.0.1.weight",
        "stages.0.1.bias",
        "stages.0.1.running_mean",
        "stages.0.1.running_var",
        "stages.0.1.num_batches_tracked",
        "stages.1.0.weight",
        "stages.1.1.weight",
        "stages.1.1.bias",
        "stages.1.1.running_mean",
        "stages.1.1.running_var",
        "stages.1.1.num_batches_tracked",
        "tail.weight",
        "tail.bias",
    ]
    assert set(dec.config()) == {
        "in_channels",
        "stride",
        "layer",
        "channels",
        "min_channels",
        "blocks",
        "skips",
        "padding_mode",
        "norm",
    }
    feats = {"layer3": torch.randn(2, 32, 5, 7), "layer1": torch.randn(2, 8, 20, 28)}
    with torch.no_grad():
        plain = dec(feats)
        sized = dec(feats, size=(20, 28))
        ladder = Decoder(32, 4, "layer3", channels=16, min_channels=8).eval()
        x = torch.randn(1, 32, 6, 3)
        assert torch.equal(ladder(x), ladder(x, size=(24, 12)))
    assert torch.equal(plain, sized)
    loaded, _ = load_decoder(save_decoder(dec, tmp_path / "d.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(feats), plain)


# ----------------------------------------------------------------------------- presets
def test_presets_and_their_overrides(tmp_path):
    assert decoder_capacity(DecoderSection(), 256) == decoder_preset("cpu", 256)
    paper = decoder_capacity(DecoderSection(preset="paper"), 256)
    assert paper == {"channels": 256, "min_channels": 32, "blocks": 2, "stage_blocks": 1, "spectral_norm": True}
    assert decoder_capacity(DecoderSection(preset="paper"), 2048)["channels"] == 512
    assert decoder_capacity(DecoderSection(preset="paper", channels=16, blocks=0), 256)["channels"] == 16
    with pytest.raises(RFIError, match="decoder.preset"):
        decoder_preset("huge", 8)
    enc = _encoder("alexnet")
    cpu = build_decoder(enc, "conv5", DecoderSection())
    big = build_decoder(enc, "conv5", DecoderSection(preset="paper"))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(big) > 5 * count(cpu)
    assert big.config()["spectral_norm"] and big.config()["stage_blocks"] == 1
    assert all(hasattr(m, "parametrizations") for m in big.modules() if isinstance(m, torch.nn.Conv2d))
    feats = enc(torch.rand(2, 3, 201, 201), layers=["conv5"])["conv5"]
    big.train()(feats, size=(201, 201))  # a training-mode pass updates the spectral-norm vectors
    big.eval()
    loaded, _ = load_decoder(save_decoder(big, tmp_path / "paper.pt", enc.config()))
    with torch.no_grad():
        assert torch.equal(loaded(feats, size=(201, 201)), big(feats, size=(201, 201)))


def test_spectral_norm_discriminator_and_summed_losses():
    for kind in ("deepsim", "patch"):
        d = build_discriminator(kind, 16, 8, spectral_norm=True)
        again = discriminator_from_config(d.config())
        again.load_state_dict(d.state_dict())
        assert d.config()["spectral_norm"] is True
    enc = _encoder("resnet18")
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    mean = DecoderLoss(enc, "layer2", pixel=1.0, feature=1.0)(x, y)[1]
    total = DecoderLoss(enc, "layer2", pixel=1.0, feature=1.0, reduction="sum")(x, y)[1]
    assert torch.allclose(total["pixel"], mean["pixel"] * x.numel())
    fx, fy = (enc(t, layers=["layer2"])["layer2"] for t in (x, y))
    assert torch.allclose(total["feature"], (fx - fy).pow(2).sum(), rtol=1e-4)
    with pytest.raises(RFIError, match="reduction"):
        DecoderLoss(enc, "layer2", reduction="max")


# ----------------------------------------------------------------------------- foreign encoders
@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A small ResNet-18 as an RFI checkpoint and as the robustness library writes it."""
    root = tmp_path_factory.mktemp("foreign")
    enc = tiny_net()
    return save_encoder(enc, root / "rfi.pt"), export_robustness(enc, root / "imagenet_l2_3_0.pt")


def _image_folder(root: Path, count: int = 6, size: int = 80) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 2)):
        for i in range(n):
            path = root / split / "class_a" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((size, size + 7, 3)) * 255).astype(np.uint8)).save(path)
    return root


def test_robustness_checkpoint_through_the_commands(foreign, tmp_path, capsys):
    rfi_path, rob_path = foreign
    assert set(load_checkpoint(rob_path)) == {"model", "epoch"}
    out = tmp_path / "dec"
    # Without the architecture: one line naming the config key to set.
    assert (
        main(["train-decoder", "--config", BASE, f"encoder.checkpoint={rob_path}", *TINY, "steps=2", f"out={out}"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder.arch=resnet50" in err[0] and str(rob_path) in err[0]
    assert not out.exists()
    # With it: trains, and the decoder records the encoder it was trained for.
    assert (
        main(
            [
                "train-decoder",
                "--config",
                BASE,
                f"encoder.checkpoint={rob_path}",
                "encoder.arch=resnet18",
                *TINY,
                "steps=2",
                f"out={out}",
            ]
        )
        == 0
    )
    ckpt = load_checkpoint(out / "decoder.pt")
    assert ckpt["encoder"]["arch"] == "resnet18" and ckpt["config"]["encoder"]["arch"] == "resnet18"
    # rfi invert: the decoder says which architecture the file is; --arch works too.
    img = tmp_path / "in" / "photo.png"
    img.parent.mkdir()
    Image.fromarray((np.random.default_rng(1).random((37, 53, 3)) * 255).astype(np.uint8)).save(img)
    for extra, name in (([], "a"), (["--arch", "resnet18"], "b")):
        assert (
            main(
                [
                    "invert",
                    str(img),
                    "--encoder",
                    str(rob_path),
                    "--decoder",
                    str(out / "decoder.pt"),
                    "--out",
                    str(tmp_path / name),
                    "--device",
                    "cpu",
                    *extra,
                ]
            )
            == 0
        )
        assert Image.open(tmp_path / name / "photo.png").size == (53, 37)
    a, b = (np.asarray(Image.open(tmp_path / n / "photo.png")) for n in "ab")
    assert np.array_equal(a, b)
    # the same as through the RFI checkpoint of the same weights
    same = RobustAutoencoder.from_checkpoints(rfi_path, out / "decoder.pt")
    via = RobustAutoencoder.from_checkpoints(rob_path, out / "decoder.pt")
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(same.reconstruct(x), via.reconstruct(x))
    # --method optimize without a decoder: nothing records the architecture, so --arch is asked for.
    capsys.readouterr()
    assert (
        main(
            [
                "invert",
                str(img),
                "--encoder",
                str(rob_path),
                "--method",
                "optimize",
                "--layer",
                "layer2",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "c"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--arch resnet50" in err[0]
    assert (
        main(
            [
                "invert",
                str(img),
                "--encoder",
                str(rob_path),
                "--method",
                "optimize",
                "--layer",
                "layer2",
                "--steps",
                "1",
                "--arch",
                "resnet18",
                "--out",
                str(tmp_path / "c"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    # rfi evaluate
    assert (
        main(
            [
                "evaluate",
                "--encoder",
                str(rob_path),
                "--decoder",
                str(out / "decoder.pt"),
                "--scales",
                "1",
                "--num",
                "2",
                "--out",
                str(tmp_path / "eval"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )


def test_apps_name_their_arch_key(foreign, tmp_path):
    from apps.anomaly import AnomalyConfig, fit
    from apps.denoise import load_denoiser_config, train_denoiser
    from apps.style.config import StyleConfig
    from apps.style.pyramid import check_pyramid_config

    _, rob_path = foreign
    cfg = load_config(StyleConfig, None, [f"train.encoder.checkpoint={rob_path}", "layers=[layer1,layer2]"])
    with pytest.raises(RFIError, match=r"train\.encoder\.arch=resnet50"):
        check_pyramid_config(cfg)
    cfg.train.encoder.arch = "resnet18"
    assert check_pyramid_config(cfg) == ["layer1", "layer2"]
    with pytest.raises(RFIError, match=r"with arch \(e\.g\. arch=resnet50\)"):
        fit(load_config(AnomalyConfig, None, [f"encoder={rob_path}"]), str(tmp_path / "nothing"), tmp_path / "m.pt")
    with pytest.raises(RFIError, match=r"train\.encoder\.arch=resnet50"):
        train_denoiser(
            load_denoiser_config(None, [f"train.encoder.checkpoint={rob_path}", f"train.out={tmp_path / 'den'}"])
        )
    assert not (tmp_path / "den").exists()  # refused before anything is written


# ----------------------------------------------------------------------------- the paper configs
@pytest.mark.parametrize(
    "config,arch",
    [
        ("configs/paper/alexnet_conv5_imagenet.yaml", "alexnet"),
        ("configs/paper/resnet50_layer4_robustness.yaml", "resnet50"),
    ],
)
def test_paper_configs_run(config, arch, tmp_path):
    """Each paper config loads and trains a step on a folder of images, with a random encoder of its
    architecture (small width) given as the file type the config expects."""
    cfg = load_config(TrainDecoderConfig, config, [])
    assert cfg.decoder.preset == "paper" and cfg.data.source == "folder" and cfg.data.size == 224
    assert (cfg.loss.pixel, cfg.loss.feature, cfg.loss.adversarial) == (2e-6, 0.01, 100.0)
    assert cfg.loss.disc_spectral_norm and tuple(cfg.optim.betas) == tuple(cfg.optim.disc_betas) == (0.0, 0.9)
    assert (cfg.optim.lr, cfg.optim.disc_lr) == (3e-4, 1.2e-3)
    torch.manual_seed(0)
    enc = create_encoder(arch, width=0.125, num_classes=10).eval()
    if cfg.encoder.arch:  # the ResNet-50 config takes a robustness-library file as it comes
        path = export_robustness(enc, tmp_path / "imagenet_l2_3_0.pt")
    else:
        path = save_encoder(enc, tmp_path / "encoder.pt")
    data = _image_folder(tmp_path / "images")
    cfg = load_config(
        TrainDecoderConfig,
        config,
        [
            f"encoder.checkpoint={path}",
            f"data.root={data}",
            "data.size=67",
            "steps=1",
            "batch_size=2",
            "num_workers=0",
            "sample_every=1",
            "log_every=1",
            "checkpoint_every=0",
            "device=cpu",
            f"out={tmp_path / 'run'}",
        ],
    )
    ckpt = load_checkpoint(train_decoder(cfg))
    assert ckpt["decoder"]["spectral_norm"] and ckpt["decoder"]["stage_blocks"] == 1
    assert ckpt["discriminator"]["config"]["spectral_norm"]
    ae = RobustAutoencoder.from_checkpoints(path, tmp_path / "run" / "decoder.pt")
    x = torch.rand(1, 3, 67, 67)
    assert ae.reconstruct(x).shape == x.shape
