"""Smoke test of bench/fast_robust.py at the tiny budget: rows trained, evaluated, tabled, judged and cached."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import fast_robust

    return fast_robust


def test_tiny_run_writes_every_row_and_the_goal(tmp_path, bench, one_thread, capsys):
    out = tmp_path / "fast_robust.json"
    argv = ["--tiny", "--seeds", "1", "--rows", "free", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    result = bench.main(argv)
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    summary = result["summary"]
    assert list(summary) == ["pgd3", "free"]  # the reference is always trained
    free = result["results"]["free"]["0"]
    assert free["timing"]["step_cpu_s"] > 0 and set(free["psnr"]) == {
        "held-out 1x",
        "held-out 4x",
        "unseen 1x",
        "unseen 4x",
    }
    assert free["twin"] is not None and summary["pgd3"]["cpu_ratio"]["median"] == 1.0
    assert "| free |" in printed and ("free: meets it" in printed or "free: misses:" in printed)
    again = bench.main(argv)  # finished runs are reused: same figures
    assert again["results"] == result["results"]


def test_processes_share_the_training_and_the_evaluation(tmp_path, bench, one_thread, monkeypatch, capsys):
    from encoders.core.rundir import RunLock

    common = ["--tiny", "--seeds", "2", "--rows", "fgsm_rs", "--workdir", str(tmp_path / "work")]
    out = tmp_path / "fast_robust.json"
    assert bench.main([*common, "--train-only", "0", "--out", str(out)]) == {}
    (root,) = (tmp_path / "work").glob("tiny_*")
    capsys.readouterr()
    with RunLock(root / "fgsm_rs" / "seed1"):  # another process has it
        assert bench.main([*common, "--train-only", "0", "1"]) == {}
    assert "fgsm_rs seed 1 skipped (another process has it)" in capsys.readouterr().err
    assert not out.exists()  # training only: no evaluation, no report
    timings = sorted(root.glob("*/seed*/timing.json"))
    assert [(t.parents[1].name, t.parent.name) for t in timings] == [
        ("fgsm_rs", "seed0"), ("pgd3", "seed0"), ("pgd3", "seed1"),
    ]  # fmt: skip
    bench.main([*common, "--train-only", "1"])  # released: now it is trained
    assert (root / "fgsm_rs" / "seed1" / "timing.json").is_file()

    monkeypatch.setattr(bench, "train_encoder", lambda cfg: pytest.fail(f"retrained {cfg.out}"))
    with RunLock(root / "pgd3" / "seed0"):  # another process is evaluating it
        assert bench.main([*common, "--evaluate-only", "0", "1"]) == {}
    evaluated = sorted((p.parent.name, p.parents[1].name) for p in root.glob("*/seed*/evaluation.json"))
    assert evaluated == [("seed0", "fgsm_rs"), ("seed1", "fgsm_rs"), ("seed1", "pgd3")]
    measured = []
    real = bench.measure_row
    monkeypatch.setattr(bench, "measure_row", lambda run, *a: measured.append(run["folder"]) or real(run, *a))
    result = bench.main([*common, "--out", str(out)])  # the report: only the skipped evaluation is measured
    assert measured == [root / "pgd3" / "seed0"]
    assert set(result["results"]["fgsm_rs"]) == {"0", "1"} and json.loads(out.read_text())["seeds"] == [0, 1]
    with pytest.raises(SystemExit, match=r"seed\(s\) \[5\] not among"):
        bench.main([*common, "--evaluate-only", "5"])
