"""Loss terms and discriminators of decoder training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from encoders.core.errors import RFIError
from inversion.discriminator import (
    DeePSiMDiscriminator,
    PatchDiscriminator,
    build_discriminator,
    discriminator_from_config,
)
from inversion.losses import (
    DecoderLoss,
    discriminator_loss,
    feature_loss,
    generator_loss,
    pixel_loss,
)
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    return tiny_net().requires_grad_(False)


def test_pixel_loss_matches_torch():
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert torch.allclose(pixel_loss(x, y, "l1"), (x - y).abs().mean())
    assert torch.allclose(pixel_loss(x, y, "l2"), ((x - y) ** 2).mean())
    with pytest.raises(RFIError, match="l3"):
        pixel_loss(x, y, "l3")


def test_feature_loss_is_relative_and_scale_free():
    f = torch.randn(3, 8, 4, 4)
    g = f + 0.1 * torch.randn_like(f)
    assert feature_loss(f, f) == 0
    assert torch.allclose(feature_loss(torch.zeros_like(f), f), torch.tensor(1.0))
    # Scaling both by 10 (a different encoder's feature scale) leaves the loss unchanged.
    assert torch.allclose(feature_loss(10 * g, 10 * f), feature_loss(g, f), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_feature_loss(reduction):
    """Gradient of the relative (mean) and summed feature loss w.r.t. the reconstruction's features (float64);
    the target is a constant (detached inside), so it gets no gradient."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o: feature_loss(o, target, reduction), (out,))
    feature_loss(out, target, reduction).backward()
    assert target.grad is None and out.grad.abs().sum() > 0


def test_feature_term_gradient_reaches_the_image_not_the_encoder(encoder):
    x = torch.rand(2, 3, 16, 16)
    target = encoder(x, layers=["layer3"])["layer3"]
    rec = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss = DecoderLoss(encoder, "layer3", pixel=0.0, feature=1.0)
    total, terms = loss(rec, x, target_features=target)
    total.backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    assert set(terms) == {"feature", "total"}
    # The term is 0 at the target and its computed target matches the given one.
    same, _ = loss(x, x)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(loss(rec.detach(), x)[0], total.detach())


def test_weights_combine_and_zero_switches_off(encoder):
    x, rec = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    only_pixel = DecoderLoss(encoder, "layer3", pixel=2.0, feature=0.0)
    total, terms = only_pixel(rec, x)
    assert set(terms) == {"pixel", "total"}
    assert torch.allclose(total, 2 * F.l1_loss(rec, x))
    both = DecoderLoss(encoder, "layer3", pixel=1.0, feature=0.5, pixel_type="l2")
    total, terms = both(rec, x)
    assert torch.allclose(total, terms["pixel"] + 0.5 * terms["feature"])
    assert torch.allclose(terms["pixel"], F.mse_loss(rec, x))


def test_bad_loss_settings_are_refused(encoder):
    with pytest.raises(RFIError, match="pixel=-1"):
        DecoderLoss(encoder, "layer3", pixel=-1)
    with pytest.raises(RFIError, match="LPIPS"):
        DecoderLoss(encoder, "layer3", lpips=1.0)
    with pytest.raises(RFIError, match="discriminator"):
        DecoderLoss(encoder, "layer3", adversarial=1.0)
    with pytest.raises(RFIError, match="wasserstein"):
        DecoderLoss(encoder, "layer3", gan_loss="wasserstein")


@pytest.mark.parametrize("kind", ["hinge", "nonsaturating"])
def test_gan_losses_point_the_right_way(kind):
    real, fake = torch.full((4, 1), 3.0), torch.full((4, 1), -3.0)
    assert discriminator_loss(real, fake, kind) < discriminator_loss(fake, real, kind)
    logits = torch.zeros(4, 1, requires_grad=True)
    generator_loss(logits, kind).backward()
    assert (logits.grad < 0).all()  # the generator wants higher "real" scores


def test_discriminators_any_size_and_rebuild():
    patch = PatchDiscriminator(channels=8, layers=3)
    assert patch(torch.rand(2, 3, 16, 16)).shape == (2, 1, 2, 2)
    assert patch(torch.rand(1, 3, 48, 40)).shape == (1, 1, 6, 5)
    deepsim = DeePSiMDiscriminator(feature_channels=32, channels=8)
    assert deepsim(torch.rand(2, 3, 16, 16), torch.rand(2, 32, 4, 4)).shape == (2, 1)
    assert deepsim(torch.rand(2, 3, 64, 48), torch.rand(2, 32, 16, 12)).shape == (2, 1)
    with pytest.raises(RFIError, match="features"):
        deepsim(torch.rand(2, 3, 16, 16))
    for d in (patch, deepsim):
        clone = discriminator_from_config(d.config())
        clone.load_state_dict(d.state_dict())
        assert type(clone) is type(d)
    with pytest.raises(RFIError, match="deepsim, patch"):
        build_discriminator("stylegan", 32)


@pytest.mark.parametrize("kind", ["deepsim", "patch"])
def test_discriminator_step_learns_to_separate(encoder, kind):
    """Real = smooth images, fake = noise: a few discriminator steps must lower its loss clearly."""
    torch.manual_seed(0)
    disc = build_discriminator(kind, 32, channels=8)
    loss = DecoderLoss(encoder, "layer3", pixel=1.0, adversarial=0.1, discriminator=disc)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    base = torch.rand(8, 3, 4, 4)
    real = F.interpolate(base, size=16, mode="bilinear", align_corners=False)
    fake = torch.rand(8, 3, 16, 16)
    cond = encoder(real, layers=["layer3"])["layer3"]
    losses = []
    for _ in range(15):
        d = loss.discriminator_step_loss(real, fake, cond)
        opt.zero_grad()
        d.backward()
        opt.step()
        losses.append(d.item())
    assert losses[-1] < 0.5 * losses[0]
    # The generator term pushes the fake towards "real" without training the discriminator.
    opt.zero_grad(set_to_none=True)
    fake_g = fake.clone().requires_grad_(True)
    total, terms = loss(fake_g, real, condition=cond)
    total.backward()
    assert fake_g.grad.abs().sum() > 0 and "adversarial" in terms
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())


def test_lpips_term_from_local_backbone_file(encoder, fake_lpips_weights):
    from inversion.perceptual import load_lpips

    model = load_lpips("alex", weights=fake_lpips_weights)
    loss = DecoderLoss(encoder, "layer3", pixel=0.0, lpips=1.0, lpips_model=model)
    x = torch.rand(2, 3, 32, 32)
    same, _ = loss(x, x)
    rec = torch.rand(2, 3, 32, 32, requires_grad=True)
    total, terms = loss(rec, x)
    total.backward()
    assert same.item() == pytest.approx(0.0, abs=1e-6) and terms["lpips"] > 0
    assert rec.grad.abs().sum() > 0
