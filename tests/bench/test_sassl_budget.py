"""bench/sassl_budget.py --tiny: the whole pipeline (two shards, cached results, the merged report and the curve)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import sassl_budget

    return sassl_budget


def test_tiny_bench_in_two_shards_merges_into_one_report(tmp_path, bench, one_thread):
    args = ["--tiny", "--seeds", "2", "--workdir", str(tmp_path)]
    assert bench.main([*args, "--shard", "0/2"]) == {"shard": "0/2", "jobs": 8}
    assert bench.main([*args, "--shard", "1/2"]) == {"shard": "1/2", "jobs": 8}
    cached = sorted(p.name for p in (tmp_path / "results").glob("*_s*.json"))
    assert len(cached) == 16 and "mocov2_p0.8_s1.json" in cached and "untrained_s0.json" in cached
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*.json")}
    assert bench.main([*args, "--shard", "0/2"])["jobs"] == 8  # finished runs come from the cache
    assert {p: p.stat().st_mtime_ns for p in before} == before

    result = bench.main([*args, "--report"])
    assert json.loads((tmp_path / "sassl_budget.json").read_text()) == json.loads(json.dumps(result))
    assert result["complete"] and result["runs"] == 14 and (tmp_path / "sassl_curve.png").stat().st_size > 0
    tasks = {"photo", "photo_grey", "texture", "unseen"}
    assert set(result["tasks"]) == tasks
    sassl = result["summary"]["mocov2"]["sassl"]
    assert set(sassl) == {"3", "6"}  # the learning curve: snapshots of the same runs
    gain = sassl["6"]["gain"]["unseen"]
    assert gain["n"] == 2 and gain["detectable"] == pytest.approx((gain["ci95"][1] - gain["ci95"][0]) / 2)
    assert set(result["summary"]["mocov2"]) == {"plain", "sassl", "full", "p0.8", "p1"}
    assert set(result["summary"]["simclr"]) == {"plain", "sassl"}


def test_markdown_report_has_a_row_per_variant_and_a_gain_per_styled_one(bench):
    tasks = ["photo", "unseen"]
    acc = {t: {"mean": 0.5, "sd": 0.01} for t in tasks}
    gain = {"mean": 0.021, "ci95": [0.004, 0.038], "excludes_zero": True, "detectable": 0.017}
    rows = {"6": {**acc, "gain": {t: gain for t in tasks}}}
    summary = {"untrained": {"-": {"0": acc}}, "mocov2": {"plain": {"6": acc}, "sassl": rows, "full": rows}}
    text = bench.markdown_report(summary, {"photo": 0.25, "unseen": 0.3}, tasks, final=6)
    lines = text.splitlines()
    assert lines[0] == "| method | variant | photo | unseen |" and "| – | colour statistics | 25.0 | 30.0 |" in lines
    assert "| – | untrained backbone | 50.0 ± 1.0 | 50.0 ± 1.0 |" in lines
    assert lines.count("| | gain [95 % CI] | +2.1 [+0.4, +3.8]* | +2.1 [+0.4, +3.8]* |") == 2  # sassl and full
    assert "| MoCo v2 + SASSL | unseen | +2.1 ± 1.7* |" in lines and not any("full" in x for x in lines[-3:])
