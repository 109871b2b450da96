from pathlib import Path

import kornia.color
import pytest
import torch

from apps.cli import main
from apps.style.config import StyleConfig
from apps.style.pyramid import layer_config
from apps.style.transfer import stylize
from encoders import RFIError
from encoders.core.config import load_config
from encoders.core.imageio import read_image, write_image
from encoders.weights.checkpoints import save_encoder
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder
from tests.conftest import tiny_net

LAYERS = ("layer1", "layer2", "layer3")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "apps" / "style.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: 1 thread (tests/conftest.py)


def tiny_pyramid(layers=LAYERS, seed=0, skips=False) -> RobustAutoencoder:
    enc = tiny_net(seed)
    info = enc.feature_info()
    decs = {
        k: Decoder(
            info[k][0],
            info[k][1],
            k,
            channels=16,
            min_channels=8,
            skips={"layer1": info["layer1"]} if skips and k != "layer1" else None,
        )
        for k in layers
    }
    for d in decs.values():  # non-trivial BatchNorm statistics, so eval-mode decoding is not the identity
        for m in d.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return RobustAutoencoder(enc, decs).eval()


@pytest.fixture(scope="module")
def ae():
    return tiny_pyramid()


def images(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["wct", "adain"])
def test_any_size_and_range(ae, method):
    content, style = images(2, 3, 29, 43), images(3, 21, 34, seed=2)
    out = stylize(ae, content, style, method=method, alpha=0.8)
    assert out.shape == content.shape
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    single = stylize(ae, content[0], [style], method=method, alpha=0.8)
    assert single.shape == (3, 29, 43)
    assert torch.allclose(single, out[0], atol=1e-5)
    tiny = stylize(ae, images(1, 3, 5, 7), images(3, 4, 3), method=method)  # smaller than the deepest stride
    assert tiny.shape == (1, 3, 5, 7) and torch.isfinite(tiny).all()


def test_alpha_zero_is_the_plain_reconstruction(ae):
    content, style = images(1, 3, 32, 40), images(1, 3, 24, 24, seed=2)
    out = stylize(ae, content, style, alpha=0.0, layers=["layer2"])
    assert torch.allclose(out, ae.reconstruct(content, "layer2"), atol=1e-5)
    # The whole pyramid at alpha=0: deepest layer first, each reconstruction re-encoded.
    chained = content
    for layer in reversed(LAYERS):
        chained = ae.reconstruct(chained, layer)
    assert torch.allclose(stylize(ae, content, style, alpha=0.0), chained, atol=1e-5)
    assert (stylize(ae, content, style, alpha=1.0) - chained).abs().max() > 1e-3


def _decoder_inputs(ae, layer):
    seen = []
    hook = ae.decoders[layer].register_forward_pre_hook(lambda m, args: seen.append(args[0][layer]))
    return seen, hook


def test_wct_and_adain_match_style_statistics_at_the_transformed_layer(ae):
    content, style = images(1, 3, 48, 48), images(1, 3, 40, 28, seed=3)
    target = ae.features(style, ["layer3"])["layer3"].flatten(2)[0].double()
    seen, hook = _decoder_inputs(ae, "layer3")
    try:
        stylize(ae, content, style, method="wct", layers=["layer3"])
        stylize(ae, content, style, method="adain", layers=["layer3"])
    finally:
        hook.remove()
    wct_feat, adain_feat = (s.flatten(2)[0].double() for s in seen)
    original = ae.features(content, ["layer3"])["layer3"].flatten(2)[0].double()
    scale = target.var(1).mean()
    # WCT can give the style's covariance only to content features of full rank (no dead channel).
    assert torch.linalg.eigvalsh(torch.cov(original)).min() > 1e-5
    assert (torch.cov(original) - torch.cov(target)).abs().max() > 0.1 * scale  # there was something to match
    assert torch.allclose(torch.cov(wct_feat), torch.cov(target), atol=1e-3 * scale)
    assert torch.allclose(wct_feat.mean(1), target.mean(1), atol=1e-4)
    assert torch.allclose(adain_feat.mean(1), target.mean(1), atol=1e-4)
    assert torch.allclose(adain_feat.std(1), target.std(1), atol=1e-3 * scale.sqrt())


