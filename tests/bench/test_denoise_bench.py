"""bench/denoise.py: the evaluation images of ``--data embedded|unseen``, its defaults and errors, a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from encoders.data.embedded import EMBEDDED_PHOTOS, embedded_image, region
from encoders.data.unseen import UNSEEN_IMAGES, unseen_image
from encoders.weights import shipped
from encoders.weights.checkpoints import save_encoder
from tests.conftest import tiny_net

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import denoise

    return denoise


def test_unseen_data_is_the_unseen_images_whole(bench):
    names, clean = bench.eval_images("unseen")
    assert names == list(UNSEEN_IMAGES)
    for name, x in zip(names, clean):
        assert torch.equal(x, unseen_image(name))  # whole, full size, as encoders.data.unseen gives it
    capped, images = bench.eval_images("unseen", 2)
    assert capped == names[:2] and [x.shape for x in images] == [x.shape for x in clean[:2]]


def test_embedded_data_is_unchanged(bench):
    names, clean = bench.eval_images("embedded")
    assert names == list(EMBEDDED_PHOTOS)
    for name, x in zip(names, clean):
        assert torch.equal(x, region(embedded_image(name), "val"))
    assert bench.eval_images("embedded", 3)[0] == names[:3]
    with pytest.raises(bench.RFIError, match="unknown data 'photos'"):
        bench.eval_images("photos")


def test_noise_is_seeded_per_image_and_sigma_on_unseen_images(bench):
    _, clean = bench.eval_images("unseen", 2)
    a, b = bench.noisy_images(clean, 25, 0), bench.noisy_images(clean, 25, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], bench.noisy_images(clean, 15, 0)[0])
    assert not torch.equal(a[0] - clean[0], (a[1] - clean[1])[:, : clean[0].shape[1], : clean[0].shape[2]])


def test_defaults_keep_embedded_results_and_unseen_writes_its_own(bench):
    embedded = bench.parse_args([])
    assert embedded.data == "embedded" and embedded.max_images is None
    assert embedded.out == str(ROOT / "bench/results/denoise.json")
    assert embedded.example == str(ROOT / "docs/img/denoise_comparison.png")
    unseen = bench.parse_args(["--data", "unseen"])
    assert unseen.out == str(ROOT / "bench/results/denoise_unseen.json") and unseen.example == ""
    given = bench.parse_args(["--data", "unseen", "--out", "x.json", "--example", "x.png"])
    assert (given.out, given.example) == ("x.json", "x.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "photos"], "argument --data: invalid choice: 'photos'"),
        (["--max-images", "0"], "--max-images must be at least 1, got 0"),
    ],
)
def test_exception_bad_arguments_are_one_line(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def test_exception_shipped_denoiser_not_in_this_build_is_one_line(bench, tmp_path, monkeypatch):
    # A build without any shipped file (the package's manifest, every model reset), whatever this one ships.
    folder = tmp_path / "shipped"
    models = shipped.shipped_models()
    for model in models:
        model.sha256, model.size = None, None
    shipped.write_manifest(models, folder, shipped.read_manifest()["limit_mb"])
    monkeypatch.setattr(shipped, "FOLDER", folder)
    out = tmp_path / "denoise.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--robust-model", "shipped:rfi_denoiser", "--data", "unseen", "--out", str(out)])
    message = str(e.value.code)
    assert message.startswith("bench/denoise.py: error: the shipped model rfi_denoiser")
    assert "not in this build" in message and "--robust-model FILE" in message and "\n" not in message
    assert not out.exists()
    with pytest.raises(SystemExit, match="is an encoder, not a denoiser"):
        bench.main(["--robust-model", "shipped:rfi_resnet18_robust", "--out", str(out)])


@pytest.fixture(scope="module")
def tiny_denoiser(tmp_path_factory):
    """A denoiser file on a tiny random encoder, trained for 2 steps (what the bench loads with --robust-model)."""
    from apps.denoise import load_denoiser_config, train_denoiser

    work = tmp_path_factory.mktemp("denoiser")
    encoder = work / "encoder.pt"
    save_encoder(tiny_net(), encoder)
    overrides = [
        f"train.encoder.checkpoint={encoder}",
        "train.encoder.layer=layer2",
        "train.decoder.skips=[input,layer1]",
        "train.decoder.channels=16",
        "train.decoder.min_channels=16",
        "train.decoder.blocks=0",
        "train.data.source=embedded",
        "train.data.size=24",
        "train.data.train_crops=16",
        "train.data.val_crops=4",
        "train.steps=2",
        "train.batch_size=4",
        "train.sample_every=0",
        "train.log_every=0",
        "train.device=cpu",
        f"train.out={work / 'run'}",
    ]
    return train_denoiser(load_denoiser_config(ROOT / "configs/apps/denoise.yaml", overrides)).path


@pytest.mark.parametrize("data", ["embedded", "unseen"])
def test_tiny_run_records_the_data_and_evaluates_its_images_whole(bench, tiny_denoiser, tmp_path, data):
    out = tmp_path / "denoise.json"
    argv = [
        *("--data", data, "--max-images", "2", "--sigmas", "25", "--seeds", "2", "--robust-model", str(tiny_denoiser)),
        *("--no-standard", "--no-dncnn", "--no-bm3d", "--classical", "wavelet bayes", "--tune-crops", "2"),
        *("--repeats", "1", "--out", str(out), "--example", ""),
    ]
    bench.main(argv)
    rep = json.loads(out.read_text())
    names, clean = bench.eval_images(data, 2)
    assert rep["data"] == data and not rep["partial"]
    assert rep["images"] == {n: list(x.shape[1:]) for n, x in zip(names, clean)}
    methods = rep["results"]["25"]["methods"]
    assert set(methods) == {"noisy input", "ours (robust)", "wavelet bayes"}
    assert list(methods["ours (robust)"]["per_seed"]) == ["0"]  # a given file is evaluated once, not per seed
    assert list(methods["ours (robust)"]["per_seed"]["0"]["psnr_per_image"]) == names
