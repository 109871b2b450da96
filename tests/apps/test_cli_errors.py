"""Bad input, from the ``rfi`` command line and the API: each case a careless user (or an attacker) can cause.

Every case asserts the one-line error (or the right result), the exit code, that no input
changed and that no partial or temporary file remains. Categories: command spellings and
flag defaults, output targets, images, checkpoints, configs, concurrent runs, API tensors.
Tiny models: the training cases take a few seconds each.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from apps.cli import COMMANDS, RENAMED, build_parser, main
from encoders import create_encoder
from encoders.core.config import bounded, config_path
from encoders.core.errors import RFIError
from encoders.core.files import EXIT_PARTIAL, FileBatch, check_output_folder
from encoders.core.imageio import read_image
from encoders.core.rundir import RunInUseError, RunLock
from encoders.core.serialization import load_checkpoint, save_checkpoint
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder
from tests.conftest import tiny_net
from tests.encoders.conftest import ROBUST, TINY, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, seed: int = 0, size: tuple[int, int] = (24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("rfi: error:") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def ae_file(tmp_path_factory) -> Path:
    ae = RobustAutoencoder(tiny_net(), Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    return ae.save(tmp_path_factory.mktemp("model") / "ae.pt")


@pytest.fixture(scope="module")
def nan_ae_file(tmp_path_factory) -> Path:
    dec = Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8)
    with torch.no_grad():
        dec.tail.weight.fill_(float("nan"))
    return RobustAutoencoder(tiny_net(), dec).save(tmp_path_factory.mktemp("nan") / "ae.pt")


# ----------------------------------------------------------------------------- output targets
def test_augment_never_overwrites_an_input_view(ae_file, tmp_path, capsys):
    src = tmp_path / "au_in"
    _png(src / "a.png", 0), _png(src / "a_view1.png", 1)
    before = _digest(src)
    code = main(["augment", str(src), "--model", str(ae_file), "--out", str(src), "--size", "16", "--views", "1"])
    assert code == 2 and "refusing to overwrite input" in _one_line_error(capsys)
    assert _digest(src) == before


def test_augment_refuses_two_inputs_with_one_output_name(ae_file, tmp_path, capsys):
    _png(tmp_path / "d1" / "x.png", 0), _png(tmp_path / "d2" / "x.png", 1)
    out = tmp_path / "o"
    code = main(
        [
            "augment",
            str(tmp_path / "d1"),
            str(tmp_path / "d2"),
            "--model",
            str(ae_file),
            "--out",
            str(out),
            "--size",
            "16",
            "--views",
            "1",
        ]
    )
    assert code == 2 and "would both be written" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("command", [["augment"], ["denoise", "apply"], ["style", "apply"]])
def test_out_naming_a_file_is_one_line_and_writes_nothing(command, ae_file, tmp_path, capsys):
    _png(tmp_path / "in" / "a.png", 0), _png(tmp_path / "in" / "b.png", 1)
    target = tmp_path / "taken.txt"
    target.write_text("user data")
    extra = {"augment": ["--size", "16"], "denoise": [], "style": ["--style", str(tmp_path / "in" / "b.png")]}
    model_flag = ["--model", str(ae_file)]
    code = main([*command, str(tmp_path / "in"), *model_flag, "--out", str(target), *extra[command[0]]])
    assert code == 2 and "is a file, not a folder" in _one_line_error(capsys)
    assert target.read_text() == "user data"


def test_read_only_target_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("encoders.core.files.tempfile.mkstemp", refuse)
    with pytest.raises(RFIError, match="cannot write to --out .*Read-only file system"):
        check_output_folder(tmp_path / "out")


def test_full_disk_stops_the_batch_with_one_line_and_no_temporary_file(tmp_path, monkeypatch):
    for i in range(3):
        _png(tmp_path / "in" / f"{i}.png", i)
    batch = FileBatch([tmp_path / "in"], tmp_path / "out")
    calls = {"n": 0}
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(fp).write_bytes(b"partial")  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(RFIError, match=r"cannot write .*1\.png: disk full \(1 file\(s\) written before\)"):
        batch.run(lambda src, x: [x])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png"]  # no .tmp left


def test_nan_model_output_is_refused_and_nothing_black_is_written(nan_ae_file, tmp_path, capsys):
    _png(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    code = main(
        [
            "augment",
            str(tmp_path / "in"),
            "--model",
            str(nan_ae_file),
            "--out",
            str(out),
            "--size",
            "16",
            "--views",
            "1",
            "--p",
            "1",
            "--styles",
            str(tmp_path / "in"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "NaN" in err or "nan" in err.lower()
    assert not list(out.glob("*_view1.png")) if out.exists() else True


def test_partial_failure_exits_1_and_names_the_file(tmp_path, capsys):
    _png(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    batch = FileBatch([tmp_path / "in"], tmp_path / "out")
    assert batch.run(lambda src, x: [x]) == EXIT_PARTIAL
    assert "bad.png" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.png"]


# ----------------------------------------------------------------------------- images
def test_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    path = _png(tmp_path / "bomb.png", size=(40, 50))
    monkeypatch.setenv("RFI_MAX_PIXELS", "1000")
    with pytest.raises(RFIError, match=r"bomb\.png is 50x40 .* RFI_MAX_PIXELS=2000"):
        read_image(path)
    monkeypatch.setenv("RFI_MAX_PIXELS", "2000")
    assert read_image(path).shape == (3, 40, 50)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :5] = 255  # a bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x = read_image(tmp_path / "phone.jpg")
    assert x.shape == (3, 30, 10)  # as a viewer shows it
    assert x[:, :5].mean() > 0.8 and x[:, -5:].mean() < 0.2  # the left edge is now the top


def test_nan_pixels_are_named(tmp_path):
    arr = np.full((8, 8), 0.5, np.float32)
    arr[2, 3] = np.nan
    Image.fromarray(arr, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(RFIError, match="nan.tif holds NaN"):
        read_image(tmp_path / "nan.tif")


# ----------------------------------------------------------------------------- checkpoints
def test_a_flipped_byte_in_a_tensor_is_reported(tmp_path):
    marker = torch.full((64,), 1.2345)
    path = save_checkpoint({"state_dict": {"w": marker}, "epoch": 1}, tmp_path / "c.pt")
    data = bytearray(path.read_bytes())
    at = bytes(data).index(marker.numpy().tobytes()[:16])
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(RFIError, match="c.pt is corrupt"):
        load_checkpoint(path)


def test_checkpoints_round_trip_without_the_hash_key(tmp_path):
    path = save_checkpoint({"state_dict": {"w": torch.arange(3)}, "x": 1}, tmp_path / "c.pt")
    assert set(load_checkpoint(path)) == {"state_dict", "x"}


def test_stale_temporary_files_of_dead_runs_are_removed(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".c.pt.{dead}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "c.pt")
    assert not stale.exists() and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# ----------------------------------------------------------------------------- concurrent runs
def test_a_run_folder_has_one_owner(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunInUseError, match=rf"in use by another run \(pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_stale_lock_is_replaced(tmp_path):
    (tmp_path / ".lock").write_text(f"{2**22 + 12345} {os.uname().nodename}\n")
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())


# ----------------------------------------------------------------------------- false figures
@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    from encoders.weights.checkpoints import save_encoder

    return save_encoder(tiny_net(), tmp_path_factory.mktemp("enc") / "enc.pt")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eps", "0.5", "--step-size=-0.125"], "step size must be a finite number > 0, got -0.125"),
        (["--eps", "-1"], "eps (attack radius) must be a finite number >= 0, got -1.0"),
        (["--eps", "nan"], "eps (attack radius) must be a finite number >= 0, got nan"),
        (["--eps", "0.5", "--steps", "0"], "--steps must be >= 1, got 0"),
    ],
)
def test_eval_encoder_refuses_attacks_that_print_false_figures(flags, message, encoder_file, tmp_path, capsys):
    out = tmp_path / "e.json"
    code = main(["eval-encoder", "--checkpoint", str(encoder_file), "--max-images", "4", "--json", str(out), *flags])
    assert code == 2 and message in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--masking-checks", "--eps", "0"], "--masking-checks need every --eps > 0"),
        (["--masking-checks", "--restarts", "0"], "--restarts must be >= 1, got 0"),
        (["--masking-checks", "--sweep", "1", "-2"], "--sweep must be > 0"),
        (["--masking-checks", "--sweep", "2", "1"], "--sweep (multiples of eps) must increase, got [2.0, 1.0]"),
    ],
)
def test_eval_encoder_refuses_masking_checks_that_prove_nothing(flags, message, encoder_file, tmp_path, capsys):
    out = tmp_path / "e.json"
    code = main(["eval-encoder", "--checkpoint", str(encoder_file), "--max-images", "4", "--json", str(out), *flags])
    assert code == 2 and message in _one_line_error(capsys)
    assert not out.exists()


def test_eval_encoder_twin_must_have_the_same_outputs(encoder_file, tmp_path, capsys):
    from encoders.weights.checkpoints import save_encoder

    twin = save_encoder(tiny_net(num_classes=5), tmp_path / "twin.pt")
    code = main(
        [
            "eval-encoder",
            "--checkpoint",
            str(encoder_file),
            "--twin",
            str(twin),
            "--max-images",
            "4",
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    error = _one_line_error(capsys)
    assert code == 2 and "has 5 outputs but" in error and "the twin must be trained on the same task" in error


def test_eval_encoder_checks_its_output_before_evaluating(encoder_file, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code = main(
        [
            "eval-encoder",
            "--checkpoint",
            str(encoder_file),
            "--max-images",
            "4",
            "--json",
            str(tmp_path / "f" / "e.json"),
        ]
    )
    assert code == 2 and "is a file, not a folder" in _one_line_error(capsys)


@dataclass
class _Optim:
    lr: float = bounded(low=0, low_open=True)


@dataclass
class _Job:
    optim: _Optim


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "must be > 0"),
        ("optim.lr=.nan", "must be a finite number"),
    ],
)
def test_numeric_config_values_are_range_checked(override, message, tmp_path):
    from encoders.core.config import load_config

    (tmp_path / "job.yaml").write_text("optim:\n  lr: 0.5\n")
    with pytest.raises(RFIError, match=rf"config key 'optim\.lr' in the command-line overrides {message}"):
        load_config(_Job, tmp_path / "job.yaml", [override])


def test_a_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    from encoders.core.config import load_config

    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  lr: 0.5\n")
    with pytest.raises(RFIError, match=r"'optim\.lr' in the command-line overrides must be > 0"):
        load_config(_Job, path, ["optim.lr=-2"])
    path.write_text("optim:\n  lr: -0.5\n")
    with pytest.raises(RFIError, match=rf"'optim\.lr' in {path} must be > 0"):
        load_config(_Job, path)


# ----------------------------------------------------------------------------- API tensors
def test_style_augment_names_an_empty_batch(ae_file):
    from apps.style.augment import StyleAugment

    aug = StyleAugment(str(ae_file), p=1.0)
    with pytest.raises(RFIError, match=r"non-empty batch .* got shape \(0, 3, 16, 16\)"):
        aug(torch.rand(0, 3, 16, 16))


# ----------------------------------------------------------------------------- evaluations that measure nothing
@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    from encoders.weights.checkpoints import save_encoder
    from inversion.decoders import save_decoder

    d = tmp_path_factory.mktemp("pair")
    enc = tiny_net()
    dec = Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8)
    return save_encoder(enc, d / "enc.pt"), save_decoder(dec, d / "dec.pt", enc.config(), train_size=16)


def _evaluate(pair, tmp_path, *data):
    enc, dec = pair
    return main(
        [
            "evaluate",
            "--encoder",
            str(enc),
            "--decoder",
            str(dec),
            "--num",
            "4",
            "--scales",
            "1,2",
            "--out",
            str(tmp_path / "ev"),
            *[a for d in data for a in ("--data", str(d))],
        ]
    )


def test_evaluate_names_a_truncated_file_and_measures_the_others(pair, tmp_path, capsys):
    folder = tmp_path / "imgs"
    for i in range(9):
        _png(folder / f"{i}.png", i, size=(40, 40))
    (folder / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    assert _evaluate(pair, tmp_path, folder) == EXIT_PARTIAL  # measured, but not everything asked
    captured = capsys.readouterr()
    assert "| pair0 | 1x | 16 |" in captured.out and "| pair0 | 2x | 32 |" in captured.out
    assert "left out of the 16-px evaluation: 9.png" in captured.err
    assert f"1 input(s) failed (the others were written):\n  {folder / '9.png'}: " in captured.err


@pytest.mark.parametrize("kind", ["missing", "file", "only_bad", "too_small"])
def test_evaluate_that_measures_nothing_exits_2(kind, pair, tmp_path, capsys):
    target = tmp_path / "data"
    if kind == "file":
        target.write_text("x")
    elif kind == "only_bad":
        for i in range(5):
            (target / f"{i}.png").parent.mkdir(exist_ok=True)
            (target / f"{i}.png").write_bytes(b"junk")
    elif kind == "too_small":
        for i, size in enumerate([(1, 1), (96, 1), (1, 96)] * 2):
            _png(target / f"{i}.png", i, size=size)
    assert _evaluate(pair, tmp_path, target) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:]  # one error line, last; warnings above it
    assert str(target) in lines[-1] and ("no such folder" in lines[-1] or "nothing measured" in lines[-1])
    if kind in ("only_bad", "too_small"):
        assert ("smaller than the 16-px" if kind == "too_small" else "cannot identify") in lines[-1]


def test_evaluate_reports_unseen_images_next_to_held_out_regions(pair, tmp_path, capsys):
    import json

    assert _evaluate(pair, tmp_path, "embedded", "unseen") == 0
    result = json.loads((tmp_path / "ev" / "evaluate.json").read_text())
    assert set(result["by_data"]) == {"embedded", "unseen"}
    assert result["by_data"]["unseen"]["data"] == "unseen"
    assert [r["size"] for r in result["by_data"]["unseen"]["models"]["pair0"]] == [16, 32]


# ----------------------------------------------------------------------------- malformed checkpoints
_MALFORMED = {
    "text": (lambda p: p.write_text("hello, not a checkpoint\n"), "not a valid checkpoint"),
    "list": (lambda p: torch.save([1, 2], p), "not a checkpoint dictionary"),
    "no_weights": (
        lambda p: torch.save({"format": "rfi-encoder", "encoder": {"arch": "resnet18"}}, p),
        "without weights",
    ),
    "unknown_key": (
        lambda p: torch.save(
            {"format": "rfi-encoder", "encoder": {"arch": "resnet18", "bogus": 1}, "state_dict": {}}, p
        ),
        "unknown Encoder settings bogus",
    ),
    "huge": (
        lambda p: torch.save(
            {"format": "rfi-encoder", "encoder": {"arch": "resnet50", "width": 500.0}, "state_dict": {}}, p
        ),
        "G parameters",
    ),
    "bad_value": (
        lambda p: torch.save({"format": "rfi-encoder", "encoder": {"arch": "nope"}, "state_dict": {}}, p),
        "unknown architecture 'nope'",
    ),
}


@pytest.mark.parametrize("kind", sorted(_MALFORMED))
def test_malformed_encoder_checkpoints_are_one_line(kind, tmp_path, capsys):
    make, message = _MALFORMED[kind]
    make(tmp_path / "enc.pt")
    assert main(["eval-encoder", "--checkpoint", str(tmp_path / "enc.pt"), "--max-images", "2"]) == 2
    assert message in _one_line_error(capsys)


@pytest.mark.parametrize(
    "decoder, message",
    [
        ({"in_channels": 10**6, "stride": 4, "channels": 10**5}, "G parameters"),
        ({"in_channels": 8, "stride": 4, "colour": 1}, "unknown Decoder settings colour"),
        ({"in_channels": 8, "stride": 4, "skips": "layer1"}, "invalid decoder skips"),
    ],
)
def test_malformed_decoder_checkpoints_are_one_line(decoder, message, pair, tmp_path, capsys):
    _png(tmp_path / "a.png")
    torch.save({"format": "rfi-decoder", "decoder": decoder, "state_dict": {}}, tmp_path / "dec.pt")
    code = main(
        [
            "invert",
            str(tmp_path / "a.png"),
            "--encoder",
            str(pair[0]),
            "--decoder",
            str(tmp_path / "dec.pt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and message in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_files_passed_in_the_wrong_place_say_what_they_are(pair, ae_file, tmp_path, capsys):
    _png(tmp_path / "a.png")
    enc, dec = pair
    assert (
        main(
            [
                "invert",
                str(tmp_path / "a.png"),
                "--encoder",
                str(dec),
                "--decoder",
                str(dec),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "is a decoder file, not an encoder checkpoint" in _one_line_error(capsys)
    assert main(["denoise", "apply", str(tmp_path / "a.png"), "--model", str(enc), "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "it is an encoder checkpoint" in err and "--encoder" not in err


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.full((1, 3, 8, 8), float("nan")), "contain NaN"),
        (torch.rand(1, 3, 8, 8) * 255, "divide by 255"),
        (torch.rand(1, 1, 8, 8), "give 3 channels"),
        (torch.rand(1, 4, 8, 8), "got (1, 4, 8, 8)"),
        (torch.rand(3, 8, 8), "add a batch dimension"),
        (torch.zeros(0, 3, 8, 8), "is empty"),
        (np.zeros((8, 8, 3), np.uint8), "torch.from_numpy"),
        ((torch.rand(1, 3, 8, 8) * 255).byte(), "got torch.uint8 (divide by 255)"),
    ],
)
def test_encoder_inputs_are_checked(x, message, tiny_encoder_net):
    enc = tiny_encoder_net
    with pytest.raises(RFIError, match=re.escape(message)):
        enc(x)


def test_autoencoder_converts_float64_and_refuses_an_empty_batch(ae_file):
    ae = RobustAutoencoder.load(ae_file)
    out = ae.reconstruct(torch.rand(1, 3, 16, 16, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 16)
    with pytest.raises(RFIError, match="is empty"):
        ae.reconstruct(torch.zeros(0, 3, 16, 16))


# ----------------------------------------------------------------------------- configs of training runs
def _tiny_encoder_run(tmp_path, *overrides):
    return main(
        [
            "train-encoder",
            "--config",
            "configs/encoder/resnet18_robust.yaml",
            "--out",
            str(tmp_path / "r"),
            "data.train_crops=16",
            "data.val_crops=8",
            "data.size=16",
            "batch_size=8",
            "epochs=1",
            "eval.enabled=false",
            "model.width=0.125",
            "device=cpu",
            *overrides,
        ]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("adv.step_size=-1", "adv: step size must be a finite number > 0, got -1"),
        ("adv.eps=-0.5", "adv: eps (attack radius) must be a finite number >= 0"),
        ("adv.steps=0", "adv: steps (PGD steps) must be >= 1"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.lr=.nan", "must be a finite number"),
        ("data.size=0", "data.size"),
        ("num_workers=-1", "num_workers must be >= 0"),
        ("adv.enabled=yes", "must be true or false"),
    ],
)
def test_train_encoder_refuses_bad_numbers_before_training(override, message, tmp_path, capsys):
    assert _tiny_encoder_run(tmp_path, override) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.betas=[2,3]", "optim.betas must be two numbers in [0, 1)"),
        ("optim.warmup_steps=-5", "optim.warmup_steps and optim.weight_decay must be >= 0"),
        ("optim.lr=-1", "optim.lr and optim.disc_lr must be > 0"),
    ],
)
def test_train_decoder_refuses_bad_numbers(override, message, pair, tmp_path, capsys):
    code = main(
        [
            "train-decoder",
            "--config",
            "configs/decoder/resnet18_robust_layer3.yaml",
            "--out",
            str(tmp_path / "d"),
            f"encoder.checkpoint={pair[0]}",
            "steps=1",
            override,
        ]
    )
    assert code == 2 and message in _one_line_error(capsys)


def test_two_runs_cannot_share_a_run_folder(tmp_path, capsys):
    with RunLock(tmp_path / "r"):
        assert _tiny_encoder_run(tmp_path) == 2
    assert "in use by another run" in _one_line_error(capsys)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path, capsys):
    assert _tiny_encoder_run(tmp_path, "steps=2", "checkpoint_every=1", "adv.enabled=false") == 0
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # the power went off mid-line
    ckpt = tmp_path / "r" / "checkpoint.pt"
    before = ckpt.read_bytes()
    assert _tiny_encoder_run(tmp_path, "steps=2", "checkpoint_every=1", "adv.enabled=false", "--resume") == 0
    assert ckpt.read_bytes() == before  # a complete run resumes as a no-op


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sigma", "nan"], "config key 'apply.sigma' in the command-line overrides must be a finite number"),
        (["--sigma", "-5"], "config key 'apply.sigma' in the command-line overrides must be >= 0"),
        (["--tile", "0"], "config key 'apply.tile' in the command-line overrides must be >= 1"),
    ],
)
def test_denoise_flags_out_of_range_blame_the_flag_not_the_image(flags, message, ae_file, tmp_path, capsys):
    _png(tmp_path / "a.png")
    assert (
        main(
            ["denoise", "apply", str(tmp_path / "a.png"), "--model", str(ae_file), "--out", str(tmp_path / "o"), *flags]
        )
        == 2
    )
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["invert", "a.png", "--encoder", "e.pt", "--out", "o", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["invert", "a.png", "--encoder", "e.pt", "--out", "o", "--tile", "0"], "--tile must be >= 1, got 0"),
        (["invert", "a.png", "--encoder", "e.pt", "--out", "o", "--lr", "0"], "--lr must be > 0, got 0.0"),
        (["evaluate", "--encoder", "e.pt", "--decoder", "d.pt", "--num", "0"], "--num must be >= 1, got 0"),
        (["eval-encoder", "--checkpoint", "e.pt", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["shift-consistency", "--encoder", "e.pt", "--max-images", "0"], "--max-images must be >= 1, got 0"),
    ],
)
def test_flags_out_of_range_are_named_before_any_file_is_read(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.pt, d.pt, a.png do not exist: the flag is checked first
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


@pytest.mark.parametrize(
    "command",
    [
        ["train-encoder", "--config", "configs/encoder/resnet18_robust.yaml"],
        ["train-decoder", "--config", "configs/decoder/resnet18_robust_layer3.yaml"],
    ],
)
def test_training_out_naming_a_file_is_one_line(command, pair, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("user data")
    extra = [f"encoder.checkpoint={pair[0]}"] if command[0] == "train-decoder" else []
    assert main([*command, "--out", str(target), "steps=1", *extra]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert target.read_text() == "user data"


@pytest.mark.parametrize(
    "command",
    [
        ["quickstart", "--budget", "tiny", "--out", "{file}"],
        ["weights", "fetch", "torchvision_alexnet", "--dest", "{file}"],
        ["anomaly", "make-benchmark", "--out", "{file}"],
        ["anomaly", "fit", "--data", "embedded", "--out", "{file}/model.pt"],
    ],
)
def test_other_writing_commands_check_their_output_first(command, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("user data")
    assert main([a.replace("{file}", str(target)) for a in command]) == 2
    err = _one_line_error(capsys)
    assert str(target) in err and ("is a file, not a folder" in err or "not an embedded benchmark folder" in err)
    assert target.read_text() == "user data"


def test_shift_consistency_checks_its_json_first(encoder_file, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["shift-consistency", "--encoder", str(encoder_file), "--json", str(tmp_path / "f" / "s.json")]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)


# ----------------------------------------------------------------------------- (from the encoder CLI tests)
def _fails(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("rfi: error: ")]
    assert len(lines) == 1 and err.endswith(lines[0]), err  # (progress logs may precede it)
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


@pytest.fixture
def train(tmp_path):
    """``train(*overrides)``: arguments of a tiny ``rfi train-encoder`` run writing to ``tmp_path/run``."""
    return lambda *overrides: [
        "train-encoder",
        "--config",
        str(ROBUST),
        "--out",
        str(tmp_path / "run"),
        *TINY,
        *overrides,
    ]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny standard ResNet-18 trained for 2 epochs on 16-px embedded crops (a few seconds)."""
    from encoders.robust.train import train_encoder

    out = tmp_path_factory.mktemp("trained")
    return train_encoder(tiny_config(out, "epochs=2", "data.train_crops=1024", "data.val_crops=256")).path


