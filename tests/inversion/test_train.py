"""Decoder training: ``train_decoder`` and ``rfi train-decoder``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from apps.cli import main
from encoders.core.errors import RFIError
from encoders.core.optim import lr_scheduler
from encoders.core.runtime import setup_distributed
from encoders.core.serialization import load_checkpoint
from inversion import RobustAutoencoder
from inversion.train import DecoderTrainer, OptimSection, train_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


def _records(out: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def _noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # a valid image, as the encoder requires


def test_training_lowers_the_loss_and_writes_a_usable_decoder(tiny_config, tiny_encoder_path, tmp_path):
    cfg = tiny_config("epochs=3")
    result = train_decoder(cfg)
    path, out = result.path, Path(cfg.out)
    assert path == out / "decoder.pt"
    losses = [r["total"] for r in _records(out, "total")]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    psnrs = [r["val_psnr"] for r in _records(out, "val_psnr")]
    assert len(psnrs) == 3 and psnrs[-1] > psnrs[0]
    assert all("images_per_s" in r and "pixel" in r and "feature" in r for r in _records(out, "total"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step_{s:06d}.png" for s in range(4, 25, 4)]
    ckpt = load_checkpoint(path)
    assert ckpt["layer"] == "layer3" and ckpt["train_size"] == 16 and ckpt["encoder_path"] == str(tiny_encoder_path)
    assert ckpt["train"]["complete"] and ckpt["train"]["step"] == 24 and "optimizer" in ckpt["train"]
    assert ckpt["val_psnr"] == pytest.approx(psnrs[-1])
    # The result also holds the trained decoder (the checkpoint's weights) and the final metrics.
    assert not result.model.training
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in result.model.state_dict().items())
    last = _records(out, "total")[-1]
    assert result.metrics["val_psnr"] == ckpt["val_psnr"] and result.metrics["step"] == 24
    assert result.metrics["total"] == last["total"] and result.metrics["lr"] == last["lr"]
    # The core loads it, and the fully convolutional decoder inverts 1x, 2x and 4x the training size.
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, path)
    for size in (16, 32, 64):
        x = torch.rand(1, 3, size, size)
        assert ae.reconstruct(x).shape == x.shape
    # An existing run is never overwritten without --resume; a complete one resumes as a no-op.
    with pytest.raises(RFIError, match="--resume"):
        train_decoder(cfg)
    before = path.read_bytes()
    again = train_decoder(cfg, resume=True)
    assert again.path == path and path.read_bytes() == before and again.metrics["val_psnr"] == ckpt["val_psnr"]


@pytest.mark.parametrize("scheduler_state", [True, False], ids=["scheduler-saved", "old-checkpoint"])
def test_killed_run_resumes_to_identical_weights(tiny_config, tmp_path, monkeypatch, scheduler_state):
    """Noise input transform, adversarial term, warm-up + cosine schedule and mid-epoch checkpoints: a
    run killed at step 11 keeps its step-9 checkpoint intact, and --resume ends bit-identical to an
    uninterrupted run, also from a checkpoint written before the scheduler's state was saved."""
    extra = ["loss.adversarial=0.05", "loss.discriminator=deepsim", "checkpoint_every=3", "optim.warmup_steps=5"]
    full = train_decoder(tiny_config(*extra, out=tmp_path / "full"), input_transform=_noise)

    cfg = tiny_config(*extra, out=tmp_path / "killed")
    original = DecoderTrainer.train_step

    def dies_at_step_11(self, x):
        if self.step == 10:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(DecoderTrainer, "train_step", dies_at_step_11)
    with pytest.raises(KeyboardInterrupt):
        train_decoder(cfg, input_transform=_noise)
    path = Path(cfg.out) / "decoder.pt"
    killed = load_checkpoint(path)
    assert killed["train"]["step"] == 9 and not killed["train"]["complete"]
    assert killed["train"]["scheduler"]["last_epoch"] == 9
    if not scheduler_state:  # as written before the scheduler's state was saved (its lr: the last step's)
        del killed["train"]["scheduler"]
        killed["train"]["optimizer"]["param_groups"][0].pop("initial_lr")
        killed["train"]["optimizer"]["param_groups"][0]["lr"] = cfg.optim.lr * _old_lr_factor(
            8, killed["train"]["total_steps"], cfg.optim
        )
        torch.save(killed, path)
    assert not [p for p in Path(cfg.out).iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(DecoderTrainer, "train_step", original)
    resumed = train_decoder(cfg, resume=True, input_transform=_noise)
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["discriminator"]["state_dict"]:
        assert torch.equal(a["discriminator"]["state_dict"][key], b["discriminator"]["state_dict"][key]), key
    assert a["val_psnr"] == b["val_psnr"]

    def without_speed(out):
        return [
            {k: v for k, v in r.items() if k not in ("images_per_s", "train_seconds")}
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        ]

    assert without_speed(tmp_path / "full") == without_speed(Path(cfg.out))
    assert {"adversarial", "disc"} <= set(_records(Path(cfg.out), "total")[-1])


def _old_lr_factor(step: int, total: int, cfg: OptimSection) -> float:
    """The hand-written schedule the decoder trainer used before torch.optim.lr_scheduler (kept to compare)."""
    warm = cfg.warmup_steps
    if warm > 0 and step < warm:
        return (step + 1) / warm
    decay = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return 1.0 if cfg.schedule == "constant" else decay


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0), ("cosine", 7), ("constant", 3)])
def test_the_lr_scheduler_gives_the_former_learning_rates_exactly(schedule, warmup):
    cfg, total = OptimSection(lr=2e-3, schedule=schedule, warmup_steps=warmup), 40
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = lr_scheduler(opt, cfg.lr, lambda: total, cfg.warmup_steps, cfg.schedule)
    lrs = []
    for _ in range(total + 2):  # the lr each step uses, then the scheduler moves on
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [cfg.lr * _old_lr_factor(s, total, cfg) for s in range(total + 2)]  # bit-identical
    # Rebuilt at a step (an old checkpoint without scheduler state): the same learning rates from there on.
    rebuilt = lr_scheduler(
        torch.optim.Adam([torch.zeros(1, requires_grad=True)]),
        cfg.lr,
        lambda: total,
        cfg.warmup_steps,
        cfg.schedule,
        step=13,
    )
    assert rebuilt.get_last_lr() == [lrs[13]] and rebuilt.last_epoch == 13


