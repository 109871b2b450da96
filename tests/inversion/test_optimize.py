import pytest
import torch

from encoders import create_encoder
from encoders.core.errors import RFIError
from encoders.data.embedded import EmbeddedCrops
from inversion.metrics import psnr
from inversion.optimize import invert_by_optimization

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/inversion/conftest.py


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_encoder("resnet18", width=0.25, small_input=True, num_classes=8).eval()


@pytest.fixture(scope="module")
def images():
    ds = EmbeddedCrops("val", 32, 2, seed=3)
    return torch.stack([ds[i][0] for i in range(2)])


def _feature_error(encoder, rec, images, layer):
    with torch.no_grad():
        a, b = encoder(rec, layers=[layer])[layer], encoder(images, layers=[layer])[layer]
    return (a - b).pow(2).flatten(1).sum(1) / b.pow(2).flatten(1).sum(1)


def test_matches_features_and_improves_pixels(encoder, images):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = images[..., 8:24, 8:24]  # small, so that enough steps are cheap
    start = invert_by_optimization(encoder, images, "layer1", steps=0, generator=g())
    rec = invert_by_optimization(encoder, images, "layer1", steps=30, lr=0.3, generator=g())
    assert rec.shape == images.shape and rec.min() >= 0 and rec.max() <= 1
    before = _feature_error(encoder, start, images, "layer1")
    assert (_feature_error(encoder, rec, images, "layer1") < 0.5 * before).all()
    assert (psnr(rec, images) > psnr(start, images) + 1.0).all()


def test_deterministic_and_inits(encoder, images):
    a = invert_by_optimization(encoder, images, "layer3", steps=3, generator=torch.Generator().manual_seed(5))
    b = invert_by_optimization(encoder, images, "layer3", steps=3, generator=torch.Generator().manual_seed(5))
    c = invert_by_optimization(encoder, images, "layer3", steps=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flat = invert_by_optimization(encoder, images, "layer3", steps=0, init="mean")
    mean = encoder.normalizer.new_mean.view(1, 3, 1, 1)
    assert torch.allclose(flat, mean.expand_as(flat), atol=1e-3)
    with pytest.raises(RFIError, match="init"):
        invert_by_optimization(encoder, images, "layer3", steps=1, init="zeros")


def test_target_features_and_tv_prior(encoder, images):
    feats = encoder(images, layers=["layer3"])["layer3"].detach()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    rec = invert_by_optimization(encoder, {"layer3": feats}, "layer3", steps=5, tv_weight=0.0, generator=g())
    assert rec.shape == images.shape  # size = feature size x stride
    smooth = invert_by_optimization(encoder, feats, "layer3", steps=5, tv_weight=5.0, generator=g())
    tv = lambda x: (x.diff(dim=-1).abs().mean() + x.diff(dim=-2).abs().mean()).item()  # noqa: E731
    assert tv(smooth) < tv(rec)
    rec = invert_by_optimization(encoder, feats, "layer3", steps=1, size=(29, 31))
    assert rec.shape[-2:] == (29, 31)


def test_bad_targets_refused_and_encoder_untouched(encoder, images):
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    flags = [p.requires_grad for p in encoder.parameters()]
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RFIError, match="NaN"):
        invert_by_optimization(encoder, bad, "layer2", steps=1)
    feats = torch.full((1, 64, 8, 8), float("inf"))
    with pytest.raises(RFIError, match="NaN or Inf"):
        invert_by_optimization(encoder, feats, "layer3", steps=1)
    with pytest.raises(RFIError, match="unknown layer"):
        invert_by_optimization(encoder, images, "conv9", steps=1)
    invert_by_optimization(encoder, images, "layer2", steps=2)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert [p.requires_grad for p in encoder.parameters()] == flags and not encoder.training
    assert all(p.grad is None for p in encoder.parameters())