def test_unknown_architecture_lists_the_valid_ones(tmp_path, capsys, train):
    _fails(
        capsys,
        train("model.arch=resnet99"),
        "unknown architecture 'resnet99'",
        "alexnet, vgg16, vgg19, resnet18, resnet50",
    )
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    _fails(
        capsys, ["eval-encoder", "--checkpoint", str(tmp_path / "w.pt"), "--arch", "vit"], "unknown architecture 'vit'"
    )


def test_unknown_layer_lists_the_valid_ones():  # the API's message, as the commands print it
    valid = r"\(valid: layer1, layer2, layer3, layer4, input\)"
    with pytest.raises(RFIError, match=r"unknown layer 'layer9' for resnet18 " + valid):
        create_encoder("resnet18", width=0.125, layers=["layer9"])


def test_misspelt_config_key_is_named(tmp_path, capsys, train):
    _fails(capsys, train("adv.epss=1.0"), "unknown config key 'adv.epss'", "eps")
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(train()[2]).read_text().replace("batch_size:", "batchsize:"))
    _fails(capsys, ["train-encoder", "--config", str(bad)], "unknown config key 'batchsize'", str(bad))
    _fails(capsys, train("adv.norm=l1"), "adv.norm 'l1'", "l2, linf")
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_architecture(trained_checkpoint, tmp_path, capsys):
    _fails(
        capsys,
        ["eval-encoder", "--checkpoint", str(trained_checkpoint), "--arch", "vgg16"],
        "holds a resnet18 encoder, not vgg16",
    )
    path = tmp_path / "tv_resnet50.pt"  # a torchvision-style state dict (no RFI metadata)
    torch.save(tiny_net(arch="resnet50", small_input=False).model.state_dict(), path)
    _fails(
        capsys,
        ["eval-encoder", "--checkpoint", str(path), "--arch", "resnet18"],
        "does not fit Encoder resnet18",
        "unexpected keys: model.layer1.0.bn3",
        "shape mismatch: model.fc.weight",
    )
    _fails(capsys, ["eval-encoder", "--checkpoint", str(path)], "name its architecture")


