"""The model zoo: fetch from a local file:// URL (nothing downloads), hash checks, atomicity, offline message."""

from __future__ import annotations

import hashlib
import json
import urllib.request

import pytest
import torch

from apps.cli import main
from encoders import RFIError
from encoders.weights import zoo


def _payload(tmp_path, name="weights.pt"):
    src = tmp_path / "server" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.arange(12.0).view(3, 4)}, src)
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def _entry(src, sha256=None, filename=""):
    return zoo.ZooEntry(
        "test_weights", src.as_uri(), "resnet50", "imagenet", "test file", "tests", filename=filename, sha256=sha256
    )


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_catalogue_has_the_expected_checkpoints_and_torchvision_hash_prefixes():
    names = [e.name for e in zoo.entries()]
    for name in (
        "imagenet_l2_3_0",
        "imagenet_linf_4",
        "imagenet_linf_8",
        "cifar_l2_0_5",
        "cifar_linf_8",
        "torchvision_alexnet",
        "torchvision_vgg16",
    ):
        assert name in names
    alex = zoo.get_entry("zoo:torchvision_alexnet")
    assert alex.filename == "alexnet-owt-7be5be79.pth" and alex.sha256 == "7be5be79"
    assert zoo.get_entry("torchvision_vgg16").sha256 == "397923af"
    l2 = zoo.get_entry("imagenet_l2_3_0")
    assert l2.sha256 is None and l2.hash_check == "recorded" and l2.url.endswith("imagenet_l2_3_0.pt?dl=1")
    assert zoo.destination(l2).parent == zoo.cache_dir() and zoo.destination(l2).name == "imagenet_l2_3_0.pt"
    # LPIPS looks for its backbone where the zoo puts it
    from inversion.perceptual import backbone_cache_path

    assert backbone_cache_path("alex") == zoo.destination(alex)
    with pytest.raises(RFIError, match="unknown model zoo name 'resnet99'.*imagenet_l2_3_0"):
        zoo.get_entry("resnet99")


def test_fetch_with_published_hash_prefix_from_file_url(tmp_path):
    src, digest = _payload(tmp_path)
    dest = tmp_path / "cache"
    path = zoo.fetch(_entry(src, sha256=digest[:8]), dest, show_progress=False)
    assert path == dest / "weights.pt" and path.read_bytes() == src.read_bytes()
    assert _leftovers(dest) == ["weights.pt"]  # no temp file, no record (the hash is published)
    assert torch.load(path, weights_only=True)["conv.weight"].shape == (3, 4)


def test_bad_hash_is_refused_and_nothing_is_left_behind(tmp_path):
    src, digest = _payload(tmp_path)
    dest = tmp_path / "cache"
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:8]
    with pytest.raises(RFIError, match="refused .*does not match .*nothing was written"):
        zoo.fetch(_entry(src, sha256=wrong), dest, show_progress=False)
    assert _leftovers(dest) == []
    # the same check applies to a hash prefix carried in a torchvision-style file name
    named = src.with_name(f"net-{wrong}.pth")
    named.write_bytes(src.read_bytes())
    entry = _entry(named)
    assert entry.sha256 == wrong
    with pytest.raises(RFIError, match="does not match"):
        zoo.fetch(entry, dest, show_progress=False)
    assert _leftovers(dest) == []


def test_unpublished_hash_is_recorded_on_first_fetch_and_checked_after(tmp_path):
    src, digest = _payload(tmp_path)
    dest = tmp_path / "cache"
    entry = _entry(src)
    path = zoo.fetch(entry, dest, show_progress=False)
    record = json.loads(zoo.record_path(path).read_text())
    assert record["sha256"] == digest and record["url"] == src.as_uri()
    assert _leftovers(dest) == ["weights.pt", "weights.pt.sha256.json"]
    assert zoo.verify(entry, path) == digest
    monkey = dict(zoo.ENTRIES)
    try:
        zoo.ENTRIES["test_weights"] = entry
        assert zoo.resolve("zoo:test_weights", dest) == path
        path.write_bytes(path.read_bytes() + b"tampered")  # changed after it was recorded
        with pytest.raises(RFIError, match="does not match .*recorded in"):
            zoo.resolve("test_weights", dest)
        with pytest.raises(RFIError, match="does not match"):
            zoo.fetch(entry, dest, show_progress=False)  # a present file is verified, not trusted
        # a forced download must match the recorded hash too: a changed server file is refused
        src.write_bytes(src.read_bytes() + b"changed upstream")
        with pytest.raises(RFIError, match="refused .*recorded in .*nothing was written"):
            zoo.fetch(entry, dest, force=True, show_progress=False)
        assert sorted(p.name for p in dest.iterdir()) == ["weights.pt", "weights.pt.sha256.json"]
        path.unlink()
        with pytest.raises(RFIError, match="not downloaded: run `rfi weights fetch test_weights`"):
            zoo.resolve("zoo:test_weights", dest)
    finally:
        zoo.ENTRIES.clear()
        zoo.ENTRIES.update(monkey)
    assert zoo.resolve(src) == src  # a plain path is passed through


def test_offline_says_what_to_download_and_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    entry = zoo.get_entry("imagenet_l2_3_0")
    with pytest.raises(RFIError) as info:
        zoo.fetch(entry, tmp_path / "cache", show_progress=False)
    msg = str(info.value)
    assert "\n" not in msg and entry.url in msg and str(tmp_path / "cache" / "imagenet_l2_3_0.pt") in msg
    assert _leftovers(tmp_path / "cache") == []


def test_cli_list_and_fetch(tmp_path, capsys, monkeypatch):
    src, digest = _payload(tmp_path)
    monkeypatch.setitem(zoo.ENTRIES, "test_weights", _entry(src, sha256=digest))
    dest = tmp_path / "cache"
    assert main(["weights", "list", "--dest", str(dest), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["test_weights"]["status"] == "missing"
    assert rows["torchvision_alexnet"]["destination"] == str(dest / "alexnet-owt-7be5be79.pth")
    assert main(["weights", "fetch", "test_weights", "--dest", str(dest)]) == 0
    assert capsys.readouterr().out.strip() == str(dest / "weights.pt")
    assert main(["weights", "list", "--dest", str(dest)]) == 0
    assert "present" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("test_weights"))
    assert main(["weights", "fetch", "test_weights", "nope", "--dest", str(dest)]) == 2
    assert "unknown model zoo name 'nope'" in capsys.readouterr().err
