"""The apps' defaults resolve to RFI's shipped models; rfi weights list / show / retrain.

Tiny models are exported by the same code as ``rfi weights retrain`` (:func:`apps.commands.weights.ship`)
into a temporary shipped folder (``shipped.FOLDER`` monkeypatched); the suite never trains the real ones.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from apps.cli import main
from apps.commands.weights import ship
from apps.denoise import load_denoiser
from apps.style.augment import StyleAugment
from apps.style.pyramid import load_pyramid
from encoders import create_encoder
from encoders.core.imageio import read_image, write_image
from encoders.core.serialization import save_checkpoint
from encoders.weights import shipped, zoo
from encoders.weights.checkpoints import encoder_checkpoint
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder, decoder_checkpoint
from tests.apps.conftest import TINY_FIT
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")
MANIFEST = shipped.FOLDER / shipped.MANIFEST  # the package's: what RFI ships


def _decoder(layer: str, channels: int, stride: int, **options) -> Decoder:
    torch.manual_seed(1)
    return Decoder(channels, stride, layer, channels=16, min_channels=8, **options).eval()


def _pyramid() -> dict[str, Decoder]:
    layers = {"layer1": (8, 1), "layer2": (16, 2), "layer3": (32, 4)}
    return {layer: _decoder(layer, channels, stride) for layer, (channels, stride) in layers.items()}


def export_tiny_models(runs: Path, folder: Path) -> None:
    """Trained-run files of tiny models for all six shipped names, shipped into ``folder`` by :func:`ship`."""
    runs.mkdir(parents=True)
    folder.mkdir(parents=True)
    shutil.copy(MANIFEST, folder)
    robust, standard = tiny_net(0), tiny_net(1)
    files = {
        "rfi_resnet18_robust": save_checkpoint(encoder_checkpoint(robust, eval={"clean_acc": 0.5}), runs / "r.pt"),
        "rfi_resnet18_standard": save_checkpoint(encoder_checkpoint(standard), runs / "s.pt"),
        "rfi_resnet18_robust_layer3": save_checkpoint(
            decoder_checkpoint(_decoder("layer3", 32, 4), robust, train={"step": 1}), runs / "rd.pt"
        ),
        "rfi_resnet18_standard_layer3": save_checkpoint(
            decoder_checkpoint(_decoder("layer3", 32, 4), standard), runs / "sd.pt"
        ),
        "rfi_style_pyramid": RobustAutoencoder(robust, _pyramid()).save(runs / "p.pt", app="style"),
        "rfi_denoiser": RobustAutoencoder(robust, _decoder("layer3", 32, 4, skips={"input": (3, 1)})).save(
            runs / "d.pt", app="denoise", sigma=[0, 55]
        ),
    }
    cards = {name: {"figures": {"unseen_psnr": 20.0}} for name in files}
    models, limit = ship(files, cards, folder)
    shipped.write_manifest(models, folder, limit)


@pytest.fixture(scope="module")
def tiny_shipped(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shipped")
    folder = root / "shipped"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shipped, "FOLDER", folder)
        export_tiny_models(root / "runs", folder)
    return folder


@pytest.fixture
def shipped_folder(tiny_shipped, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny shipped folder for one test (which may damage it), as the package's."""
    folder = tmp_path / "shipped"
    shutil.copytree(tiny_shipped, folder)
    monkeypatch.setattr(shipped, "FOLDER", folder)
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        write_image(torch.rand(3, 24, 36, generator=g), folder / f"{name}.png")
    return folder


def test_every_shipped_model_loads_matches_its_hash_and_runs(shipped_folder):
    x = torch.rand(1, 3, 24, 36)
    for model in shipped.shipped_models():
        assert shipped.status(model) == shipped.SHIPPED and model.card["figures"] == {"unseen_psnr": 20.0}
    encoder = create_encoder(checkpoint="shipped:rfi_resnet18_robust")
    assert "train" not in torch.load(shipped_folder / "rfi_resnet18_robust_layer3.pt", weights_only=True)
    for kind in ("robust", "standard"):
        ae = RobustAutoencoder.from_checkpoints(
            shipped.shipped_path(f"rfi_resnet18_{kind}"), shipped.shipped_path(f"rfi_resnet18_{kind}_layer3")
        )
        assert ae.reconstruct(x).shape == x.shape
    pyramid = load_pyramid(shipped.shipped_path("rfi_style_pyramid"))
    assert pyramid.layers == ["layer1", "layer2", "layer3"] and pyramid.kind == "style"
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in pyramid.encoder.state_dict().items())
    denoiser, info = load_denoiser("shipped:rfi_denoiser")
    assert info["sigma"] == [0, 55] and denoiser.reconstruct(x).shape == x.shape


