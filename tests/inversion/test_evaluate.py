import json

import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.commands.evaluate import parse_scales
from encoders.core.errors import RFIError
from encoders.data.embedded import EmbeddedCrops
from encoders.weights.checkpoints import load_encoder
from inversion import Decoder, RobustAutoencoder, save_decoder
from inversion.evaluate import (
    compare_autoencoders,
    evaluate_autoencoder,
    held_out_images,
)
from inversion.metrics import psnr, ssim

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