def test_resume_refuses_a_changed_config(tiny_config, tmp_path):
    train_decoder(tiny_config("steps=2", out=tmp_path / "r"))
    with pytest.raises(RFIError, match="loss.feature"):
        train_decoder(tiny_config("steps=2", "loss.feature=0.5", out=tmp_path / "r"), resume=True)
    # More steps is allowed: the run is extended.
    path = train_decoder(tiny_config("steps=3", out=tmp_path / "r"), resume=True)
    assert load_checkpoint(path)["train"]["step"] == 3


def test_input_transform_corrupts_inputs_but_targets_stay_clean(tiny_config, monkeypatch):
    seen = {}

    def transform(x, g):
        assert isinstance(g, torch.Generator)
        seen["clean"] = x.clone()
        seen["noisy"] = _noise(x, g)
        return seen["noisy"]

    from inversion import losses

    original = losses.DecoderLoss.__call__

    def spy(self, output, target, condition=None, target_features=None):
        seen["target"], seen["condition"], seen["target_features"] = target, condition, target_features
        return original(self, output, target, condition, target_features)

    monkeypatch.setattr(losses.DecoderLoss, "__call__", spy)
    cfg = tiny_config("steps=1", "sample_every=1")
    trainer = DecoderTrainer(cfg, transform, *setup_distributed("cpu"))
    trainer.train_step(trainer.train_set[0][0][None].expand(4, -1, -1, -1))
    enc = trainer.encoder
    assert torch.equal(seen["target"], seen["clean"])
    assert torch.allclose(seen["target_features"], enc(seen["clean"], layers=["layer3"])["layer3"])
    assert torch.allclose(seen["condition"], enc(seen["noisy"], layers=["layer3"])["layer3"])
    assert not torch.allclose(seen["condition"], seen["target_features"])
    # Same step and seed -> same corruption (so --resume reproduces it).
    g1, g2 = trainer._generator(5, 0), trainer._generator(5, 0)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert not torch.equal(
        torch.rand(3, generator=trainer._generator(5, 0)), torch.rand(3, generator=trainer._generator(6, 0))
    )