def test_the_models_this_package_ships_load_in_under_a_second_and_run():
    """The package's own files (not the tiny ones): whatever this build ships loads fast and runs."""
    x = torch.rand(1, 3, 24, 36)
    loaders = {
        "encoder": lambda m: create_encoder(checkpoint=f"shipped:{m.name}", layers=["layer3"]),
        "decoder": lambda m: RobustAutoencoder.from_checkpoints(
            shipped.shipped_path(m.encoder), shipped.shipped_path(m.name)
        ),
        "style": lambda m: load_pyramid(shipped.shipped_path(m.name)),
        "denoise": lambda m: load_denoiser(f"shipped:{m.name}")[0],
    }
    for model in [m for m in shipped.shipped_models() if shipped.status(m) == shipped.SHIPPED]:
        seconds = []
        for _ in range(3):  # the best of three: a garbage collection of the whole suite's objects can land in one
            gc.collect()
            start = time.process_time()  # this process's CPU seconds: the wall time when idle; a loaded CI adds others'
            loaded = loaders[model.kind](model)
            seconds.append(time.process_time() - start)
        assert min(seconds) < 1.0, (model.name, seconds)
        with torch.no_grad():
            out = loaded(x)["layer3"] if model.kind == "encoder" else loaded.reconstruct(x)
        assert torch.isfinite(out).all() and (model.kind == "encoder" or out.shape == x.shape), model.name


def test_app_files_reference_the_encoder_stored_once(shipped_folder):
    raw = torch.load(shipped_folder / "rfi_denoiser.pt", weights_only=True)
    assert set(raw["encoder"]) == {"shipped", "sha256"} and raw["encoder"]["shipped"] == "rfi_resnet18_robust"
    encoder_file = shipped_folder / "rfi_resnet18_robust.pt"
    assert (shipped_folder / "rfi_denoiser.pt").stat().st_size < encoder_file.stat().st_size


