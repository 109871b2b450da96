"""Fast adversarial training (encoders.robust.fast): each method's perturbation bound, free training's replayed δ,
the settings check and GradAlign's gradient."""

import pytest
import torch
import torch.nn.functional as F

from encoders import RFIError
from encoders.robust.attacks import ascent_direction, project_to_ball, uniform_in_ball
from encoders.robust.fast import AdvMethod, FreeReplay, check_method, grad_align_penalty
from tests.conftest import tiny_net

EPS = {"l2": 0.5, "linf": 8 / 255}


@pytest.fixture(scope="module")
def model():
    return tiny_net()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 8, (8,), generator=g)


def _size(delta, norm):
    delta = delta.flatten(1)
    return delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("method", ["pgd", "fgsm_rs"])
def test_projected_methods_stay_in_the_eps_ball(model, batch, method, norm):
    x, y = batch
    eps = EPS[norm]
    x_adv = AdvMethod(method, norm, eps, steps=3).examples(model.logits, x, y, torch.Generator().manual_seed(0))
    size = _size(x_adv - x, norm)
    assert (size <= eps + 1e-5).all() and (size > 0.5 * eps).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_n_fgsm_is_bounded_by_noise_plus_step_not_by_eps(model, batch, norm):
    x, y = batch
    eps = EPS[norm]
    method = AdvMethod("n_fgsm", norm, eps)
    assert method.step == eps
    x_adv = method.examples(model.logits, x, y, torch.Generator().manual_seed(0))
    size = _size(x_adv - x, norm)
    assert (size <= 2 * eps + eps + 1e-5).all()  # k * eps + alpha, k = 2
    assert (size > eps).any()  # not projected back onto the eps-ball (de Jorge et al. 2022)
    assert x_adv.min() >= 0 and x_adv.max() <= 1  # only the image range is enforced
    quiet = AdvMethod("n_fgsm", norm, eps, noise=0.5 * eps, step_size=0.5 * eps)
    assert (_size(quiet.examples(model.logits, x, y) - x, norm) <= eps + 1e-5).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_uniform_in_ball_fills_the_ball(norm):
    noise = uniform_in_ball(torch.zeros(256, 3, 4, 4), 0.5, norm, torch.Generator().manual_seed(0))
    size = _size(noise, norm)
    assert (size <= 0.5 + 1e-6).all() and size.max() > 0.45
    if norm == "linf":  # uniform in the cube: values spread over [-eps, eps]
        assert noise.abs().mean() == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_free_training_replays_delta_across_replays_and_minibatches(norm):
    """The δ that replay r + 1 (and the next minibatch) trains on is the δ updated from replay r's gradient."""
    eps = EPS[norm]
    model = tiny_net()
    replay = AdvMethod("free", norm, eps, replays=3).replay()
    g = torch.Generator().manual_seed(2)
    expected = torch.zeros(8, 3, 16, 16)
    for _ in range(2):  # two minibatches, three replays each
        x, y = torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 8, (8,), generator=g)
        for _ in range(3):
            x_adv = replay.perturb(x)
            assert torch.allclose(x_adv, (x + expected).clamp(0, 1), atol=1e-6)
            assert (_size(x_adv - x, norm) <= eps + 1e-5).all()
            model.zero_grad()
            F.cross_entropy(model.logits(x_adv), y).backward()  # the one backward: parameters and input
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
            replay.update(x_adv)
            expected = project_to_ball(expected + eps * ascent_direction(x_adv.grad, norm), eps, norm)
    assert (_size(expected, norm) > 0.5 * eps).all()


