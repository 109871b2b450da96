"""The run-folder bookkeeping every trainer shares (encoders/core/rundir.py).

Guard, resume check, config, metrics, seeds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from encoders.core.errors import RFIError
from encoders.core.rundir import RunDir, TrainResult, config_changes, flatten, step_seed


def test_flatten_gives_dotted_keys_lists_for_tuples_and_keeps_empty_mappings():
    nested = {"a": {"b": {"c": 1}, "d": (1, 2)}, "e": {}, "f": None}
    assert flatten(nested) == {"a.b.c": 1, "a.d": [1, 2], "e": {}, "f": None}
    assert flatten({}) == {}


def test_config_changes_frees_keys_and_everything_below_them():
    old = {"seed": 0, "eval": {"steps": 5}, "style": {"background": True, "alpha": 0.5}, "out": "a"}
    new = {"seed": 0, "eval": {"steps": 9}, "style": {"background": False, "alpha": 0.7}, "out": "b"}
    assert config_changes(old, new) == ["eval.steps", "out", "style.alpha", "style.background"]
    assert config_changes(old, new, free=["eval", "out", "style.background"]) == ["style.alpha"]
    # "eval" frees "eval.steps" but not a key that only starts with the same letters
    assert config_changes({"evaluate": 1}, {"evaluate": 2}, free=["eval"]) == ["evaluate"]


def test_config_changes_takes_todays_defaults_for_keys_a_run_did_not_have():
    old = {"seed": 0}  # written before "precision" existed
    assert config_changes(old, {"seed": 0, "precision": "fp32"}, defaults={"precision": "fp32"}) == []
    assert config_changes(old, {"seed": 0, "precision": "bf16"}, defaults={"precision": "fp32"}) == ["precision"]
    assert config_changes(old, {"seed": 0, "precision": "fp32"}) == ["precision"]  # without defaults: a change


def test_run_dir_guard_resume_check_config_and_metrics(tmp_path):
    run = RunDir(tmp_path / "run", "decoder.pt")
    assert not run.has_checkpoint(resume=False) and not run.has_checkpoint(resume=True)
    run.write_config({"seed": 3, "optim": {"lr": 0.1, "betas": [0.9, 0.99]}})
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == {
        "seed": 3,
        "optim": {"lr": 0.1, "betas": [0.9, 0.99]},
    }
    run.checkpoint.write_bytes(b"x")
    with pytest.raises(
        RFIError, match=r"decoder\.pt exists: pass --resume to continue that run, or choose another --out"
    ):
        run.has_checkpoint(resume=False)
    assert run.has_checkpoint(resume=True)
    with pytest.raises(
        RFIError,
        match=r"cannot resume .*decoder\.pt: the config differs in seed \(use the run's "
        r".*config\.yaml or another --out\)",
    ):
        run.check_resume({"seed": 3, "out": "a"}, {"seed": 4, "out": "b"}, free=["out"])
    run.check_resume({"seed": 3, "out": "a"}, {"seed": 3, "out": "b"}, free=["out"])

    log = run.metrics()
    for step in (1, 2, 3):
        log.write(step=step, loss=1.0 / step)
    run.metrics(resume_step=2).write(step=3, loss=0.5)  # resumed after step 2: step 3 is written again, once
    lines = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert run.metrics_path.name == "metrics.jsonl" and [r["step"] for r in lines] == [1, 2, 3]
    assert lines[-1]["loss"] == 0.5


def test_only_the_main_process_writes(tmp_path):
    run = RunDir(tmp_path / "run", main=False)
    run.write_config({"seed": 0})
    run.metrics().write(step=1)
    assert not (tmp_path / "run").exists()


def test_step_seed_is_a_pure_function_of_seed_step_and_rank():
    seeds = {step_seed(s, t, r) for s in range(3) for t in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4  # no two (seed, step, rank) share a seed
    assert step_seed(0, 5, 1) == (5 * 4099 + 1) and 0 <= step_seed(2**40, 2**40, 7) < 2**63


def test_train_result_stands_for_its_path(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"x": 1}, path)
    result = TrainResult(path, torch.nn.Linear(1, 1), {"loss": 0.1})
    assert os.fspath(result) == str(path) and str(result) == str(path) and Path(result) == path
    assert torch.load(result, weights_only=True) == {"x": 1}


def test_an_empty_lock_older_than_a_write_is_stale_and_replaced(tmp_path, caplog):
    from encoders.core.rundir import LOCK_WRITE_SECONDS, RunInUseError, RunLock

    lock = tmp_path / ".lock"
    lock.write_bytes(b"")  # a run that ran out of disk space as it wrote its lock (an older RFI left these)
    with pytest.raises(RunInUseError, match="is being locked by another run"):  # young: perhaps being written now
        RunLock(tmp_path).acquire()
    old = lock.stat().st_mtime - LOCK_WRITE_SECONDS - 1
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger="rfi"), RunLock(tmp_path) as held:
        assert held.held and lock.read_text().split()[0] == str(os.getpid())
    assert "replacing the empty or unreadable lock" in caplog.text and not lock.exists()
    lock.write_bytes(b"\xff\xfe garbage")
    os.utime(lock, (old, old))
    with RunLock(tmp_path) as held:
        assert held.held


def test_a_full_disk_as_the_lock_is_written_leaves_no_lock(tmp_path, monkeypatch):
    import errno

    from encoders.core import rundir

    class FullDisk:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fdopen", FullDisk)
    with pytest.raises(RFIError, match=r"cannot write the lock .*\.lock: No space left on device"):
        rundir.RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()  # neither the lock nor the folder it made
    monkeypatch.undo()
    with rundir.RunLock(tmp_path / "run") as held:  # the next run is not refused
        assert held.held
