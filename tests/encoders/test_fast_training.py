"""Fast adversarial training wired into ``rfi train-encoder`` (issue 23): config rules, each method's
training steps, free training's resume, the overfitting monitor and ``rfi eval-encoder``'s masking checks."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from apps.cli import main
from encoders import RFIError
from encoders.core.config import load_config
from encoders.core.serialization import load_checkpoint
from encoders.robust.train import TrainEncoderConfig, check_config, train_encoder
from tests.encoders.conftest import ROBUST, STANDARD

# 256 crops / 64 = 4 minibatches per epoch.
QUICK = ("adv.enabled=true", "eval.enabled=false", "log_every=1")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["adv.method=fgsm"], "'fgsm' is not one of ['pgd', 'fgsm_rs', 'free', 'n_fgsm']"),
        (["adv.replays=4"], "adv.replays is for adv.method=free, not adv.method=pgd"),
        (["adv.method=fgsm_rs", "adv.noise=0.5"], "adv.noise is for adv.method=n_fgsm, not adv.method=fgsm_rs"),
        (
            ["adv.method=free", "adv.grad_align=0.2"],
            "adv.grad_align is for adv.method=fgsm_rs or adv.method=n_fgsm, not adv.method=free",
        ),
        (["adv.method=free", "adv.replays=0"], "config key 'adv.replays' in the command-line overrides must be >= 1"),
        (["adv.method=fgsm_rs", "adv.step_size=0"], "adv: step size must be a finite number > 0, got 0"),
        (
            ["adv.method=n_fgsm", "adv.noise=1.5"],
            "adv.noise (N-FGSM's noise radius k*eps) must be in [0, 2 * adv.eps] = [0, 1], got 1.5",
        ),
        (
            ["adv.method=n_fgsm", "adv.grad_align=-1"],
            "config key 'adv.grad_align' in the command-line overrides must be >= 0",
        ),
        (["adv.method=free", "adv.replays=4", "adv.mix=0.5"], "adv.mix=0.5 is not available with adv.method=free"),
    ],
)
def test_bad_method_settings_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(RFIError) as error:
        load_config(TrainEncoderConfig, ROBUST, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_method_rules_across_sections_and_disabled_runs():
    cfg = load_config(TrainEncoderConfig, ROBUST, ["adv.method=free", "adv.replays=4", "steps=6"])
    with pytest.raises(RFIError, match=r"steps=6 \(optimiser steps\) must be a multiple of adv.replays=4"):
        check_config(cfg)
    cfg.adv.method = "fgsm"  # changed in code: check_config applies the declared choices too
    with pytest.raises(RFIError, match="'fgsm' is not one of"):
        check_config(cfg)
    # a disabled adv section's method settings are not checked (they are when adv.enabled=true)
    load_config(TrainEncoderConfig, STANDARD, ["adv.method=n_fgsm", "adv.noise=5"])


@pytest.mark.parametrize(
    "overrides",
    [
        ("adv.method=pgd", "adv.steps=1"),
        ("adv.method=fgsm_rs",),
        ("adv.method=fgsm_rs", "adv.norm=linf", "adv.eps=0.03137", "adv.grad_align=0.2"),
        ("adv.method=n_fgsm", "adv.norm=linf", "adv.eps=0.03137"),
        ("adv.method=n_fgsm", "adv.noise=0.5", "adv.grad_align=0.5"),
        ("adv.method=free", "adv.replays=2"),
    ],
    ids=["pgd", "fgsm_rs", "fgsm_rs-linf-gradalign", "n_fgsm-linf", "n_fgsm-gradalign", "free"],
)
def test_each_method_trains_and_the_monitor_is_logged_and_recorded(overrides, tmp_path, tiny_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="rfi"):
        run = train_encoder(tiny_cfg(tmp_path, *QUICK, "steps=4", *overrides))
    ckpt = load_checkpoint(run.path)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    epochs = [r for r in records if "val_acc" in r]
    assert len(epochs) == 1 and set(epochs[0]["probe"]) == {"clean_acc", "train_attack_acc", "pgd_acc"}
    assert ckpt["train"]["probes"] == [epochs[0]["probe"]]
    assert any("probe on 64 val images: training attack acc" in m for m in caplog.messages)
    free = "adv.method=free" in overrides
    # free: 4 optimiser steps are 2 minibatches replayed twice; the schedule spans the 4 optimiser steps
    assert ckpt["train"]["step"] == (2 if free else 4) and ckpt["train"]["scheduler"]["last_epoch"] == 4
    assert ("free_replay" in ckpt["train"]) == free
    if free:
        assert epochs[0]["optimizer_steps"] == 4
        delta = ckpt["train"]["free_replay"][0]["delta"]
        assert delta.shape == (64, 3, 16, 16) and 0 < delta.flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


def test_standard_runs_have_no_probe(tmp_path, tiny_cfg):
    run = train_encoder(tiny_cfg(tmp_path, "eval.enabled=false", "steps=2"))
    assert "probe" not in run.metrics and "probes" not in load_checkpoint(run.path)["train"]


def test_free_training_killed_mid_epoch_resumes_bit_identical(tmp_path, monkeypatch, tiny_cfg):
    """The replayed perturbation is in the checkpoint: a killed free run resumes to the uninterrupted weights."""
    import encoders.robust.train as train

    # 14 optimiser steps = 7 minibatches x 2 replays; checkpoints after minibatches 3, 4 (epoch) and 6.
    overrides = (*QUICK, "adv.method=free", "adv.replays=2", "steps=14", "checkpoint_every=3")
    full = train_encoder(tiny_cfg(tmp_path / "full", *overrides))
    step = train.EncoderTrainer.train_step

    def dying_step(self, x, y):
        sums = step(self, x, y)
        if self.step == 7:  # killed before minibatch 7 was saved
            raise KeyboardInterrupt
        return sums

    monkeypatch.setattr(train.EncoderTrainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_encoder(tiny_cfg(tmp_path / "cut", *overrides))
    monkeypatch.setattr(train.EncoderTrainer, "train_step", step)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["train"]
    assert saved["step"] == 6 and saved["free_replay"][0]["delta"].abs().sum() > 0
    resumed = train_encoder(tiny_cfg(tmp_path / "cut", *overrides), resume=True)
    a, b = load_checkpoint(full)["state_dict"], load_checkpoint(resumed)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def comparable(path: Path):
        timings = ("images_per_s", "train_seconds")
        lines = path.read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines]

    assert comparable(tmp_path / "full" / "metrics.jsonl") == comparable(tmp_path / "cut" / "metrics.jsonl")


def test_diverging_probe_warns_in_one_line_and_is_recorded(tmp_path, monkeypatch, tiny_cfg, caplog):
    import encoders.robust.train as train

    accs = iter([(0.5, 0.5), (0.45, 0.6), (0.05, 0.8)])  # (PGD, training attack): catastrophic overfitting

    def probe(*args, **kwargs):
        pgd_acc, attack_acc = next(accs)
        return {"clean_acc": 0.9, "train_attack_acc": attack_acc, "pgd_acc": pgd_acc}

    monkeypatch.setattr(train, "overfitting_probe", probe)
    with caplog.at_level(logging.INFO, logger="rfi"):
        train_encoder(tiny_cfg(tmp_path, *QUICK, "adv.method=fgsm_rs", "steps=6", "data.train_crops=128"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("catastrophic overfitting: PGD accuracy fell from 50.0%")
    assert "\n" not in warnings[0]
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_acc" in line]
    assert ["overfitting_warning" in r for r in epochs] == [False, False, True]


def _strict_json(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_eval_encoder_masking_checks_with_a_twin(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval-encoder",
            "--checkpoint",
            str(trained_checkpoint),
            "--twin",
            str(trained_checkpoint),
            "--max-images",
            "16",
            "--restarts",
            "1",
            "--sweep",
            "1",
            "8",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "clean acc" in printed and "PGD-50" in printed and "transfer" in printed
    report = _strict_json(out)
    assert [r["eps"] for r in report["results"]] == [0.5]  # today's results, unchanged
    (check,) = report["masking"]
    assert set(check) >= {
        "pgd10_acc",
        "pgd50_acc",
        "sweep",
        "transfer_acc",
        "masking_flags",
        "possibly_gradient_masked",
    }
    assert [s["eps"] for s in check["sweep"]] == [0.5, 4.0] and report["twin"] == str(trained_checkpoint)
    # the twin is the model itself: its transfer attack is the white-box one
    assert check["transfer_acc"] <= check["pgd50_acc"] + check["tolerance"]
    assert check["possibly_gradient_masked"] == bool(check["masking_flags"])


def test_eval_encoder_flags_a_sweep_that_does_not_reach_zero(trained_checkpoint, tmp_path, capsys):
    """A sweep too small to defeat the model: the figures are flagged, the reason printed; no twin, no transfer."""
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval-encoder",
            "--checkpoint",
            str(trained_checkpoint),
            "--masking-checks",
            "--eps",
            "0.01",
            "--max-images",
            "16",
            "--restarts",
            "1",
            "--sweep",
            "0.5",
            "1",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    (check,) = _strict_json(out)["masking"]
    assert code == 0 and check["transfer_acc"] is None and check["possibly_gradient_masked"]
    assert "possibly gradient-masked at eps=0.01: accuracy at the sweep's largest eps" in printed


# 256 crops, global batch 64 (32 per process): 4 minibatches per epoch. Free: 12 optimiser steps = 6 minibatches x 2
# replays, checkpointed after minibatch 5 (mid-epoch 2); the cut run dies after minibatch 6, before saving it.
DDP_FREE = (
    "adv.enabled=true",
    "adv.method=free",
    "adv.replays=2",
    "steps=12",
    "checkpoint_every=5",
    "device=cpu",
    "eval.enabled=false",
    "log_every=2",
)
DDP_GRAD_ALIGN = (
    "adv.enabled=true",
    "adv.method=n_fgsm",
    "adv.grad_align=0.2",
    "steps=2",
    "device=cpu",
    "eval.enabled=false",
)


def _ddp_worker(rank: int, world: int, ports: tuple[int, ...], tmp: str) -> None:
    """One process of three free-training runs (uninterrupted, killed, resumed) and one N-FGSM + GradAlign run;
    saves its weights after each."""
    import os

    from tests.encoders.conftest import tiny_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), RFI_NO_PROGRESS="1"
    )
    torch.set_num_threads(1)
    import encoders.robust.train as train

    step = train.EncoderTrainer.train_step
    kill = {"armed": False}

    def dying_step(self, x, y):
        sums = step(self, x, y)
        if kill["armed"] and self.step == 6:
            raise KeyboardInterrupt
        return sums

    train.EncoderTrainer.train_step = dying_step
    runs = [
        ("full", DDP_FREE, False, False),
        ("cut", DDP_FREE, True, False),
        ("cut", DDP_FREE, False, True),
        ("align", DDP_GRAD_ALIGN, False, False),
    ]
    for port, (name, overrides, armed, resume) in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        kill["armed"] = armed
        try:
            result = train.train_encoder(tiny_config(Path(tmp, name), *overrides), resume=resume)
        except KeyboardInterrupt:
            step_saved = torch.load(Path(tmp, name, "checkpoint.pt"), weights_only=True)["train"]["step"]
            Path(tmp, "rec", f"killed{rank}.json").write_text(json.dumps(step_saved))
            continue
        torch.save(result.model.state_dict(), Path(tmp, "rec", f"{name}{rank}.pt"))


def test_two_gloo_processes_train_free_and_grad_align_and_resume_free_bit_identical(tmp_path):
    import torch.multiprocessing as mp

    from tests.ddp import free_ports

    (tmp_path / "rec").mkdir()
    mp.spawn(_ddp_worker, args=(2, free_ports(4), str(tmp_path)), nprocs=2, join=True)
    weights = {
        name: [torch.load(tmp_path / "rec" / f"{name}{r}.pt", weights_only=True) for r in (0, 1)]
        for name in ("full", "cut", "align")
    }
    full = weights["full"][0]
    for name, (w0, w1) in weights.items():  # one model on both ranks
        assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), name
        assert all(torch.isfinite(v).all() for v in w0.values() if v.is_floating_point()), name
    assert [json.loads((tmp_path / "rec" / f"killed{r}.json").read_text()) for r in (0, 1)] == [5, 5]
    assert all(torch.equal(weights["cut"][0][k], full[k]) for k in full)  # killed and resumed: bit-identical
    replays = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["train"]["free_replay"]
    assert len(replays) == 2 and not torch.equal(replays[0]["delta"], replays[1]["delta"])  # one δ per rank
