import numpy as np
import pytest
import torch
from PIL import Image

from encoders import RFIError
from encoders.core.imageio import list_images, open_image, read_image, write_image


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16"])
def test_conversions_to_rgb(tmp_path, mode, caplog):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    im = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    im.save(tmp_path / "x.png")
    with caplog.at_level("INFO", logger="rfi"):
        x = read_image(tmp_path / "x.png")
    assert x.shape == (3, 9, 7) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert "converted" in caplog.text
    if mode in ("L", "LA"):
        ref = torch.from_numpy(np.asarray(rgb.convert("L"))).float() / 255
        torch.testing.assert_close(x[0], ref)


def test_16bit_keeps_precision(tmp_path):
    arr = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    x = read_image(tmp_path / "deep.png")
    torch.testing.assert_close(x[0], torch.from_numpy(arr / 65535.0).float())


def test_roundtrip_and_exceptions(tmp_path):
    img = torch.rand(3, 10, 12)
    write_image(img, tmp_path / "a.png")
    assert (read_image(tmp_path / "a.png") - img).abs().max() <= 0.5 / 255 + 1e-6
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("hello")
    for name in ("cut.png", "text.png", "missing.png"):
        with pytest.raises(RFIError, match=name):
            read_image(tmp_path / name)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert [p.name for p in list_images([tmp_path])] == ["a.png", "cut.png", "text.png"]


def test_open_image_is_the_one_place_a_bad_file_becomes_one_line(tmp_path, monkeypatch):
    write_image(torch.rand(3, 10, 12), tmp_path / "a.png")
    with open_image(tmp_path / "a.png") as im:
        assert im.size == (12, 10)
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:60])
    (tmp_path / "text.png").write_text("hello")
    for name, message in [
        ("cut.png", "is not a readable image"),
        ("text.png", "cannot identify image file"),
        ("missing.png", "image not found"),
    ]:
        with pytest.raises(RFIError, match=message) as error:
            with open_image(tmp_path / name):
                pass
        assert name in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(RFIError, match=r"a\.png is not a readable image \(broken while converting\)"):
        with open_image(tmp_path / "a.png"):
            raise OSError("broken while converting")  # raised by the caller inside the block: mapped too
    monkeypatch.setenv("RFI_MAX_PIXELS", "100")
    with pytest.raises(RFIError, match=r"a\.png is 12x10 .* RFI_MAX_PIXELS=120"):
        with open_image(tmp_path / "a.png"):
            pass


@pytest.mark.parametrize(
    "values, expected, note",
    [
        ([0.0, 0.25, 1.0], [0.0, 0.25, 1.0], "float values in [0, 1], kept as they are"),
        ([0.0, 51.0, 200.0], [0.0, 0.2, 200 / 255], "values up to 200: assumed 0-255"),
        ([0.0, 13107.0, 40000.0], [0.0, 0.2, 40000 / 65535], "values up to 40000: assumed 0-65535"),
    ],
)
def test_float_images_are_scaled_by_their_range_and_say_what_was_assumed(values, expected, note, tmp_path, caplog):
    arr = np.array([values] * 2, dtype=np.float32)
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    with caplog.at_level("INFO", logger="rfi"):
        x = read_image(tmp_path / "f.tif")
    torch.testing.assert_close(x[1, 0], torch.tensor(expected))  # a [0, 1] float TIFF is not divided by 255
    assert f"converted F grayscale to RGB ({note})" in caplog.text


def test_integer_images_within_255_are_taken_as_8_bit_and_say_so(tmp_path, caplog):
    Image.fromarray(np.array([[0, 51, 255]], dtype=np.int32), mode="I").save(tmp_path / "i.tif")
    with caplog.at_level("INFO", logger="rfi"):
        x = read_image(tmp_path / "i.tif")
    torch.testing.assert_close(x[0, 0], torch.tensor([0.0, 0.2, 1.0]))
    assert "assumed 0-255" in caplog.text


def test_an_image_size_above_the_pixel_limit_names_the_flag():
    from encoders.core.imageio import check_image_side

    check_image_side(None, "--size")
    check_image_side(1000, "--size")
    with pytest.raises(RFIError, match=r"--size 60000 asks for 60000x60000-px images \(3600 Mpx, 43\.2 GB"):
        check_image_side(60000, "--size")
