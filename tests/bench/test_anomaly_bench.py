"""Smoke tests of bench/anomaly.py at tiny sizes: both modes measure every method, resume from --work, merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    from bench import anomaly

    return anomaly


@pytest.fixture(scope="module")
def unseen(bench):
    from bench import anomaly_unseen

    return anomaly_unseen


def test_tiny_unseen_run_measures_every_method_next_to_the_baseline(tmp_path, bench, unseen, one_thread, capsys):
    out = tmp_path / "anomaly_unseen.json"
    standard = unseen.tiny_encoder(tmp_path / "standard.pt")  # --standard: the memory bank on it too
    argv = ["--unseen", "--tiny", "--seeds", "2", "--categories", "camera", "--out", str(out), "--work", str(tmp_path)]
    assert bench.main([*argv, "--standard", str(standard)]) == 0
    result = json.loads(out.read_text())
    assert not result["partial"] and result["seeds"] == [0, 1] and "untrained tiny" in result["encoder"]
    assert result["standard_encoder"] == str(standard)
    runs = {(r["seed"], r["category"], r["method"]) for r in result["runs"]}
    assert runs == {(s, "camera", m) for s in (0, 1) for m in unseen.UNSEEN_METHODS}
    for r in result["runs"]:
        assert 0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1 and r["fit_s"] > 0
        assert set(r["per_defect"]) == {"pasted_patch", "blurred_disk", "tinted_disk"}
        assert set(r["controls"]) == set(unseen.CONTROLS) and all(0 <= v <= 1 for v in r["controls"].values())
    table = result["table"]
    assert set(table["mean"]) == set(unseen.UNSEEN_METHODS) and table["mean"]["memory"]["seeds"] == 2
    baseline = [r["image_auroc"] for r in result["runs"] if r["method"] == "raw pixels"]
    memory = [r["image_auroc"] for r in result["runs"] if r["method"] == "memory"]
    paired = table["paired_vs_raw_pixels"]["memory"]["image_auroc"]
    assert paired["seeds"] == 2 and paired["mean"] == pytest.approx(sum(memory) / 2 - sum(baseline) / 2)
    assert "raw pixels" not in table["paired_vs_raw_pixels"]
    shifts = [r["controls"]["region_shift"] for r in result["runs"] if r["method"] == "memory"]
    assert table["mean"]["memory"]["controls"]["region_shift"] == pytest.approx(sum(shifts) / 2)
    printed = capsys.readouterr().out
    assert "vs raw image" in printed and "raw pixels: mean image AUROC >= 90%" in printed and "normal shift" in printed


def test_tiny_needs_the_unseen_mode_run_as_a_script():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "anomaly.py"), "--tiny"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 2 and "--tiny is a smoke run of --unseen: add --unseen" in done.stderr


def test_a_restarted_run_reuses_every_measurement_and_never_refits_a_finished_model(tmp_path, bench, one_thread):
    argv = ["--unseen", "--tiny", "--seeds", "1", "--categories", "camera", "--work", str(tmp_path)]
    first = bench.main([*argv, "--out", str(tmp_path / "first.json")])
    records = sorted((tmp_path / "models" / "seed0").glob("camera_*.json"))
    stems = ["camera_combined", "camera_memory", "camera_raw_pixels", "camera_reconstruction"]
    assert first == 0 and [r.stem for r in records] == sorted(stems + [f"{stem}_controls" for stem in stems])
    (tmp_path / "models" / "seed0" / "camera_memory.json").unlink()  # killed after the fit, before its record
    model = tmp_path / "models" / "seed0" / "camera_memory.pt"
    written = model.stat().st_mtime_ns
    assert bench.main([*argv, "--out", str(tmp_path / "second.json")]) == 0
    assert model.stat().st_mtime_ns == written  # loaded, not fitted again
    runs = [
        {r["method"]: r for r in json.loads((tmp_path / f"{n}.json").read_text())["runs"]} for n in ("first", "second")
    ]
    assert runs[1]["reconstruction"] == runs[0]["reconstruction"] and runs[1]["combined"] == runs[0]["combined"]
    assert runs[1]["raw pixels"] == runs[0]["raw pixels"]
    memory = runs[1]["memory"]  # measured again on the reused model: the same scores, the fit not measured
    assert memory["fit_s"] is None and memory["fit_peak_mib"] is None and runs[0]["memory"]["fit_s"] > 0
    assert memory["image_auroc"] == pytest.approx(runs[0]["memory"]["image_auroc"])
    assert memory["controls"] == runs[0]["memory"]["controls"]  # kept, not measured again


def test_resume_keeps_the_photos_out_measured_in_full_and_merge_joins_seeds(tmp_path, bench, one_thread, capsys):
    """A run longer than a session: commit --out, resume from it on a new --work; seeds run apart are merged."""
    argv = ["--unseen", "--tiny", "--seeds", "1", "--categories", "camera", "coins"]
    out = tmp_path / "seed0.json"
    assert bench.main([*argv, "--out", str(out), "--work", str(tmp_path / "w1")]) == 0
    first = json.loads(out.read_text())
    kept = [r for r in first["runs"] if not (r["category"] == "coins" and r["method"] == "combined")]
    out.write_text(json.dumps({**first, "runs": kept, "partial": True}))  # the session ended inside coins
    capsys.readouterr()
    assert bench.main([*argv, "--out", str(out), "--work", str(tmp_path / "w2"), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "seed 0 camera        kept from" in printed and "seed 0 coins" in printed and "coins kept" not in printed
    models = sorted(p.name for p in (tmp_path / "w2" / "models" / "seed0").glob("*.pt"))
    assert models == ["coins_memory.pt", "coins_reconstruction.pt"]  # camera was not fitted again, coins was
    second = json.loads(out.read_text())
    assert not second["partial"] and len(second["runs"]) == len(first["runs"])
    again = {(r["category"], r["method"]): r["image_auroc"] for r in second["runs"]}
    assert again == {(r["category"], r["method"]): r["image_auroc"] for r in first["runs"]}  # seeded: the same
    fewer = ["--unseen", "--tiny", "--seeds", "1", "--categories", "camera", "--out", str(out), "--resume"]
    assert bench.main([*fewer, "--work", str(tmp_path / "w3")]) == 2
    assert "also holds seed 0, photo coins, which this run does not measure" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["runs"]) == len(first["runs"])  # --out untouched
    other = ["--pixel-patch", "3", "--out", str(out), "--resume"]
    assert bench.main([*argv, *other, "--work", str(tmp_path / "w3")]) == 2
    assert "was measured with another baseline; pass another --out" in capsys.readouterr().err

    seed1 = tmp_path / "seed1.json"
    assert bench.main([*argv, "--first-seed", "1", "--out", str(seed1), "--work", str(tmp_path / "w1")]) == 0
    merged = tmp_path / "merged.json"
    assert bench.main(["--unseen", "--merge", str(out), str(seed1), "--out", str(merged)]) == 0
    result = json.loads(merged.read_text())
    assert result["seeds"] == [0, 1] and result["table"]["mean"]["memory"]["seeds"] == 2
    assert len(result["runs"]) == 2 * len(first["runs"])
    assert bench.main(["--unseen", "--merge", str(out), str(out), "--out", str(merged)]) == 2
    assert "seed 0, photo camera is in more than one file" in capsys.readouterr().err


def test_tiny_embedded_run_draws_its_figure_resumes_and_merges(tmp_path, bench, unseen, one_thread):
    enc = str(unseen.tiny_encoder(tmp_path / "enc.pt"))
    argv = ["--robust", enc, "--standard", enc, "--draws", "0", "--seeds", "1", "--categories", "brick"]
    argv += ["--work", str(tmp_path / "work"), *unseen.TINY]
    out = {name: tmp_path / f"{name}.json" for name in ("first", "again", "seed1", "merged")}
    assert bench.main([*argv, "--out", str(out["first"]), "--figure", str(tmp_path / "maps.png")]) == 0
    first = json.loads(out["first"].read_text())
    assert {r["method"] for r in first["runs"]} == set(bench.METHODS) and (tmp_path / "maps.png").is_file()
    assert bench.main([*argv, "--out", str(out["again"])]) == 0  # restarted: every measurement reused
    assert json.loads(out["again"].read_text())["runs"] == first["runs"]
    assert bench.main([*argv, "--first-seed", "1", "--out", str(out["seed1"])]) == 0
    assert bench.main(["--merge", str(out["first"]), str(out["seed1"]), "--out", str(out["merged"])]) == 0
    merged = json.loads(out["merged"].read_text())
    assert merged["seeds"] == [0, 1] and merged["table"]["draw 0"]["brick"]["memory (robust)"]["seeds"] == 2
