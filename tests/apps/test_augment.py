"""StyleAugment and ``rfi augment`` on a tiny random autoencoder (no training needed)."""

from __future__ import annotations

import kornia.augmentation as K
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

import apps
import apps.style.augment as augment_module
from apps.cli import main as rfi
from apps.style.augment import StyleAugment
from apps.style.multiview import MultiView
from encoders.core.errors import RFIError
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ae() -> RobustAutoencoder:
    return RobustAutoencoder(tiny_net(), Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))


@pytest.fixture(scope="module")
def ae_file(ae, tmp_path_factory):
    return ae.save(tmp_path_factory.mktemp("model") / "ae.pt")


@pytest.fixture()
def batch() -> torch.Tensor:
    return torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(1))


def _write_png(path, seed, size=(20, 28)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture()
def style_dir(tmp_path):
    for i in range(3):
        _write_png(tmp_path / "styles" / f"s{i}.png", 10 + i, size=(16 + 8 * i, 24))
    (tmp_path / "styles" / "broken.png").write_bytes(b"not an image")  # skipped with a warning
    return tmp_path / "styles"


def test_exported_from_apps():
    assert apps.StyleAugment is StyleAugment and apps.MultiView is MultiView


def test_p0_is_identity(ae, batch):
    out = StyleAugment(ae, p=0.0, generator=0)(batch)
    assert torch.equal(out, batch)


def test_p1_changes_every_image(ae, batch):
    out = StyleAugment(ae, p=1.0, generator=0)(batch)
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    assert ((out - batch).abs().flatten(1).amax(1) > 1e-3).all()


def test_partial_p_leaves_unchosen_images_untouched(ae, batch):
    aug = StyleAugment(ae, p=0.5, generator=3)
    params = aug.make_params([batch])
    while not 0 < params["chosen"].sum() < len(batch):  # some images chosen, not all
        params = aug.make_params([batch])
    out = aug.stylize(batch, params)
    chosen = params["chosen"]
    assert torch.equal(out[~chosen], batch[~chosen])
    assert ((out[chosen] - batch[chosen]).abs().flatten(1).amax(1) > 1e-3).all()


def test_beta_zero_returns_input_exactly(ae, batch):
    out = StyleAugment(ae, p=1.0, beta=(0.0, 0.0), generator=0)(batch)
    assert torch.equal(out, batch)


def test_seeded_generator_is_deterministic(ae, batch):
    a = StyleAugment(ae, p=0.5, generator=torch.Generator().manual_seed(7))(batch)
    b = StyleAugment(ae, p=0.5, generator=torch.Generator().manual_seed(7))(batch)
    c = StyleAugment(ae, p=0.5, generator=torch.Generator().manual_seed(8))(batch)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_style_is_never_the_image_itself_draws(ae):
    aug = StyleAugment(ae, p=0.5, generator=0)
    seen = torch.zeros(5, 5)
    for _ in range(400):
        params = aug.make_params([torch.zeros(5, 3, 8, 8)])
        style, chosen = params["style"], params["chosen"]
        assert (style != torch.arange(5)).all()
        seen[torch.arange(5)[chosen], style[chosen]] += 1
    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    assert (seen[off_diagonal] > 0).all() and (seen.diagonal() == 0).all()  # every other image serves


def test_batch_style_is_never_the_image_itself_hook(ae, batch, monkeypatch):
    """Spy on adain: the style statistics given for each image are another image's."""
    calls, adain = [], augment_module.adain

    def spy(content, style, alpha=1.0, eps=1e-5):
        calls.append((content.mean(dim=(2, 3)), style.mean(dim=(2, 3))))
        return adain(content, style, alpha, eps)

    monkeypatch.setattr(augment_module, "adain", spy)
    aug = StyleAugment(ae, p=1.0, generator=0)
    for _ in range(3):
        aug(batch)
    own = ae.encode(batch)["layer3"].mean(dim=(2, 3))  # p=1: row i of the content is image i
    for content_mean, style_mean in calls:
        assert torch.allclose(content_mean, own, atol=1e-5)
        source = torch.cdist(style_mean, own).argmin(dim=1)
        assert torch.allclose(style_mean, own[source], atol=1e-4)  # the style is one of the images...
        assert (source != torch.arange(len(batch))).all()  # ...never the image itself


def test_style_folder(ae, style_dir):
    aug = StyleAugment(ae, p=1.0, styles=style_dir, generator=0, style_size=24)
    assert aug.num_styles == 3  # the unreadable file is skipped
    x = torch.rand(1, 3, 20, 20)  # a batch of one is fine with folder styles
    out = aug(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert aug.style_mean.shape == (3, 32)


def test_composes_with_torchvision_v2(ae, batch):
    pipeline = v2.Compose(
        [v2.RandomResizedCrop(16, antialias=True), v2.RandomHorizontalFlip(), StyleAugment(ae, p=1.0, generator=0)]
    )
    labels = torch.arange(len(batch))
    images, out_labels = pipeline(tv_tensors.Image(batch), labels)
    assert isinstance(images, tv_tensors.Image) and images.shape == (6, 3, 16, 16)
    assert torch.equal(out_labels, labels)


def test_composes_with_kornia(ae, batch):
    """Inside and around kornia pipelines, each step acts on the previous one's output, in order."""
    flip, gray = K.RandomHorizontalFlip(p=1.0), K.RandomGrayscale(p=1.0)
    inside = K.AugmentationSequential(flip, StyleAugment(ae, p=1.0, generator=0), gray)
    by_hand = gray(StyleAugment(ae, p=1.0, generator=0)(batch.flip(-1)))
    out = inside(batch)
    assert out.shape == batch.shape and torch.allclose(out, by_hand, atol=1e-6)
    assert not torch.allclose(out, gray(batch.flip(-1)), atol=1e-3)  # the style step did act
    assert not torch.allclose(out, gray(StyleAugment(ae, p=1.0, generator=0)(batch)).flip(-1), atol=1e-3)  # in order

    crop = K.RandomResizedCrop((16, 16))  # draws from torch's global generator, StyleAugment from its own
    around = nn.Sequential(
        K.AugmentationSequential(crop), StyleAugment(ae, p=1.0, generator=0), K.AugmentationSequential(gray)
    )
    torch.manual_seed(5)
    out = around(batch)
    torch.manual_seed(5)
    cropped = crop(batch)
    assert out.shape == (6, 3, 16, 16) and torch.allclose(
        out, gray(StyleAugment(ae, p=1.0, generator=0)(cropped)), atol=1e-6
    )
    assert torch.equal(out[:, 0], out[:, 1]) and not torch.allclose(out, gray(cropped), atol=1e-3)


def test_multiview(ae, batch):
    views = MultiView(StyleAugment(ae, p=1.0, generator=0), views=3)(batch)
    assert len(views) == 3 and all(v.shape == batch.shape for v in views)
    assert not torch.equal(views[0], views[1])
    two = MultiView([v2.RandomHorizontalFlip(p=1.0), StyleAugment(ae, p=0.0)])(batch)
    assert torch.equal(two[0], batch.flip(-1)) and torch.equal(two[1], batch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_keeps_dtype(ae, batch, dtype):
    out = StyleAugment(ae, p=1.0, generator=0)(batch.to(dtype))
    assert out.dtype == dtype and out.device == batch.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_the_batch_to_cuda(ae, batch):
    out = StyleAugment(ae, p=1.0, generator=0)(batch.cuda())
    assert out.is_cuda


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 1.5}, "p .*in \\[0, 1\\]"),
        ({"p": -0.1}, "p .*in \\[0, 1\\]"),
        ({"alpha": (0.8, 0.2)}, "alpha must be one number or a range"),
        ({"beta": (0.0, 1.2)}, "beta must be one number or a range"),
        ({"alpha": (-0.1, 0.5)}, "alpha must be one number or a range"),
        ({"work_size": 0}, "work_size"),
        ({"work_size": 12.5}, "work_size"),
    ],
)
def test_bad_arguments(ae, kwargs, match):
    with pytest.raises(RFIError, match=match) as err:
        StyleAugment(ae, **kwargs)
    assert "\n" not in str(err.value)


