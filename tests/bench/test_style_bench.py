"""bench/style.py's border measurements: the band (outer 8 px against the next 32) and its paired control, the edge
effect (the band of rows at the border minus the band of the same rows inside the image)."""

import pytest
import torch
import torch.nn.functional as F

from bench.style import EDGE_COLUMNS, SIDES, border_band, edge_columns, edge_effect


def box_blur(x: torch.Tensor, padding: str) -> torch.Tensor:
    """A 9 x 9 box blur: zero padding darkens the outer 4 px of every side, reflect padding does not."""
    kernel = torch.ones(3, 1, 9, 9) / 81
    if padding == "zeros":
        return F.conv2d(x, kernel, padding=4, groups=3)
    return F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), kernel, groups=3)


@pytest.fixture
def photo() -> torch.Tensor:
    """A (1, 3, 160, 200) image with content bands of its own: a bright strip along the top, a ramp left to right."""
    torch.manual_seed(0)
    x = 0.3 + 0.2 * torch.rand(1, 3, 160, 200) + torch.linspace(0, 0.3, 200)
    x[..., :8, :] += 0.2
    return x.clamp(0, 1)


def test_band_counts_the_content_and_edge_effect_does_not(photo):
    out = box_blur(photo, "reflect")
    band = border_band(out)
    assert band["top"]["outer"] - band["top"]["next"] > 20  # the photo's bright strip, blurred: a "band"
    edge = edge_effect(lambda y: box_blur(y, "reflect"), photo, out)
    assert set(edge) == set(SIDES)
    assert max(abs(v) for v in edge.values()) < 0.5  # the same rows come out the same at the border and inside


def test_edge_effect_finds_a_zero_padding_band(photo):
    out = box_blur(photo, "zeros")
    edge = edge_effect(lambda y: box_blur(y, "zeros"), photo, out)
    # zero padding darkens 4 of the outer 8 px by up to half: about -10 grey levels on each side
    assert all(-25 < edge[side] < -5 for side in SIDES), edge


def test_edge_columns_averages_absolute_effects_over_images(photo):
    runs = [lambda y: box_blur(y, "zeros"), lambda y: box_blur(y, "reflect")]
    columns = edge_columns(runs, [photo, photo.flip(-1)])
    assert len(columns["edge"]) == len(columns["band"]) == 2
    zeros = edge_effect(runs[0], photo, runs[0](photo))
    for side, key in zip(SIDES, EDGE_COLUMNS):
        assert columns[key] == pytest.approx((abs(zeros[side]) + abs(columns["edge"][1][side])) / 2)
        assert abs(columns["edge"][1][side]) < 0.5
