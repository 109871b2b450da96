import pytest
import torch
import torch.nn.functional as F

from encoders import RFIError
from encoders.robust.attacks import default_step_size, fgsm_rs, n_fgsm, pgd
from tests.conftest import tiny_net


@pytest.fixture(scope="module")
def model():
    return tiny_net()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 8, (8,), generator=g)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 8 / 255)])
def test_pgd_stays_in_the_ball_and_in_image_range(model, batch, norm, eps):
    x, y = batch
    x_adv = pgd(model.logits, x, y, eps=eps, steps=5, norm=norm)
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert (size <= eps + 1e-5).all() and (size > 0.5 * eps).all()  # uses most of the budget
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 4 / 255)])
def test_pgd_increases_the_loss_and_leaves_parameter_grads_alone(model, batch, norm, eps):
    x, y = batch
    x_adv = pgd(model.logits, x, y, eps=eps, steps=5, norm=norm, random_start=False)
    with torch.no_grad():
        clean = F.cross_entropy(model.logits(x), y, reduction="none")
        adv = F.cross_entropy(model.logits(x_adv), y, reduction="none")
    assert (adv > clean).all()
    assert all(p.grad is None for p in model.parameters())


def test_pgd_is_reproducible_with_a_generator(model, batch):
    x, y = batch
    runs = [pgd(model.logits, x, y, 0.5, 2, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_more_steps_find_stronger_examples(model, batch):
    x, y = batch
    losses = []
    for steps in (1, 10):
        x_adv = pgd(model.logits, x, y, eps=0.25, steps=steps, random_start=False)
        with torch.no_grad():
            losses.append(F.cross_entropy(model.logits(x_adv), y).item())
    assert losses[1] > losses[0]


def test_zero_eps_and_bad_arguments(model, batch):
    x, y = batch
    assert torch.equal(pgd(model.logits, x, y, eps=0, steps=3), x)
    assert default_step_size(0.5, 10) == pytest.approx(0.125)
    with pytest.raises(RFIError, match="unknown attack norm 'l1'.*l2, linf"):
        pgd(model.logits, x, y, 0.5, 3, norm="l1")
    with pytest.raises(RFIError, match="eps .* must be a finite number >= 0"):
        pgd(model.logits, x, y, -1.0, 3)
    with pytest.raises(RFIError, match="step size must be a finite number > 0, got -0.1"):
        pgd(model.logits, x, y, 0.5, 3, step_size=-0.1)  # would be an anti-attack


@pytest.mark.parametrize("attack", [fgsm_rs, n_fgsm])
@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 8 / 255)])
def test_single_step_attacks_raise_the_loss_and_are_reproducible(model, batch, attack, norm, eps):
    x, y = batch
    runs = [attack(model.logits, x, y, eps, norm, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with torch.no_grad():
        assert F.cross_entropy(model.logits(runs[0]), y) > F.cross_entropy(model.logits(x), y)
    assert all(p.grad is None for p in model.parameters()) and not runs[0].requires_grad


def test_single_step_attacks_refuse_bad_arguments(model, batch):
    x, y = batch
    assert torch.equal(fgsm_rs(model.logits, x, y, eps=0.0), x)
    with pytest.raises(RFIError, match="unknown attack norm 'l1'"):
        fgsm_rs(model.logits, x, y, 0.5, norm="l1")
    with pytest.raises(RFIError, match="step size must be a finite number > 0, got -0.1"):
        n_fgsm(model.logits, x, y, 0.5, step_size=-0.1)
    with pytest.raises(RFIError, match="N-FGSM noise radius must be a finite number >= 0, got -1"):
        n_fgsm(model.logits, x, y, 0.5, noise=-1)
