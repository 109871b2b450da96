import json

import pytest
import torch
from torch.utils.data import TensorDataset

from apps.cli import main
from encoders import RFIError, create_encoder
from encoders.data.embedded import EmbeddedCrops
from encoders.robust.evaluate import evaluate_encoder, masking_checks, overfitting_probe, overfitting_warning
from encoders.robust.fast import AdvMethod
from tests.conftest import tiny_net


def test_evaluate_encoder_reports_clean_and_pgd_accuracy(trained_checkpoint):
    enc = create_encoder(checkpoint=str(trained_checkpoint))
    val = EmbeddedCrops("val", 16, num=96, seed=0)
    r = evaluate_encoder(enc, val, eps=0.5, steps=10, norm="l2", batch_size=32, max_images=64)
    assert r["images"] == 64 and r["steps"] == 10 and r["step_size"] == pytest.approx(0.125)
    assert r["clean_acc"] > 0.3  # trained: well above chance (1/8)
    assert r["pgd_acc"] < r["clean_acc"] and r["pgd_loss"] > r["clean_loss"]
    assert evaluate_encoder(enc, val, eps=0.5, steps=10, norm="l2", batch_size=32, max_images=64) == r  # seeded
    none = evaluate_encoder(enc, val, eps=0.0, steps=10, norm="linf", max_images=64)
    assert none["pgd_acc"] == none["clean_acc"] == r["clean_acc"]
    assert not enc.training
    with pytest.raises(RFIError, match="unknown attack norm"):
        evaluate_encoder(enc, val, eps=0.5, steps=1, norm="l3")


def test_eval_encoder_cli_prints_a_table_and_writes_json(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval-encoder",
            "--checkpoint",
            str(trained_checkpoint),
            "--eps",
            "0.25",
            "1.0",
            "--steps",
            "10",
            "--max-images",
            "64",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "clean acc" in printed and "PGD acc" in printed and "16px" in printed  # the training data's size
    results = json.loads(out.read_text())["results"]
    assert [r["eps"] for r in results] == [0.25, 1.0] and all(r["norm"] == "l2" for r in results)
    assert results[1]["pgd_acc"] <= results[0]["pgd_acc"]
    assert f"{100 * results[0]['pgd_acc']:.1f}%" in printed


class _Quantised(torch.nn.Module):
    """A gradient-masking model: ``net``'s logits rounded to 1e-3, the same predictions but a zero input gradient."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def logits(self, x):
        return torch.round(self.net.logits(x) * 1000) / 1000


@pytest.fixture(scope="module")
def own_labels():
    """Random images labelled with the tiny net's own predictions (clean accuracy 100 %)."""
    net = tiny_net()
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return TensorDataset(x, net.logits(x).argmax(1))


CHECKS = {"eps": 0.5, "norm": "l2", "restarts": 1, "sweep": (0.5, 1, 8), "sweep_steps": 10}


def test_masking_checks_flag_a_model_whose_gradients_are_masked(own_labels):
    net = tiny_net()
    r = masking_checks(_Quantised(net), own_labels, twin=net, **CHECKS)  # the smooth twin's examples transfer
    assert r["clean_acc"] == 1.0 and r["pgd50_acc"] > 0.5  # white-box PGD gets no gradient
    assert r["transfer_acc"] < 0.25
    assert any("transfer attack from the twin" in flag for flag in r["masking_flags"])
    assert any("not near zero" in flag for flag in r["masking_flags"])
    assert all("\n" not in flag for flag in r["masking_flags"])


def test_masking_checks_pass_a_plain_model(own_labels):
    net = tiny_net()
    r = masking_checks(net, own_labels, twin=tiny_net(seed=1), **CHECKS)
    assert r["masking_flags"] == [], r["masking_flags"]
    assert r["images"] == 16 and r["tolerance"] == 0.25
    assert [s["eps"] for s in r["sweep"]] == [0.25, 0.5, 4.0] and r["sweep"][-1]["acc"] <= 0.05
    assert r["pgd50_acc"] <= r["pgd10_acc"] <= r["clean_acc"] and r["transfer_acc"] >= r["pgd50_acc"]
    assert masking_checks(net, own_labels, max_images=2, **CHECKS)["transfer_acc"] is None  # no twin, no transfer
    with pytest.raises(RFIError, match="positive, increasing sweep"):
        masking_checks(net, own_labels, **{**CHECKS, "sweep": (2, 1)})


@pytest.mark.parametrize(
    "method",
    [
        AdvMethod("fgsm_rs", "linf", 8 / 255),
        AdvMethod("free", "l2", 0.5, replays=4),
        AdvMethod("n_fgsm", "l2", 0.5),
        AdvMethod("pgd", "l2", 0.5, steps=2),
    ],
)
def test_overfitting_probe_measures_the_training_attack_and_pgd(own_labels, method):
    net = tiny_net().train()
    x, y = own_labels.tensors
    probe = overfitting_probe(net, x, y, method, pgd_steps=5)
    assert set(probe) == {"clean_acc", "train_attack_acc", "pgd_acc"} and probe["clean_acc"] == 1.0
    assert probe["pgd_acc"] < probe["clean_acc"] and all(0 <= v <= 1 for v in probe.values())
    assert overfitting_probe(net, x, y, method, pgd_steps=5) == probe  # seeded: a fixed yardstick
    assert net.training


def test_overfitting_warning_fires_on_divergence_only():
    def history(*pairs):
        return [{"pgd_acc": p, "train_attack_acc": t} for p, t in pairs]

    healthy = history((0.10, 0.15), (0.25, 0.30), (0.32, 0.40))
    assert overfitting_warning(healthy) is None
    assert overfitting_warning(history((0.40, 0.50), (0.10, 0.20))) is None  # both fell: not this failure
    assert overfitting_warning(history((0.30, 0.40))) is None
    warning = overfitting_warning(healthy + history((0.03, 0.75)))  # PGD collapses, the training attack is beaten
    assert warning.startswith("catastrophic overfitting: PGD accuracy fell from 32.0% (probe 3) to 3.0% (probe 4)")
    assert "\n" not in warning
    assert overfitting_warning(healthy + history((0.03, 0.75)), drop=0.3) is None  # a fall of 29 points < 30
    assert overfitting_warning(healthy + history((0.05, 0.37))) is not None  # within tolerance of 0.40: still fires
    assert overfitting_warning(healthy + history((0.05, 0.30))) is None  # fell by 10 points with it
