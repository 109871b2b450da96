"""Mixed precision (bf16 / fp16 autocast), channels-last and the deterministic switch, on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from encoders import RFIError, create_encoder
from encoders.core.runtime import autocast, check_precision, grad_scaler, seed_everything
from encoders.core.serialization import load_checkpoint
from encoders.robust.attacks import pgd
from encoders.robust.train import train_encoder


def _losses(path):
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_encoder_training_runs_end_to_end_in_mixed_precision(precision, tmp_path, tiny_cfg):
    path = train_encoder(
        tiny_cfg(
            tmp_path,
            f"precision={precision}",
            "adv.enabled=true",
            "adv.steps=1",
            "steps=4",
            "batch_size=16",
            "data.train_crops=64",
            "data.val_crops=16",
            "eval.max_images=16",
            "log_every=1",
            "device=cpu",
        )
    )
    losses = _losses(tmp_path / "metrics.jsonl")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    ckpt = load_checkpoint(path)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert ("scaler" in ckpt["train"]) == (precision == "fp16")  # the grad scaler's state, for --resume
    assert math.isfinite(json.loads((tmp_path / "eval.json").read_text())["clean_loss"])


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_is_the_memory_format_the_training_step_sees(channels_last, tmp_path, tiny_cfg, monkeypatch):
    import encoders.robust.train as train

    seen = []
    forward = train._Logits.forward

    def spy(self, x):  # the batch and the first convolution's weights, as the step's forward pass gets them
        weight = next(m.weight for m in self.encoder.modules() if isinstance(m, torch.nn.Conv2d))
        seen.append(
            (
                x.is_contiguous(memory_format=torch.channels_last),
                weight.is_contiguous(memory_format=torch.channels_last),
            )
        )
        return forward(self, x)

    monkeypatch.setattr(train._Logits, "forward", spy)
    path = train_encoder(
        tiny_cfg(
            tmp_path,
            f"channels_last={str(channels_last).lower()}",
            "steps=2",
            "batch_size=16",
            "eval.enabled=false",
            "device=cpu",
        )
    )
    assert seen == [(channels_last, channels_last)] * 2
    enc = create_encoder(checkpoint=path)
    assert all(torch.isfinite(p).all() for p in enc.parameters())


def test_bad_precision_is_one_line_naming_the_key(tmp_path, tiny_cfg):
    with pytest.raises(RFIError, match="unknown precision 'fp64'"):
        train_encoder(tiny_cfg(tmp_path, "precision=fp64"))
    with pytest.raises(RFIError, match="attack precision"):
        check_precision("half", key="attack precision")


def test_fp32_autocast_is_a_no_op_and_scaler_disabled():
    with autocast("cpu", "bf16"):
        with autocast("cpu", "fp32"):  # does not switch off the caller's autocast
            y = torch.nn.Linear(4, 2)(torch.rand(3, 4))
    assert y.dtype == torch.bfloat16
    assert not grad_scaler("cpu", "bf16").is_enabled() and grad_scaler("cpu", "fp16").is_enabled()


def test_deterministic_switch():
    seed_everything(0, deterministic=False)
    try:
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        seed_everything(0)
    assert torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_attack_under_autocast_stays_in_the_ball_in_fp32_and_raises_the_loss(precision, norm):
    torch.manual_seed(0)
    enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8).eval()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 8, (8,))
    eps = 0.5 if norm == "l2" else 4 / 255
    x_adv = pgd(enc.logits, x, y, eps=eps, steps=5, norm=norm, precision=precision)
    assert x_adv.dtype == torch.float32 and 0 <= x_adv.min() and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert (size <= eps + 1e-6).all()  # exact: projected in fp32
    with torch.no_grad():
        clean, adv = F.cross_entropy(enc.logits(x), y), F.cross_entropy(enc.logits(x_adv), y)
    assert adv > clean + 0.05, (float(clean), float(adv))
    # The attack's perturbation is close to the fp32 attack's (same start, same gradient direction).
    ref = pgd(enc.logits, x, y, eps=eps, steps=5, norm=norm, random_start=False)
    low = pgd(enc.logits, x, y, eps=eps, steps=5, norm=norm, random_start=False, precision=precision)
    cos = F.cosine_similarity((ref - x).flatten(1), (low - x).flatten(1)).mean()
    assert cos > 0.8, float(cos)


def test_fp16_attack_step_that_overflows_is_recomputed_in_fp32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 3)

    def model(x):  # logits beyond fp16's range (65504) under fp16 autocast: Inf, NaN gradients
        return lin(x.flatten(1)) * 1e5

    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    with autocast("cpu", "fp16"):
        assert not torch.isfinite(model(x)).all()
    x_adv = pgd(model, x, y, eps=0.5, steps=2, precision="fp16", random_start=False)
    assert torch.isfinite(x_adv).all() and not torch.equal(x_adv, x)
    assert torch.allclose(x_adv, pgd(model, x, y, eps=0.5, steps=2, random_start=False))


def test_decoder_training_and_inference_in_bf16(tmp_path):
    from encoders.core.config import load_config
    from encoders.weights.checkpoints import save_encoder
    from inversion.autoencoder import RobustAutoencoder
    from inversion.train import TrainDecoderConfig, train_decoder

    torch.manual_seed(0)
    enc_path = save_encoder(
        create_encoder("resnet18", width=0.125, small_input=True, num_classes=8).eval(), tmp_path / "encoder.pt"
    )
    cfg = load_config(
        TrainDecoderConfig,
        None,
        [
            f"encoder.checkpoint={enc_path}",
            "encoder.layer=layer3",
            "data.size=16",
            "data.train_crops=64",
            "data.val_crops=8",
            "batch_size=16",
            "steps=4",
            "decoder.channels=16",
            "decoder.min_channels=8",
            "sample_every=0",
            "log_every=2",
            "device=cpu",
            "precision=bf16",
            "channels_last=true",
            f"out={tmp_path / 'decoder'}",
        ],
    )
    path = train_decoder(cfg)
    records = [json.loads(line) for line in (tmp_path / "decoder" / "metrics.jsonl").read_text().splitlines()]
    totals = [r["total"] for r in records if "total" in r]
    assert len(totals) == 2 and all(math.isfinite(v) for v in totals), totals

    ae = RobustAutoencoder.from_checkpoints(enc_path, path)
    x = torch.rand(2, 3, 24, 40)
    ref = ae.reconstruct(x)
    low = ae.set_precision("bf16", channels_last=True).reconstruct(x)
    assert low.dtype == torch.float32 and low.shape == x.shape
    assert (low - ref).abs().mean() < 0.05  # bf16 keeps about 3 significant digits
    with ae.autocast():
        assert ae.encode(x)["layer3"].dtype == torch.bfloat16
