import json
from collections import Counter

import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.quickstart import DEFAULT_CONFIG, QuickstartConfig, _budget
from encoders.core import serialization
from encoders.core.config import load_config
from encoders.core.errors import RFIError


def test_quickstart_tiny_end_to_end_and_cache(tmp_path, one_thread, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no LPIPS backbone here
    reads: Counter = Counter()  # checkpoint files read (every read goes through torch.load)
    real_load = serialization.torch.load
    monkeypatch.setattr(serialization.torch, "load", lambda f, *a, **k: reads.update([str(f)]) or real_load(f, *a, **k))
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--budget", "tiny"]) == 0
    assert not reads  # the trainers hand back their models: nothing written is read back
    stdout = capsys.readouterr().out
    assert "| robust | 4x | 64 |" in stdout and "LPIPS not computed" in stdout
    report = json.loads((out / "report.json").read_text())
    ev = report["evaluation"]
    assert list(ev["models"]) == ["standard", "robust"]
    assert [r["scale"] for r in ev["models"]["robust"]] == [1, 2, 4] and ev["models"]["robust"][0]["n"] == 4
    runs = report["runs"]
    assert runs["robust"]["adversarial"]["enabled"] and not runs["standard"]["adversarial"]["enabled"]
    assert report["runs"]["robust"]["encoder"]["eval"]["pgd_acc"] is not None
    md = (out / "report.md").read_text()
    assert "| standard | 1x | 16 |" in md and "Robust minus standard PSNR" in md and "![1x grid](grid_1x.png)" in md
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
    assert main(["quickstart", "--out", str(out), "--budget", "tiny", "eval.scales=[1]"]) == 0
    assert reads == Counter({str(p): 1 for p in ckpts})  # each finished run's file read once
    again = json.loads((out / "report.json").read_text())
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
