"""Anomaly detection: data layouts, the embedded benchmark, scoring, metrics and the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.anomaly.benchmark import DEFECTS, make_benchmark
from apps.anomaly.config import AnomalyConfig, BenchmarkConfig, load_anomaly_config
from apps.anomaly.data import load_anomaly_data, read_labels, read_mask
from apps.anomaly.detector import AnomalyDetector
from apps.anomaly.maps import image_scores, smooth
from apps.anomaly.metrics import image_metrics, pixel_metrics
from apps.cli import main
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from encoders.core.files import EXIT_PARTIAL

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BENCH = BenchmarkConfig(size=32, train=3, test_good=2, test_defect=2)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- reading layouts
def test_reader_parses_the_mvtec_layout(dummy_mvtec, dummy_categories):
    data = load_anomaly_data(dummy_mvtec, category="widget")
    n_train, n_good, defects = dummy_categories["widget"]
    assert data.layout == "mvtec" and data.category == "widget" and data.has_masks
    assert len(data.train) == n_train and all(p.parent.name == "good" for p in data.train)
    assert len(data.test) == n_good + sum(defects.values())
    for item in data.test:
        assert item.name == f"{item.path.parent.name}/{item.path.stem}"
        if item.defect == "good":
            assert item.label == 0 and item.mask is None
        else:
            assert item.label == 1 and item.mask.name == f"{item.path.stem}_mask.png"
            assert item.mask.parent.name == item.defect
    # a category folder works directly; a root with several categories needs one named
    assert load_anomaly_data(dummy_mvtec / "gadget").category == "gadget"
    with pytest.raises(RFIError, match="several MVTec categories.*gadget, widget"):
        load_anomaly_data(dummy_mvtec)
    with pytest.raises(RFIError, match="no category 'nope'"):
        load_anomaly_data(dummy_mvtec, category="nope")


def test_exception_masks_that_do_not_match_their_images_are_named(dummy_mvtec, tmp_path):
    cat = _copy(dummy_mvtec / "widget", tmp_path / "widget")
    (cat / "ground_truth/blot/001_mask.png").rename(cat / "ground_truth/blot/001_msk.png")
    Image.new("L", (20, 30)).save(cat / "ground_truth/crack/000_mask.png")
    with pytest.raises(RFIError) as e:
        load_anomaly_data(cat)
    msg = str(e.value)
    assert "test/blot/001.png has no mask ground_truth/blot/001_mask.png" in msg
    assert "ground_truth/blot/001_msk.png matches no test image" in msg
    assert "ground_truth/crack/000_mask.png is 20x30 but its image test/crack/000.png is 48x48" in msg


def test_exception_category_without_normal_training_images(dummy_mvtec, tmp_path):
    cat = _copy(dummy_mvtec / "gadget", tmp_path / "gadget")
    for f in (cat / "train/good").iterdir():
        f.unlink()
    with pytest.raises(RFIError, match="category 'gadget' has no normal training images"):
        load_anomaly_data(cat, need="train")
    assert load_anomaly_data(cat, need="test").test  # scoring it still works


def test_plain_folders_with_a_labels_file(dummy_mvtec, tmp_path):
    root = tmp_path / "plain"
    shutil.copytree(dummy_mvtec / "widget/train/good", root / "normal")
    (root / "test").mkdir()
    shutil.copy(dummy_mvtec / "widget/test/good/000.png", root / "test/a.png")
    shutil.copy(dummy_mvtec / "widget/test/blot/000.png", root / "test/b.png")
    (root / "labels.csv").write_text("name,label\na.png,0\nb.png,1\n")
    data = load_anomaly_data(root)
    assert data.layout == "folders" and not data.has_masks and len(data.train) == 10
    assert [(t.name, t.label) for t in data.test] == [("a", 0), ("b", 1)]
    assert read_labels(root / "labels.csv") == {"a.png": 0, "b.png": 1}
    # sub-folders give the labels when there is no CSV; a flat folder is unlabelled
    (root / "labels.csv").unlink()
    assert [t.label for t in load_anomaly_data(root, need="test").test] == [None, None]
    (root / "test/good").mkdir()
    (root / "test/a.png").rename(root / "test/good/a.png")
    assert [(t.name, t.label) for t in load_anomaly_data(root, need="test").test] == [("b", None), ("good/a", 0)]
    bad = tmp_path / "bad.csv"
    bad.write_text("b.png,1\nmissing.png,0\n")
    with pytest.raises(RFIError, match=r"bad.csv does not match .*no label for good/a.png.*missing.png"):
        load_anomaly_data(root, labels=bad, need="test")
    bad.write_text("b.png,maybe\n")
    with pytest.raises(RFIError, match=r"bad.csv:1: label 'maybe'"):
        read_labels(bad)


# ----------------------------------------------------------------------------- the embedded benchmark
def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_benchmark_is_deterministic_and_in_the_mvtec_layout(tmp_path):
    a = make_benchmark(tmp_path / "a", TINY_BENCH)
    b = make_benchmark(tmp_path / "b", TINY_BENCH)
    c = make_benchmark(tmp_path / "c", BenchmarkConfig(size=32, train=3, test_good=2, test_defect=2, seed=1))
    fa = _files(a)
    assert fa == _files(b)
    assert fa.keys() == _files(c).keys() and fa != _files(c)
    for texture in TINY_BENCH.textures:
        data = load_anomaly_data(a, category=texture)
        assert len(data.train) == 3 and data.has_masks
        assert sorted({t.defect for t in data.test}) == sorted(["good", *DEFECTS])
    assert make_benchmark(tmp_path / "a", TINY_BENCH) == a  # same settings: reused
    with pytest.raises(RFIError, match="other settings.*seed"):
        make_benchmark(tmp_path / "a", BenchmarkConfig(size=32, train=3, test_good=2, test_defect=2, seed=1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(RFIError, match="not an embedded benchmark folder"):
        make_benchmark(tmp_path / "other", TINY_BENCH)
    assert not list(tmp_path.glob(".*.tmp"))


def test_benchmark_masks_cover_exactly_the_defects(tmp_path):
    from apps.anomaly.benchmark import _crop, _rng, _texture_areas

    root = make_benchmark(tmp_path / "bench", TINY_BENCH)
    for texture in TINY_BENCH.textures:
        _, test_area = _texture_areas(texture)
        for k, defect in enumerate(DEFECTS):
            for i in range(TINY_BENCH.test_defect):
                clean = _crop(test_area, TINY_BENCH.size, _rng(TINY_BENCH, texture, 2 + k, i))
                img = np.asarray(Image.open(root / texture / "test" / defect / f"{i:03d}.png"), np.float32) / 255
                mask = read_mask(root / texture / "ground_truth" / defect / f"{i:03d}_mask.png").numpy()
                diff = np.abs(img - clean).max(-1)
                assert mask.sum() >= 8, (texture, defect, i)
                assert diff[~mask].max() <= 1 / 255 + 1e-6, (texture, defect, i)  # untouched outside (8-bit rounding)
                assert diff[mask].mean() > 0.04, (texture, defect, i)  # changed inside
    # test images come from the held-out region: none equals a crop of the training region
    assert not set(_files(root / "brick" / "test").values()) & set(_files(root / "brick" / "train").values())


# ----------------------------------------------------------------------------- metrics and maps
def test_metrics_on_constructed_cases():
    labels = [0, 0, 0, 1, 1]
    perfect = image_metrics(labels, [0.1, 0.2, 0.3, 0.8, 0.9])
    assert perfect["auroc"] == 1.0 and perfect["f1"] == 1.0 and 0.3 < perfect["threshold"] <= 0.8
    assert image_metrics(labels, [0.9, 0.8, 0.7, 0.2, 0.1])["auroc"] == 0.0
    half = image_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4])  # pairs (0.1<0.2, 0.1<0.4, 0.3>0.2, 0.3<0.4): 3/4
    assert half["auroc"] == pytest.approx(0.75)
    masks = [torch.tensor([[True, False], [False, False]]), torch.zeros(2, 2, dtype=torch.bool)]
    maps = [torch.tensor([[5.0, 1.0], [0.0, 2.0]]), torch.full((2, 2), 3.0)]
    pix = pixel_metrics(masks, maps)
    assert pix["auroc"] == 1.0 and pix["f1"] == 1.0


def test_exception_single_class_gives_a_message_not_nan():
    for labels in ([0, 0, 0], [1, 1]):
        out = image_metrics(labels, [0.5] * len(labels))
        assert out["auroc"] is None and out["f1"] is None
        assert "single class" in out["note"] and "needs both normal and anomalous" in out["note"]
    out = pixel_metrics([torch.zeros(3, 3, dtype=torch.bool)], [torch.rand(3, 3)])
    assert out["auroc"] is None and "ground truth has a single class" in out["note"]


def test_image_scores_and_smoothing():
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 4, 5] = 10.0
    assert image_scores(maps, "max").tolist() == [10.0, 0.0]
    assert image_scores(maps, "topk", 0.02).tolist() == [5.0, 0.0]  # mean of the top 2 of 100 pixels
    assert image_scores(maps, "mean").tolist() == pytest.approx([0.1, 0.0])
    s = smooth(maps, 1.0)  # the peak is 3 sigma from the border: the blur keeps its mass
    assert s.shape == maps.shape and s[0].sum() == pytest.approx(10.0, rel=1e-4) and s[0].max() < 10.0


def test_detector_maps_are_standardised_on_normal_images(tiny_model, dummy_mvtec):
    det = AnomalyDetector.load(tiny_model)
    assert det.threshold is not None and set(det.stats) == {"pixel", "feature:layer1", "feature:layer2"}
    from encoders.core.imageio import read_image

    normal = [read_image(p) for p in load_anomaly_data(dummy_mvtec, "widget").train]
    det.calibrate(normal, batch_size=4)
    maps = torch.cat([det.maps(x) for x in det.batches(normal, 4)])
    assert maps.shape == (len(normal), 1, 48, 48)
    assert float(maps.mean()) == pytest.approx(0.0, abs=1e-3)
    assert det.image_scores(maps).max() == pytest.approx(det.threshold)
    over = det.overlay(normal[0], maps[0])
    assert over.shape == (3, 48, 48)
    assert torch.equal(det.overlay(normal[0], maps[0], alpha=0.0), normal[0])  # no colour: the image itself
    flat = det.overlay(normal[0], torch.zeros(48, 48), alpha=1.0)  # one score everywhere: one colour
    assert torch.equal(flat, flat[:, :1, :1].expand_as(flat))
    hot = det.overlay(normal[0], torch.full((48, 48), 2 * det.threshold), alpha=1.0)  # the top of the scale
    assert not torch.equal(hot[:, 0, 0], flat[:, 0, 0])


def test_shipped_config_equals_the_python_defaults(anomaly_config):
    assert load_config(AnomalyConfig, anomaly_config) == AnomalyConfig()


def test_exception_bad_score_settings():
    with pytest.raises(RFIError, match=r"'score.pixel_metric' in the command-line overrides: 'l3' is not one of"):
        load_anomaly_config(None, ["score.pixel_metric=l3"])
    with pytest.raises(RFIError, match=r"'score.topk' in the command-line overrides must be in \(0, 1\], got 0"):
        load_anomaly_config(None, ["score.topk=0"])
    with pytest.raises(RFIError, match="score.pixel_weight and score.feature_weight are both 0"):
        load_anomaly_config(None, ["score.pixel_weight=0", "score.feature_weight=0"])


def test_exception_the_old_decoder_section_names_its_new_spelling(tmp_path):
    """``decoder:`` is ``train:`` now (as in the denoise and style configs): the old key fails in one line."""
    with pytest.raises(RFIError) as e:
        load_anomaly_config(None, ["decoder.decoder.channels=16"])
    assert str(e.value) == (
        "config key 'decoder.decoder.channels' in the command-line overrides is now 'train.decoder.channels'"
    )
    mine = tmp_path / "mine.yaml"
    mine.write_text("decoder:\n  steps: 5\n")
    with pytest.raises(RFIError, match=r"config key 'decoder.steps' in .*mine.yaml is now 'train.steps'$"):
        load_anomaly_config(mine)
    mine.write_text("train:\n  steps: 5\n")
    assert load_anomaly_config(mine).train.steps == 5


# ----------------------------------------------------------------------------- fit + score through the CLI
def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_and_score_end_to_end(
    dummy_mvtec, dummy_categories, tiny_encoder, anomaly_config, tiny_fit, tmp_path, capsys
):
    model = tmp_path / "m" / "widget.pt"
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
                str(model),
                "--config",
                str(anomaly_config),
                *tiny_fit,
                f"encoder={tiny_encoder}",
            ]
        )
        == 0
    )
    ckpt = torch.load(model, weights_only=True)  # one self-contained, safe file
    assert ckpt["anomaly"]["category"] == "widget" and ckpt["anomaly"]["stats"]
    out = tmp_path / "scored"
    # the model's category is picked from the root
    assert (
        main(
            [
                "anomaly",
                "score",
                "--model",
                str(model),
                "--data",
                str(dummy_mvtec),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "widget" in printed
    rows = _read_csv(out / "scores.csv")
    n_train, n_good, defects = dummy_categories["widget"]
    assert len(rows) == n_good + sum(defects.values())
    assert {r["name"] for r in rows} >= {"good/000", "blot/000", "crack/001"}
    for r in rows:
        assert r["label"] == ("0" if r["defect"] == "good" else "1") and float(r["score"]) == float(r["score"])
        with Image.open(out / r["map"]) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
    m = json.loads((out / "metrics.json").read_text())
    # The image metrics are those of the written scores: AUROC as sklearn computes it, F1 at the written threshold.
    from sklearn.metrics import f1_score, roc_auc_score

    labels, scores = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    flagged = [int(s >= m["image_f1_threshold"]) for s in scores]
    assert m["image_f1"] == pytest.approx(f1_score(labels, flagged))
    anomalous = sum(labels) / len(labels)  # the best F1 is at least that of flagging every image
    assert m["image_f1"] >= 2 * anomalous / (1 + anomalous) - 1e-9
    assert m["pixel_auroc"] is not None and m["pixel_f1"] is not None
    assert set(m["per_defect"]) == {"blot", "crack"} and m["skipped"] == []
    assert not list(out.rglob("*.tmp"))


def test_fit_and_score_the_embedded_benchmark(tiny_encoder, anomaly_config, tiny_fit, tmp_path, monkeypatch):
    monkeypatch.setenv("RFI_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "grass.pt"
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--data",
                "embedded",
                "--category",
                "grass",
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
        main(
            ["anomaly", "score", "--model", str(model), "--data", "embedded", "--out", str(tmp_path / "s"), "--no-maps"]
        )
        == 0
    )
    m = json.loads((tmp_path / "s/metrics.json").read_text())
    assert m["category"] == "grass" and m["images"] == 3 + 3 * 2 and m["pixel_auroc"] is not None
    assert not (tmp_path / "s/maps").exists()


def test_exception_single_class_test_set_through_the_cli(tiny_model, dummy_mvtec, tmp_path, capsys):
    cat = _copy(dummy_mvtec / "widget", tmp_path / "widget")
    for d in ("blot", "crack"):
        shutil.rmtree(cat / "test" / d)
        shutil.rmtree(cat / "ground_truth" / d)
    assert main(["anomaly", "score", "--model", str(tiny_model), "--data", str(cat), "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert "n/a" in printed and "AUROC undefined" in printed and "all 3 are normal" in printed
    text = (tmp_path / "s/metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["image_auroc"] is None


def test_exception_corrupt_images_are_skipped_by_name(tiny_model, dummy_mvtec, tmp_path, capsys):
    cat = _copy(dummy_mvtec / "widget", tmp_path / "widget")
    data = (cat / "test/good/001.png").read_bytes()
    (cat / "test/good/001.png").write_bytes(data[: len(data) // 3])  # truncated
    (cat / "test/blot/002.png").write_bytes(b"not an image")
    assert (
        main(["anomaly", "score", "--model", str(tiny_model), "--data", str(cat), "--out", str(tmp_path / "s")])
        == EXIT_PARTIAL
    )  # as invert/denoise/stylize/augment: some failed, rest written
    captured = capsys.readouterr()
    summary = captured.err[captured.err.index("rfi: 2 input(s) failed") :].splitlines()
    assert len(summary) == 3 and "test/blot/002.png" in summary[1] and "test/good/001.png" in summary[2]
    names = {r["name"] for r in _read_csv(tmp_path / "s/scores.csv")}
    assert "good/001" not in names and "blot/002" not in names and "good/000" in names
    m = json.loads((tmp_path / "s/metrics.json").read_text())
    assert m["skipped"] == ["blot/002", "good/001"] and m["image_auroc"] is not None
    assert [f.startswith(str(cat / p)) for f, p in zip(m["failed"], ["test/blot/002.png", "test/good/001.png"])] == [
        True
    ] * 2


def test_exception_nan_image_is_skipped_and_all_failed_exits_2(tiny_model, dummy_mvtec, tmp_path, capsys):
    cat = _copy(dummy_mvtec / "widget", tmp_path / "widget")
    w, h = Image.open(cat / "test/good/000.png").size
    Image.fromarray(np.full((h, w), np.nan, np.float32), mode="F").save(cat / "test/good/000.tif")  # NaN pixels
    (cat / "test/good/000.png").unlink()
    out = tmp_path / "s"
    assert main(["anomaly", "score", "--model", str(tiny_model), "--data", str(cat), "--out", str(out)]) == EXIT_PARTIAL
    assert "good/000" not in {r["name"] for r in _read_csv(out / "scores.csv")}
    assert "test/good/000.tif holds NaN or Inf" in capsys.readouterr().err
    for f in (cat / "test").rglob("*.*"):
        f.write_bytes(b"broken")
    assert main(["anomaly", "score", "--model", str(tiny_model), "--data", str(cat), "--out", str(tmp_path / "t")]) == 2
    assert "could be scored" in capsys.readouterr().err and not (tmp_path / "t/scores.csv").exists()


def test_a_killed_score_run_leaves_no_half_written_files(tiny_model, dummy_mvtec, tmp_path, monkeypatch):
    import apps.anomaly.scoring as scoring

    calls, write_image = [], scoring.write_image

    def write_then_die(image, path):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        return write_image(image, path)

    monkeypatch.setattr(scoring, "write_image", write_then_die)
    out = tmp_path / "s"
    assert (
        main(["anomaly", "score", "--model", str(tiny_model), "--data", str(dummy_mvtec / "widget"), "--out", str(out)])
        == 130
    )
    assert not (out / "scores.csv").exists() and not (out / "metrics.json").exists()
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert written == sorted(calls)  # only complete PNGs, no temporary files
    for p in written:
        Image.open(p).load()


def test_exception_cli_bad_inputs(tiny_model, tiny_encoder, dummy_mvtec, anomaly_config, tmp_path, capsys):
    assert (
        main(
            ["anomaly", "score", "--model", str(tiny_encoder), "--data", str(dummy_mvtec), "--out", str(tmp_path / "s")]
        )
        == 2
    )
    assert "is not an anomaly model" in capsys.readouterr().err
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--data",
                str(dummy_mvtec),
                "--out",
                str(tmp_path / "m.pt"),
                "--config",
                str(anomaly_config),
                "encoder=/nope/enc.pt",
            ]
        )
        == 2
    )
    assert "encoder checkpoint not found: /nope/enc.pt" in capsys.readouterr().err
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--data",
                str(dummy_mvtec),
                "--out",
                str(tmp_path / "m.pt"),
                "--config",
                str(anomaly_config),
                f"encoder={tiny_encoder}",
            ]
        )
        == 2
    )
    assert "several MVTec categories" in capsys.readouterr().err
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--data",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "m.pt"),
                "--config",
                str(anomaly_config),
                f"encoder={tiny_encoder}",
            ]
        )
        == 2
    )
    assert "data folder not found" in capsys.readouterr().err
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--data",
                str(dummy_mvtec),
                "--out",
                str(tmp_path / "m.pt"),
                "--config",
                str(anomaly_config),
                "score.pixel_metric=l3",
            ]
        )
        == 2
    )
    assert "'score.pixel_metric' in the command-line overrides: 'l3' is not one of" in capsys.readouterr().err
    assert (
        main(
            [
                "anomaly",
                "fit",
                "--data",
                str(dummy_mvtec),
                "--out",
                str(tmp_path / "m.pt"),
                "--config",
                str(anomaly_config),
                "decoder.steps=3",
            ]
        )
        == 2
    )
    assert "config key 'decoder.steps' in the command-line overrides is now 'train.steps'" in capsys.readouterr().err
    assert (
        main(
            [
                "anomaly",
                "score",
                "--model",
                str(tiny_model),
                "--data",
                str(dummy_mvtec),
                "--out",
                str(tmp_path / "s"),
                "--batch-size",
                "0",
            ]
        )
        == 2
    )
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_score_flags_default_to_the_config():
    """``rfi anomaly score``'s --batch-size and --device defaults are the shipped config's, not written twice."""
    from apps.cli import build_parser

    argv = ["anomaly", "score", "--model", "m.pt", "--data", "d", "--out", "o"]
    args = build_parser(argv).parse_args(argv)
    assert (args.batch_size, args.device) == (AnomalyConfig().batch_size, AnomalyConfig().device) == (16, "auto")


def test_decoder_training_crops_keep_the_image_scale(dummy_mvtec):
    """fit trains on plain random crops (ImageFiles crop='random'), not rescaled ones, repeated per epoch."""
    from encoders.core.imageio import read_image
    from encoders.data.folders import ImageFiles

    folder = dummy_mvtec / "widget/train/good"
    ds = ImageFiles(folder, "train", 16, crop="random", repeat=3)
    assert len(ds) == 3 * 8  # 10 files, every 5th held out for validation
    torch.manual_seed(0)
    crop, _ = ds[0]
    src = read_image(ds.items[0][0])
    windows = src.unfold(1, 16, 1).unfold(2, 16, 1).permute(1, 2, 0, 3, 4)  # (33, 33, 3, 16, 16)
    found = [(windows == c).flatten(2).all(-1).any() for c in (crop, crop.flip(-1))]
    assert any(found)
    with pytest.raises(RFIError, match="unknown crop mode 'zoom'"):
        ImageFiles(folder, "train", 16, crop="zoom")


def test_large_images_and_batches_are_mapped_in_bounded_pieces(tiny_model, monkeypatch):
    """A batch or image above MAP_PIXELS is processed image by image and in tiles with
    cropped margins: same shape as a whole pass and close to it (it is not bit-exact)."""
    import apps.anomaly.detector as anomaly

    det = anomaly.AnomalyDetector.load(tiny_model)
    x = torch.rand(2, 3, 200, 264, generator=torch.Generator().manual_seed(0))
    whole = det.maps(x)
    monkeypatch.setattr(anomaly, "TILE_MARGIN", 48)
    monkeypatch.setattr(anomaly, "MAP_PIXELS", 160 * 160)  # tiles of 160 px with 48-px margins
    calls = []
    inner = anomaly.AnomalyDetector._component_maps
    monkeypatch.setattr(
        anomaly.AnomalyDetector, "_component_maps", lambda self, t: calls.append(tuple(t.shape)) or inner(self, t)
    )
    tiled = det.maps(x)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    assert max(b * h * w for b, _, h, w in calls) <= 160 * 160 and len(calls) > 2
    interior = (slice(None), slice(None), slice(30, -30), slice(30, -30))
    rel = (tiled - whole)[interior].abs().mean() / whole[interior].std()
    assert rel < 0.01, rel  # 48 px cover this encoder's receptive field


# ----------------------------------------------------------------------------- scale (issue 15)
def test_streaming_pixel_metrics_match_scikit_learn():
    """PixelMetrics (2^20-bin histogram, memory fixed) agrees with scikit-learn on all pixels at once."""
    from sklearn.metrics import roc_auc_score

    from apps.anomaly.metrics import PixelMetrics

    g = torch.Generator().manual_seed(0)
    shapes = [(64, 80), (100, 100), (33, 47), (128, 64)]
    masks = [torch.rand(s, generator=g) < 0.15 for s in shapes]
    maps = [torch.randn(s, generator=g) * 3 + 2 * m for s, m in zip(shapes, masks)]
    pm = PixelMetrics()
    size = pm.counts.nbytes
    for m, a in zip(masks, maps):
        pm.update(m, a)
    assert pm.counts.nbytes == size  # memory does not grow with the number of maps
    ours = pm.result()
    y = torch.cat([m.flatten() for m in masks]).numpy()
    s = torch.cat([a.flatten() for a in maps]).numpy()
    exact = image_metrics(y.astype(int), s)
    assert abs(ours["auroc"] - roc_auc_score(y, s)) < 1e-3 and abs(ours["f1"] - exact["f1"]) < 1e-3
    assert ours["threshold"] == pytest.approx(exact["threshold"], rel=1e-3)
    assert pixel_metrics(masks, maps) == ours  # the list form is the same accumulator
    flat = PixelMetrics()  # one score everywhere: every pair a tie
    flat.update(masks[0], torch.zeros(shapes[0]))
    assert flat.result()["auroc"] == 0.5


def test_normal_crops_are_decoded_once_and_match_image_files(dummy_mvtec, tmp_path, monkeypatch):
    """Training crops from the decode cache are ImageFiles' crops for the same seed; validation crops
    are fixed windows of the held-out images at their own scale."""
    import apps.anomaly.decoded as decoded
    from apps.anomaly.decoded import DecodedImages, NormalCrops
    from encoders.core.imageio import read_image
    from encoders.data.folders import ImageFiles

    paths = sorted((dummy_mvtec / "widget/train/good").glob("*.png"))
    calls: list[Path] = []
    monkeypatch.setattr(decoded, "read_image", lambda p: calls.append(Path(p)) or read_image(p))
    cache = DecodedImages([*paths, tmp_path / "missing.png"], tmp_path / "normal.u8")
    assert calls == [*paths, tmp_path / "missing.png"] and len(cache) == len(paths)  # the missing one skipped
    for sub in ("train", "val"):
        (tmp_path / "files" / sub / "x").mkdir(parents=True)
        for p in paths:
            shutil.copy(p, tmp_path / "files" / sub / "x" / p.name)
    files = ImageFiles(tmp_path / "files", "train", 16, crop="random", repeat=3)
    crops = NormalCrops(cache, range(len(paths)), "train", 16, repeat=3)
    assert len(crops) == len(files)
    torch.manual_seed(0)
    expected = [files[i][0] for i in range(len(files))]
    torch.manual_seed(0)
    assert all(torch.equal(crops[i], e) for i, e in enumerate(expected))
    assert len(calls) == len(paths) + 1  # no decode per crop
    val = NormalCrops(cache, [0, 1], "val", 16, repeat=2, seed=3)
    a = [val[i] for i in range(len(val))]
    assert all(torch.equal(x, y) for x, y in zip(a, [val[i] for i in range(len(val))]))  # fixed positions
    src = read_image(paths[0])
    windows = src.unfold(1, 16, 1).unfold(2, 16, 1).permute(1, 2, 0, 3, 4)
    assert (windows == a[0]).flatten(2).all(-1).any()  # a native-scale window, not the image shrunk


def test_fit_decodes_each_normal_image_once(dummy_mvtec, tiny_encoder, anomaly_config, tiny_fit, tmp_path, monkeypatch):
    import apps.anomaly.decoded as decoded
    import encoders.data.folders
    from apps.anomaly.fitting import fit
    from encoders.core.imageio import read_image

    calls: list[str] = []

    def counted(p):
        calls.append(Path(p).name)
        return read_image(p)

    for module in (decoded, encoders.data.folders):
        monkeypatch.setattr(module, "read_image", counted)
    cfg = load_anomaly_config(anomaly_config, [*tiny_fit, f"encoder={tiny_encoder}"])
    fit(cfg, str(dummy_mvtec / "widget"), tmp_path / "m.pt")
    names = sorted(p.name for p in (dummy_mvtec / "widget/train/good").glob("*.png"))
    assert sorted(calls) == names
    assert not list(tmp_path.glob(".*decoded*"))  # the mapped file is removed after the fit
    det = AnomalyDetector.load(tmp_path / "m.pt")
    assert det.threshold is not None


def test_score_batches_hold_a_bounded_number_of_pixels(tiny_model, dummy_mvtec, tmp_path, monkeypatch):
    """A batch of 16 images is split so that no batch holds more than BATCH_PIXELS pixels at once."""
    import apps.anomaly.detector as detector
    from apps.anomaly.scoring import score

    det = AnomalyDetector.load(tiny_model)
    data = load_anomaly_data(dummy_mvtec, "widget")
    whole = score(det, data, tmp_path / "whole", batch_size=16, write_maps=False)
    monkeypatch.setattr(detector, "BATCH_PIXELS", 2 * 48 * 48)
    seen = []
    inner = AnomalyDetector.maps
    monkeypatch.setattr(AnomalyDetector, "maps", lambda self, x: seen.append(x.shape[0]) or inner(self, x))
    parts = score(det, data, tmp_path / "parts", batch_size=16, write_maps=False)
    assert max(seen) == 2 and sum(seen) == len(data.test)
    assert parts["pixel_auroc"] == pytest.approx(whole["pixel_auroc"], abs=1e-6)
    assert parts["image_auroc"] == pytest.approx(whole["image_auroc"], abs=1e-6)
    assert "histogram" in parts["pixel_method"]
    assert [len(b) for b in det.batches([torch.rand(3, 48, 48)] * 5, 16)] == [2, 2, 1]


def test_a_killed_fit_leaves_no_decoded_copy_and_a_later_fit_removes_a_kill_9_one(tmp_path, caplog):
    import os

    from apps.anomaly.decoded import decoding_folder

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C, or kill (rfi turns SIGTERM into an exception)
        with decoding_folder(tmp_path / "brick.pt") as folder:
            (folder / "normal.u8").write_bytes(b"\0" * 1024)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    dead = 2**22 + 12345  # above the default pid_max: a fit killed with kill -9
    stale = tmp_path / f".brick_decoded.{dead}.x1y2"
    stale.mkdir()
    (stale / "normal.u8").write_bytes(b"\0" * 1024)
    other = tmp_path / f".grass_decoded.{dead}.x1y2"  # another model's: left to its own next fit
    other.mkdir()
    live = tmp_path / f".brick_decoded.{os.getppid()}.x1y2"  # a fit still running
    live.mkdir()
    with caplog.at_level("INFO", logger="rfi"), decoding_folder(tmp_path / "brick.pt"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, live.name])
    assert f"removing {stale}, left by a fit that was killed" in caplog.text
