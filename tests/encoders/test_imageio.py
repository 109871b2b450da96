import numpy as np
import pytest
import torch
from PIL import Image

from encoders import RFIError
from encoders.core.imageio import list_images, read_image, write_image


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
