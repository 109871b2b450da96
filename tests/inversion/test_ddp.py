"""DDP decoder training: 2 CPU processes on the gloo backend (as ``torchrun --nproc_per_node 2``)."""

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


def _worker(rank: int, world: int, ports: tuple[int, int], cfg, more_steps: int, record: str) -> None:
    """One DDP process: torchrun's environment, then ``train_decoder`` and a resumed, extended run
    (``more_steps`` steps more); records every file it writes and its weights after each run.

    The resumed run gets its own port, as a second ``torchrun`` launch would: on one port a fast rank
    could reach rank 0's first store just before rank 0 tears it down."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ports[0]),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        RFI_NO_PROGRESS="1",
    )
    torch.set_num_threads(1)
    import encoders.core.imageio
    import encoders.core.rundir
    import encoders.core.runtime
    import inversion.train as train

    writes = record_writes(encoders.core.runtime, encoders.core.imageio, encoders.core.rundir)
    run = train.DecoderTrainer.run

    def run_and_keep_weights(self, resume):
        path = run(self, resume)
        torch.save(self.decoder.state_dict(), Path(record) / f"weights{rank}_{self.step}.pt")
        return path

    train.DecoderTrainer.run = run_and_keep_weights
    train.train_decoder(cfg)
    Path(record, f"writes{rank}.json").write_text(json.dumps(writes))
    cfg.steps += more_steps
    os.environ["MASTER_PORT"] = str(ports[1])
    train.train_decoder(cfg, resume=True)


def test_two_gloo_processes_train_identical_weights(tiny_config, tmp_path):
    out, rec = tmp_path / "ddp", tmp_path / "rec"
    rec.mkdir()
    cfg = tiny_config("steps=12", "log_every=2", "sample_every=6", "checkpoint_every=5", out=out)
    mp.spawn(_worker, args=(2, free_ports(2), cfg, 4, str(rec)), nprocs=2, join=True)

    w0, w1 = (torch.load(rec / f"weights{r}_12.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    # Only rank 0 wrote: checkpoints, the log, samples, the resolved config.
    writes0 = json.loads((rec / "writes0.json").read_text())
    assert json.loads((rec / "writes1.json").read_text()) == []
    names = {Path(p).name for p in writes0}
    assert {"decoder.pt", "metrics.jsonl", "config.yaml", "step_000006.png", "step_000012.png"} <= names
    # The loss falls (logged from the first 12 steps).
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    totals = [r["total"] for r in records if "total" in r and r["step"] <= 12]
    assert len(totals) == 6 and totals[-1] < 0.85 * totals[0], totals

    # The resumed run (4 more steps) continued from the step-12 checkpoint on both ranks.
    v0, v1 = (torch.load(rec / f"weights{r}_16.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(v0[k], v1[k]) for k in v0) and any(not torch.equal(v0[k], w0[k]) for k in w0)
    ckpt = torch.load(out / "decoder.pt", weights_only=True)
    assert ckpt["train"]["world_size"] == 2 and ckpt["train"]["step"] == 16 and ckpt["train"]["complete"]
    assert all(torch.equal(ckpt["state_dict"][k], v0[k]) for k in v0)
    assert [r["step"] for r in records if "total" in r] == [2, 4, 6, 8, 10, 12, 14, 16]


@pytest.mark.slow
def test_torchrun_command_line(tiny_encoder_path, tmp_path):
    """The documented command: ``torchrun --standalone --nproc_per_node 2 -m apps.cli train-decoder ...``."""
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
        "train-decoder",
        "--config",
        "configs/decoder/resnet18_robust_layer3.yaml",
        f"encoder.checkpoint={tiny_encoder_path}",
        "data.size=16",
        "data.train_crops=128",
        "data.val_crops=16",
        "batch_size=16",
        "steps=6",
        "decoder.channels=16",
        "device=cpu",
        "--out",
        str(out),
    ]
    env = {**os.environ, "RFI_NO_PROGRESS": "1"}
    done = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out / "decoder.pt")
    assert torch.load(out / "decoder.pt", weights_only=True)["train"]["world_size"] == 2
