"""Interop with the MadryLab ``robustness`` library, used for real through encoders.weights.robustness_compat."""

import dill
import pytest
import torch
import torch.nn.functional as F
import torchvision

from encoders import RFIError, create_encoder
from encoders.data.embedded import EmbeddedCrops
from encoders.robust.attacks import pgd
from encoders.weights.interop import export_robustness
from encoders.weights.robustness_compat import (
    attacker_model,
    encoder_attacker_model,
    imagenet_dataset,
    import_robustness,
    robustness_pgd,
)


def _randomise_batchnorm(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _save_like_robustness(model, path, epoch=7):
    """What the library's train loop writes: a DataParallel state dict and friends, pickled with dill."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50)
    torch.save(
        {
            "model": torch.nn.DataParallel(model).state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": sched.state_dict(),
            "epoch": epoch,
            "amp": None,
            "adv_prec1": 0.5,
        },
        path,
        pickle_module=dill,
    )


@pytest.mark.parametrize("arch", ["resnet18", "alexnet"])
def test_robustness_checkpoint_loads_with_matching_logits(tmp_path, arch):
    rb = import_robustness()
    torch.manual_seed(0)
    theirs = attacker_model(rb.imagenet_models.__dict__[arch](num_classes=8), imagenet_dataset(8)).eval()
    _randomise_batchnorm(theirs)
    path = tmp_path / "robustness.pt"
    _save_like_robustness(theirs, path)
    keys = torch.load(path, weights_only=True)["model"].keys()
    assert any(k.startswith("module.attacker.model.") for k in keys) and "module.normalizer.new_mean" in keys

    ours = create_encoder(arch, checkpoint=str(path))
    assert (ours.num_classes, ours.width, ours.small_input) == (8, 1.0, False)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(x), theirs(x, with_image=False), rtol=1e-4, atol=1e-5)


def test_export_loads_in_robustness_with_matching_logits(tmp_path):
    rb = import_robustness()
    torch.manual_seed(0)
    ours = create_encoder("resnet18", num_classes=8).eval()
    _randomise_batchnorm(ours)
    path = export_robustness(ours, tmp_path / "exported.pt", epoch=3)
    # The library's own loader (make_and_restore_model: strips 'module.', strict load_state_dict).
    theirs, ckpt = rb.model_utils.make_and_restore_model(
        arch="resnet18", dataset=imagenet_dataset(8), resume_path=str(path)
    )
    assert ckpt["epoch"] == 3
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x, with_image=False), ours.logits(x), rtol=1e-4, atol=1e-5)


def test_small_encoder_round_trips_through_the_robustness_layout(tmp_path):
    torch.manual_seed(0)
    for arch, kw in [
        ("resnet18", {"small_input": True}),
        ("vgg16", {"small_input": True, "batch_norm": True}),
        ("alexnet", {"small_input": True}),
    ]:
        ours = create_encoder(arch, num_classes=5, width=0.125, **kw).eval()
        back = create_encoder(arch, checkpoint=str(export_robustness(ours, tmp_path / f"{arch}.pt")))
        assert back.config() == ours.config()
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(back.logits(x), ours.logits(x))


def test_torchvision_state_dict_imports(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    ours = create_encoder("resnet18", checkpoint=str(path))
    assert ours.num_classes == 1000
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(x), tv((x - mean) / std))
    with pytest.raises(RFIError, match=r"does not fit Encoder resnet50: missing keys: .*shape mismatch: "):
        create_encoder("resnet50", checkpoint=str(path))


@pytest.fixture(scope="module")
def attacked(trained_checkpoint):
    enc = create_encoder(checkpoint=str(trained_checkpoint)).eval()
    data = EmbeddedCrops("val", 16, num=128, seed=0)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    return enc, encoder_attacker_model(enc).eval(), x, y


def _accuracy_and_loss(enc, x, y):
    with torch.no_grad():
        logits = enc.logits(x)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 4 / 255)])
def test_our_pgd_matches_the_robustness_attacker(attacked, norm, eps):
    enc, theirs, x, y = attacked
    steps, step = 10, 2.5 * eps / 10
    # Without random start both are deterministic: on images away from 0 and 1 (where the
    # library's input clamp zeroes the gradient, see encoders.robust.attacks) the iterates agree.
    inner = 0.1 + 0.8 * x
    a = pgd(enc.logits, inner, y, eps, steps, step, norm, random_start=False)
    b = robustness_pgd(theirs, inner, y, eps, steps, step, norm, random_start=False)
    diff = (a - b).abs()  # float rounding only (the library's renorm adds 1e-7 to norms)
    assert diff.amax().item() < 1e-2 and diff.mean().item() < 1e-4
    # On the real crops, with random starts: the same strength.
    clean_acc, clean_loss = _accuracy_and_loss(enc, x, y)
    torch.manual_seed(1)
    acc_a, loss_a = _accuracy_and_loss(enc, pgd(enc.logits, x, y, eps, steps, step, norm), y)
    acc_b, loss_b = _accuracy_and_loss(enc, robustness_pgd(theirs, x, y, eps, steps, step, norm), y)
    print(f"{norm}: clean {clean_acc:.3f}, ours {acc_a:.3f} (loss {loss_a:.3f}), robustness {acc_b:.3f} ({loss_b:.3f})")
    assert acc_a < clean_acc - 0.1 and loss_a > clean_loss  # the attack does something
    assert abs(acc_a - acc_b) <= 0.06 and loss_a == pytest.approx(loss_b, rel=0.15)