def test_apps_default_to_the_shipped_models(shipped_folder, photos, tmp_path, capsys):
    image = photos / "a.png"
    assert main(["invert", str(image), "--out", str(tmp_path / "inv"), "--quiet"]) == 0
    assert read_image(tmp_path / "inv" / "a.png").shape == (3, 24, 36)
    assert main(["denoise", "apply", str(image), "--out", str(tmp_path / "den"), "--quiet"]) == 0
    assert (tmp_path / "den" / "a.png").is_file()
    args = ["style", "apply", str(image), "--style", str(photos / "b.png"), "--out", str(tmp_path / "sty")]
    assert main([*args, "--quiet"]) == 0 and (tmp_path / "sty" / "a.png").is_file()
    views = ["augment", str(photos), "--out", str(tmp_path / "aug"), "--views", "1", "--size", "32", "--p", "1"]
    assert main([*views, "--quiet"]) == 0 and (tmp_path / "aug" / "a_view1.png").is_file()
    aug = StyleAugment(p=1.0, generator=0)
    assert aug.layer == "layer3" and aug.autoencoder.kind == "style"
    assert aug(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_anomaly_fit_defaults_to_the_shipped_encoder(shipped_folder, dummy_mvtec, tmp_path):
    out = tmp_path / "model.pt"
    fit = ["anomaly", "fit", "--data", str(dummy_mvtec), "--category", "widget", "--out", str(out)]
    assert main([*fit, "--method", "memory", *TINY_FIT, "--quiet"]) == 0
    recorded = torch.load(out, weights_only=True)
    assert str(shipped_folder / "rfi_resnet18_robust.pt") in json.dumps(recorded.get("info", recorded), default=str)


def test_decoders_train_for_a_shipped_encoder_given_by_name(shipped_folder, tmp_path, capsys):
    """``encoder.checkpoint=shipped:NAME`` (train-decoder) and ``train.encoder.checkpoint`` (style train) train
    for the shipped encoder's file; a damaged one stops with one line naming it."""
    tiny = ["data.size=16", "data.train_crops=32", "data.val_crops=8", "batch_size=8", "steps=2", "device=cpu"]
    dec = ["train-decoder", "--config", "configs/decoder/resnet18_robust_layer3.yaml", "decoder.channels=8"]
    out = tmp_path / "dec"
    assert main([*dec, "encoder.checkpoint=shipped:rfi_resnet18_standard", *tiny, "--out", str(out)]) == 0
    ae = RobustAutoencoder.from_checkpoints("shipped:rfi_resnet18_standard", out / "decoder.pt")
    assert ae.reconstruct(torch.rand(1, 3, 24, 36)).shape == (1, 3, 24, 36)
    style = [
        "style",
        "train",
        "--config",
        "configs/apps/style.yaml",
        "train.encoder.checkpoint=shipped:rfi_resnet18_robust",
    ]
    pyramid = tmp_path / "pyramid.pt"
    layers = ["layers=[layer1]", f"out={pyramid}", f"runs={tmp_path / 'runs'}", *(f"train.{t}" for t in tiny)]
    assert main([*style, *layers, "--quiet"]) == 0
    assert load_pyramid(pyramid).layers == ["layer1"]
    (shipped_folder / "rfi_resnet18_robust.pt").write_bytes(b"damaged")
    assert main([*dec, "encoder.checkpoint=shipped:rfi_resnet18_robust", *tiny, "--out", str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rfi_resnet18_robust.pt does not match the SHA-256" in err and "rfi weights retrain" in err, err


def test_a_default_not_in_this_build_names_the_flag(shipped_folder, photos, tmp_path, capsys):
    models = shipped.shipped_models()
    for model in models:
        model.sha256 = model.size = None
    shipped.write_manifest(models, shipped_folder, 60)
    cases = [
        (["invert", str(photos)], "--encoder FILE"),
        (["denoise", "apply", str(photos)], "--model FILE"),
        (["style", "apply", str(photos), "--style", str(photos / "a.png")], "--model FILE"),
        (["augment", str(photos)], "--model (Python: model=) FILE"),
    ]
    for argv, flag in cases:
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is not in this build" in err and flag in err, err


def test_a_model_of_another_kind_names_both(shipped_folder, photos, tmp_path, capsys):
    argv = ["denoise", "apply", str(photos), "--out", str(tmp_path / "o"), "--model", "shipped:rfi_style_pyramid"]
    assert main(argv) == 2
    assert "shipped:rfi_style_pyramid is a style pyramid, not a denoiser" in capsys.readouterr().err
    pyramid = str(shipped_folder / "rfi_style_pyramid.pt")  # the file itself: its recorded app says what it is
    assert main([*argv[:-1], pyramid]) == 2
    err = capsys.readouterr().err
    assert "is not a denoiser (rfi denoise train): it is a style pyramid (rfi style train)" in err


def test_weights_list_and_show_print_the_shipped_models(shipped_folder, capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("rfi_denoiser "))
    assert "shipped" in line and "unseen_psnr 20.00" in line and "imagenet_l2_3_0" in out
    assert main(["weights", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["rfi_resnet18_robust"]["origin"] == "shipped" and rows["imagenet_l2_3_0"]["origin"] == "zoo"
    assert rows["rfi_resnet18_robust"]["sha256"] == shipped.get_shipped("rfi_resnet18_robust").sha256
    assert main(["weights", "show", "rfi_denoiser"]) == 0
    card = capsys.readouterr().out
    for field in ("data", "budget", "command", "config", "figures", "limits", "configs/shipped/denoiser.yaml"):
        assert field in card
    assert "  figures   unseen_psnr 20.00\n" in card  # as in the list, not raw JSON
    assert main(["weights", "show", "torchvision_alexnet"]) == 0
    assert "alexnet-owt-7be5be79.pth" in capsys.readouterr().out
    assert main(["weights", "show", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_ship_to_another_folder_holds_every_file_its_manifest_lists(shipped_folder, tmp_path, caplog):
    """One model shipped into an empty ``--ship-to`` folder: the package's files of the others are copied beside it
    (hash-checked), so the folder can replace the package's; one whose package file is damaged is dropped."""
    standard = tiny_net(1)
    torch.manual_seed(2)
    retrained = decoder_checkpoint(Decoder(32, 4, "layer3", channels=16, min_channels=8).eval(), standard)
    trained = {"rfi_resnet18_standard_layer3": save_checkpoint(retrained, tmp_path / "sd.pt")}
    (shipped_folder / "rfi_denoiser.pt").write_bytes(b"damaged")
    out = tmp_path / "dist"
    out.mkdir()
    models, limit = ship(trained, {"rfi_resnet18_standard_layer3": {"figures": {"unseen_psnr": 21.0}}}, out)
    shipped.write_manifest(models, out, limit)
    listed = {m.name: m for m in shipped.shipped_models(out)}
    assert listed["rfi_denoiser"].sha256 is None and not (out / "rfi_denoiser.pt").exists()
    assert "rfi_denoiser: its file is in neither" in caplog.text
    kept = [m for m in listed.values() if m.sha256 is not None]
    assert len(kept) == 5 and listed["rfi_resnet18_standard_layer3"].card["figures"] == {"unseen_psnr": 21.0}
    for model in kept:
        assert zoo.sha256_file(out / model.file) == model.sha256, model.name
    assert listed["rfi_resnet18_robust"].sha256 == shipped.get_shipped("rfi_resnet18_robust").sha256
    assert listed["rfi_resnet18_standard_layer3"].sha256 != shipped.get_shipped("rfi_resnet18_standard_layer3").sha256


@pytest.mark.slow
def test_retrain_tiny_end_to_end(tmp_path, monkeypatch):
    """``rfi weights retrain --tiny``: all six trained, measured, shipped; then a resumed call reuses the runs."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    shutil.copy(MANIFEST, folder)
    monkeypatch.setattr(shipped, "FOLDER", folder)
    argv = ["weights", "retrain", "--tiny", "--out", str(tmp_path / "runs"), "--quiet"]
    assert main([*argv, "--ship-to", str(folder)]) == 0
    assert (tmp_path / "runs" / "encoder_robust" / "checkpoint.pt").is_file()
    for model in shipped.shipped_models():
        assert shipped.status(model) == shipped.SHIPPED and model.card["figures"], model.name
        assert "not timed" not in model.card["trained"], model.card  # every run of the model was timed
    assert set(shipped.get_shipped("rfi_denoiser").card["figures"]) >= {"psnr_sigma15", "psnr_sigma50"}
    assert main(["weights", "retrain", "rfi_denoiser", "--tiny", "--out", str(tmp_path / "runs")]) == 2  # no --resume
    assert main([*argv, "rfi_resnet18_standard_layer3", "--resume"]) == 0
    assert shipped.status(shipped.get_shipped("rfi_denoiser")) == shipped.SHIPPED  # its encoder was not retrained
    assert main([*argv, "rfi_style_pyramid", "--resume"]) == 0  # ships its encoder again, with the same weights
    assert all(shipped.status(m) == shipped.SHIPPED for m in shipped.shipped_models())


def test_training_time_sums_every_run_and_extrapolates_an_untimed_start(tmp_path):
    from apps.commands.weights import training_seconds

    def metrics(folder, *rows):
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    pyramid = tmp_path / "style_pyramid" / "decoders"
    metrics(pyramid / "layer1", {"step": 5, "train_seconds": 10.0}, {"step": 10, "train_seconds": 20.0})
    metrics(pyramid / "layer2", {"step": 10, "train_seconds": 30.0}, {"step": 10, "val_psnr": 20.0})
    assert training_seconds(tmp_path / "style_pyramid") == (50.0, "")  # the last time of each layer's run
    resumed = {"step": 400, "train_seconds": 600.0, "timed_from_step": 100}  # resumed at 100 from an untimed run
    metrics(tmp_path / "encoder", {"step": 100, "loss": 1.0}, resumed)
    seconds, note = training_seconds(tmp_path / "encoder")
    assert seconds == 800.0 and note == "steps 1-100 of 400 not timed: extrapolated from the rest"
    metrics(tmp_path / "old", {"step": 100, "loss": 1.0})
    assert training_seconds(tmp_path / "old") == (0.0, "old not timed")
