import json
from pathlib import Path

import pytest
import torch
import yaml

from encoders import RFIError, create_encoder
from encoders.config import config_to_dict, load_config
from encoders.data import build_dataset
from encoders.evaluate import evaluate_encoder
from encoders.models import Encoder
from encoders.serialization import load_checkpoint
from encoders.train import AdvConfig, TrainEncoderConfig, adversarial_batch, check_config, train_encoder

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "encoder"
ROBUST = CONFIGS / "resnet18_robust.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_encoder_config_is_valid_and_builds_its_model(path):
    cfg = load_config(TrainEncoderConfig, path)
    check_config(cfg)
    m = cfg.model
    enc = Encoder(m.arch, num_classes=m.num_classes or 8, width=m.width, small_input=m.small_input,
                  batch_norm=m.batch_norm).eval()
    size = min(cfg.data.size, 64) if m.small_input else 64
    with torch.no_grad():
        assert enc.logits(torch.rand(1, 3, size, size)).shape == (1, m.num_classes or 8)


def test_default_configs_are_the_documented_pair():
    robust = load_config(TrainEncoderConfig, ROBUST)
    standard = load_config(TrainEncoderConfig, CONFIGS / "resnet18_standard.yaml")
    assert (robust.model.arch, robust.model.width, robust.model.small_input) == ("resnet18", 0.25, True)
    assert (robust.adv.enabled, robust.adv.norm, robust.adv.eps, robust.adv.steps) == (True, "l2", 0.5, 3)
    assert (robust.data.source, robust.data.size, robust.data.train_crops, robust.epochs) == ("embedded", 32, 12000, 6)
    a, b = config_to_dict(robust), config_to_dict(standard)
    assert a.pop("adv").pop("enabled") and not b.pop("adv").pop("enabled")
    assert a == b  # same model, data, budget and evaluation


def test_training_writes_checkpoint_metrics_config_and_eval(tmp_path, tiny_cfg):
    path = train_encoder(tiny_cfg(tmp_path, "adv.enabled=true", "adv.steps=1"))
    assert path == tmp_path / "checkpoint.pt"
    enc = create_encoder(checkpoint=path)
    assert (enc.arch, enc.num_classes, enc.width, enc.small_input) == ("resnet18", 8, 0.125, True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "acc" in r for r in records)
    epoch = next(r for r in records if "val_acc" in r)
    assert epoch["images_per_s"] > 0 and 0 <= epoch["val_acc"] <= 1
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["adv"]["enabled"] is True and resolved["model"]["width"] == 0.125
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result) >= {"clean_acc", "pgd_acc"} and result["eps"] == 0.5
    assert load_checkpoint(path)["eval"] == result


def test_mixed_batches_keep_the_first_fraction_clean():
    torch.manual_seed(0)
    enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8).train()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 8, (8,))
    out = adversarial_batch(enc, x, y, AdvConfig(enabled=True, eps=0.5, steps=2, mix=0.25))
    assert torch.equal(out[:2], x[:2]) and not torch.equal(out[2:], x[2:])
    assert enc.training  # the attack ran in eval mode, the mode is restored
    assert adversarial_batch(enc, x, y, AdvConfig(enabled=False)) is x


def _state(path):
    return load_checkpoint(path)["state_dict"]


def test_killed_run_keeps_its_checkpoint_and_resume_gives_identical_weights(tmp_path, monkeypatch, tiny_cfg):
    # AlexNet: its dropout draws random numbers too, so the restored RNG state matters.
    overrides = ("epochs=2", "adv.enabled=true", "adv.steps=1", "model.arch=alexnet")
    full = train_encoder(tiny_cfg(tmp_path / "full", *overrides))

    import encoders.serialization as ser

    real_save, calls = ser.torch.save, []

    def dying_save(obj, f, *args, **kwargs):  # killed half-way through writing epoch 2's checkpoint
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ser.torch, "save", dying_save)
    cfg = tiny_cfg(tmp_path / "cut", *overrides)
    with pytest.raises(KeyboardInterrupt):
        train_encoder(cfg)
    monkeypatch.setattr(ser.torch, "save", real_save)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["train"]["epoch"] == 1  # the previous checkpoint, intact
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]
    create_encoder(checkpoint=ckpt)

    with pytest.raises(RFIError, match="exists: pass --resume"):
        train_encoder(cfg)
    with pytest.raises(RFIError, match="config differs in adv.eps, seed "):
        train_encoder(tiny_cfg(tmp_path / "cut", *overrides, "seed=1", "adv.eps=0.25"), resume=True)
    resumed = train_encoder(cfg, resume=True)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def comparable(path):  # the metrics log matches too, except wall-clock figures
        drop = {"images_per_s", "epoch_seconds"}
        return [{k: v for k, v in json.loads(line).items() if k not in drop}
                for line in path.read_text().splitlines()]

    assert comparable(full.parent / "metrics.jsonl") == comparable(resumed.parent / "metrics.jsonl")
    assert train_encoder(cfg, resume=True) == resumed  # a finished run resumes to a no-op


def test_robust_training_beats_standard_under_attack(tmp_path):
    """The default robust config vs the standard one at a small budget (16-px crops, width 0.125,
    4 x 4096 crops): PGD-10 accuracy at the training eps. Over seeds 0-3 the gap measured
    25-42 points (robust 49-55 %, standard 11-25 %; clean accuracy about 72 % for both)."""
    small = ("data.size=16", "data.train_crops=4096", "data.val_crops=512", "model.width=0.125", "epochs=4",
             "eval.enabled=false")
    results = {}
    for name in ("robust", "standard"):
        cfg = load_config(TrainEncoderConfig, CONFIGS / f"resnet18_{name}.yaml", [*small, f"out={tmp_path / name}"])
        enc = create_encoder(checkpoint=train_encoder(cfg))
        results[name] = evaluate_encoder(enc, build_dataset(cfg.data, "val"), eps=cfg.adv.eps, steps=10, norm="l2")
    print({k: (round(r["clean_acc"], 3), round(r["pgd_acc"], 3)) for k, r in results.items()})
    assert results["standard"]["clean_acc"] > 0.5 and results["robust"]["clean_acc"] > 0.5  # both learnt the task
    assert results["robust"]["pgd_acc"] >= results["standard"]["pgd_acc"] + 0.20
