import json

import numpy as np
import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.commands.evaluate import parse_scales
from encoders.core.errors import RFIError
from encoders.data.embedded import EMBEDDED_PHOTOS, EmbeddedCrops, embedded_image, region
from encoders.data.unseen import UNSEEN_IMAGES, unseen_image
from encoders.weights.checkpoints import load_encoder
from inversion import Decoder, RobustAutoencoder, save_decoder
from inversion.evaluate import (
    compare_autoencoders,
    evaluate_autoencoder,
    format_table,
    held_out_images,
    whole_images,
)
from inversion.metrics import psnr, ssim
from inversion.perceptual import load_lpips

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/inversion/conftest.py


@pytest.fixture(scope="module")
def decoders(tiny_encoder_path, tmp_path_factory):
    enc = load_encoder(tiny_encoder_path)
    root = tmp_path_factory.mktemp("decoders")
    paths = []
    for i, name in enumerate(("standard", "robust")):
        torch.manual_seed(i)
        dec = Decoder(32, 4, "layer3", channels=16, min_channels=8)
        paths.append(save_decoder(dec, root / name / "decoder.pt", enc.config(), train_size=16))
    return paths


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def test_evaluate_autoencoder_matches_direct_metrics(tiny_encoder_path, decoders):
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, decoders[0])
    res = evaluate_autoencoder(ae, scales=(1, 2, 4), train_size=16, num=6, batch_size=4)
    assert [r["size"] for r in res["scales"]] == [16, 32, 64] and res["scales"][0]["n"] == 6
    x = held_out_images(32, 6)
    assert torch.equal(x[0], EmbeddedCrops("val", 32, 6)[0][0])
    rec = ae.reconstruct(x)
    assert res["scales"][1]["psnr"] == pytest.approx(psnr(rec, x).mean().item(), abs=1e-4)
    assert res["scales"][1]["ssim"] == pytest.approx(ssim(rec, x).mean().item(), abs=1e-4)
    assert res["scales"][1]["lpips"] is None and "LPIPS not computed" in res["lpips"]


def test_too_large_scale_is_skipped_not_fatal(tiny_encoder_path, decoders):
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, decoders[0])
    res = compare_autoencoders({"a": ae}, scales=(1, 16), train_size=16, num=2)
    assert [r["scale"] for r in res["models"]["a"]] == [1]
    assert "larger than the val region" in res["skipped"]["16x"]


