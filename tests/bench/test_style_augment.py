"""Smoke test of bench/style_augment.py at a tiny size: every variant is timed, tabled and written to the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import style_augment

    return style_augment


def test_tiny_run_writes_a_row_per_variant(tmp_path, bench, one_thread):
    out = tmp_path / "style_augment.json"
    result = bench.main(
        ["--size", "24", "--batch-size", "4", "--work-sizes", "16", "12", "--repeats", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["work_size"] for r in result["rows"]] == [None, 16, 12]
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert result["weights"] == "random" and all(r["psnr_vs_full_resolution"] is None for r in result["rows"])
