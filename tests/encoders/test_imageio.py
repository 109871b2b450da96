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
    for name, message in [("cut.png", "is not a readable image"), ("text.png", "cannot identify image file"),
                          ("missing.png", "image not found")]:
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
