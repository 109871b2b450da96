"""Smoke test of bench/segmentation.py --tiny: every row is trained, measured, tabled and written to the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import segmentation

    return segmentation


def test_tiny_run_writes_a_row_per_model(tmp_path, bench, one_thread):
    out = tmp_path / "segmentation.json"
    result = bench.main(
        [
            "--tiny",
            "--models",
            "resnet18,resnet18_lps,swin_t,swin_t_eq",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--figure",
            str(tmp_path / "shift.png"),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["resnet18", "resnet18_lps", "swin_t", "swin_t_eq"] and result["complete"]
    for name in ("resnet18_lps", "swin_t_eq"):  # the equivariant rows: exactly consistent under circular shifts
        assert rows[name]["masc_circular"] == 1.0
    assert all(0 <= r["miou"] <= 1 and 0 <= r["masc_crop"] <= 1 and r["ms_per_step"] > 0 for r in rows.values())
    assert (tmp_path / "shift.png").stat().st_size > 0
    assert "| resnet18_lps | layer3 | 1 |" in bench.table(result["rows"])


def test_a_second_run_reuses_the_finished_rows_of_the_same_budget(tmp_path, bench, one_thread, monkeypatch):
    args = ["--tiny", "--models", "resnet18", "--work", str(tmp_path / "work")]
    first = bench.main([*args, "--out", str(tmp_path / "first.json")])
    calls = []
    monkeypatch.setattr(bench, "train_encoder", lambda cfg: calls.append(cfg) or pytest.fail("retrained"))
    again = bench.main([*args, "--out", str(tmp_path / "again.json")])
    assert again["rows"][0]["per_seed"][0]["model"] == first["rows"][0]["per_seed"][0]["model"]
    assert again["rows"][0]["miou"] == first["rows"][0]["miou"]
    monkeypatch.undo()  # another budget is trained again, not taken from the folder
    other = bench.main([*args, "--frozen", "--out", str(tmp_path / "other.json")])
    budgets = [result["rows"][0]["per_seed"][0]["budget"] for result in (first, other)]
    assert [b["frozen"] for b in budgets] == [False, True]


def test_the_padding_ablation_row_is_the_stride_network_padded_circularly(tmp_path, bench):
    args = bench.parse_args(["--tiny"])
    circ, plain = (bench.encoder_config(args, row, 0, tmp_path / row) for row in ("resnet18_circ", "resnet18"))
    assert circ.model.options == {"padding": "circular"} and circ.model.downsample == "stride"
    assert plain.model.options.get("padding", "zeros") == "zeros"
    assert {k: v for k, v in vars(circ.model).items() if k != "options"} == {
        k: v for k, v in vars(plain.model).items() if k != "options"
    }
