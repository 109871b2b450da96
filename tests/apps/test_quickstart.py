import json
import shutil
from collections import Counter

import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.quickstart import DEFAULT_CONFIG, SHIPPED_PAIRS, QuickstartConfig, _budget, shipped_pairs
from encoders.core import serialization
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from encoders.weights import shipped


def test_quickstart_tiny_end_to_end_and_cache(tmp_path, one_thread, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no LPIPS backbone here
    reads: Counter = Counter()  # checkpoint files read (every read goes through torch.load)
    real_load = serialization.torch.load
    monkeypatch.setattr(serialization.torch, "load", lambda f, *a, **k: reads.update([str(f)]) or real_load(f, *a, **k))
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--budget", "tiny"]) == 0
    shipped_files = [shipped.get_shipped(name).path for pair in SHIPPED_PAIRS.values() for name in pair]
    # the trainers hand back their models: nothing written is read back; each shipped file is read once
    assert reads == Counter({str(f): 1 for f in shipped_files})
    stdout = capsys.readouterr().out
    assert "| robust | 4x | 64 |" in stdout and "LPIPS not computed" in stdout
    report = json.loads((out / "report.json").read_text())
    ev = report["evaluation"]
    assert list(ev["models"]) == ["standard", "robust", "shipped robust", "shipped standard"]
    assert (
        report["shipped"]["shipped robust"]["eval"]["pgd_acc"]
        > report["shipped"]["shipped standard"]["eval"]["pgd_acc"]
    )
    assert [r["scale"] for r in ev["models"]["robust"]] == [1, 2, 4] and ev["models"]["robust"][0]["n"] == 4
    runs = report["runs"]
    assert runs["robust"]["adversarial"]["enabled"] and not runs["standard"]["adversarial"]["enabled"]
    assert report["runs"]["robust"]["encoder"]["eval"]["pgd_acc"] is not None
    md = (out / "report.md").read_text()
    assert "| standard | 1x | 16 |" in md and "Robust minus standard PSNR" in md and "![1x grid](grid_1x.png)" in md
    assert "| shipped robust | shipped: `rfi_resnet18_robust` + `rfi_resnet18_robust_layer3` |" in md
    assert "| shipped standard | 1x | 16 |" in md and "The shipped rows are RFI's own pairs" in md
    for s in (1, 2, 4):
        assert Image.open(out / f"grid_{s}x.png").width > 3 * 128
    # The same comparison on the unseen images, with its grids and the held-out minus unseen gap.
    unseen = report["evaluation_unseen"]
    assert [r["scale"] for r in unseen["models"]["robust"]] == [1, 2, 4] and unseen["models"]["robust"][0]["n"] == 4
    assert unseen["models"]["robust"][0]["psnr"] != ev["models"]["robust"][0]["psnr"]
    assert "## Inversion on unseen images" in md and "Held-out minus unseen PSNR: standard 1x" in md
    assert "![1x grid](unseen/grid_1x.png)" in md and (out / "unseen" / "grid_1x.png").is_file()
    # A second call reuses every finished run (keyed by config) and does not retrain.
    ckpts = sorted(out.glob("*/*/*.pt"))
    assert len(ckpts) == 4
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    reads.clear()
    argv = ["quickstart", "--out", str(out), "--budget", "tiny", "eval.scales=[1]", "eval.shipped=false"]
    assert main(argv) == 0
    assert reads == Counter({str(p): 1 for p in ckpts})  # each finished run's file read once
    again = json.loads((out / "report.json").read_text())
    assert list(again["evaluation"]["models"]) == ["standard", "robust"] and not again["shipped"]
    assert all(r["encoder"]["cached"] and r["decoder"]["cached"] for r in again["runs"].values())
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes and sorted(out.glob("*/*/*.pt")) == ckpts


def test_budgets_and_errors(capsys):
    cfg = load_config(QuickstartConfig, DEFAULT_CONFIG)
    assert {"default", "small", "tiny"} <= set(cfg.budgets) and cfg.budget == "default"
    assert _budget(cfg, "default", "x") == {"encoder": {}, "decoder": {}, "eval": {}}
    assert _budget(cfg, "tiny", "x")["eval"] == {"num": 4, "grid_rows": 2}  # key=value lists parsed once, as data
    with pytest.raises(RFIError, match="unknown budget 'huge'"):
        _budget(cfg, "huge", "x")
    assert main(["quickstart", "--budget", "huge", "--out", "/nonexistent/never"]) == 2
    assert "unknown budget" in capsys.readouterr().err


def test_shipped_pairs_leave_out_what_this_build_lacks_and_refuse_a_damaged_file(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "shipped"
    shutil.copytree(shipped.FOLDER, folder)
    monkeypatch.setattr(shipped, "FOLDER", folder)
    manifest = json.loads((folder / shipped.MANIFEST).read_text())
    for entry in manifest["models"]:
        if entry["name"] == "rfi_resnet18_standard_layer3":
            entry["sha256"] = entry["size"] = None  # not in this build
    (folder / shipped.MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level("INFO", logger="rfi"):
        models, cards = shipped_pairs(torch.device("cpu"))
    assert list(models) == list(cards) == ["shipped robust"]
    assert "shipped standard: not in this build" in caplog.text
    assert models["shipped robust"].reconstruct(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    (folder / "rfi_resnet18_robust.pt").write_bytes(b"damaged")
    with pytest.raises(RFIError, match="rfi_resnet18_robust.pt does not match the SHA-256"):
        shipped_pairs(torch.device("cpu"))
