import numpy as np
import pytest
import torch
from PIL import Image

from apps.cli import main
from encoders.core.files import plan_outputs
from encoders.core.imageio import read_image
from encoders.weights.checkpoints import load_encoder
from inversion import Decoder, RobustAutoencoder, save_decoder
from inversion.invert import invert_files

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/inversion/conftest.py


@pytest.fixture(scope="module")
def decoder_path(tiny_encoder_path, tmp_path_factory):
    torch.manual_seed(1)
    enc = load_encoder(tiny_encoder_path)
    dec = Decoder(32, 4, "layer3", channels=16, min_channels=8)
    return save_decoder(dec, tmp_path_factory.mktemp("dec") / "decoder.pt", enc.config(), train_size=16)


def _rgb(h=45, w=70, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture
def mixed_folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb()).save(d / "color.png")
    Image.fromarray(_rgb()[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([_rgb(40, 40), np.full((40, 40), 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray((np.random.default_rng(1).random((33, 35)) * 65535).astype(np.uint16)).save(d / "deep.png")
    Image.fromarray(_rgb(36, 36)).convert("P").save(d / "palette.png")
    (d / "cut.png").write_bytes((d / "color.png").read_bytes()[:200])
    (d / "notes.png").write_text("not an image")
    nan = np.full((20, 20), 0.5, np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan, mode="F").save(d / "nan.tif")
    return d


def test_invert_folder_with_bad_files(tiny_encoder_path, decoder_path, mixed_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "invert",
            str(mixed_folder),
            "--encoder",
            str(tiny_encoder_path),
            "--decoder",
            str(decoder_path),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 1
    written = sorted(p.name for p in out.iterdir())
    assert written == ["color.png", "deep.png", "gray.png", "palette.png", "rgba.png"]
    err = capsys.readouterr().err
    for bad in ("cut.png", "notes.png", "nan.tif"):
        assert bad in err
    assert "3 input(s) failed" in err
    for name in written:  # same size as the input, RGB
        src = Image.open(mixed_folder / name)
        dst = Image.open(out / name)
        assert dst.size == src.size and dst.mode == "RGB"
    for note in ("grayscale to RGB", "RGBA", "16-bit", "palette"):  # conversions are logged
        assert note in err


def test_invert_matches_autoencoder_and_tiles(tiny_encoder_path, decoder_path, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(_rgb(64, 80)).save(src)
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, decoder_path)
    x = read_image(src)[None]
    for tile, expected in ((None, ae.reconstruct(x)), (32, ae.reconstruct(x, tile=32))):
        out = tmp_path / f"out{tile}"
        args = [
            "invert",
            str(src),
            "--encoder",
            str(tiny_encoder_path),
            "--decoder",
            str(decoder_path),
            "--out",
            str(out),
        ] + (["--tile", str(tile)] if tile else [])
        assert main(args) == 0
        got = read_image(out / "a.png")
        assert (got - expected[0]).abs().max() <= 1 / 255 + 1e-6


def test_optimize_method(tiny_encoder_path, decoder_path, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(_rgb(24, 20)).save(src)
    base = ["invert", str(src), "--encoder", str(tiny_encoder_path), "--method", "optimize", "--steps", "2"]
    assert main([*base, "--decoder", str(decoder_path), "--out", str(tmp_path / "o1")]) == 0
    assert Image.open(tmp_path / "o1" / "a.png").size == (20, 24)
    assert main([*base, "--layer", "layer2", "--out", str(tmp_path / "o2")]) == 0
    assert main([*base, "--out", str(tmp_path / "o3")]) == 2  # no layer and no decoder


def test_outputs_never_overwrite_inputs(tiny_encoder_path, decoder_path, tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(_rgb(20, 20)).save(d / "a.png")
    before = (d / "a.png").read_bytes()
    args = ["--encoder", str(tiny_encoder_path), "--decoder", str(decoder_path)]
    assert main(["invert", str(d), *args, "--out", str(d)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (d / "a.png").read_bytes() == before
    Image.fromarray(_rgb(20, 20, seed=3)).save(d / "b.jpg")  # b.jpg -> b.png next to it: allowed
    assert main(["invert", str(d / "b.jpg"), *args, "--out", str(d)]) == 0
    assert (d / "b.png").exists() and (d / "a.png").read_bytes() == before
    Image.fromarray(_rgb(20, 20)).save(d / "a.bmp")  # a.png and a.bmp -> the same a.png
    assert main(["invert", str(d / "a.png"), str(d / "a.bmp"), *args, "--out", str(tmp_path / "o")]) == 2
    assert "would both be written" in capsys.readouterr().err


def test_mismatched_decoder_is_refused(tiny_encoder_path, tmp_path, capsys):
    bad = save_decoder(Decoder(48, 4, "layer3"), tmp_path / "bad.pt", {"arch": "resnet18"}, train_size=16)
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "a.png")
    code = main(
        [
            "invert",
            str(tmp_path / "a.png"),
            "--encoder",
            str(tiny_encoder_path),
            "--decoder",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "do not fit" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "a.png")
    out = tmp_path / "out"

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        invert_files([tmp_path / "a.png"], out, lambda x: x)
    assert list(out.iterdir()) == []


def test_output_paths(tmp_path):
    assert plan_outputs([tmp_path / "x" / "a.jpg"], tmp_path / "o", lambda p: [p.stem + ".png"]) == [
        [tmp_path / "o" / "a.png"]
    ]