def test_two_styles_with_weights_one_and_zero_equal_the_single_style(ae):
    content, s1, s2 = images(1, 3, 24, 30), images(3, 24, 24, seed=4), images(3, 30, 20, seed=5)
    for method in ("wct", "adain"):
        one = stylize(ae, content, [s1], method=method)
        assert torch.allclose(stylize(ae, content, [s1, s2], weights=[1, 0], method=method), one, atol=1e-6)
        assert torch.allclose(
            stylize(ae, content, [s1, s2], weights=[0, 3], method=method),
            stylize(ae, content, [s2], method=method),
            atol=1e-6,
        )
        mixed = stylize(ae, content, [s1, s2], weights=[0.5, 0.5], method=method)
        assert (mixed - one).abs().max() > 1e-4


def _chroma_gap(a, b):
    lab_a, lab_b = kornia.color.rgb_to_lab(a)[:, 1:], kornia.color.rgb_to_lab(b)[:, 1:]
    return float(
        (lab_a.mean((2, 3)) - lab_b.mean((2, 3))).abs().sum() + (lab_a.std((2, 3)) - lab_b.std((2, 3))).abs().sum()
    )


def test_preserve_color_keeps_the_content_colours(ae):
    g = torch.Generator().manual_seed(7)
    content = torch.rand(1, 3, 32, 32, generator=g) * torch.tensor([0.9, 0.4, 0.2]).view(1, 3, 1, 1)  # orange
    style = torch.rand(1, 3, 32, 32, generator=g) * torch.tensor([0.2, 0.5, 1.0]).view(1, 3, 1, 1)  # blue
    plain = stylize(ae, content, style)
    kept = stylize(ae, content, style, preserve_color=True)
    assert _chroma_gap(kept, content) < 0.5 * _chroma_gap(plain, content)
    luma = kornia.color.rgb_to_ycbcr
    assert (luma(kept)[:, 0] - luma(plain)[:, 0]).abs().mean() < 0.05  # the stylised luminance is kept


def test_tiled_decoding_equals_whole_decoding():
    ae = tiny_pyramid(("layer1", "layer3"), skips=True)
    feats = ae.encode(images(1, 3, 132, 100), "layer3")
    whole = ae.decode(feats, "layer3")
    side = (2 * ae.margins("layer3")[1] + 1) * 4  # the smallest exact tile: several tiles per side
    assert side < 100
    assert torch.allclose(ae.decode_tiled(feats, "layer3", tile=8), whole, atol=1e-5)  # raised to `side`
    content, style = images(1, 3, 50, 70), images(1, 3, 30, 30, seed=2)
    ref = stylize(ae, content, style)
    ae.max_pixels = 500  # every level of a 50x70 image now goes through tiles
    assert torch.allclose(stylize(ae, content, style, tile=16), ref, atol=1e-5)


def test_bad_arguments(ae):
    x = images(1, 3, 16, 16)
    with pytest.raises(RFIError, match="method"):
        stylize(ae, x, x, method="gram")
    with pytest.raises(RFIError, match="alpha"):
        stylize(ae, x, x, alpha=1.5)
    with pytest.raises(RFIError, match="weights"):
        stylize(ae, x, [x, x], weights=[1.0])
    with pytest.raises(RFIError, match="weights"):
        stylize(ae, x, [x, x], weights=[0, 0])
    with pytest.raises(RFIError, match="layer4"):
        stylize(ae, x, x, layers=["layer4"])
    with pytest.raises(RFIError, match=r"\[0, 1\]"):
        stylize(ae, x, x * 3)


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def files(tmp_path_factory, ae):
    root = tmp_path_factory.mktemp("style")
    model = root / "pyramid.pt"
    ae.save(model)
    paths = {"model": model}
    for name, shape, seed in (
        ("cat", (3, 27, 41), 1),
        ("dog", (3, 40, 33), 2),
        ("waves", (3, 30, 30), 3),
        ("stars", (3, 25, 35), 4),
    ):
        paths[name] = write_image(images(*shape, seed=seed), root / "in" / f"{name}.png")
    return paths