def test_truncated_and_non_checkpoint_files(trained_checkpoint, tmp_path, capsys):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained_checkpoint.read_bytes()[:5000])
    _fails(capsys, ["eval-encoder", "--checkpoint", str(cut)], str(cut), "not a valid checkpoint")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    _fails(capsys, ["eval-encoder", "--checkpoint", str(text)], str(text), "not a valid checkpoint")
    _fails(capsys, ["eval-encoder", "--checkpoint", str(tmp_path / "missing.pt")], "checkpoint not found")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_file_that_would_run_code_is_refused_and_never_executed(tmp_path, capsys, container, train):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}
    if container == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    _fails(capsys, ["eval-encoder", "--checkpoint", str(path), "--arch", "resnet18"], str(path))
    (tmp_path / "run").mkdir()
    shutil.copy(path, tmp_path / "run" / "checkpoint.pt")
    _fails(capsys, train() + ["--resume"], str(tmp_path / "run" / "checkpoint.pt"))  # also when resuming a run
    assert not marker.exists()


def test_resume_of_a_foreign_file_is_refused(tmp_path, capsys, train):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": {}}, run / "checkpoint.pt")
    _fails(capsys, train() + ["--resume"], "not a training checkpoint")


def test_empty_or_unreadable_image_folder(tmp_path, capsys, train):
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = ("data.source=folder", "data.size=16")
    _fails(capsys, train(*folder, f"data.root={empty}"), "no image files in", str(empty))
    _fails(capsys, train(*folder, f"data.root={tmp_path / 'nowhere'}"), "image folder not found")
    broken = tmp_path / "broken"
    for cls in ("a", "b"):
        (broken / cls).mkdir(parents=True)
        for i in range(5):
            (broken / cls / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _fails(capsys, train(*folder, f"data.root={broken}"), "is not a readable image")
    _fails(
        capsys, train("data.source=cifar10", f"data.root={tmp_path}"), "CIFAR-10 not found", "cifar-10-python.tar.gz"
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- commands, spellings, flag defaults
@pytest.mark.parametrize("command", [c for c, _, _ in COMMANDS])
def test_every_command_has_help_from_its_module_in_apps_commands(command, capsys):
    """Each command's parser comes from ``apps/commands/<command>.py`` and ``--help`` exits 0."""
    module = dict((c, m) for c, m, _ in COMMANDS)[command]
    assert module == "apps.commands." + command.replace("-", "_")
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and f"usage: rfi {command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--quiet", "anomaly", "score"], ["anomaly", "score", "--quiet"]])
def test_anomaly_takes_the_common_flags_before_or_after_its_sub_command(argv):
    args = build_parser(argv).parse_args([*argv, "--model", "m.pt", "--data", "d", "--out", "o"])
    assert args.quiet is True and args.debug is False and args.anomaly_command == "score"


