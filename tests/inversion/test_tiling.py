"""The one tiler (inversion.tiling) and its users: tiled results equal whole passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders.core.errors import RFIError
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder
from inversion.tiling import (
    conv_radius,
    pad_to_multiple,
    receptive_radius,
    tile_positions,
    tiled_apply,
)
from tests.conftest import tiny_net


@pytest.fixture(scope="module")
def ae() -> RobustAutoencoder:
    """An untrained ResNet-18 (width 0.125, 3x3 stem) with a layer1 skip decoder for layer3 (stride 4)."""
    enc = tiny_net()
    info = enc.feature_info()
    dec = Decoder(
        info["layer3"][0], info["layer3"][1], "layer3", channels=16, min_channels=8, skips={"layer1": info["layer1"]}
    )
    for m in dec.modules():  # non-trivial BatchNorm statistics, so eval-mode BN is really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return RobustAutoencoder(enc, dec).eval()


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "length,tile,overlap,align", [(100, 40, 8, 1), (97, 30, 10, 1), (96, 40, 8, 8), (512, 128, 64, 16), (33, 40, 8, 1)]
)
def test_tile_positions_cover_with_the_overlap(length, tile, overlap, align):
    starts = tile_positions(length, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    if (length - tile) % align == 0:
        assert all(s % align == 0 for s in starts)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


def test_pad_to_multiple_shapes_and_values():
    x = _images(2, 3, 10, 13)
    y = pad_to_multiple(x, 8)
    assert y.shape == (2, 3, 16, 16) and torch.equal(y[..., :10, :13], x)
    assert torch.equal(y[..., 10, :13], x[..., 8, :13])  # reflect: row 10 mirrors row 8
    assert pad_to_multiple(x, 8, min_size=24).shape[-2:] == (24, 24)
    small = pad_to_multiple(_images(1, 1, 2, 3), 8)  # too small to reflect: replicate
    assert small.shape[-2:] == (8, 8) and torch.equal(small[..., 7, 2], small[..., 1, 2])
    assert pad_to_multiple(x, 1) is x
    zeros = pad_to_multiple(x, 8, mode="constant")
    assert zeros[..., 10:, :].abs().sum() == 0


def test_receptive_radius_is_measured():
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 1, 5, padding=2)
    )
    assert receptive_radius(net, 2) == 1 + 2 + 2 == conv_radius(net) - 1
    strided = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 3, padding=1)
    )  # the last conv counts twice: 1 + 1 + 2
    assert receptive_radius(strided, 1) == 4
    with pytest.raises(RFIError, match="receptive field wider than 64 px"):
        receptive_radius(lambda t: t.mean((2, 3), keepdim=True), 1, size=32, max_size=64)


@pytest.mark.parametrize("h,w,tile", [(53, 71, 24), (64, 40, 20), (17, 90, 30)])
def test_tiled_apply_equals_whole_pass_and_batching_changes_nothing(h, w, tile):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2, padding_mode="reflect"))
    x = _images(2, 3, h, w)
    with torch.no_grad():
        whole = net(x)
        margin = receptive_radius(net, 3)
        one = tiled_apply(net, x, tile, margin)
        batched = tiled_apply(net, x, tile, margin, batch_pixels=10 * 2 * tile * tile)
    assert torch.allclose(one, whole, atol=1e-5)
    assert torch.equal(one, batched)


def test_tiled_apply_batches_within_the_pixel_budget():
    calls = []
    x = _images(1, 1, 100, 100)
    out = tiled_apply(lambda t: calls.append(tuple(t.shape)) or t * 2, x, 30, 3, batch_pixels=3 * 30 * 30)
    assert torch.equal(out, x * 2)
    assert max(n * h * w for n, _, h, w in calls) <= 3 * 30 * 30 and len(calls) < 16 and calls[0][0] == 3


def test_tiled_apply_blend_and_mapping_outputs():
    x = _images(1, 2, 40, 56)
    out = tiled_apply(lambda t: {"same": t, "half": t[..., ::2, ::2]}, x, 16, 2, align=2, blend=True)
    assert torch.allclose(out["same"], x, atol=1e-6) and torch.allclose(out["half"], x[..., ::2, ::2], atol=1e-6)


@pytest.mark.parametrize("tile,margin,align", [(10, 5, 1), (12, 4, 8), (0, 0, 1), (16, -1, 1)])
def test_bad_tile_sizes_raise_one_line(tile, margin, align):
    with pytest.raises(RFIError) as err:
        tiled_apply(lambda t: t, torch.zeros(1, 1, 64, 64), tile, margin, align=align)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("h,w", [(131, 77), (90, 203)])
def test_reconstruct_tiles_equal_the_whole_pass(ae, h, w):
    assert ae.tiles_exactly()
    enc_margin, dec_margin = ae.margins()
    assert enc_margin > 0 and dec_margin > 0
    x = _images(2, 3, h, w)
    whole = ae.reconstruct(x)
    for tile in (80, 120):
        assert torch.allclose(ae.reconstruct(x, tile=tile), whole, atol=1e-5)
    ae.max_pixels = 100 * 100  # the default path: tiles of 100 px
    try:
        assert torch.allclose(ae.reconstruct(x), whole, atol=1e-5)
    finally:
        ae.max_pixels = 1024 * 1024


def test_encode_tiled_equals_encode(ae):
    x = pad_to_multiple(_images(1, 3, 150, 99), 4)
    whole, tiled = ae.encode(x), ae.encode_tiled(x, tile=72)
    assert list(tiled) == list(whole) == ["layer3", "layer1"]
    for k in whole:
        assert torch.allclose(tiled[k], whole[k], atol=1e-5), k


def test_overlap_blends_whole_reconstructions(ae):
    x = _images(1, 3, 120, 96)
    blended = ae.reconstruct(x, tile=48, overlap=16)  # the approximate mode (LPS, Swin, or asked for)
    assert blended.shape == x.shape
    assert (blended - ae.reconstruct(x)).abs().mean() < 0.05
