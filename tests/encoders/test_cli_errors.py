"""Bad input: one line on stderr, exit code 2, nothing half-done."""
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from apps.cli import COMMANDS, build_parser, main
from encoders import RFIError, create_encoder


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
def train(tmp_path, train_argv):
    """``train(*overrides)``: arguments of a tiny ``rfi train-encoder`` run writing to ``tmp_path/run``."""
    return lambda *overrides: train_argv(tmp_path / "run", *overrides)


def test_unknown_architecture_lists_the_valid_ones(tmp_path, capsys, train):
    _fails(capsys, train("model.arch=resnet99"),
           "unknown architecture 'resnet99'", "alexnet, vgg16, vgg19, resnet18, resnet50")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    _fails(capsys, ["eval-encoder", "--checkpoint", str(tmp_path / "w.pt"), "--arch", "vit"], "unknown architecture 'vit'")


def test_unknown_layer_lists_the_valid_ones():
    with pytest.raises(RFIError, match=r"unknown layer 'layer9' for resnet18 \(valid: layer1, layer2, layer3, layer4, input\)"):
        create_encoder("resnet18", width=0.125, layers=["layer9"])


def test_misspelt_config_key_is_named(tmp_path, capsys, train):
    _fails(capsys, train("adv.epss=1.0"), "unknown config key 'adv.epss'", "eps")
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(train()[2]).read_text().replace("batch_size:", "batchsize:"))
    _fails(capsys, ["train-encoder", "--config", str(bad)], "unknown config key 'batchsize'", str(bad))
    _fails(capsys, train("adv.norm=l1"), "adv.norm 'l1'", "l2, linf")
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_architecture(trained_checkpoint, tmp_path, capsys):
    _fails(capsys, ["eval-encoder", "--checkpoint", str(trained_checkpoint), "--arch", "vgg16"],
           "holds a resnet18 encoder, not vgg16")
    path = tmp_path / "tv_resnet50.pt"  # a torchvision-style state dict (no RFI metadata)
    torch.save(create_encoder("resnet50", width=0.125, num_classes=8).model.state_dict(), path)
    _fails(capsys, ["eval-encoder", "--checkpoint", str(path), "--arch", "resnet18"],
           "does not fit Encoder resnet18", "unexpected keys: model.layer1.0.bn3", "shape mismatch: model.fc.weight")
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
    _fails(capsys, train("data.source=cifar10", f"data.root={tmp_path}"),
           "CIFAR-10 not found", "cifar-10-python.tar.gz")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


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
