"""The training scaffold (encoders/core/trainer.py) on a toy trainer: data order, resume, cadence, config check."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from encoders.core.errors import RFIError
from encoders.core.rundir import TrainResult
from encoders.core.runtime import DistContext
from encoders.core.serialization import load_checkpoint, save_checkpoint
from encoders.core.trainer import Trainer, run_trainer


@dataclass
class ToyConfig:
    epochs: int = 3
    steps: int = 0
    batch_size: int = 2
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 3


class ToyTrainer(Trainer):
    """Fits y = 2x on 8 items (4 steps per epoch) with noisy inputs (global RNG), recording what it trains on."""

    def __init__(self, cfg: ToyConfig, ctx: DistContext, device: torch.device, out: Path):
        super().__init__(cfg, ctx, device, out, torch.arange(8.0))
        self.module = nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.01, momentum=0.9)
        self.optimizers = {"optimizer": self.optimizer}
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, self.total_steps)
        self.batches_seen: list[list[float]] = []
        self.saved_at: list[int] = []

    def train_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches_seen.append(x.tolist())
        x = x[:, None] + 0.1 * torch.rand(len(x), 1)
        loss = (self.module(x) - 2 * x).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": loss.detach()}

    def save(self) -> None:
        self.saved_at.append(self.step)
        super().save()

    def checkpoint(self, train):
        return {"state_dict": self.module.state_dict(), "train": train, "config": vars(self.cfg)}

    def training_state(self, ckpt):
        return ckpt["train"], ckpt["config"]

    def load_payload(self, ckpt):
        self.module.load_state_dict(ckpt["state_dict"])

    def result(self) -> TrainResult:
        return TrainResult(self.ckpt_path, self.module, {"trainer": self})


def _run(out: Path, resume: bool = False, **cfg) -> ToyTrainer:
    return run_trainer(
        lambda ctx, device: ToyTrainer(ToyConfig(**cfg), ctx, device, out), "cpu", resume=resume
    ).metrics["trainer"]


def _killed_at_step_8(out: Path, monkeypatch) -> None:
    """A run in ``out`` interrupted during its 8th step (its last checkpoint: step 6, mid-epoch 2)."""
    step = ToyTrainer.train_step

    def dies_at_step_8(self, x):
        if self.step == 7:
            raise KeyboardInterrupt
        return step(self, x)

    with monkeypatch.context() as m:
        m.setattr(ToyTrainer, "train_step", dies_at_step_8)
        with pytest.raises(KeyboardInterrupt):
            _run(out)


def test_every_epoch_is_one_pass_in_an_order_given_by_seed_and_epoch(tmp_path):
    run = _run(tmp_path / "a")
    epochs = [sorted(sum(run.batches_seen[e * 4 : (e + 1) * 4], [])) for e in range(3)]
    assert epochs == [[float(i) for i in range(8)]] * 3
    assert run.batches_seen[:4] != run.batches_seen[4:8]  # reshuffled every epoch
    assert _run(tmp_path / "b").batches_seen == run.batches_seen  # a pure function of seed and epoch
    assert _run(tmp_path / "c", seed=1).batches_seen != run.batches_seen


def test_checkpoints_every_n_steps_and_at_every_epoch_end(tmp_path):
    run = _run(tmp_path, steps=10)
    assert run.saved_at == [3, 4, 6, 8, 9, 10]  # checkpoint_every=3, 4 steps per epoch, the last step
    assert load_checkpoint(tmp_path / "checkpoint.pt")["train"]["complete"]


def test_resume_skips_the_batches_done_and_ends_bit_identical(tmp_path, monkeypatch):
    full = _run(tmp_path / "full")
    _killed_at_step_8(tmp_path / "cut", monkeypatch)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["train"]["step"] == 6  # mid-epoch 2
    resumed = _run(tmp_path / "cut", resume=True)
    assert resumed.batches_seen == full.batches_seen[6:]
    assert all(
        torch.equal(a, b) for a, b in zip(full.module.state_dict().values(), resumed.module.state_dict().values())
    )
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "train_seconds")}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("full", "cut")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 12 and "loss" in logs[0][-1]


def test_a_checkpoint_is_never_overwritten_and_resumes_only_with_its_config(tmp_path):
    _run(tmp_path, steps=2)
    with pytest.raises(RFIError, match="exists: pass --resume"):
        _run(tmp_path, steps=2)
    with pytest.raises(RFIError, match="config differs in seed"):
        _run(tmp_path, steps=2, seed=1, resume=True)
    assert _run(tmp_path, steps=2, resume=True).batches_seen == []  # complete: nothing left to do


def test_training_seconds_add_up_over_sessions_and_untimed_checkpoints_say_so(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 10))  # every reading of the clock is 10 s after the last one
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    _killed_at_step_8(tmp_path / "cut", monkeypatch)
    first = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["train"]
    assert first["step"] == 6 and first["seconds"] > 0 and first["timed_from_step"] == 0
    _run(tmp_path / "cut", resume=True)
    final = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["train"]
    assert final["seconds"] > first["seconds"]  # the second session's time added to the first's
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert first["seconds"] < records[-1]["train_seconds"] <= final["seconds"]  # the last line: (nearly) the total

    untimed = {**final, "step": 6, "complete": False}  # a checkpoint of a run from before runs were timed
    del untimed["seconds"], untimed["timed_from_step"]
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    save_checkpoint({**ckpt, "train": untimed}, tmp_path / "old" / "checkpoint.pt")
    (tmp_path / "old" / "config.yaml").write_text((tmp_path / "cut" / "config.yaml").read_text())
    _run(tmp_path / "old", resume=True)
    resumed = load_checkpoint(tmp_path / "old" / "checkpoint.pt")["train"]
    assert resumed["timed_from_step"] == 6 and 0 < resumed["seconds"] < final["seconds"]