def test_work_size_at_or_above_the_image_changes_nothing(ae, batch):
    full = StyleAugment(ae, p=0.7, generator=3)
    params = full.make_params([batch])
    expected = full.stylize(batch, params)
    for work_size in (20, 64):  # batch: 20 x 24 px, short side 20
        assert torch.equal(StyleAugment(ae, p=0.7, work_size=work_size).stylize(batch, params), expected)


def test_work_size_stylises_small_and_adds_the_change(ae, monkeypatch):
    x = torch.rand(4, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    aug = StyleAugment(ae, p=0.6, work_size=24, generator=0)
    params = aug.make_params([x])
    seen = []
    encode = aug.autoencoder.encode
    monkeypatch.setattr(
        aug.autoencoder, "encode", lambda t, *a, **k: seen.append(tuple(t.shape[-2:])) or encode(t, *a, **k)
    )
    out = aug.stylize(x, params)
    assert seen == [(24, 32)]  # short side 48 -> 24: the autoencoder never sees the full size
    chosen = params["chosen"]
    assert chosen.any() and not chosen.all()
    assert torch.equal(out[~chosen], x[~chosen])
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    # out = x + upsample(stylised_small - small): recompute it from the full-resolution pieces
    small = torch.nn.functional.interpolate(x, size=(24, 32), mode="bilinear", antialias=True).clamp(0, 1)
    styled_small = StyleAugment(ae, p=0.6).stylize(small, params)
    change = torch.nn.functional.interpolate(styled_small - small, size=(48, 64), mode="bilinear")
    assert torch.allclose(out[chosen], (x + change).clamp(0, 1)[chosen], atol=1e-6)
    # the fine detail of the original is kept: the output minus the original is smooth
    diff = (out - x)[chosen]
    assert (diff[..., 1:] - diff[..., :-1]).abs().mean() < (x[chosen][..., 1:] - x[chosen][..., :-1]).abs().mean()
    half = aug.stylize(x.to(torch.bfloat16), params)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), out, atol=0.05)