@pytest.mark.parametrize(
    "argv, new",
    [
        (["train-denoiser", "--config", "configs/apps/denoise.yaml"], "'rfi denoise train'"),
        (["train-decoders", "--config", "configs/apps/style.yaml"], "'rfi style train'"),
        (["stylize", "a.png", "--style", "b.png", "--out", "o"], "'rfi style apply'"),
        (["denoise", "a.png", "--model", "m.pt", "--out", "o"], "'rfi denoise apply FILES'"),
        (["--quiet", "denoise", "photos/", "--out", "o"], "'rfi denoise apply FILES'"),
    ],
)
def test_an_old_spelling_names_the_new_one_in_one_line(argv, new, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _fails(capsys, argv, new, "is now")
    assert f"'rfi {argv[argv[0] == '--quiet']}" in line
    assert not list(tmp_path.iterdir())  # nothing read, nothing written
    assert set(RENAMED) == {"train-denoiser", "train-decoders", "stylize"}


def _device_flags(parser: argparse.ArgumentParser):
    """Every ``--device`` option of a parser and its sub-commands' parsers."""
    for action in parser._actions:
        if "--device" in action.option_strings:
            yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _device_flags(sub)


def _device_keys(data, where=""):
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "device":
                yield f"{where}{key}", value
            yield from _device_keys(value, f"{where}{key}.")


def test_every_device_default_is_auto():
    """One ``--device`` default for every command, ``auto``: read from a config class (the YAML), not argparse."""
    seen = 0
    for command, _, _ in COMMANDS:
        for action in _device_flags(build_parser([command])):
            seen += 1
            assert action.default in (None, "auto"), (command, action.default)  # None: the config's key
            assert "(default: cpu" not in (action.help or ""), command
    assert seen >= 7
    for path in sorted(Path(config_path("configs/quickstart.yaml")).parent.rglob("*.yaml")):
        for key, value in _device_keys(yaml.safe_load(path.read_text())):
            assert value == "auto", f"{path}: {key}: {value}"


@pytest.mark.parametrize(
    "command",
    [
        ["invert", "a.png", "--out", "o"],
        ["evaluate", "--encoder", "e", "--decoder", "d"],
        ["eval-encoder", "--checkpoint", "c"],
        ["shift-consistency", "--encoder", "e"],
    ],
)
def test_flag_defaults_come_from_configs_commands_yaml(command):
    shipped = yaml.safe_load(config_path("configs/commands.yaml").read_text())[command[0].replace("-", "_")]
    args = build_parser(command).parse_args(command)
    assert shipped["device"] == "auto" and {k: getattr(args, k) for k in shipped} == shipped


def test_denoise_and_style_apply_read_their_device_from_the_config():
    from apps.denoise import DenoiseConfig
    from apps.style.config import StyleConfig

    assert DenoiseConfig().apply.device == StyleConfig().apply.device == "auto"
    for verb in ("train", "apply"):
        with pytest.raises(SystemExit) as done:
            main(["denoise", verb, "--help"])
        assert done.value.code == 0


# ----- issue 21, round 2: models and checkpoints
@pytest.fixture(scope="module")
def nan_files(tmp_path_factory) -> dict[str, Path]:
    """An encoder, a decoder and an autoencoder file whose weights hold NaN (a training that diverged)."""
    from encoders.weights.checkpoints import save_encoder
    from inversion.decoders import save_decoder

    d = tmp_path_factory.mktemp("nan_models")
    enc, dec = tiny_net(), Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8)
    with torch.no_grad():
        enc.model.fc.weight.fill_(float("nan"))
        dec.tail.weight.fill_(float("nan"))
    return {
        "encoder": save_encoder(enc, d / "nan_enc.pt"),
        "decoder": save_decoder(dec, d / "nan_dec.pt", tiny_net(), train_size=16),
        "model": RobustAutoencoder(tiny_net(), dec).save(d / "nan_ae.pt"),
    }


