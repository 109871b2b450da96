"""Anomaly benchmarks from a folder of photos (``make-benchmark --from``) and the raw-pixel baseline."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.anomaly.baseline import PixelPatches, raw_pixel_maps
from apps.anomaly.benchmark import (
    PHOTO_DEFECTS,
    VISIBLE,
    _photo_rng,
    make_benchmark,
    photo_controls,
    photo_defect,
    photo_tiles,
)
from apps.anomaly.config import BenchmarkConfig, MemoryConfig, load_anomaly_config
from apps.anomaly.data import load_anomaly_data, read_mask
from apps.anomaly.maps import image_scores
from apps.anomaly.metrics import image_metrics, pixel_metrics
from apps.cli import main
from encoders.core.errors import RFIError
from encoders.core.imageio import read_image

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = BenchmarkConfig(size=32, train=3, test_good=2, test_defect=2)


def _photo(path: Path, h: int, w: int, tint: tuple[float, float, float], seed: int) -> Path:
    """A noisy textured photo (detail everywhere, so every defect changes its pixels) in one tint."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    grey = 0.5 + 0.2 * np.sin(x / 3.0 + seed) * np.cos(y / 4.0) + 0.15 * rng.standard_normal((h, w))
    arr = (grey[..., None] * np.array(tint)).clip(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((arr * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """Two usable photos (red, green), one too small, one unreadable."""
    folder = tmp_path / "photos"
    _photo(folder / "red.png", 48, 120, (1.0, 0.2, 0.2), 0)
    _photo(folder / "green.jpg", 150, 40 * 3, (0.2, 1.0, 0.2), 1)
    _photo(folder / "tiny.png", 20, 60, (0.5, 0.5, 0.5), 2)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not a photo")
    return folder


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_benchmark_layout_determinism_and_skipped_photos(photos, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rfi"):
        a = make_benchmark(tmp_path / "a", BENCH, photos=photos)
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    assert "tiny.png is 60x20 px: too small for benchmark.size=32" in skipped and "broken.png" in skipped
    assert sorted(p.name for p in a.iterdir()) == ["benchmark.json", "green", "red"]
    for name in ("red", "green"):
        data = load_anomaly_data(a, category=name)
        assert data.layout == "mvtec" and data.has_masks and len(data.train) == 3
        assert sorted({t.defect for t in data.test}) == sorted(["good", *PHOTO_DEFECTS])
        assert len(data.test) == 2 + 2 * len(PHOTO_DEFECTS)
        assert all(read_image(t.path).shape == (3, 32, 32) for t in data.test)
    assert _files(a) == _files(make_benchmark(tmp_path / "b", BENCH, photos=photos))
    other = _files(
        make_benchmark(
            tmp_path / "c", BenchmarkConfig(size=32, train=3, test_good=2, test_defect=2, seed=1), photos=photos
        )
    )
    assert other.keys() == _files(a).keys() and other != _files(a)
    assert make_benchmark(tmp_path / "a", BENCH, photos=photos) == a  # same photos and settings: reused
    _photo(photos / "blue.png", 64, 120, (0.2, 0.2, 1.0), 3)
    with pytest.raises(RFIError, match="other settings \\(photos\\)"):
        make_benchmark(tmp_path / "a", BENCH, photos=photos)
    with pytest.raises(RFIError, match="not a photo benchmark folder"):
        make_benchmark(photos, BENCH, photos=photos)


def _photo_arrays(photos: Path) -> dict[str, np.ndarray]:
    """The fixture's usable photos as make_benchmark reads them, in its (file name) order."""
    return {
        name: read_image(photos / file).permute(1, 2, 0).numpy().astype(np.float32)
        for name, file in (("green", "green.jpg"), ("red", "red.png"))
    }


def _boxes_holding(crop: np.ndarray, image: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where ``crop`` (8-bit values) is an exact window of ``image``."""
    windows = np.lib.stride_tricks.sliding_window_view(np.round(image * 255), crop.shape, axis=(0, 1, 2))[:, :, 0]
    hits = np.argwhere((windows == np.round(crop * 255)).all(axis=(-3, -2, -1)))
    return [tuple(int(v) for v in hit) for hit in hits]


def test_photo_tiles_split_the_scene_into_disjoint_interleaved_parts():
    split = photo_tiles(512, 768, 64)
    tiles = split["train"] + split["test"]
    covered = np.zeros((512, 768), int)
    for top, left, bottom, right in tiles:
        assert bottom - top >= 128 and right - left >= 128  # twice the crop side
        covered[top:bottom, left:right] += 1
    assert (covered == 1).all()  # a partition of the photo
    assert len(split["test"]) == len(tiles) // 3
    for third in range(3):  # both parts reach every third of the photo, along both axes
        for axis in (0, 1):
            lo, hi = third * (512, 768)[axis] // 3, (third + 1) * (512, 768)[axis] // 3
            for part in ("train", "test"):
                assert any(box[axis] < hi and box[axis + 2] > lo for box in split[part]), (part, axis, third)
    assert photo_tiles(48, 120, 32) == {"train": [(0, 0, 48, 40), (0, 40, 48, 80)], "test": [(0, 80, 48, 120)]}
    with pytest.raises(RFIError, match="fewer than three 32-px tiles"):
        photo_tiles(48, 90, 32)


def test_folder_benchmark_crops_come_from_their_own_tiles(photos, tmp_path):
    root = make_benchmark(tmp_path / "bench", BENCH, photos=photos)
    for name, image in _photo_arrays(photos).items():
        split = photo_tiles(*image.shape[:2], BENCH.size)
        for part, folder in (("train", "train/good"), ("test", "test/good")):
            for file in sorted((root / name / folder).glob("*.png")):
                crop = np.asarray(Image.open(file), np.float32) / 255
                boxes = _boxes_holding(crop, image)
                assert boxes, (name, file)
                size = BENCH.size
                within = [any(t <= y and y + size <= b and lf <= x and x + size <= r for t, lf, b, r in split[part])
                          for y, x in boxes]  # fmt: skip
                assert any(within), (name, file, boxes)  # the crop lies within one tile of its own part


def test_folder_benchmark_masks_cover_exactly_the_visible_defects(photos, tmp_path):
    root = make_benchmark(tmp_path / "bench", BENCH, photos=photos)
    images = _photo_arrays(photos)
    for name, image in images.items():
        tiles = photo_tiles(*image.shape[:2], BENCH.size)["test"]
        donors = [image, *(other for key, other in images.items() if key != name)]
        for k, defect in enumerate(PHOTO_DEFECTS):
            for i in range(BENCH.test_defect):
                clean, _, drawn, visibility = photo_defect(
                    image, tiles, defect, donors, BENCH.size, _photo_rng(BENCH, name, 2 + k, i)
                )
                img = np.asarray(Image.open(root / name / "test" / defect / f"{i:03d}.png"), np.float32) / 255
                mask = read_mask(root / name / "ground_truth" / defect / f"{i:03d}_mask.png").numpy()
                assert np.array_equal(mask, drawn) and mask.sum() >= 16, (name, defect, i)
                diff = np.abs(img - clean).max(-1)
                assert diff[~mask].max() <= 1 / 255 + 1e-6, (name, defect, i)  # untouched outside (8-bit rounding)
                assert visibility >= VISIBLE and np.abs(img - clean).mean(-1)[mask].mean() >= VISIBLE - 1 / 255
                if defect == "pasted_patch":  # from the other photo: the other colour dominates inside
                    inside = img[mask].mean(0)
                    assert (inside[1] > inside[0]) == (name == "red"), (name, i, inside)


def test_photo_controls_are_the_clean_twins_and_new_crops_of_the_training_tiles(photos, tmp_path):
    root = make_benchmark(tmp_path / "bench", BENCH, photos=photos)
    for name, image in _photo_arrays(photos).items():
        held_out, clean = photo_controls(photos, name, BENCH)
        assert len(held_out) == BENCH.test_good and len(clean) == len(PHOTO_DEFECTS) * BENCH.test_defect
        split = photo_tiles(*image.shape[:2], BENCH.size)
        train = [np.asarray(Image.open(f), np.float32) / 255 for f in sorted((root / name / "train/good").glob("*"))]
        for crop in held_out:  # a new crop of the training part, on the files' 8-bit levels
            assert crop.dtype == np.float32 and np.array_equal(np.round(crop * 255), crop * 255)
            assert not any(np.array_equal(crop, t) for t in train)
            boxes = _boxes_holding(crop, image)
            assert any(
                t <= y and y + 32 <= b and lf <= x and x + 32 <= r for y, x in boxes for t, lf, b, r in split["train"]
            )
        twins = iter(clean)
        for defect in PHOTO_DEFECTS:
            for i in range(BENCH.test_defect):  # the defect image is its twin plus the defect inside the mask only
                img = np.asarray(Image.open(root / name / "test" / defect / f"{i:03d}.png"), np.float32) / 255
                mask = read_mask(root / name / "ground_truth" / defect / f"{i:03d}_mask.png").numpy()
                twin = next(twins)
                assert np.abs(img - twin).max(-1)[~mask].max() <= 1e-6, (name, defect, i)
                assert np.abs(img - twin).mean(-1)[mask].mean() >= VISIBLE - 1 / 255, (name, defect, i)
    with pytest.raises(RFIError, match="no usable photo 'tiny'"):
        photo_controls(photos, "tiny", BENCH)


def test_a_defect_is_redrawn_until_it_can_be_seen_and_a_flat_photo_is_named(tmp_path, caplog):
    rng = np.random.default_rng(0)
    image = np.full((64, 192, 3), 0.5, np.float32)  # flat on the left two thirds...
    image[:, 128:] += 0.25 * rng.standard_normal((64, 64, 3)).astype(np.float32)  # ...detail on the right
    image = image.clip(0, 1)
    tiles = [(0, 0, 64, 32), (0, 32, 64, 64), (0, 64, 64, 96), (0, 96, 64, 128), (0, 128, 64, 192)]
    for seed in range(5):  # a blur is only visible on the detailed tile: it is drawn there
        clean, img, mask, visibility = photo_defect(
            image, tiles, "blurred_disk", [image], 32, np.random.default_rng(seed)
        )
        assert visibility >= VISIBLE and clean.std() > 0.1
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.fromarray(np.full((48, 120, 3), 128, np.uint8)).save(folder / "sky.png")
    with caplog.at_level(logging.WARNING, logger="rfi"):
        make_benchmark(tmp_path / "bench", BenchmarkConfig(size=32, train=2, test_good=1, test_defect=2), photos=folder)
    assert "sky: 2 of 2 blurred_disk images change their mask by less than 8 grey levels" in caplog.text


def test_one_photo_pastes_from_itself_and_photo_side_resizes(tmp_path):
    folder = tmp_path / "one"
    _photo(folder / "small.png", 24, 72, (0.6, 0.6, 0.6), 0)
    with pytest.raises(RFIError, match="no photo can be used.*small.png is 72x24 px"):
        make_benchmark(tmp_path / "x", BENCH, photos=folder)
    assert not (tmp_path / "x").exists()
    cfg = BenchmarkConfig(size=32, train=2, test_good=1, test_defect=1, photo_side=40)  # 24x72 -> 40x120
    root = make_benchmark(tmp_path / "bench", cfg, photos=folder)
    data = load_anomaly_data(root, category="small")
    assert {t.defect for t in data.test} == {"good", *PHOTO_DEFECTS}
    with pytest.raises(RFIError, match="benchmark.photo_side=24 is smaller than benchmark.size=32"):
        make_benchmark(tmp_path / "y", BenchmarkConfig(size=32, photo_side=24), photos=folder)


def test_bad_photo_folders_are_named(tmp_path):
    with pytest.raises(RFIError, match=f"--from {tmp_path / 'missing'}: not a folder"):
        make_benchmark(tmp_path / "out", BENCH, photos=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    with pytest.raises(RFIError, match=f"--from {tmp_path / 'empty'}: holds no images"):
        make_benchmark(tmp_path / "out", BENCH, photos=tmp_path / "empty")
    locked = tmp_path / "locked"
    locked.mkdir()
    listing = Path.iterdir

    def refused(path: Path):  # root reads any folder, so chmod 0 proves nothing here: refuse the listing
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "iterdir", refused)
        with pytest.raises(RFIError, match=f"--from {locked}: cannot be read"):
            make_benchmark(tmp_path / "out", BENCH, photos=locked)
    assert not (tmp_path / "out").exists()


def test_cli_make_benchmark_from_a_folder(photos, tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "anomaly",
                "make-benchmark",
                "--from",
                str(photos),
                "--out",
                str(out),
                "benchmark.size=32",
                "benchmark.train=2",
                "benchmark.test_good=1",
                "benchmark.test_defect=1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "green", "red"]
    assert main(["anomaly", "make-benchmark", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rfi: error:") and err.count("\n") == 1 and str(tmp_path / "nope") in err


# ----------------------------------------------------------------------------- the raw-pixel baseline
def _flat(rng: np.random.Generator, n: int, size: int = 24) -> torch.Tensor:
    """Flat grey images with a little noise."""
    return torch.from_numpy(0.5 + 0.03 * rng.standard_normal((n, 3, size, size))).float().clamp(0, 1)


def _scored(normal: torch.Tensor, test: torch.Tensor, masks: torch.Tensor, labels: list[int]) -> tuple[float, float]:
    cfg = load_anomaly_config()
    maps = raw_pixel_maps(list(normal), test, 3, MemoryConfig(coreset=0.25, sigma=1.0))
    assert maps.shape == (len(test), 1, *test.shape[-2:])
    scores = image_scores(maps, cfg.score.image_score, cfg.score.topk).tolist()
    return image_metrics(labels, scores)["auroc"], pixel_metrics(list(masks), list(maps[:, 0]))["auroc"]


def test_raw_pixel_baseline_finds_a_bright_disk_and_is_at_chance_without_defects():
    rng = np.random.default_rng(0)
    normal, test = _flat(rng, 6), _flat(rng, 40)
    yy, xx = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    masks = torch.zeros(40, 24, 24, dtype=torch.bool)
    for i in range(20, 40):  # a bright disk of radius 3 on half the test images
        cy, cx = rng.integers(5, 19, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
    with_disks = test.clone()
    with_disks[masks[:, None].expand(-1, 3, -1, -1)] = 0.95
    labels = [0] * 20 + [1] * 20
    image_auroc, pixel_auroc = _scored(normal, with_disks, masks, labels)
    assert image_auroc >= 0.99 and pixel_auroc >= 0.95
    # the same test images without their disks: labels carry no signal, the baseline is at chance
    image_auroc, _ = _scored(normal, test, masks, labels)
    assert 0.3 <= image_auroc <= 0.7


def test_pixel_patches_are_the_raw_neighbourhoods():
    x = torch.rand(1, 3, 8, 9)
    feats = PixelPatches(3)(x)["pixels"]
    assert feats.shape == (1, 27, 8, 9)
    assert torch.equal(feats[0, :, 4, 5].reshape(3, 3, 3), x[0, :, 3:6, 4:7])  # an inner pixel's 3x3 patch
    assert torch.equal(PixelPatches(1)(x)["pixels"], x)
    with pytest.raises(RFIError, match="odd number"):
        PixelPatches(4)
    with pytest.raises(RFIError, match="one size"):
        raw_pixel_maps([x[0]], [torch.rand(3, 8, 8), torch.rand(3, 9, 9)], 3, MemoryConfig())
