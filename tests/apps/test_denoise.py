"""Denoising app: noise model, ``rfi denoise train`` and ``rfi denoise apply`` on tiny random encoders."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apps.cli import main
from apps.denoise import DenoiseConfig, GaussianNoise, add_noise, load_denoiser, model_file
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from encoders.core.imageio import read_image
from encoders.data.embedded import embedded_image, region
from encoders.weights.checkpoints import save_encoder
from inversion.metrics import psnr
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA = 50
APPLY = ["denoise", "apply"]


def tiny_overrides(encoder_path, steps=40):
    return [
        f"train.encoder.checkpoint={encoder_path}",
        "train.encoder.layer=layer2",
        "train.decoder.skips=[input,layer1]",
        "train.decoder.channels=16",
        "train.decoder.min_channels=16",
        "train.decoder.blocks=0",
        "train.data.size=24",
        "train.data.train_crops=160",
        "train.data.val_crops=8",
        f"train.steps={steps}",
        "train.batch_size=16",
        "train.optim.lr=0.005",
        "train.loss.feature=0",
        "train.loss.pixel_type=l2",
        "train.sample_every=0",
        "train.log_every=0",
        f"noise.sigma={SIGMA}",
    ]


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_encoder(tiny_net(), path)
    return path


@pytest.fixture(scope="module")
def model_path(encoder_path, tmp_path_factory):
    """A denoiser trained for a few steps through the CLI (shared by the tests below)."""
    out = tmp_path_factory.mktemp("denoiser")
    code = main(
        [
            "denoise",
            "train",
            "--config",
            "configs/apps/denoise.yaml",
            "--out",
            str(out / "run"),
            *tiny_overrides(encoder_path),
        ]
    )
    assert code == 0
    return out / "run" / "denoiser.pt"


# ----------------------------------------------------------------------------- noise model
def test_noise_is_seeded_clipped_and_has_the_asked_level():
    x = torch.full((4, 3, 64, 64), 0.5)
    a = add_noise(x, 25, torch.Generator().manual_seed(0))
    b = add_noise(x, 25, torch.Generator().manual_seed(0))
    c = add_noise(x, 25, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    assert abs(float((a - x).std()) * 255 - 25) < 1.0  # mid-grey: clipping is negligible at sigma 25
    big = add_noise(torch.rand(2, 3, 16, 16), 200, torch.Generator().manual_seed(0))
    assert big.min() >= 0 and big.max() <= 1 and (big == 0).any() and (big == 1).any()
    assert torch.equal(add_noise(x, 0), x)
    single = add_noise(x[0], 25, torch.Generator().manual_seed(0))  # (3, H, W) in, same out
    assert single.shape == x[0].shape


def test_blind_noise_draws_one_level_per_image_within_the_range():
    x = torch.full((16, 3, 64, 64), 0.5)
    t = GaussianNoise([5, 50])
    y = t(x, torch.Generator().manual_seed(0))
    levels = (y - x).flatten(1).std(1) * 255
    assert levels.min() > 4 and levels.max() < 51.5 and levels.max() - levels.min() > 15
    assert torch.equal(y, t(x, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("bad", [[-1], [30, 10], [1, 2, 3], ["a"]])
def test_exception_bad_sigma(bad):
    with pytest.raises(RFIError, match="sigma"):
        GaussianNoise(bad)
    with pytest.raises(RFIError, match=r"noise\.sigma"):
        load_config(DenoiseConfig, None, {"noise.sigma": bad})
    assert GaussianNoise(15).sigma == (15.0, 15.0) and GaussianNoise([5, 50]).sigma == (5.0, 50.0)


def test_train_and_apply_share_one_config_and_one_model_file():
    cfg = load_config(DenoiseConfig, "configs/apps/denoise.yaml", ["train.out=runs/d2"])
    assert model_file(cfg).as_posix() == "runs/d2/denoiser.pt" and cfg.apply.device == "auto"
    assert model_file(load_config(DenoiseConfig, None, ["model=m.pt"])).as_posix() == "m.pt"


# ----------------------------------------------------------------------------- denoise train
def test_train_denoiser_writes_a_model_that_improves_psnr(model_path, encoder_path):
    model, info = load_denoiser(model_path)
    assert info["app"] == "denoise" and info["sigma"] == [SIGMA, SIGMA] and info["layer"] == "layer2"
    assert list(model.decoders["layer2"].skips) == ["input", "layer1"]
    # A smooth held-out image (the training crops come from the other regions).
    clean = region(embedded_image("chelsea"), "val")[None, :, 100:164, 40:104]
    clean = F.avg_pool2d(clean, 3, 1, 1, count_include_pad=False)
    noisy = add_noise(clean, SIGMA, torch.Generator().manual_seed(0))
    out = model.reconstruct(noisy)
    assert out.shape == clean.shape
    gain = float(psnr(out, clean) - psnr(noisy, clean))
    assert gain > 1.0, f"denoiser did not improve PSNR (gain {gain:.2f} dB)"


def test_train_denoiser_refuses_to_overwrite_or_resume_with_other_noise(model_path, encoder_path, capsys):
    run = model_path.parent
    args = [
        "denoise",
        "train",
        "--config",
        "configs/apps/denoise.yaml",
        "--out",
        str(run),
        *tiny_overrides(encoder_path),
    ]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "noise.sigma=[0,55]", "--resume"]) == 2
    assert "noise" in capsys.readouterr().err


def test_exception_train_denoiser_bad_config(tmp_path, capsys):
    assert main(["denoise", "train", "--out", str(tmp_path), "noise.sigma=[50,10]"]) == 2
    assert "sigma" in capsys.readouterr().err
    assert main(["denoise", "train", "--config", "configs/apps/denoise.yaml", "train.decoder.wings=2"]) == 2
    assert "train.decoder.wings" in capsys.readouterr().err


# ----------------------------------------------------------------------------- denoise apply
def _write(path, h, w, mode="RGB"):
    rng = np.random.default_rng(h * w)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def test_denoise_any_size_same_names(model_path, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sizes = {"a.png": (37, 53), "b.jpg": (20, 9), "c.png": (70, 33)}
    for name, (h, w) in sizes.items():
        _write(src / name, h, w, "L" if name == "b.jpg" else "RGB")
    out = tmp_path / "out"
    assert (
        main(
            [
                *APPLY,
                str(src / "a.png"),
                str(src / "b.jpg"),
                str(src / "c.png"),
                "--model",
                str(model_path),
                "--out",
                str(out),
                "--sigma",
                "25",
                "--save-noisy",
            ]
        )
        == 0
    )
    for name, (h, w) in sizes.items():
        stem = name.rsplit(".", 1)[0]
        assert read_image(out / f"{stem}.png").shape == (3, h, w)
        assert (out / "noisy" / f"{stem}.png").is_file()
    # tiled: same size out, and close to the whole-image result away from the borders
    assert (
        main([*APPLY, str(src / "c.png"), "--model", str(model_path), "--out", str(tmp_path / "tiled"), "--tile", "32"])
        == 0
    )
    assert main([*APPLY, str(src / "c.png"), "--model", str(model_path), "--out", str(tmp_path / "whole")]) == 0
    tiled, whole = read_image(tmp_path / "tiled" / "c.png"), read_image(tmp_path / "whole" / "c.png")
    assert tiled.shape == whole.shape == (3, 70, 33)
    assert float(psnr(tiled[None], whole[None])) > 20


def test_denoise_reports_corrupt_files_by_name_and_writes_the_rest(model_path, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "good.png", 19, 23)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    assert main([*APPLY, str(src), "--model", str(model_path), "--out", str(out)]) == 1  # partial: EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "broken.png" in err and "good.png" not in err.split("failed")[-1]
    assert (out / "good.png").is_file() and not (out / "broken.png").exists()


def test_exception_denoise_bad_inputs(model_path, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "x.png", 16, 16)
    before = (src / "x.png").read_bytes()
    # --out equal to the input folder would overwrite x.png: refused, nothing written
    assert main([*APPLY, str(src), "--model", str(model_path), "--out", str(src)]) == 2
    assert "overwrite" in capsys.readouterr().err and (src / "x.png").read_bytes() == before
    # ... but a JPEG there would be written to x.png next to it, which overwrites nothing
    (tmp_path / "jpg").mkdir()
    _write(tmp_path / "jpg" / "y.jpg", 16, 16)
    assert main([*APPLY, str(tmp_path / "jpg"), "--model", str(model_path), "--out", str(tmp_path / "jpg")]) == 0
    assert (tmp_path / "jpg" / "y.png").is_file() and (tmp_path / "jpg" / "y.jpg").is_file()
    # missing model file, missing input, two inputs with the same output name
    assert main([*APPLY, str(src), "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert main([*APPLY, str(tmp_path / "missing.png"), "--model", str(model_path), "--out", str(tmp_path / "o")]) == 2
    assert "missing.png" in capsys.readouterr().err
    _write(tmp_path / "x.jpg", 16, 16)
    assert (
        main(
            [
                *APPLY,
                str(src / "x.png"),
                str(tmp_path / "x.jpg"),
                "--model",
                str(model_path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "both be written" in capsys.readouterr().err
    assert main([*APPLY, str(src), "--model", str(model_path), "--out", str(tmp_path / "o"), "--sigma", "-3"]) == 2
    assert "apply.sigma" in capsys.readouterr().err


def test_refine_blocks_add_full_resolution_capacity_and_keep_old_files_loading():
    """``refine_blocks``: residual blocks at the output resolution, fed the noisy image; off by default."""
    from inversion.decoders import Decoder, decoder_checkpoint, decoder_from_checkpoint

    skips = {"input": (3, 1), "layer1": (8, 1)}
    plain = Decoder(16, 4, "layer3", channels=16, min_channels=8, skips=skips, residual=True)
    refined = Decoder(16, 4, "layer3", channels=16, min_channels=8, skips=skips, residual=True, refine_blocks=2)
    assert "refine_blocks" not in plain.config() and refined.config()["refine_blocks"] == 2
    extra = sum(p.numel() for p in refined.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(p.numel() for p in refined.refine.parameters()) > 0
    feats = {"layer3": torch.rand(2, 16, 5, 7), "input": torch.rand(2, 3, 19, 27), "layer1": torch.rand(2, 8, 19, 27)}
    out = refined.eval()(feats)
    assert out.shape == (2, 3, 19, 27) and torch.equal(out, feats["input"])  # residual: starts as the identity
    # the refinement sees the image at full resolution: changing one input pixel changes its neighbourhood
    torch.nn.init.normal_(refined.tail.weight, std=0.1)
    a = refined(feats)
    feats2 = dict(feats, input=feats["input"].clone())
    feats2["input"][..., 10, 10] = 1 - feats2["input"][..., 10, 10]
    assert not torch.allclose(
        refined(feats2)[..., 8:13, 8:13] - feats2["input"][..., 8:13, 8:13],
        a[..., 8:13, 8:13] - feats["input"][..., 8:13, 8:13],
    )
    # an old checkpoint (no key) still loads as a plain decoder; a new one round-trips
    assert not hasattr(decoder_from_checkpoint(decoder_checkpoint(plain)), "refine")
    assert decoder_from_checkpoint(decoder_checkpoint(refined)).refine_blocks == 2