@pytest.mark.parametrize(
    "argv, bad",
    [
        (["eval-encoder", "--checkpoint", "{encoder}", "--max-images", "2", "--json", "{out}/e.json"], "encoder"),
        (["shift-consistency", "--encoder", "{encoder}", "--max-images", "2", "--json", "{out}/s.json"], "encoder"),
        (["invert", "{img}", "--encoder", "{good}", "--decoder", "{decoder}", "--out", "{out}"], "decoder"),
        (["evaluate", "--encoder", "{good}", "--decoder", "{decoder}", "--num", "2", "--out", "{out}"], "decoder"),
        (["denoise", "apply", "{img}", "--model", "{model}", "--out", "{out}"], "model"),
        (["style", "apply", "{img}", "--style", "{img}", "--model", "{model}", "--out", "{out}"], "model"),
        (
            ["augment", "{img}", "--model", "{model}", "--out", "{out}", "--size", "16", "--styles", "{img_dir}"],
            "model",
        ),
        (["anomaly", "score", "--model", "{model}", "--data", "{img_dir}", "--out", "{out}"], "model"),
    ],
)
def test_every_command_refuses_a_model_with_nan_weights(argv, bad, nan_files, pair, tmp_path, capsys):
    img = _png(tmp_path / "in" / "a.png")
    paths = {**nan_files, "good": pair[0], "img": img, "img_dir": img.parent, "out": tmp_path / "out"}
    assert main([a.format(**paths) for a in argv]) == 2
    err = _one_line_error(capsys)
    assert f"{nan_files[bad]} holds NaN or Inf values (first in '" in err and "state_dict/" in err
    assert not (tmp_path / "out").exists()  # no figure, no JSON, no image


