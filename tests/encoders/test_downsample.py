"""Blur pooling and learnable polyphase down-sampling (LPS) in the encoders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from encoders import RFIError, create_encoder
from encoders.nets.downsample import (
    LPD,
    CircularConv2d,
    SamePhase,
    annealed_temperature,
    lpd_modules,
    polyphase,
    select_phase,
    set_temperature,
)
from encoders.nets.models import Encoder
from encoders.robust.shift import circular_shift, feature_equivariance_error

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch: str = "resnet18", downsample: str = "lps", **kw) -> Encoder:
    torch.manual_seed(0)
    kw.setdefault("small_input", True)
    return create_encoder(arch, width=0.125, num_classes=8, downsample=downsample, **kw).eval()


def shifted_copies(x: torch.Tensor, every: bool) -> torch.Tensor:
    """Circular shifts of one image (N, 3, H, W): every offset, or the first one and 63 random ones."""
    h, w = x.shape[-2:]
    offsets = [(dy, dx) for dy in range(h) for dx in range(w)]
    if not every:
        offsets = [offsets[0]] + [offsets[i] for i in torch.randperm(h * w - 1)[:63] + 1]
    return torch.stack([x.roll(o, (1, 2)) for o in offsets])


@pytest.mark.parametrize(
    "arch,kw,size,every",
    [
        ("resnet18", {}, 16, True),
        ("resnet18", {"small_input": False}, 32, False),
        ("resnet50", {}, 16, False),
        ("vgg16", {}, 32, False),
    ],
)
def test_lps_predictions_identical_under_circular_shifts(arch, kw, size, every):
    enc = tiny(arch, **kw)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        for img in x:
            logits = enc.logits(shifted_copies(img, every))
            assert (logits.argmax(1) == logits[0].argmax()).all()  # 100% consistency
            assert (logits - logits[0]).abs().max() < 1e-4  # the logits themselves are invariant


def test_stride_logits_change_under_a_one_pixel_shift_lps_do_not():
    x = torch.rand(4, 3, 16, 16)
    change = {}
    with torch.no_grad():
        for mode in ("stride", "lps"):
            enc = tiny(downsample=mode)
            change[mode] = (enc.logits(x.roll(1, 3)) - enc.logits(x)).abs().max()
    assert change["stride"] > 1e-3  # the failure LPS fixes
    assert change["lps"] < 1e-5


def test_lps_features_are_circular_shifts_of_each_other():
    x = torch.rand(2, 3, 32, 32)
    for mode, exact in (("lps", True), ("stride", False)):
        enc = tiny(downsample=mode)
        with torch.no_grad():
            fa = enc(x, layers=["layer3"])["layer3"]
            fb = enc(circular_shift(x, torch.tensor([[3, 7], [-5, 1]])), layers=["layer3"])["layer3"]
        err = feature_equivariance_error(fa, fb)
        assert (err < 1e-5).all() if exact else (err > 1e-3).all()


def test_shortcut_takes_the_residual_branch_phase():
    enc = tiny()
    block = enc.model.layer2[0]
    assert isinstance(block.downsample[0], SamePhase) and block.downsample[0].source is block.conv1[1]
    with torch.no_grad():
        enc(torch.rand(2, 3, 16, 16), layers=["layer2"])
    assert block.conv1[1].weights.sum(1).eq(1).all()  # one-hot in eval mode


def test_gumbel_softmax_path_gets_gradients_in_training_mode():
    enc = tiny().train()
    set_temperature(enc, 0.5)
    enc.logits(torch.rand(4, 3, 16, 16)).logsumexp(1).sum().backward()
    for name, lpd in lpd_modules(enc.model).items():
        assert lpd.tau == 0.5
        assert not lpd.weights.eq(1).any(), name  # a soft Gumbel-softmax mixture, not a hard choice
        grads = [p.grad for p in lpd.score.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert annealed_temperature(0) == 1.0 and abs(annealed_temperature(1) - 0.1) < 1e-12
    copy.deepcopy(enc)  # the recorded (autograd) selection does not travel with copies


def test_attack_gradient_flows_through_the_eval_argmax_path():
    enc = tiny()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    enc.logits(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for lpd in lpd_modules(enc.model).values() for p in lpd.score.parameters())


def test_polyphase_component_order():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    comps = polyphase(x, 2)
    for i in range(2):
        for j in range(2):
            assert torch.equal(comps[:, 2 * i + j], x[..., i::2, j::2])


def test_blurpool_keeps_shapes_and_uses_kornia():
    from kornia.filters import BlurPool2D

    x = torch.rand(1, 3, 32, 32)
    ref, blur = tiny(downsample="stride"), tiny(downsample="blurpool")
    assert any(isinstance(m, BlurPool2D) for m in blur.modules())
    with torch.no_grad():
        assert {k: v.shape for k, v in ref(x).items()} == {k: v.shape for k, v in blur(x).items()}


def test_default_encoder_unchanged_and_lps_checkpoint_round_trip(tmp_path):
    from encoders.weights.checkpoints import load_encoder, save_encoder

    ref = tiny(downsample="stride")
    assert "downsample" not in ref.config()
    assert list(Encoder(**ref.config()).state_dict()) == list(ref.state_dict())
    enc = tiny()
    assert enc.config()["downsample"] == "lps"
    save_encoder(enc, tmp_path / "lps.pt")
    back = load_encoder(tmp_path / "lps.pt")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.logits(x), enc.logits(x))


def test_odd_size_is_refused_naming_size_and_layer():
    with pytest.raises(RFIError, match=r"layer2\.0\.conv1\.1.*15x16"):
        tiny().logits(torch.rand(1, 3, 15, 16))


def test_layers_that_cannot_take_lps_are_named():
    with pytest.raises(RFIError, match="classifier"):
        create_encoder("vgg16", width=0.125, num_classes=8, downsample="lps")
    with pytest.raises(RFIError, match="features.0"):
        create_encoder("alexnet", width=0.125, num_classes=8, downsample="blurpool")
    with pytest.raises(RFIError, match="unknown downsample 'bogus'"):
        create_encoder("resnet18", width=0.125, num_classes=8, downsample="bogus")


def test_lpd_alone_is_shift_equivariant():
    lpd = LPD(4).eval()
    x = torch.rand(2, 4, 8, 8)
    with torch.no_grad():
        y = lpd(x)
        for shift in [(1, 0), (0, 1), (1, 1), (3, 6)]:
            err = feature_equivariance_error(y, lpd(x.roll(shift, (2, 3))))
            assert (err == 0).all()


def test_adversarial_training_of_an_lps_encoder(tmp_path, tiny_cfg):
    from encoders.core.serialization import load_checkpoint
    from encoders.data.build import build_dataset
    from encoders.robust.evaluate import evaluate_encoder
    from encoders.robust.train import train_encoder

    robust = Path(__file__).resolve().parents[2] / "configs" / "encoder" / "resnet18_robust.yaml"
    cfg = tiny_cfg(tmp_path, "model.downsample=lps", "epochs=1", config=robust)
    path = train_encoder(cfg)
    recorded = load_checkpoint(path)["eval"]  # PGD through the eval-mode argmax path, at the end of training
    enc = create_encoder(checkpoint=str(path)).eval()
    assert enc.downsample == "lps"
    # The recorded figures are the saved model's: the seeded evaluation of the reloaded encoder repeats them.
    again = evaluate_encoder(
        enc,
        build_dataset(cfg.data, "val"),
        eps=recorded["eps"],
        steps=recorded["steps"],
        norm=recorded["norm"],
        batch_size=2 * cfg.batch_size,
        max_images=cfg.eval.max_images,
    )
    assert (again["clean_acc"], again["pgd_acc"]) == (recorded["clean_acc"], recorded["pgd_acc"])
    assert recorded["pgd_loss"] > recorded["clean_loss"]  # the attack did raise the loss
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(enc.logits(x).argmax(1), enc.logits(x.roll((5, 11), (2, 3))).argmax(1))


# ----------------------------------------------------------------------------- gradcheck (float64, tiny)
def test_gradcheck_polyphase_mixing():
    """The soft (training-mode) mixture of polyphase components: gradients w.r.t. the input and the weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.rand(2, 4, dtype=torch.float64, generator=g).softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: select_phase(polyphase(x, 2), w), (x, weights))