def test_free_replay_follows_the_batch_size_and_keeps_its_state():
    replay = FreeReplay(eps=0.1, norm="linf", step=0.2)
    x = torch.full((4, 3, 2, 2), 0.5)
    x_adv = replay.perturb(x)
    x_adv.sum().backward()  # gradient +1 everywhere: delta steps to +0.2, projected to +eps
    replay.update(x_adv)
    small = replay.perturb(x[:2])  # the last, partial batch: the first rows
    assert small.shape[0] == 2 and torch.allclose(small, torch.full_like(small, 0.6))
    (-small).sum().backward()
    replay.update(small)
    delta = replay.perturb(torch.full((6, 3, 2, 2), 0.5)) - 0.5  # a larger batch: zero rows appended
    assert torch.allclose(delta[:, 0, 0, 0], torch.tensor([-0.1, -0.1, 0.1, 0.1, 0, 0]), atol=1e-6)
    restored = FreeReplay(eps=0.1, norm="linf", step=0.2)
    restored.load_state_dict(replay.state_dict())
    assert torch.equal(restored.perturb(x), replay.perturb(x))
    assert torch.equal(replay.perturb(torch.full((4, 3, 3, 3), 0.5)), torch.full((4, 3, 3, 3), 0.5))  # new size
    with pytest.raises(ValueError, match="after loss.backward"):
        replay.update(replay.perturb(x))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "fgsm"}, r"unknown adv.method 'fgsm' \(valid: pgd, fgsm_rs, free, n_fgsm\)"),
        ({"norm": "l1"}, r"unknown adv.norm 'l1' \(valid: l2, linf\)"),
        ({"method": "free", "replays": 0}, r"adv.replays \(.*\) must be >= 1, got 0"),
        ({"step_size": 0.0}, r"adv.step_size must be a finite number > 0 .*got 0.0"),
        ({"step_size": float("nan")}, r"adv.step_size must be a finite number > 0"),
        ({"eps": -1.0}, r"adv.eps \(attack radius\) must be a finite number >= 0, got -1.0"),
        ({"method": "pgd", "steps": 0}, r"adv.steps \(PGD steps\) must be >= 1 for adv.method=pgd, got 0"),
        ({"method": "n_fgsm", "noise": 1.5}, r"adv.noise \(.*\) must be in \[0, 2 \* adv.eps\] = \[0, 1\], got 1.5"),
        ({"method": "n_fgsm", "noise": -0.1}, r"adv.noise .* must be in \[0, 2 \* adv.eps\]"),
        ({"method": "fgsm_rs", "grad_align": -0.2}, r"adv.grad_align \(.*\) must be a finite number >= 0"),
        ({"method": "fgsm_rs", "replays": 8}, r"^adv.replays is for adv.method=free, not adv.method=fgsm_rs$"),
        ({"method": "pgd", "noise": 0.5}, r"^adv.noise is for adv.method=n_fgsm, not adv.method=pgd$"),
        (
            {"method": "free", "grad_align": 0.2},
            r"^adv.grad_align is for adv.method=fgsm_rs or adv.method=n_fgsm, not adv.method=free$",
        ),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(kwargs, message):
    settings = {"method": "fgsm_rs", "norm": "l2", "eps": 0.5, "steps": 3, **kwargs}
    with pytest.raises(RFIError, match=message) as error:
        check_method(**settings)
    assert "\n" not in str(error.value)
    with pytest.raises(RFIError, match=message):
        AdvMethod(**settings)


def test_default_steps_are_the_papers():
    assert AdvMethod("pgd", "l2", 0.5, steps=5).step == pytest.approx(0.25)  # 2.5 eps / steps
    assert AdvMethod("fgsm_rs", "linf", 8 / 255).step == pytest.approx(10 / 255)  # Wong et al.: 1.25 eps
    assert AdvMethod("free", "linf", 8 / 255, replays=8).step == pytest.approx(8 / 255)  # Shafahi et al.: eps
    assert AdvMethod("n_fgsm", "linf", 8 / 255, grad_align=0.2).step == pytest.approx(8 / 255)  # de Jorge: eps
    assert AdvMethod("fgsm_rs", "l2", 0.5, step_size=0.1).step == 0.1
    check_method("n_fgsm", "linf", 8 / 255, noise=16 / 255)  # k = 2, the upper end, is allowed


def _tiny_double_model(params, x):
    """Conv -> tanh -> linear, smooth so its second derivatives are defined everywhere."""
    w1, b1, w2, b2 = params
    return F.linear(torch.tanh(F.conv2d(x, w1, b1, padding=1)).flatten(1), w2, b2)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_grad_align_penalty_gradient_is_exact(norm):
    """``torch.autograd.gradcheck`` of the penalty with respect to the parameters (double backprop through both
    input gradients), on a double-precision model."""
    g = torch.Generator().manual_seed(0)
    params = tuple(
        torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        for shape in [(2, 3, 3, 3), (2,), (3, 2 * 4 * 4), (3,)]
    )
    x = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])

    def penalty(*p):
        return grad_align_penalty(
            lambda z: _tiny_double_model(p, z),
            x,
            y,
            eps=0.3 if norm == "l2" else 0.1,
            norm=norm,
            generator=torch.Generator().manual_seed(5),
        )  # the same eta each call

    value = penalty(*params)
    assert 0 < value.item() <= 2
    assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-5)


def test_grad_align_penalty_is_zero_when_the_gradient_direction_is_constant():
    """Logits (a . x, 0): the cross-entropy's input gradient is a multiple of a (sign fixed by the label)."""
    a = torch.randn(12)
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])

    def logits(z):
        return torch.stack([(z.flatten(1) * a).sum(1), torch.zeros(len(z))], 1)

    for norm in ("l2", "linf"):
        assert grad_align_penalty(logits, x, y, eps=0.3, norm=norm).abs().item() < 1e-6