def test_a_decoder_from_the_future_or_of_an_unknown_format_is_refused(pair, tmp_path, capsys):
    _png(tmp_path / "a.png")
    ckpt = load_checkpoint(pair[1])
    for name, change, message in (
        ("v99.pt", {"version": 99}, "is an rfi-decoder file of version 99, newer than"),
        ("fmt.pt", {"format": "rfi-gen"}, "has an unknown checkpoint format 'rfi-gen'"),
    ):
        save_checkpoint({**ckpt, **change}, tmp_path / name)
        assert (
            main(
                [
                    "invert",
                    str(tmp_path / "a.png"),
                    "--encoder",
                    str(pair[0]),
                    "--decoder",
                    str(tmp_path / name),
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
            == 2
        )
        assert f"{tmp_path / name} {message}" in _one_line_error(capsys)
    save_checkpoint({**load_checkpoint(pair[0]), "format": "rfi-classifier"}, tmp_path / "enc.pt")
    assert main(["eval-encoder", "--checkpoint", str(tmp_path / "enc.pt"), "--arch", "resnet18"]) == 2
    assert "unknown checkpoint format 'rfi-classifier'" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_a_flipped_bit_in_a_decoders_training_size_is_reported(pair, tmp_path, capsys):
    data = bytearray(pair[1].read_bytes())
    at = data.index(b"K\x10", data.index(b"train_size"))  # the pickled int 16
    data[at + 1] = 0x30  # 48: evaluate would measure at 48 px
    (tmp_path / "dec.pt").write_bytes(bytes(data))
    assert (
        main(
            [
                "evaluate",
                "--encoder",
                str(pair[0]),
                "--decoder",
                str(tmp_path / "dec.pt"),
                "--num",
                "2",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 2
    )
    assert f"{tmp_path / 'dec.pt'} is corrupt" in _one_line_error(capsys)
    assert not (tmp_path / "ev").exists()


@pytest.fixture(scope="module")
def robust_pair(tmp_path_factory) -> dict[str, Path]:
    """A decoder trained (recorded) on one encoder, that encoder, and another of the same settings."""
    from encoders.weights.checkpoints import save_encoder
    from inversion.decoders import save_decoder

    d = tmp_path_factory.mktemp("mismatch")
    robust, standard = tiny_net(seed=0), tiny_net(seed=1)
    dec = Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8)
    return {
        "robust": save_encoder(robust, d / "robust.pt"),
        "standard": save_encoder(standard, d / "standard.pt"),
        "decoder": save_decoder(dec, d / "dec.pt", robust, train_size=16, encoder_path=str(d / "robust.pt")),
    }


@pytest.mark.parametrize("command", ["invert", "evaluate"])
def test_a_decoder_with_another_encoder_needs_allow_mismatch(command, robust_pair, tmp_path, capsys):
    _png(tmp_path / "a.png", size=(32, 32))
    out = tmp_path / "o"
    argv = {
        "invert": ["invert", str(tmp_path / "a.png"), "--encoder", str(robust_pair["standard"])],
        "evaluate": ["evaluate", "--encoder", str(robust_pair["standard"]), "--num", "2", "--scales", "1"],
    }[command]
    argv += ["--decoder", str(robust_pair["decoder"]), "--out", str(out)]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"{robust_pair['decoder']} was trained on another resnet18 encoder than {robust_pair['standard']}" in err
    assert f"it was trained on {robust_pair['robust']}" in err and "--allow-mismatch" in err
    assert not out.exists()
    assert main([*argv, "--allow-mismatch"]) == 0  # the deliberate mismatch
    capsys.readouterr()
    argv[argv.index(str(robust_pair["standard"]))] = str(robust_pair["robust"])
    assert main([*argv[:-1], str(tmp_path / "o2")]) == 0  # the pair it was trained as


@pytest.fixture(scope="module")
def app_models(tmp_path_factory) -> dict[str, Path]:
    """Autoencoder files as ``rfi style train``, ``rfi denoise train`` and ``rfi anomaly fit`` record them."""
    from apps.anomaly.detector import AnomalyDetector, ScoreConfig

    d = tmp_path_factory.mktemp("kinds")
    ae = RobustAutoencoder(tiny_net(), Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    return {
        "style": ae.save(d / "pyramid.pt", app="style"),
        "denoise": ae.save(d / "denoiser.pt", app="denoise"),
        "anomaly": AnomalyDetector(ae, ScoreConfig(), image_size=16, stats={}, threshold=1.0).save(d / "anom.pt"),
    }


@pytest.mark.parametrize(
    "command, model, message",
    [
        (
            ["style", "apply"],
            "denoise",
            "is not a style pyramid (rfi style train): it is a denoiser (rfi denoise train)",
        ),
        (
            ["denoise", "apply"],
            "style",
            "is not a denoiser (rfi denoise train): it is a style pyramid (rfi style train)",
        ),
        (["denoise", "apply"], "anomaly", "is not a denoiser (rfi denoise train): it is an anomaly model"),
    ],
)
def test_a_model_file_of_another_kind_is_refused_naming_both(command, model, message, app_models, tmp_path, capsys):
    img = _png(tmp_path / "in" / "a.png")
    extra = ["--style", str(img)] if command[0] == "style" else []
    assert main([*command, str(img), "--model", str(app_models[model]), "--out", str(tmp_path / "o"), *extra]) == 2
    assert f"{app_models[model]} {message}" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


# ----- issue 21, round 2: files, disks, sizes, flags
@pytest.fixture
def full_disk(monkeypatch):
    """Every file write fails as on a full disk: ``Path.write_text``/``write_bytes`` and PIL's ``save`` with
    ``ENOSPC``, ``torch.save`` with the ``RuntimeError`` its writer raises then (seen on a full tmpfs)."""

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    for owner, name in [(Path, "write_text"), (Path, "write_bytes"), (Image.Image, "save")]:
        monkeypatch.setattr(owner, name, enospc)
    monkeypatch.setattr(torch, "save", torch_save)


def _leftovers(folder: Path) -> list[str]:
    return [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.endswith(".tmp") or p.name == ".lock" or "_decoded." in p.name
    ]


_FULL_DISK = {
    "train-encoder": lambda t, pair: [
        "train-encoder",
        "--config",
        "configs/encoder/resnet18_robust.yaml",
        "--out",
        str(t / "out"),
        "data.train_crops=16",
        "data.val_crops=8",
        "data.size=16",
        "batch_size=8",
        "steps=1",
        "eval.enabled=false",
        "model.width=0.125",
    ],
    "train-decoder": lambda t, pair: [
        "train-decoder",
        "--config",
        "configs/decoder/resnet18_robust_layer3.yaml",
        "--out",
        str(t / "out"),
        f"encoder.checkpoint={pair[0]}",
        "steps=1",
        "data.size=16",
        "data.train_crops=8",
        "data.val_crops=4",
        "batch_size=4",
    ],
    "denoise train": lambda t, pair: [
        "denoise",
        "train",
        "--out",
        str(t / "out"),
        f"train.encoder.checkpoint={pair[0]}",
        "train.steps=1",
        "train.data.size=16",
        "train.data.train_crops=8",
        "train.data.val_crops=4",
        "train.batch_size=4",
    ],
    "style train": lambda t, pair: [
        "style",
        "train",
        "--out",
        str(t / "out" / "pyramid.pt"),
        "train.steps=1",
        f"train.encoder.checkpoint={pair[0]}",
        "layers=[layer1]",
        "train.data.size=16",
        "train.data.train_crops=8",
        "train.data.val_crops=4",
        "train.batch_size=4",
    ],
    "quickstart": lambda t, pair: ["quickstart", "--budget", "tiny", "--out", str(t / "out")],
    "shift-consistency --json": lambda t, pair: [
        "shift-consistency",
        "--encoder",
        str(pair[0]),
        "--max-images",
        "2",
        "--json",
        str(t / "out" / "s.json"),
    ],
    "anomaly make-benchmark": lambda t, pair: [
        "anomaly",
        "make-benchmark",
        "--out",
        str(t / "out"),
        "benchmark.size=32",
        "benchmark.train=2",
        "benchmark.test_good=1",
        "benchmark.test_defect=1",
    ],
}


def _last_line_error(capsys) -> str:
    """The one error line, last (a training logs its progress above it), and no traceback."""
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "error" in line or "Traceback" in line] == lines[-1:], lines
    return lines[-1]


@pytest.mark.parametrize("command", sorted(_FULL_DISK))
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(command, pair, full_disk, tmp_path, capsys):
    assert main(_FULL_DISK[command](tmp_path, pair)) == 2
    err = _last_line_error(capsys)
    assert "disk full" in err and str(tmp_path / "out") in err and "free some space" in err, err
    assert _leftovers(tmp_path) == []


def test_a_full_disk_while_scoring_is_one_line(tiny_model, dummy_mvtec, full_disk, tmp_path, capsys):
    assert (
        main(
            [
                "anomaly",
                "score",
                "--model",
                str(tiny_model),
                "--data",
                str(dummy_mvtec / "widget"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = _last_line_error(capsys)
    assert "disk full" in err and str(tmp_path / "out") in err
    assert _leftovers(tmp_path) == []


def test_an_empty_lock_left_by_a_full_disk_no_longer_refuses_every_later_run(tmp_path, capsys):
    from encoders.core.rundir import LOCK_WRITE_SECONDS

    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_bytes(b"")  # what a full disk left as an older RFI took the lock
    old = (run / ".lock").stat().st_mtime - LOCK_WRITE_SECONDS - 1
    os.utime(run / ".lock", (old, old))
    assert _tiny_encoder_run(tmp_path, "steps=1", "adv.enabled=false") == 0
    assert "replacing the empty or unreadable lock" in capsys.readouterr().err
    assert not (run / ".lock").exists() and (run / "checkpoint.pt").is_file()


def test_sizes_from_the_api_are_bounded_before_allocating(monkeypatch):
    monkeypatch.setattr("encoders.core.budget.memory_bytes", lambda: 8 * 10**9)
    with pytest.raises(
        RFIError,
        match=r"create_encoder\('resnet50', width=64\) with 96\.2 G parameters needs about "
        r"384\.7 GB, more than the 8\.0 GB of memory of this machine: lower width",
    ):
        create_encoder("resnet50", width=64)
    with pytest.raises(RFIError, match="num_classes must be >= 1, got 0"):
        create_encoder("resnet18", num_classes=0)


def test_a_decoder_too_large_for_memory_is_refused_naming_its_key(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("encoders.core.budget.memory_bytes", lambda: 8 * 10**9)
    code = main(
        [
            "train-decoder",
            "--config",
            "configs/decoder/resnet18_robust_layer3.yaml",
            "--out",
            str(tmp_path / "d"),
            f"encoder.checkpoint={pair[0]}",
            "steps=1",
            "decoder.channels=200000",
        ]
    )
    err = _one_line_error(capsys)
    assert code == 2 and "decoder.channels=200000" in err and "lower decoder.channels" in err and "GB" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["augment", "--size", "60000"],
        ["style", "apply", "--size", "60000", "--style", "{in}/a.png"],
        ["style", "apply", "--style-size", "60000", "--style", "{in}/a.png"],
    ],
)
def test_an_image_size_beyond_memory_is_refused_before_any_image_is_read(command, ae_file, tmp_path, capsys):
    _png(tmp_path / "in" / "a.png")
    argv = [a.replace("{in}", str(tmp_path / "in")) for a in command]
    assert (
        main(
            [
                *argv[: 2 if argv[0] == "style" else 1],
                str(tmp_path / "in"),
                *argv[2 if argv[0] == "style" else 1 :],
                "--model",
                str(ae_file),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "60000x60000-px images (3600 Mpx, 43.2 GB as floats)" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_augment_refuses_views_that_would_not_fit_in_memory(ae_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("encoders.core.budget.memory_bytes", lambda: 10**8)
    _png(tmp_path / "in" / "a.png")
    assert (
        main(
            [
                "augment",
                str(tmp_path / "in"),
                "--model",
                str(ae_file),
                "--out",
                str(tmp_path / "o"),
                "--size",
                "4000",
                "--views",
                "4",
            ]
        )
        == 2
    )
    assert "--size 4000 with --views 4 for 1 images needs about" in _one_line_error(capsys)


def test_denoise_train_checks_its_model_file_before_training(pair, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    code = main(
        [
            "denoise",
            "train",
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(tmp_path / "taken"),
            f"train.encoder.checkpoint={pair[0]}",
            "train.steps=1",
        ]
    )
    assert code == 2 and "model (--model) " in (err := _one_line_error(capsys)) and "is a folder" in err
    assert not (tmp_path / "run").exists()


_LONG = "x" * 300


@pytest.mark.parametrize(
    "command",
    [
        ["train-encoder", "--config", "configs/encoder/resnet18_robust.yaml", "--out", "{t}/" + _LONG, "steps=1"],
        ["quickstart", "--budget", "tiny", "--out", "{t}/" + _LONG],
        ["anomaly", "fit", "--data", "embedded", "--out", "{t}/" + _LONG + ".pt"],
        ["anomaly", "fit", "--data", "embedded", "--out", "{t}/" + "m" * 240 + ".pt"],  # fits, its temporary name not
        ["anomaly", "make-benchmark", "--out", "{t}/" + _LONG],
        ["invert", "{t}/in", "--encoder", "e.pt", "--out", "{t}/deep/" + _LONG],
        ["shift-consistency", "--encoder", "e.pt", "--json", "{t}/" + _LONG + ".json"],
    ],
)
def test_a_name_too_long_for_the_file_system_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "in" / "a.png")
    assert main([a.replace("{t}", str(tmp_path)) for a in command]) == 2
    assert "this file system allows: choose a shorter name" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize(
    "command",
    [
        ["invert", "{t}/in", "--encoder", "e.pt", "--decoder", "d.pt", "--out", ""],
        ["augment", "{t}/in", "--out", ""],
        ["train-encoder", "--config", "configs/encoder/resnet18_robust.yaml", "--out", "", "steps=1"],
        ["anomaly", "make-benchmark", "--out", ""],
        ["anomaly", "fit", "--data", "embedded", "--out", ""],
        ["shift-consistency", "--encoder", "e.pt", "--json", ""],
    ],
)
def test_an_empty_out_is_refused_not_taken_as_the_working_folder(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "in" / "a.png")
    assert main([a.replace("{t}", str(tmp_path)) for a in command]) == 2
    assert "is empty: name" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_make_benchmark_onto_a_read_only_mount_is_one_line(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("encoders.core.files.tempfile.mkstemp", refuse)
    assert main(["anomaly", "make-benchmark", "--out", str(tmp_path / "bench")]) == 2
    assert "cannot write to --out" in (err := _one_line_error(capsys)) and "Read-only file system" in err
    assert list(tmp_path.iterdir()) == []


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    code = main(
        [
            "train-encoder",
            "--config",
            "configs/encoder/resnet18_robust.yaml",
            "steps=1",
            "--out",
            str(tmp_path / "r"),
            "batch_size=0",
        ]
    )  # the override after --out is read (and checked)
    assert code == 2 and "batch_size must be >= 1, got 0" in _one_line_error(capsys)
    with pytest.raises(SystemExit) as done:  # anything else left over is argparse's usage error, as before
        main(
            [
                "train-encoder",
                "--config",
                "configs/encoder/resnet18_robust.yaml",
                "--out",
                str(tmp_path),
                "steps=1",
                "--bogus",
            ]
        )
    assert done.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_users_quickstart_file_changes_only_the_keys_it_names(tmp_path, monkeypatch):
    import apps.quickstart

    (tmp_path / "mine.yaml").write_text("eval:\n  num: 4\n")
    seen = []

    def stop(kind, name, cfg, *args, **kwargs):
        seen.append(cfg)
        raise RFIError("stop here")

    monkeypatch.setattr(apps.quickstart, "_train", stop)
    with pytest.raises(RFIError, match="stop here"):  # the run configs were found (the shipped ones) and loaded
        apps.quickstart.run_quickstart(tmp_path / "out", tmp_path / "mine.yaml")
    assert seen[0].model.arch == "resnet18"


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_bytes(b"eval:\n  num: \xff4\n")
    assert main(["quickstart", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "bad.yaml is not UTF-8 text (byte 0xff at position 13): save it as UTF-8" in _one_line_error(capsys)


# ----- issue 21, round 2: evaluate, eval-encoder, leftovers
def test_evaluate_with_a_scale_no_image_fits_exits_1_and_writes_what_it_measured(pair, tmp_path, capsys):
    import json

    enc, dec = pair
    out = tmp_path / "ev"
    code = main(
        ["evaluate", "--encoder", str(enc), "--decoder", str(dec), "--num", "2", "--scales", "1,64", "--out", str(out)]
    )
    assert code == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "1 input(s) failed" in err and "embedded: scale 64x not measured:" in err
    result = json.loads((out / "evaluate.json").read_text())
    assert [r["scale"] for r in result["models"]["pair0"]] == [1] and "64x" in result["skipped"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", "0"], "--size must be >= 1, got 0"),
        (["--scales", "1,huge"], "--scales must be positive integers or full, separated by commas"),
        (["--lpips-weights", "nowhere/alexnet.pth"], "--lpips-weights nowhere/alexnet.pth: no such file"),
    ],
)
def test_evaluate_refuses_bad_flags_before_any_work(flags, message, pair, tmp_path, capsys):
    enc, dec = pair
    code = main(
        [
            "evaluate",
            "--encoder",
            str(enc),
            "--decoder",
            str(dec),
            "--num",
            "2",
            "--scales",
            "1",
            "--out",
            str(tmp_path / "ev"),
            *flags,
        ]
    )
    assert code == 2 and message in _one_line_error(capsys)
    assert not (tmp_path / "ev").exists()


def test_evaluate_on_a_full_disk_is_one_line(pair, full_disk, tmp_path, capsys):
    enc, dec = pair
    code = main(
        [
            "evaluate",
            "--encoder",
            str(enc),
            "--decoder",
            str(dec),
            "--num",
            "2",
            "--scales",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    err = _last_line_error(capsys)
    assert "disk full" in err and str(tmp_path / "out") in err and "free some space" in err
    assert _leftovers(tmp_path) == []


def test_eval_encoder_refuses_a_model_with_another_number_of_classes(tmp_path, capsys):
    from encoders.weights.checkpoints import save_encoder

    ten = save_encoder(tiny_net(num_classes=10), tmp_path / "ten.pt")
    out = tmp_path / "e.json"
    code = main(["eval-encoder", "--checkpoint", str(ten), "--max-images", "4", "--json", str(out)])
    error = _one_line_error(capsys)
    assert code == 2 and f"{ten} has 10 outputs but the embedded data has 8 classes" in error and "--data" in error
    assert not out.exists()


def test_eval_encoder_json_on_a_full_disk_is_one_line(encoder_file, full_disk, tmp_path, capsys):
    out = tmp_path / "out" / "e.json"
    assert main(["eval-encoder", "--checkpoint", str(encoder_file), "--max-images", "2", "--json", str(out)]) == 2
    err = _last_line_error(capsys)
    assert "disk full" in err and "--json" in err and "free some space" in err
    assert _leftovers(tmp_path) == []


def test_train_encoder_refuses_num_classes_0(tmp_path, capsys):
    assert _tiny_encoder_run(tmp_path, "model.num_classes=0") == 2
    assert "'model.num_classes' in the command-line overrides must be >= 1, got 0" in _one_line_error(capsys)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_train_encoder_refuses_a_width_beyond_memory_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("encoders.core.budget.memory_bytes", lambda: 8 * 10**9)
    assert _tiny_encoder_run(tmp_path, "model.width=64") == 2
    err = _last_line_error(capsys)
    assert "model.arch=resnet18 with model.width=64" in err and "8.0 GB of memory" in err
    assert "lower model.width" in err


def test_ssl_on_a_full_disk_is_one_line(full_disk, tmp_path, capsys):
    assert (
        main(
            [
                "ssl",
                "--config",
                "configs/apps/ssl.yaml",
                "--out",
                str(tmp_path / "out"),
                "steps=1",
                "data.crops=32",
                "data.crop_size=20",
                "data.view_size=16",
                "model.width=0.125",
                "batch_size=16",
                "moco.queue=32",
                "probe.enabled=false",
                "device=cpu",
            ]
        )
        == 2
    )
    err = _last_line_error(capsys)
    assert "disk full" in err and str(tmp_path / "out") in err
    assert _leftovers(tmp_path) == []


def test_augment_refuses_a_model_of_another_kind(app_models, tmp_path, capsys):
    _png(tmp_path / "in" / "a.png", 0), _png(tmp_path / "in" / "b.png", 1)
    code = main(["augment", str(tmp_path / "in"), "--model", str(app_models["denoise"]), "--out", str(tmp_path / "o")])
    assert code == 2
    message = "is not a style pyramid (rfi style train): it is a denoiser (rfi denoise train)"
    assert f"{app_models['denoise']} {message}" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_a_nan_loss_is_logged_as_null_so_every_metrics_line_is_json(tmp_path):
    import json

    from encoders.core.runtime import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(step=1, loss=torch.tensor(float("nan")), lr=float("inf"), images_per_s=np.float32(2.5))
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "loss": None, "lr": None, "images_per_s": 2.5}
    assert "NaN" not in line and "Infinity" not in line


def test_output_into_a_pipe_whose_reader_has_gone_ends_quietly():
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "apps.cli", "weights", "list"]  # as in `rfi weights list | head -1`
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root) as proc:
        proc.stdout.close()  # the reader is gone before the first line is written
        err = proc.stderr.read().decode()
        code = proc.wait()
    assert code == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
