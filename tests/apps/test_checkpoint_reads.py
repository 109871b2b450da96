"""Every command reads each checkpoint file once, and the autoencoder keeps what its files record."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from apps.cli import main
from encoders.core import serialization
from encoders.core.imageio import write_image
from encoders.weights.checkpoints import save_encoder
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder, save_decoder
from tests.conftest import tiny_net


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An untrained tiny encoder (RFI and torchvision formats), a layer3 decoder for it, two images."""
    root = tmp_path_factory.mktemp("reads")
    enc = tiny_net()
    channels, stride = enc.feature_info()["layer3"]
    torch.save(enc.state_dict(), root / "torchvision.pt")
    paths = {
        "encoder": save_encoder(enc, root / "encoder.pt"),
        "decoder": save_decoder(
            Decoder(channels, stride, "layer3", channels=16),
            root / "decoder.pt",
            enc.config(),
            train_size=32,
            val_psnr=12.5,
        ),
        "foreign": root / "torchvision.pt",
        "images": root / "images",
    }
    for i in range(2):
        write_image(torch.rand(3, 24, 24), paths["images"] / f"{i}.png")
    return paths


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """Counts the files read through ``torch.load`` (what :func:`encoders.core.serialization.load_checkpoint` calls)."""
    counts: Counter = Counter()
    real = serialization.torch.load

    def counting(path, *args, **kwargs):
        counts[Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(serialization.torch, "load", counting)
    return counts


def test_eval_encoder_reads_its_checkpoint_once(files, reads, tmp_path, capsys):
    assert (
        main(
            [
                "eval-encoder",
                "--checkpoint",
                str(files["encoder"]),
                "--eps",
                "0.5",
                "--steps",
                "1",
                "--max-images",
                "4",
                "--device",
                "cpu",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    assert reads == {"encoder.pt": 1}


def test_shift_consistency_reads_encoder_and_decoder_once(files, reads, tmp_path, capsys):
    assert (
        main(
            [
                "shift-consistency",
                "--encoder",
                str(files["encoder"]),
                "--decoder",
                str(files["decoder"]),
                "--max-images",
                "2",
                "--device",
                "cpu",
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    assert reads == {"encoder.pt": 1, "decoder.pt": 1}


@pytest.mark.parametrize("encoder", ["encoder", "foreign"])
def test_invert_reads_each_file_once(files, reads, tmp_path, capsys, encoder):
    """A torchvision file takes its architecture from the decoder, still with one read."""
    assert (
        main(
            [
                "invert",
                str(files["images"]),
                "--encoder",
                str(files[encoder]),
                "--decoder",
                str(files["decoder"]),
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert reads == {files[encoder].name: 1, "decoder.pt": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]


def test_from_checkpoints_keeps_each_files_metadata(files, reads):
    ae = RobustAutoencoder.from_checkpoints(files["encoder"], files["decoder"])
    assert reads == {"encoder.pt": 1, "decoder.pt": 1}
    assert ae.metadata["decoders"]["layer3"]["train_size"] == 32
    assert ae.metadata["decoders"]["layer3"]["val_psnr"] == 12.5


def test_load_keeps_the_files_extra_metadata(files, tmp_path, reads):
    ae = RobustAutoencoder.from_checkpoints(files["encoder"], files["decoder"])
    ae.save(tmp_path / "ae.pt", app="denoise", sigma=[5, 50], config={"noise": {"sigma": [5, 50]}})
    reads.clear()
    loaded = RobustAutoencoder.load(tmp_path / "ae.pt")
    assert reads == {"ae.pt": 1}
    assert loaded.metadata == {"app": "denoise", "sigma": [5, 50], "config": {"noise": {"sigma": [5, 50]}}}