def test_cli_style_apply_end_to_end(files, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "style",
            "apply",
            str(files["cat"]),
            str(files["dog"]),
            "--style",
            str(files["waves"]),
            "--out",
            str(out),
            "--model",
            str(files["model"]),
            "--alpha",
            "0.7",
            "--quiet",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "dog.png"]
    assert read_image(out / "cat.png").shape == (3, 27, 41)
    assert read_image(out / "dog.png").shape == (3, 40, 33)

    sized = tmp_path / "sized"
    assert (
        main(
            [
                "style",
                "apply",
                str(files["cat"]),
                "--style",
                str(files["waves"]),
                "--style",
                str(files["stars"]),
                "--weights",
                "0.7,0.3",
                "--method",
                "adain",
                "--preserve-color",
                "--size",
                "48",
                "--out",
                str(sized),
                "--model",
                str(files["model"]),
                "--quiet",
            ]
        )
        == 0
    )
    assert [p.name for p in sized.iterdir()] == ["cat.png"]
    assert read_image(sized / "cat.png").shape == (3, 32, 48)

    each = tmp_path / "each"
    assert (
        main(
            [
                "style",
                "apply",
                str(files["cat"]),
                "--style",
                str(files["waves"]),
                "--style",
                str(files["stars"]),
                "--out",
                str(each),
                "--model",
                str(files["model"]),
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in each.iterdir()) == ["cat_stars.png", "cat_waves.png"]


def test_cli_missing_style_names_it_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no_such_style.jpg"
    code = main(
        [
            "style",
            "apply",
            str(files["cat"]),
            "--style",
            str(files["waves"]),
            "--style",
            str(missing),
            "--weights",
            "0.5,0.5",
            "--out",
            str(out),
            "--model",
            str(files["model"]),
        ]
    )
    assert code == 2
    assert "no_such_style.jpg" in capsys.readouterr().err
    assert not out.exists()
    code = main(
        [
            "style",
            "apply",
            str(files["cat"]),
            "--style",
            str(files["waves"]),
            "--out",
            str(out),
            "--model",
            str(tmp_path / "nothing.pt"),
        ]
    )
    assert code == 2 and "nothing.pt" in capsys.readouterr().err and not out.exists()
    code = main(
        [
            "style",
            "apply",
            str(files["cat"]),
            "--style",
            str(files["waves"]),
            "--style",
            str(files["stars"]),
            "--weights",
            "1",
            "--out",
            str(out),
            "--model",
            str(files["model"]),
        ]
    )
    assert code == 2 and "weights" in capsys.readouterr().err and not out.exists()


def test_cli_style_apply_reads_the_config_and_flags_win(files, tmp_path, capsys, monkeypatch):
    """The config's ``out`` is the default model, its ``apply:`` section the default settings; a flag wins."""
    seen = []
    monkeypatch.setattr("apps.commands.style.stylize", lambda ae, content, styles, **kw: seen.append(kw) or content)
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"out: {files['model']}\napply:\n  method: adain\n  alpha: 0.3\n  size: 20\n"
        f"  layers: [layer1, layer2]\n  device: cpu\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "style",
                "apply",
                str(files["cat"]),
                "--style",
                str(files["waves"]),
                "--out",
                str(out),
                "--config",
                str(config),
                "--quiet",
            ]
        )
        == 0
    )
    assert read_image(out / "cat.png").shape == (3, 13, 20)  # apply.size: the longer side
    assert seen[-1] | {"weights": None} == {
        "method": "adain",
        "alpha": 0.3,
        "preserve_color": False,
        "layers": ["layer1", "layer2"],
        "weights": None,
    }
    assert (
        main(
            [
                "style",
                "apply",
                str(files["cat"]),
                "--style",
                str(files["waves"]),
                "--out",
                str(tmp_path / "o2"),
                "--config",
                str(config),
                "--method",
                "wct",
                "--alpha",
                "0.9",
                "--preserve-color",
                "--layers",
                "layer3",
                "--size",
                "30",
                "--quiet",
            ]
        )
        == 0
    )
    assert read_image(tmp_path / "o2" / "cat.png").shape == (3, 20, 30)
    assert seen[-1] | {"weights": None} == {
        "method": "wct",
        "alpha": 0.9,
        "preserve_color": True,
        "layers": ["layer3"],
        "weights": None,
    }
    for flags, fragment in (
        (["--alpha", "1.5"], "'apply.alpha' in the command-line overrides must be in [0, 1]"),
        (["--method", "gram"], "'apply.method'"),
        (["--size", "0"], "'apply.size' in the command-line overrides must be >= 1"),
    ):
        code = main(
            [
                "style",
                "apply",
                str(files["cat"]),
                "--style",
                str(files["waves"]),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "bad"),
                *flags,
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_cli_style_without_a_sub_command_prints_help(capsys):
    assert main(["style"]) == 2
    assert "train" in capsys.readouterr().out


def test_per_layer_overrides_and_errors(tmp_path):
    cfg = load_config(
        StyleConfig,
        None,
        ["train.steps=7", "per_layer.layer1.decoder.channels=8", "per_layer.layer2={steps: 3}", f"out={tmp_path}/p.pt"],
    )
    one, two = layer_config(cfg, "layer1"), layer_config(cfg, "layer2")
    assert (one.decoder.channels, one.steps, one.encoder.layer) == (8, 100, "layer1")  # steps: configs/apps/style.yaml
    assert (two.decoder.channels, two.steps, two.encoder.layer) == (cfg.train.decoder.channels, 3, "layer2")
    assert one.out == str(tmp_path / "p_decoders" / "layer1")
    bad = load_config(StyleConfig, None, ["per_layer.layer1.decoder.chanels=8"])
    with pytest.raises(RFIError, match="per_layer.layer1.*chanels"):
        layer_config(bad, "layer1")


def test_cli_style_train_writes_a_pyramid_that_style_apply_uses(files, tmp_path, capsys):
    save_encoder(tiny_net(), tmp_path / "enc.pt")
    model = tmp_path / "pyr.pt"
    args = [
        "style",
        "train",
        "--config",
        str(CONFIG),
        "--out",
        str(model),
        "--quiet",
        f"train.encoder.checkpoint={tmp_path / 'enc.pt'}",
        "layers=[layer1, layer2]",
        "per_layer={}",
        "train.steps=2",
        "train.batch_size=4",
        "train.data.train_crops=8",
        "train.data.val_crops=4",
        "train.data.size=16",
        "train.decoder.channels=8",
        "train.decoder.min_channels=8",
        "train.log_every=0",
    ]
    assert main(args) == 0
    pyramid = RobustAutoencoder.load(model)
    assert pyramid.layers == ["layer1", "layer2"]
    assert (tmp_path / "pyr_decoders" / "layer2" / "decoder.pt").is_file()
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never overwritten without --resume
    assert main(args + ["--resume"]) == 0  # finished runs are reused
    out = tmp_path / "styled"
    assert (
        main(
            [
                "style",
                "apply",
                str(files["cat"]),
                "--style",
                str(files["waves"]),
                "--out",
                str(out),
                "--model",
                str(model),
                "--quiet",
            ]
        )
        == 0
    )
    assert read_image(out / "cat.png").shape == (3, 27, 41)
    bad = args[:-1] + ["layers=[layer1, layer9]"]
    assert main(bad) == 2 and "layer9" in capsys.readouterr().err


# ----------------------------------------------------------------------------- gradcheck (float64, tiny)
def _feature_pair():
    """Content and style features (float64) whose channel covariances have well-separated eigenvalues:
    WCT differentiates through ``torch.linalg.eigh``, whose gradient has 1 / (lambda_i - lambda_j) terms and
    is ill-conditioned for (near-)repeated eigenvalues, so gradcheck needs a well-conditioned input."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1)
    content = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=g) * scale
    style = torch.randn(1, 3, 3, 3, dtype=torch.float64, generator=g) * scale.flip(1)
    for f in (content, style):
        eig = torch.linalg.eigvalsh(torch.cov(f.flatten(2)[0]))
        assert (eig.diff() > 0.5).all() and eig.min() > 0.1, eig  # the precondition above
    return content.requires_grad_(), style.requires_grad_()


@pytest.mark.parametrize("method", ["adain", "wct"])
def test_gradcheck_feature_transforms(method):
    """AdaIN and WCT: gradients w.r.t. the content, the style features and a (B,) tensor alpha."""
    from apps.style.transforms import adain, wct

    fn = adain if method == "adain" else wct
    content, style = _feature_pair()
    alpha = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (content, style, alpha))
