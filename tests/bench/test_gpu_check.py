"""Smoke test of bench/gpu_check.py on CPU (--tiny): it runs the project's training and inversion code end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_writes_every_row(tmp_path, gpu_check, monkeypatch):
    monkeypatch.setenv("RFI_NO_PROGRESS", "1")
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--archs",
            "alexnet",
            "--precisions",
            "fp32",
            "bf16",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--batch-size",
            "2",
            "--inversion-size",
            "40",
            "56",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {(r["precision"], r["job"].split()[0]): r for r in result["rows"]}
    for job in ("encoder", "decoder", "inversion"):
        r = rows[("fp32", job)]
        assert r["images_per_s"] > 0 and r["peak_mib"] > 0
    assert rows[("fp32", "inversion")]["size"] == "56x40"
    # bf16: measured where this version's config has `precision`, otherwise said so (never silently fp32)
    from encoders.robust.train import TrainEncoderConfig

    bf16 = rows[("bf16", "encoder")]
    if gpu_check.has_key(TrainEncoderConfig, "precision"):
        assert bf16["images_per_s"] > 0
    else:
        assert "not supported" in bf16["skipped"]


def test_config_key_probe(gpu_check):
    from inversion.train import TrainDecoderConfig

    assert gpu_check.has_key(TrainDecoderConfig, "encoder.layer")
    assert not gpu_check.has_key(TrainDecoderConfig, "encoder.no_such_key")
    assert not gpu_check.has_key(TrainDecoderConfig, "steps.nested")
