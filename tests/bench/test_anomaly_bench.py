"""Smoke test of bench/anomaly.py --unseen --tiny: every method and the raw-pixel baseline measured, paired, tabled."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import anomaly

    return anomaly


def test_tiny_unseen_run_measures_every_method_next_to_the_baseline(tmp_path, bench, one_thread, capsys):
    out = tmp_path / "anomaly_unseen.json"
    standard = bench.tiny_encoder(tmp_path / "standard.pt")  # --standard: the memory bank on it too
    argv = ["--unseen", "--tiny", "--seeds", "2", "--categories", "camera", "--out", str(out), "--work", str(tmp_path)]
    assert bench.main([*argv, "--standard", str(standard)]) == 0
    result = json.loads(out.read_text())
    assert not result["partial"] and result["seeds"] == [0, 1] and "untrained tiny" in result["encoder"]
    assert result["standard_encoder"] == str(standard)
    runs = {(r["seed"], r["category"], r["method"]) for r in result["runs"]}
    assert runs == {(s, "camera", m) for s in (0, 1) for m in bench.UNSEEN_METHODS}
    for r in result["runs"]:
        assert 0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1 and r["fit_s"] > 0
        assert set(r["per_defect"]) == {"pasted_patch", "blurred_disk", "tinted_disk"}
    table = result["table"]
    assert set(table["mean"]) == set(bench.UNSEEN_METHODS) and table["mean"]["memory"]["seeds"] == 2
    baseline = [r["image_auroc"] for r in result["runs"] if r["method"] == "raw pixels"]
    memory = [r["image_auroc"] for r in result["runs"] if r["method"] == "memory"]
    paired = table["paired_vs_raw_pixels"]["memory"]["image_auroc"]
    assert paired["seeds"] == 2 and paired["mean"] == pytest.approx(sum(memory) / 2 - sum(baseline) / 2)
    assert "raw pixels" not in table["paired_vs_raw_pixels"]
    printed = capsys.readouterr().out
    assert "vs raw image" in printed and "raw pixels: mean image AUROC >= 90%" in printed


def test_tiny_needs_the_unseen_mode(bench):
    with pytest.raises(SystemExit):
        bench.main(["--tiny"])


def test_a_restarted_run_reuses_every_measurement_and_never_times_a_reused_fit(tmp_path, bench, one_thread):
    argv = ["--unseen", "--tiny", "--seeds", "1", "--categories", "camera", "--work", str(tmp_path)]
    first = bench.main([*argv, "--out", str(tmp_path / "first.json")])
    records = sorted((tmp_path / "models" / "seed0").glob("camera_*.json"))
    assert first == 0 and [r.stem for r in records] == [
        "camera_combined",
        "camera_memory",
        "camera_raw_pixels",
        "camera_reconstruction",
    ]
    (tmp_path / "models" / "seed0" / "camera_memory.json").unlink()  # killed after the fit, before its record
    assert bench.main([*argv, "--out", str(tmp_path / "second.json")]) == 0
    runs = [
        {r["method"]: r for r in json.loads((tmp_path / f"{n}.json").read_text())["runs"]} for n in ("first", "second")
    ]
    assert runs[1]["reconstruction"] == runs[0]["reconstruction"] and runs[1]["combined"] == runs[0]["combined"]
    assert runs[1]["raw pixels"] == runs[0]["raw pixels"]
    memory = runs[1]["memory"]  # measured again on the reused model: the same scores, the fit not timed
    assert memory["fit_s"] is None and runs[0]["memory"]["fit_s"] > 0
    assert memory["image_auroc"] == pytest.approx(runs[0]["memory"]["image_auroc"])
