"""DDP encoder training: 2 CPU processes on the gloo backend (as ``torchrun --nproc_per_node 2``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.ddp import free_ports, record_writes
from tests.encoders.conftest import tiny_config

# 256 crops, global batch 64 (32 per process): 4 steps per epoch; 6 steps end mid-epoch 2.
DDP = (
    "adv.enabled=true",
    "adv.steps=1",
    "steps=6",
    "checkpoint_every=5",
    "log_every=2",
    "device=cpu",
    "eval.max_images=32",
    "eval.steps=2",
)
KILL_AT = 6  # the cut run dies after step 6, before saving it: it resumes from the step-5 checkpoint


def _worker(rank: int, world: int, ports: tuple[int, int, int], tmp: str) -> None:
    """One process: an uninterrupted run, a run killed after step ``KILL_AT``, and its ``--resume``
    (each on its own port, as three ``torchrun`` launches would be). Records the files it writes and
    its weights after each run."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), RFI_NO_PROGRESS="1"
    )
    torch.set_num_threads(1)
    import encoders.core.rundir
    import encoders.core.runtime
    import encoders.robust.train as train

    writes = record_writes(encoders.core.runtime, encoders.core.rundir)
    run = train.EncoderTrainer.run
    step = train.EncoderTrainer.train_step
    kill = {"armed": False}

    def run_and_keep_weights(self, resume):
        path = run(self, resume)
        torch.save(self.encoder.state_dict(), Path(tmp, "rec", f"{self.out.name}{rank}.pt"))
        return path

    def dying_step(self, x, y):
        n = step(self, x, y)
        if kill["armed"] and self.step == KILL_AT:
            raise KeyboardInterrupt
        return n

    train.EncoderTrainer.run = run_and_keep_weights
    train.EncoderTrainer.train_step = dying_step

    os.environ["MASTER_PORT"] = str(ports[0])
    train.train_encoder(tiny_config(Path(tmp, "full"), *DDP))
    Path(tmp, "rec", f"writes{rank}.json").write_text(json.dumps(writes))

    kill["armed"] = True
    os.environ["MASTER_PORT"] = str(ports[1])
    try:
        train.train_encoder(tiny_config(Path(tmp, "cut"), *DDP))
        raise AssertionError("the cut run was not killed")
    except KeyboardInterrupt:
        pass
    kill["armed"] = False
    Path(tmp, "rec", f"cut_step{rank}.json").write_text(
        json.dumps(torch.load(Path(tmp, "cut", "checkpoint.pt"), weights_only=True)["train"]["step"])
    )
    os.environ["MASTER_PORT"] = str(ports[2])
    train.train_encoder(tiny_config(Path(tmp, "cut"), *DDP), resume=True)


def test_two_gloo_processes_train_one_model_and_resume_mid_epoch(tmp_path):
    (tmp_path / "rec").mkdir()
    mp.spawn(_worker, args=(2, free_ports(3), str(tmp_path)), nprocs=2, join=True)
    rec = tmp_path / "rec"

    # One model: the same weights (parameters and batch-norm statistics) on both ranks.
    w0, w1 = (torch.load(rec / f"full{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert ckpt["train"]["world_size"] == 2 and ckpt["train"]["step"] == 6 and len(ckpt["train"]["rng_ranks"]) == 2
    assert all(torch.equal(ckpt["state_dict"][k], w0[k]) for k in w0)
    # The two ranks drew different random numbers (flips, PGD starts): per-rank RNG states.
    assert not torch.equal(ckpt["train"]["rng_ranks"][0]["torch"], ckpt["train"]["rng_ranks"][1]["torch"])

    # Only rank 0 wrote: the checkpoint, the metrics log, the resolved config, eval.json.
    assert json.loads((rec / "writes1.json").read_text()) == []
    names = {Path(p).name for p in json.loads((rec / "writes0.json").read_text())}
    assert {"checkpoint.pt", "metrics.jsonl", "config.yaml", "eval.json"} <= names

    # The loss is finite and falls; every log line covers the global batch (both ranks' images).
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert any("eval" in r for r in records)

    # Killed after step 6, the run kept its step-5 (mid-epoch) checkpoint; resumed on 2 processes it
    # ends with bit-identical weights on both ranks, and the same metrics log.
    assert json.loads((rec / "cut_step0.json").read_text()) == 5
    c0, c1 = (torch.load(rec / f"cut{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(c0[k], w0[k]) and torch.equal(c1[k], w0[k]) for k in w0)

    def comparable(path):
        drop = {"images_per_s", "epoch_seconds", "train_seconds"}
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]

    assert comparable(tmp_path / "cut" / "metrics.jsonl") == comparable(tmp_path / "full" / "metrics.jsonl")


def test_global_batch_is_split_into_equal_rank_slices():
    from encoders.core.trainer import shard_positions

    parts = [shard_positions(300, 64, world=4, rank=r) for r in range(4)]
    assert all(len(p) == 4 * 16 for p in parts)  # 4 whole global batches, the partial one dropped
    for i in range(4):  # global batch i is the same set of positions as for one process
        batch = sorted(q for p in parts for q in p[i * 16 : (i + 1) * 16])
        assert batch == list(range(i * 64, (i + 1) * 64))
    assert shard_positions(300, 64, world=2, rank=1, skip=3) == list(range(3 * 64 + 32, 4 * 64))
    assert shard_positions(300, 64) == list(range(300))  # one process keeps the partial batch


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """The documented command: ``torchrun --standalone --nproc_per_node 2 -m apps.cli train-encoder ...``."""
    out = tmp_path / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "apps.cli",
        "train-encoder",
        "--config",
        "configs/encoder/resnet18_robust.yaml",
        "data.size=16",
        "data.train_crops=256",
        "data.val_crops=64",
        "model.width=0.125",
        "batch_size=64",
        "steps=4",
        "adv.steps=1",
        "eval.max_images=32",
        "eval.steps=2",
        "device=cpu",
        "--out",
        str(out),
    ]
    env = {**os.environ, "RFI_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out / "checkpoint.pt")  # printed once, by rank 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["train"]["world_size"] == 2