def test_bad_style_folders(ae, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RFIError, match="no image files"):
        StyleAugment(ae, styles=tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    with pytest.raises(RFIError, match="no readable image"):
        StyleAugment(ae, styles=tmp_path / "junk")
    with pytest.raises(RFIError, match="not found"):
        StyleAugment(ae, styles=tmp_path / "missing")


def test_bad_batches(ae, batch):
    aug = StyleAugment(ae, p=1.0)
    with pytest.raises(RFIError, match="batch of 1"):
        aug(batch[:1])
    with pytest.raises(RFIError, match="\\[0, 1\\]"):
        aug(batch * 2)
    with pytest.raises(RFIError, match="\\[0, 1\\]"):
        StyleAugment(ae, p=0.0)(batch - 0.5)  # checked even when nothing is restyled


def test_missing_default_model_says_what_to_train(tmp_path, monkeypatch):
    from encoders.weights import shipped

    models = shipped.shipped_models()  # a build without any shipped file, whatever this one ships
    for model in models:
        model.sha256 = model.size = None
    shipped.write_manifest(models, tmp_path, 60)
    monkeypatch.setattr(shipped, "FOLDER", tmp_path)
    with pytest.raises(RFIError, match="is not in this build"):
        StyleAugment()


def test_cli_writes_views_and_contact_sheet(ae_file, tmp_path):
    for i, size in enumerate([(20, 30), (40, 24), (24, 24)]):
        _write_png(tmp_path / "in" / f"img{i}.png", i, size)
    out = tmp_path / "out"
    code = rfi(
        [
            "augment",
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--views",
            "2",
            "--model",
            str(ae_file),
            "--size",
            "16",
            "--p",
            "1",
            "--alpha",
            "0.5,1",
            "--beta",
            "1,1",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"img{i}_view{k}.png" for i in range(3) for k in (1, 2)] + ["contact_sheet.png"])
    view = np.asarray(Image.open(out / "img0_view1.png"))
    assert view.shape == (16, 16, 3)
    assert not np.array_equal(view, np.asarray(Image.open(out / "img0_view2.png")))
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (3 * 18 + 2, 3 * 18 + 2)  # 3 columns (original + 2 views) x 3 rows, 2-px padding


def test_cli_errors_write_nothing(ae_file, tmp_path, capsys):
    _write_png(tmp_path / "one" / "a.png", 0)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert rfi(["augment", str(tmp_path / "one"), "--out", str(out), "--model", str(ae_file)]) == 2
    assert "at least 2 images" in capsys.readouterr().err
    assert (
        rfi(
            [
                "augment",
                str(tmp_path / "one"),
                "--out",
                str(out),
                "--model",
                str(ae_file),
                "--styles",
                str(tmp_path / "empty"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("rfi: error:") and err.count("\n") == 1
    assert (
        rfi(["augment", str(tmp_path / "one"), "--out", str(out), "--model", str(ae_file), "--alpha", "0.9,0.1"]) == 2
    )
    assert not out.exists()


def test_cli_reads_its_config_and_flags_win(ae_file, tmp_path, capsys):
    for i in range(2):
        _write_png(tmp_path / "in" / f"img{i}.png", i)
    config = tmp_path / "mine.yaml"
    config.write_text(f"model: {ae_file}\nviews: 1\nsize: 12\np: 1.0\ndevice: cpu\n")
    assert rfi(["augment", str(tmp_path / "in"), "--out", str(tmp_path / "a"), "--config", str(config)]) == 0
    assert sorted(p.name for p in (tmp_path / "a").glob("*_view*.png")) == ["img0_view1.png", "img1_view1.png"]
    assert np.asarray(Image.open(tmp_path / "a" / "img0_view1.png")).shape == (12, 12, 3)
    assert (
        rfi(
            [
                "augment",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "b"),
                "--config",
                str(config),
                "--views",
                "2",
                "--size",
                "16",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "b").glob("img0_view*.png"))) == 2
    assert np.asarray(Image.open(tmp_path / "b" / "img0_view2.png")).shape == (16, 16, 3)
    capsys.readouterr()
    for flags, fragment in (
        (["--p", "1.5"], "'p' in the command-line overrides must be in [0, 1]"),
        (["--views", "0"], "'views' in the command-line overrides must be >= 1"),
        (["--encoder", str(ae_file)], "encoder and decoder"),
    ):
        assert (
            rfi(["augment", str(tmp_path / "in"), "--out", str(tmp_path / "c"), "--config", str(config), *flags]) == 2
        )
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- issue 21: API errors
def test_a_numpy_batch_gets_the_torch_from_numpy_hint(ae):
    aug = StyleAugment(ae, p=1.0, generator=0)
    for array in (np.random.rand(2, 3, 8, 8).astype(np.float32), np.zeros((8, 8, 3), np.uint8)):
        with pytest.raises(RFIError, match=r"got ndarray: convert it with torch\.from_numpy\(a\)"):
            aug(array)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (4, 4)])
def test_images_smaller_than_the_encoder_stride_are_restyled(ae, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    out = StyleAugment(ae, p=1.0, generator=0)(x)
    assert out.shape == x.shape and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
