"""Shipped models (encoders.weights.shipped): the real manifest, hash-checked paths, the shipped: spelling.

Tiny models are exported into a temporary shipped folder (``shipped.FOLDER`` monkeypatched); the suite
never trains the real ones. The test over the package's own manifest checks the files that ship.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from encoders import create_encoder
from encoders.core.errors import RFIError
from encoders.core.serialization import save_checkpoint
from encoders.weights import shipped
from encoders.weights.checkpoints import encoder_checkpoint, load_encoder
from encoders.weights.zoo import sha256_file
from tests.conftest import tiny_net


def write_shipped_encoder(folder: Path, name: str = "rfi_resnet18_robust") -> Path:
    """A shipped folder holding the package's manifest with one tiny encoder shipped as ``name``, every other
    model not in this build (whatever the package ships)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = shipped.shipped_models()
    for other in models:
        other.sha256 = other.size = None
    model = next(m for m in models if m.name == name)
    path = save_checkpoint(encoder_checkpoint(tiny_net(), shipped=name), folder / model.file)
    model.sha256, model.size = sha256_file(path), path.stat().st_size
    shipped.write_manifest(models, folder, 60)
    return path


@pytest.fixture
def shipped_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "shipped"
    write_shipped_encoder(folder)
    monkeypatch.setattr(shipped, "FOLDER", folder)
    return folder


def test_package_manifest_files_match_or_are_reported_not_in_this_build():
    """Every model the package lists has its file with the recorded SHA-256, or is "not in this build"."""
    models = shipped.shipped_models()
    assert {m.kind for m in models} == {"encoder", "decoder", "style", "denoise"}
    names = {m.name for m in models}
    for model in models:
        assert model.encoder is None or model.encoder in names
        assert Path(model.config).name == f"{model.run}.yaml"
        assert shipped.status(model) in (shipped.SHIPPED, shipped.NOT_IN_BUILD), model.name
        if model.sha256 is None:
            with pytest.raises(RFIError, match="is not in this build: pass --model FILE"):
                shipped.shipped_path(model.name, flag="--model")
        else:
            assert model.path.stat().st_size == model.size
            assert shipped.shipped_path(model.name) == model.path
    assert sum(m.size or 0 for m in models) <= shipped.read_manifest()["limit_mb"] * 1e6


def test_shipped_encoder_loads_fast_through_every_spelling(shipped_folder):
    x = torch.rand(1, 3, 32, 32)
    start = time.process_time()  # CPU seconds, as in test_shipped_defaults: the machine's load is not the loader's
    encoder = create_encoder(checkpoint="shipped:rfi_resnet18_robust", layers=["layer3"])
    assert time.process_time() - start < 1.0
    assert torch.equal(encoder(x)["layer3"], tiny_net()(x, layers=["layer3"])["layer3"])
    assert load_encoder("shipped:rfi_resnet18_robust").arch == "resnet18"
    assert shipped.resolve_checkpoint("shipped:rfi_resnet18_robust") == shipped_folder / "rfi_resnet18_robust.pt"


def test_not_in_this_build_names_the_flag_and_the_retrain_command(shipped_folder):
    with pytest.raises(RFIError) as info:
        shipped.resolve_checkpoint("shipped:rfi_resnet18_standard", flag="--encoder")
    msg = str(info.value)
    assert "\n" not in msg and "not in this build" in msg and "--encoder FILE" in msg
    assert "rfi weights retrain rfi_resnet18_standard --out runs/shipped --resume" in msg


def test_damaged_and_missing_files_give_one_line(shipped_folder):
    path = shipped_folder / "rfi_resnet18_robust.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(RFIError) as info:
        create_encoder(checkpoint="shipped:rfi_resnet18_robust")
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "does not match the SHA-256" in msg
    assert "pip install --force-reinstall robust-inversion" in msg and "rfi weights retrain" in msg
    assert shipped.status(shipped.get_shipped("rfi_resnet18_robust")) == shipped.DAMAGED
    path.unlink()
    with pytest.raises(RFIError, match=r"rfi_resnet18_robust.pt is missing \(a damaged install\): reinstall"):
        load_encoder("shipped:rfi_resnet18_robust")


def test_another_kind_names_both_and_unknown_names_list_the_shipped_ones(shipped_folder):
    with pytest.raises(RFIError, match="shipped:rfi_denoiser is a denoiser, not an encoder"):
        load_encoder("shipped:rfi_denoiser")
    with pytest.raises(RFIError, match="no shipped model 'nope' .*rfi_resnet18_robust"):
        shipped.shipped_path("nope")


def test_a_file_referencing_its_encoder_finds_it_beside_itself_then_installed(tmp_path, monkeypatch):
    from encoders.weights.checkpoints import encoder_from_checkpoint

    package = tmp_path / "package"  # an install where no model is in the build
    package.mkdir()
    models = shipped.shipped_models()
    for m in models:
        m.sha256 = m.size = None
    shipped.write_manifest(models, package, 60)
    monkeypatch.setattr(shipped, "FOLDER", package)
    encoder = write_shipped_encoder(tmp_path / "dist")  # what `rfi weights retrain --ship-to dist` writes
    reference = shipped.encoder_reference("rfi_resnet18_robust", sha256_file(encoder))
    x = torch.rand(1, 3, 32, 32)
    loaded = encoder_from_checkpoint(reference, str(tmp_path / "dist" / "rfi_style_pyramid.pt"), layers=["layer3"])
    assert torch.equal(loaded(x)["layer3"], tiny_net()(x, layers=["layer3"])["layer3"])
    elsewhere = str(tmp_path / "copied" / "rfi_style_pyramid.pt")  # the file alone: its encoder is nowhere
    with pytest.raises(RFIError) as info:
        encoder_from_checkpoint(reference, elsewhere)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{elsewhere} needs its encoder rfi_resnet18_robust, and ")
    assert "not in this build" in msg
    other = shipped.encoder_reference("rfi_resnet18_robust", "0" * 64)  # beside it, but another encoder
    with pytest.raises(RFIError, match="needs its encoder rfi_resnet18_robust"):
        encoder_from_checkpoint(other, str(tmp_path / "dist" / "rfi_style_pyramid.pt"))