def test_patch_adversarial_and_lpips_terms_train(tiny_config, fake_lpips_weights):
    with pytest.raises(RFIError, match="16-px crops"):  # AlexNet cannot see 16-px crops
        train_decoder(tiny_config("steps=1", "loss.lpips=0.5", f"loss.lpips_weights={fake_lpips_weights}"))
    cfg = tiny_config(
        "steps=3",
        "log_every=1",
        "data.size=32",
        "batch_size=8",
        "loss.adversarial=0.05",
        "loss.discriminator=patch",
        "loss.lpips=0.5",
        f"loss.lpips_weights={fake_lpips_weights}",
        "loss.gan_loss=nonsaturating",
    )
    path = train_decoder(cfg)
    record = _records(Path(cfg.out), "total")[-1]
    assert {"pixel", "feature", "lpips", "adversarial", "disc"} <= set(record)
    assert load_checkpoint(path)["discriminator"]["config"]["kind"] == "patch"


def test_lpips_without_local_weights_is_a_clear_error(tiny_config, tmp_path):
    cfg = tiny_config("steps=1", "loss.lpips=1", f"loss.lpips_weights={tmp_path / 'missing.pth'}")
    with pytest.raises(RFIError, match="download"):
        train_decoder(cfg)


def test_bad_input_is_named(tiny_config, tmp_path):
    with pytest.raises(
        RFIError, match=r"not-there\.pt.*rfi train-encoder --config configs/encoder/resnet18_robust\.yaml"
    ):
        train_decoder(tiny_config(f"encoder.checkpoint={tmp_path / 'not-there.pt'}"))
    with pytest.raises(RFIError, match="layer9.*valid: layer1, layer2, layer3, layer4"):
        train_decoder(tiny_config("encoder.layer=layer9"))
    with pytest.raises(RFIError, match="shallower"):
        train_decoder(tiny_config("decoder.skips=[layer4]"))
    with pytest.raises(RFIError, match="batch_size"):
        train_decoder(tiny_config("batch_size=0"))
    with pytest.raises(RFIError, match="pixel_type"):
        tiny_config("loss.pixel_type=l3")


def test_cli_default_config_with_skips(tiny_encoder_path, tmp_path, capsys):
    """The shipped YAML (shrunk by overrides) runs through ``rfi train-decoder``; U-Net skips work."""
    out = tmp_path / "cli"
    args = [
        "train-decoder",
        "--config",
        str(REPO / "configs/decoder/resnet18_robust_layer3.yaml"),
        f"encoder.checkpoint={tiny_encoder_path}",
        "data.size=16",
        "data.train_crops=64",
        "data.val_crops=8",
        "batch_size=16",
        "steps=2",
        "decoder.channels=8",
        "decoder.min_channels=8",
        "decoder.skips=[layer1]",
        "device=cpu",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == out / "decoder.pt"
    ae = RobustAutoencoder.from_checkpoints(tiny_encoder_path, path)
    assert ae.decoders["layer3"].skips == {"layer1": (8, 1)}
    assert ae.reconstruct(torch.rand(1, 3, 24, 40)).shape == (1, 3, 24, 40)


def test_cli_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  pixle: 1.0\n")
    assert main(["train-decoder", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "loss.pixle" in err and err.startswith("rfi: error:")


def test_the_decoder_records_its_encoder_so_another_of_the_same_settings_is_refused(
    tiny_config, tiny_encoder_path, tmp_path
):
    from encoders.weights.checkpoints import save_encoder
    from tests.conftest import tiny_net

    cfg = tiny_config("epochs=1", "steps=2")
    decoder = train_decoder(cfg).path
    other = save_encoder(tiny_net(seed=1), tmp_path / "other.pt")  # same settings, other weights
    with pytest.raises(RFIError, match=f"{decoder} was trained on another resnet18 encoder than {other}") as refused:
        RobustAutoencoder.from_checkpoints(other, decoder)
    assert f"it was trained on {tiny_encoder_path}" in str(refused.value)
    assert RobustAutoencoder.from_checkpoints(other, decoder, allow_mismatch=True).layer == "layer3"
    assert RobustAutoencoder.from_checkpoints(tiny_encoder_path, decoder).layer == "layer3"
