"""``rfi ssl`` under DDP: 2 CPU processes on gloo (as ``torchrun --nproc_per_node 2``), MoCo v2 + StyleAugment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.ddp import free_ports, record_writes

# 64 crops, global batch 16 (8 per process): 4 steps per epoch; 6 steps cross an epoch's end.
DDP = (
    "method=mocov2",
    "data.crops=64",
    "data.crop_size=20",
    "data.view_size=16",
    "model.width=0.125",
    "batch_size=16",
    "steps=6",
    "moco.queue=64",
    "moco.bn_splits=2",
    "snapshot_steps=[3]",
    "log_every=2",
    "probe.train_crops=48",
    "probe.val_crops=32",
    "probe.tasks=[photo_grey]",
    "device=cpu",
)


def _worker(rank: int, world: int, port: int, tmp: str, ae_file: str) -> None:
    """One process of the job: records the files it writes, the keys it computes and the keys it enqueues."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        RFI_NO_PROGRESS="1",
    )
    torch.set_num_threads(1)
    import encoders.core.rundir
    import encoders.core.runtime
    from apps.ssl import SSLConfig, run_ssl
    from apps.ssl.methods import MoCo
    from apps.ssl.train import SSLTrainer
    from encoders.core.config import load_config

    writes = record_writes(encoders.core.runtime, encoders.core.rundir)
    computed, enqueued = [], []
    keys, enqueue = MoCo.keys, MoCo.enqueue

    def spy_keys(self, x, generator=None):
        k = keys(self, x, generator)
        computed.append(k.clone())
        return k

    def spy_enqueue(self, k):
        enqueued.append(k.clone())
        return enqueue(self, k)

    MoCo.keys, MoCo.enqueue = spy_keys, spy_enqueue
    result_of = SSLTrainer.result
    weights = {}

    def keep_weights(self):
        weights.update({k: v.clone() for k, v in self.model.state_dict().items()})
        return result_of(self)

    SSLTrainer.result = keep_weights
    overrides = [*DDP, f"out={tmp}/run", "style.enabled=true", f"style.model={ae_file}"]
    result = run_ssl(load_config(SSLConfig, "configs/apps/ssl.yaml", overrides))
    rec = Path(tmp, "rec")
    torch.save(
        {
            "computed": computed,
            "enqueued": enqueued,
            "probe": result["probe"],
            "rank": result["rank"],
            "weights": weights,
        },
        rec / f"keys{rank}.pt",
    )
    (rec / f"writes{rank}.json").write_text(json.dumps(writes))


def test_two_gloo_processes_train_mocov2_with_one_queue(tmp_path, one_thread):
    from inversion.autoencoder import RobustAutoencoder
    from inversion.decoders import Decoder
    from tests.conftest import tiny_net

    ae = RobustAutoencoder(tiny_net(), Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    ae_file = str(ae.save(tmp_path / "ae.pt"))
    (tmp_path / "rec").mkdir()
    mp.spawn(_worker, args=(2, free_ports(1)[0], str(tmp_path), ae_file), nprocs=2, join=True)
    rec = tmp_path / "rec"
    r0, r1 = (torch.load(rec / f"keys{r}.pt", weights_only=True) for r in (0, 1))

    # Every step each process enqueued the keys of the whole global batch: its own and the other's, in rank order.
    assert len(r0["enqueued"]) == len(r1["enqueued"]) == 6
    for step, (k0, k1) in enumerate(zip(r0["computed"], r1["computed"])):
        assert k0.shape == (8, 64) and not torch.equal(k0, k1)
        both = torch.cat([k0, k1])
        assert torch.equal(r0["enqueued"][step], both) and torch.equal(r1["enqueued"][step], both), step

    # One model: the same weights, buffers (rank 0's batch-norm statistics) and queue on both ranks.
    w0, w1 = r0["weights"], r1["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    # The checkpoint's queue holds both ranks' keys of the last steps, where the pointer says.
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    train = ckpt["ssl_train"]
    assert train["world_size"] == 2 and train["step"] == 6 and len(train["rng_ranks"]) == 2
    queue, ptr = train["model"]["queue"], int(train["model"]["queue_ptr"])
    assert ptr == (6 * 16) % 64
    torch.testing.assert_close(queue[ptr - 16 : ptr], torch.cat([r0["computed"][-1], r1["computed"][-1]]))

    # Only rank 0 wrote (checkpoint, snapshot, metrics, config, result) and probed.
    assert json.loads((rec / "writes1.json").read_text()) == [] and r1["probe"] == {} and r1["rank"] == 1
    names = {Path(p).name for p in json.loads((rec / "writes0.json").read_text())}
    assert {"checkpoint.pt", "checkpoint_step3.pt", "metrics.jsonl", "config.yaml", "result.json"} <= names
    assert set(r0["probe"]) == {"photo_grey"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]


def _simclr_worker(rank: int, world: int, port: int, tmp: str) -> None:
    """One process's NT-Xent on its share of a fixed batch, and the gradient of its share."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from apps.ssl.methods import nt_xent

    z1, z2 = torch.load(Path(tmp, "z.pt"), weights_only=True)
    share = slice(rank * len(z1) // world, (rank + 1) * len(z1) // world)
    mine1, mine2 = z1[share].clone().requires_grad_(), z2[share].clone().requires_grad_()
    loss = nt_xent(mine1, mine2, 0.5)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": (mine1.grad, mine2.grad)}, Path(tmp, f"simclr{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_simclr_under_ddp_contrasts_against_every_process_batch(tmp_path, one_thread):
    from apps.ssl.methods import nt_xent

    z1, z2 = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
    torch.save((z1, z2), tmp_path / "z.pt")
    mp.spawn(_simclr_worker, args=(2, free_ports(1)[0], str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"simclr{r}.pt", weights_only=True) for r in (0, 1)]
    whole1, whole2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    whole = nt_xent(whole1, whole2, 0.5)  # one process with the global batch of 6 images
    whole.backward()
    # The mean of the processes' losses is the global batch's (each anchor sees all 10 negatives, not 4)...
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole.detach())
    # ... and DDP's average of their gradients is its gradient: each share's sums both losses' terms.
    for r, rec in enumerate(ranks):
        share = slice(3 * r, 3 * r + 3)
        torch.testing.assert_close(rec["grads"][0] / 2, whole1.grad[share])
        torch.testing.assert_close(rec["grads"][1] / 2, whole2.grad[share])
    assert not torch.allclose(ranks[0]["loss"], nt_xent(z1[:3], z2[:3], 0.5))  # per-process negatives differ
