"""Memory-bank (PatchCore-style) anomaly scoring: coreset, distances, fit/score methods, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apps.anomaly.config import MemoryConfig, load_anomaly_config
from apps.anomaly.detector import AnomalyDetector
from apps.anomaly.fitting import fit
from apps.anomaly.memory import MemoryBank, default_memory_layers, greedy_coreset, patch_features
from apps.cli import main
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from encoders.core.imageio import read_image
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    """The suite's tiny encoder, shared by this module's tests (none of them changes it)."""
    return tiny_net()


def test_greedy_coreset_covers_every_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    idx = greedy_coreset(pts, 4, generator=torch.Generator().manual_seed(1))
    assert len(set(idx.tolist())) == 4
    assert sorted((pts[idx] / 10).round().abs().tolist()) == sorted(centres.div(10).tolist())  # one per cluster
    # every point is within the cluster radius of the coreset (the k-center objective)
    assert float(torch.cdist(pts, pts[idx]).min(1).values.max()) < 1.0
    # seeded: same seed, same subset; projection keeps it working in high dimension
    high = torch.randn(300, 512, generator=g)
    a = greedy_coreset(high, 30, projection=64, generator=torch.Generator().manual_seed(3))
    b = greedy_coreset(high, 30, projection=64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 30
    assert torch.equal(greedy_coreset(pts, len(pts)), torch.arange(len(pts)))


def test_distances_are_exact_nearest_neighbours_in_chunks():
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(500, 16, generator=g), torch.randn(300, 16, generator=g)
    exact = torch.cdist(q, bank).min(1).values
    tiny_chunks = MemoryBank(bank, ["layer2"], MemoryConfig(chunk_mb=0.01))  # ~5 query rows per chunk
    assert torch.allclose(tiny_chunks.distances(q), exact, atol=1e-5)
    k3 = MemoryBank(bank, ["layer2"], MemoryConfig(neighbours=3)).distances(q)
    assert torch.allclose(k3, torch.cdist(q, bank).topk(3, largest=False).values.mean(1), atol=1e-5)
    assert bool((k3 >= exact - 1e-6).all())


def test_patch_features_and_default_layers(encoder):
    assert default_memory_layers(encoder) == ["layer2", "layer3"]
    assert default_memory_layers(tiny_net(arch="alexnet")) == ["conv2", "conv3"]
    f = patch_features(encoder, torch.rand(2, 3, 24, 20), ["layer2", "layer3"])
    info = encoder.feature_info()
    assert f.shape == (2, info["layer2"][0] + info["layer3"][0], 12, 10)


def test_memory_maps_find_a_defect(encoder):
    """A bank of flat grey patches: a bright square in a grey test image is where the map peaks."""
    normal = [torch.full((3, 32, 32), 0.5) + 0.02 * torch.randn(3, 32, 32) for _ in range(4)]
    bank = MemoryBank.fit(encoder, normal, MemoryConfig(coreset=0.5, sigma=1.0), progress_bar=False)
    assert bank.bank.shape[0] == round(0.5 * bank.patches) and bank.patches == 4 * 16 * 16
    x = torch.full((1, 3, 32, 32), 0.5)
    x[..., 8:14, 18:24] = 1.0
    m = bank.maps(encoder, x)[0, 0]
    peak = divmod(int(m.argmax()), 32)
    assert 5 <= peak[0] <= 17 and 15 <= peak[1] <= 27
    assert float(m[8:14, 18:24].mean()) > 3 * float(m[24:, :8].mean())


def test_exception_bad_memory_settings(encoder):
    for bad in (0, 0.0, 1.5, -0.1):
        with pytest.raises(RFIError, match=r"config key 'coreset' in the command-line overrides must be in \(0, 1\]"):
            load_config(MemoryConfig, None, [f"coreset={bad}"])
    with pytest.raises(RFIError, match=r"'pool' in the command-line overrides: 2 is not one of \[1, 3, 5, 7\]"):
        load_config(MemoryConfig, None, ["pool=2"])
    with pytest.raises(RFIError, match=r"config key 'coreset' in the memory settings must be in \(0, 1\], got 2"):
        MemoryBank.fit(encoder, [torch.rand(3, 32, 32)], MemoryConfig(coreset=2), progress_bar=False)
    imgs = [torch.rand(3, 32, 32) for _ in range(3)]
    with pytest.raises(RFIError) as e:
        MemoryBank.fit(encoder, imgs, MemoryConfig(max_mb=0.01), progress_bar=False, count=3)
    msg = str(e.value)
    assert "\n" not in msg and "768 patches" in msg and "MiB before the coreset" in msg
    assert "memory.patches_per_image=" in msg and "memory.max_mb=0.01" in msg
    # the suggested setting works
    n = int(msg.split("memory.patches_per_image=")[1].split()[0])
    bank = MemoryBank.fit(encoder, imgs, MemoryConfig(max_mb=0.01, patches_per_image=n), progress_bar=False, count=3)
    assert bank.patches == 3 * n


def _memory_fit(
    tmp_path: Path, dummy_mvtec: Path, tiny_encoder: Path, anomaly_config: Path, method: str, tiny_fit: list[str]
) -> Path:
    cfg = load_anomaly_config(
        anomaly_config, [*tiny_fit, f"encoder={tiny_encoder}", f"method={method}", "memory.coreset=0.5"]
    )
    return fit(cfg, str(dummy_mvtec / "widget"), tmp_path / f"{method}.pt")


def test_memory_and_combined_fit_save_and_load(dummy_mvtec, tiny_encoder, anomaly_config, tiny_fit, tmp_path):
    for method in ("memory", "combined"):
        path = _memory_fit(tmp_path, dummy_mvtec, tiny_encoder, anomaly_config, method, tiny_fit)
        ckpt = torch.load(path, weights_only=True)  # a safe file: tensors and plain values only
        assert ckpt["anomaly"]["method"] == method and ckpt["memory"]["bank"].dim() == 2
        assert ("decoders" in ckpt) == (method == "combined")
        assert not (tmp_path / f"{method}_fit").exists() or method == "combined"
        det = AnomalyDetector.load(path)
        assert det.method == method
        comps = det.components()
        if method == "memory":
            assert comps == {"memory": 1.0}
        else:
            assert comps["memory"] == 1.0 and sum(v for k, v in comps.items() if k != "memory") == pytest.approx(1.0)
            assert {"pixel", "feature:layer1", "feature:layer2"} <= set(comps)
        from apps.anomaly.data import load_anomaly_data

        data = load_anomaly_data(dummy_mvtec, "widget")
        held = [read_image(p) for p in data.train][4::5]
        maps = torch.cat([det.maps(x) for x in det.batches(held, 4)])
        assert det.image_scores(maps).max() == pytest.approx(det.threshold, rel=1e-4)  # standardised as before
        # the loaded model scores like the one that was saved
        x = det.prepare(read_image(data.test[-1].path))[None]
        assert torch.allclose(det.maps(x), AnomalyDetector.load(path).maps(x))


def test_cli_fit_method_memory_and_score(dummy_mvtec, tiny_encoder, anomaly_config, tiny_fit, tmp_path, capsys):
    model = tmp_path / "mem.pt"
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--method",
                "memory",
                "--data",
                str(dummy_mvtec),
                "--category",
                "widget",
                "--out",
                str(model),
                "--config",
                str(anomaly_config),
                *tiny_fit,
                f"encoder={tiny_encoder}",
            ]
        )
        == 0
    )
    assert (
        main(["anomaly", "score", "--model", str(model), "--data", str(dummy_mvtec), "--out", str(tmp_path / "s")]) == 0
    )
    m = json.loads((tmp_path / "s/metrics.json").read_text())
    import csv

    from sklearn.metrics import roc_auc_score

    with open(tmp_path / "s/scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    labels, scores = [int(r["label"]) for r in table], [float(r["score"]) for r in table]
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))  # the written scores' AUROC
    assert m["pixel_auroc"] is not None and (tmp_path / "s/maps").is_dir()
    capsys.readouterr()
    # unknown method, bad coreset: one line naming the key, before any work
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--method",
                "patchcore",
                "--data",
                str(dummy_mvtec),
                "--category",
                "widget",
                "--out",
                str(tmp_path / "x.pt"),
                "--config",
                str(anomaly_config),
                f"encoder={tiny_encoder}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "config key 'method'" in err and "'patchcore' is not one of ['reconstruction', 'memory', 'combined']" in err
    assert "\n" not in err
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--data",
                str(dummy_mvtec),
                "--category",
                "widget",
                "--out",
                str(tmp_path / "x.pt"),
                "--config",
                str(anomaly_config),
                f"encoder={tiny_encoder}",
                "method=memory",
                "memory.coreset=1.5",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "config key 'memory.coreset' in the command-line overrides must be in (0, 1], got 1.5" in err
    assert "\n" not in err
    assert not (tmp_path / "x.pt").exists()


def test_exception_test_image_smaller_than_the_encoder_allows(
    dummy_mvtec, tiny_encoder, anomaly_config, tiny_fit, tmp_path
):
    det = AnomalyDetector.load(_memory_fit(tmp_path, dummy_mvtec, tiny_encoder, anomaly_config, "memory", tiny_fit))
    assert det.min_side() == 4  # layer3 of the small-input ResNet: stride 4
    with pytest.raises(RFIError, match=r"image is 3x8 px, smaller than the encoder allows \(4 px per side"):
        det.maps(torch.rand(1, 3, 3, 8))
    assert det.maps(torch.rand(1, 3, 4, 8)).shape == (1, 1, 4, 8)


def test_a_fit_killed_mid_way_leaves_no_model_file(
    dummy_mvtec, tiny_encoder, anomaly_config, tiny_fit, tmp_path, monkeypatch
):
    import encoders.core.serialization as serialization

    def save_half_then_die(obj, f, *args, **kwargs):
        f.write(b"half a model")  # torch.save writes into the open temporary file
        raise KeyboardInterrupt

    monkeypatch.setattr(serialization.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        _memory_fit(tmp_path, dummy_mvtec, tiny_encoder, anomaly_config, "memory", tiny_fit)
    monkeypatch.undo()
    assert not (tmp_path / "memory.pt").exists()
    assert not [p for p in tmp_path.iterdir() if "memory.pt" in p.name]  # no temporary left either


def test_memory_bank_batches_hold_a_bounded_number_of_pixels(encoder, monkeypatch):
    """max_pixels splits a batch (at least one image per pass); the features are the same.

    Batches of 2 and of 5 may round differently in the last bits on some CPUs, and the greedy
    coreset's argmax then picks other rows: compare the features the coreset is chosen from.
    """
    import apps.anomaly.memory as anomaly_memory

    normal = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    pools = []
    monkeypatch.setattr(anomaly_memory, "greedy_coreset", lambda x, n, *a, **k: pools.append(x) or torch.arange(n))
    MemoryBank.fit(encoder, normal, MemoryConfig(coreset=1.0), batch_size=16, progress_bar=False)
    seen = []
    inner = anomaly_memory.patch_features
    monkeypatch.setattr(anomaly_memory, "patch_features", lambda e, x, *a: seen.append(x.shape[0]) or inner(e, x, *a))
    parts = MemoryBank.fit(
        encoder, normal, MemoryConfig(coreset=1.0), batch_size=16, progress_bar=False, max_pixels=2 * 32 * 32 + 1
    )
    assert seen == [2, 2, 1]
    whole, split = pools
    assert whole.shape == split.shape == parts.bank.shape
    assert torch.allclose(split, whole, atol=1e-5, rtol=1e-4)