def test_gradcheck_lpd_training_mode_through_the_scores():
    """LPD in training mode: the input reaches the output through the kept components *and* through the
    scoring network's Gumbel-softmax weights. The noise is re-drawn from the same seed at every call, so the
    function gradcheck differentiates is deterministic."""
    torch.manual_seed(0)
    lpd = LPD(2, hidden=3).double().train()
    lpd.tau = 0.5

    def forward(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)
        return lpd(x)

    x = torch.rand(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(forward, (x,))
    forward(x)
    assert 0 < float(lpd.weights.detach().max()) < 1  # a soft mixture was differentiated, not a hard choice


def test_gradcheck_lpd_scorer_parameters():
    """Gradients w.r.t. the scoring network's weights (what LPS training learns), training mode."""
    torch.manual_seed(0)
    lpd = LPD(2, hidden=3).double().train()
    names = [n for n, _ in lpd.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in lpd.parameters())
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)

    def forward(*values: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)
        return torch.func.functional_call(lpd, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(forward, params)


def test_resnet_circular_padding_option_round_trips_and_bad_values_are_named(tmp_path):
    from encoders.weights.checkpoints import load_encoder, save_encoder

    enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8, padding="circular").eval()
    padded = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and any(p > 0 for p in m.padding)]
    assert padded and all(isinstance(m, CircularConv2d) for m in padded)
    assert enc.config()["padding"] == "circular" and "padding" not in tiny(downsample="stride").config()
    save_encoder(enc, tmp_path / "circ.pt")
    back = load_encoder(tmp_path / "circ.pt")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.logits(x), enc.logits(x))
        # five 3x3 convolutions up to layer1: the same inside a 5-px margin, not at the edges
        zeros = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
        zeros.load_state_dict(enc.state_dict())
        a, b = enc.eval()(x)["layer1"], zeros.eval()(x)["layer1"]
        assert torch.allclose(a[..., 5:-5, 5:-5], b[..., 5:-5, 5:-5], atol=1e-5)
        assert not torch.allclose(a[..., :, :1], b[..., :, :1], atol=1e-3)
    with pytest.raises(RFIError, match=r"^model\.options\.padding: 'reflect' is not one of zeros, circular$"):
        create_encoder("resnet18", width=0.125, num_classes=8, padding="reflect")