def test_cli_table_json_grids_and_lpips_note(tiny_encoder_path, decoders, tmp_path, empty_hub, capsys):
    out = tmp_path / "ev"
    e = str(tiny_encoder_path)
    code = main(
        [
            "evaluate",
            "--encoder",
            e,
            "--decoder",
            str(decoders[0]),
            "--encoder",
            e,
            "--decoder",
            str(decoders[1]),
            "--scales",
            "1,2",
            "--num",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    note = [line for line in lines if "LPIPS" in line and "alexnet-owt-7be5be79.pth" in line]
    assert len(note) == 1 and "download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in note[0]
    assert "| standard | 1x | 16 |" in stdout and "| robust | 2x | 32 |" in stdout and "n/a" in stdout
    res = json.loads((out / "evaluate.json").read_text())
    assert set(res["models"]) == {"standard", "robust"} and res["models"]["robust"][1]["lpips"] is None
    assert res["models"]["standard"][0]["psnr"] != res["models"]["robust"][0]["psnr"]
    grid = Image.open(out / "grid_1x.png")
    assert grid.width > 3 * 128 and grid.height > 4 * 128  # 3 labelled columns, 4 rows, enlarged
    assert (out / "grid_2x.png").exists()


def test_cli_lpips_with_local_backbone(tiny_encoder_path, decoders, tmp_path, fake_lpips_weights, capsys):
    out = tmp_path / "ev"
    code = main(
        [
            "evaluate",
            "--encoder",
            str(tiny_encoder_path),
            "--decoder",
            str(decoders[1]),
            "--scales",
            "1,2",
            "--num",
            "2",
            "--out",
            str(out),
            "--lpips-weights",
            str(fake_lpips_weights),
            "--names",
            "mine",
        ]
    )
    assert code == 0
    res = json.loads((out / "evaluate.json").read_text())
    assert res["models"]["mine"][1]["lpips"] > 0 and res["lpips"] == "LPIPS computed"
    # 16-px crops are too small for AlexNet: a note, not a crash and not a silent 0
    assert res["models"]["mine"][0]["lpips"] is None and "too small" in res["models"]["mine"][0]["lpips_note"]


def test_cli_errors(tiny_encoder_path, decoders, tmp_path, capsys):
    e, d = str(tiny_encoder_path), str(decoders[0])
    assert main(["evaluate", "--encoder", e, "--decoder", d, "--decoder", d, "--out", str(tmp_path)]) == 2
    assert "one --encoder per --decoder" in capsys.readouterr().err
    assert main(["evaluate", "--encoder", e, "--decoder", d, "--scales", "1,x", "--out", str(tmp_path)]) == 2
    assert "--scales" in capsys.readouterr().err
    nosize = save_decoder(Decoder(32, 4, "layer3"), tmp_path / "nosize.pt", {"arch": "resnet18"})
    assert main(["evaluate", "--encoder", e, "--decoder", str(nosize), "--out", str(tmp_path)]) == 2
    assert "--size" in capsys.readouterr().err
    with pytest.raises(RFIError, match="positive"):
        parse_scales("0")
    assert main(["evaluate", "--encoder", e, "--decoder", d, "--scales", "1,huge", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--scales must be positive integers or full" in err and "'1,huge'" in err


# ----- the scale "full": the held-out images whole, at their own sizes
WHOLE_SIZES = [(40, 56), (33, 70), (64, 48)]  # (H, W) of the folder's validation images, in file order


def test_parse_scales_full():
    assert parse_scales("1,4,full") == [1, 4, "full"]
    assert parse_scales(" FULL ") == ["full"]
    for bad in ("1,huge", "full,0", "", "1.5", "fullsize"):
        with pytest.raises(RFIError, match=r"^--scales must be positive integers or full, .*1,4,full"):
            parse_scales(bad)


@pytest.fixture
def whole_folder(tmp_path):
    """``train/`` + ``val/``: 3 readable validation images of different sizes and a torn file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for split, sizes in (("train", [(32, 32)]), ("val", WHOLE_SIZES)):
        (root / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            y, x = np.mgrid[:h, :w]
            smooth = np.stack([x / w, y / h, (x + y) / (h + w)], -1) * 200
            pixels = (smooth + rng.integers(0, 55, (h, w, 3))).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i}.png")
    (root / "val" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    return root


def _direct(ae, path):
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    return psnr(ae.reconstruct(x[None]), x[None]).item(), ssim(ae.reconstruct(x[None]), x[None]).item()


def test_full_scale_measures_each_whole_folder_image(tiny_encoder_path, decoders, whole_folder, tmp_path):
    models = {n: RobustAutoencoder.from_checkpoints(tiny_encoder_path, d) for n, d in zip(("a", "b"), decoders)}
    res = compare_autoencoders(models, ["full"], train_size=16, folder=whole_folder, grid_dir=tmp_path / "grids")
    for name, ae in models.items():
        (row,) = res["models"][name]
        assert row["scale"] == "full" and row["size"] is None and row["n"] == 3
        assert [im["size"] for im in row["per_image"]] == [list(hw) for hw in WHOLE_SIZES]
        assert [im["name"] for im in row["per_image"]] == ["0.png", "1.png", "2.png"]
        direct = [_direct(ae, whole_folder / "val" / f"{i}.png") for i in range(3)]
        assert row["psnr"] == pytest.approx(float(np.mean([p for p, _ in direct])), abs=1e-4)
        assert row["psnr_std"] == pytest.approx(float(np.std([p for p, _ in direct], ddof=1)), abs=1e-4)
        assert row["ssim"] == pytest.approx(float(np.mean([s for _, s in direct])), abs=1e-4)
        assert row["lpips"] is None
    assert res["models"]["a"][0]["psnr"] != res["models"]["b"][0]["psnr"]
    (torn,) = res["left_out"]
    assert torn.startswith(f"{whole_folder / 'val' / '3.png'}: is not a readable image")
    grid = Image.open(res["grids"]["full"])
    assert grid.width > 3 * 192 and grid.height > 3 * 192  # original | a | b, 3 thumbnails each
    assert "| a | full | whole (3 images) |" in format_table(res)


def test_full_scale_through_tiles_equals_the_whole_pass(tiny_encoder_path, decoders, whole_folder):
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, decoders[0])
    whole = compare_autoencoders({"a": ae}, ["full"], folder=whole_folder)["models"]["a"][0]
    ae.max_pixels = 24 * 24  # every image above it: reconstruct tiles them, as rfi invert does
    tiled = compare_autoencoders({"a": ae}, ["full"], folder=whole_folder)["models"]["a"][0]
    assert tiled["n"] == 3 and tiled["psnr"] == pytest.approx(whole["psnr"], abs=1e-3)


def test_full_scale_on_unseen_images_at_their_own_sizes(tiny_encoder_path, decoders):
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, decoders[0])
    res = compare_autoencoders({"a": ae}, [1, "full"], train_size=16, folder="unseen", num=2)
    small, full = res["models"]["a"]
    assert small["size"] == 16 and full["scale"] == "full" and full["n"] == 2
    names = list(UNSEEN_IMAGES)[:2]
    assert [im["name"] for im in full["per_image"]] == names
    assert [im["size"] for im in full["per_image"]] == [list(unseen_image(n).shape[-2:]) for n in names]
    x = unseen_image(names[1])
    assert full["per_image"][1]["psnr"] == pytest.approx(psnr(ae.reconstruct(x[None]), x[None]).item(), abs=1e-4)


def test_whole_embedded_images_are_the_validation_regions():
    images = whole_images(3)
    assert [n for n, _ in images] == list(EMBEDDED_PHOTOS[:3])
    for name, x in images:
        assert torch.equal(x, region(embedded_image(name), "val"))
    with pytest.raises(RFIError, match="no such folder"):
        whole_images(2, "nowhere")


def test_full_scale_lpips_and_unreadable_folder(tiny_encoder_path, decoders, tmp_path, fake_lpips_weights):
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, decoders[0])
    folder = tmp_path / "torn"
    folder.mkdir()
    for i in range(5):  # every fifth file is held out: 4.png, which cannot be read
        (folder / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    res = compare_autoencoders({"a": ae}, ["full"], folder=folder)
    assert res["models"]["a"] == [] and "no readable validation image" in res["skipped"]["full"]
    lp = load_lpips("alex", fake_lpips_weights)
    row = compare_autoencoders({"a": ae}, ["full"], folder="unseen", num=1, lpips_model=lp)["models"]["a"][0]
    x = unseen_image(next(iter(UNSEEN_IMAGES)))
    rec = ae.reconstruct(x[None])
    assert row["lpips"] == pytest.approx(lp(rec, x[None], normalize=True).item(), abs=1e-4)
    assert row["per_image"][0]["lpips"] == pytest.approx(row["lpips"]) and "lpips_note" not in row


def test_cli_full_scale_on_a_folder(tiny_encoder_path, decoders, whole_folder, tmp_path, capsys):
    out = tmp_path / "ev"
    e = str(tiny_encoder_path)
    argv = ["evaluate", "--encoder", e, "--decoder", str(decoders[0]), "--encoder", e, "--decoder", str(decoders[1])]
    argv += ["--names", "robust,standard", "--data", str(whole_folder), "--scales", "1,full", "--out", str(out)]
    assert main(argv) == 1  # measured, but the torn file is named
    stdout = capsys.readouterr().out
    assert "| robust | 1x | 16 |" in stdout and "| standard | full | whole (3 images) |" in stdout
    res = json.loads((out / "evaluate.json").read_text())
    full = res["models"]["robust"][1]
    assert full["scale"] == "full" and full["size"] is None and len(full["per_image"]) == 3
    assert (out / "grid_full.png").exists() and (out / "grid_1x.png").exists()
