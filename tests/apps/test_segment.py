"""Segmentation: exact shift equivariance of LPS / equivariant-Swin segmenters, the metrics on hand-computed
cases, ``rfi segment train`` then ``apply``, bit-identical resume, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.segment.config import SegmentConfig
from apps.segment.metrics import (
    circular_agreement,
    class_iou,
    confusion_matrix,
    crop_agreement,
    evaluate_segmenter,
    mean_iou,
    pixel_accuracy,
)
from apps.segment.model import build_segmenter, load_segmenter
from apps.segment.train import SegmenterTrainer, train_segmenter
from encoders import RFIError, create_encoder
from encoders.core.config import load_config
from encoders.core.serialization import load_checkpoint
from encoders.data.scenes import SCENE_CLASSES, SceneSegmentation
from encoders.data.voc import read_label_png
from encoders.weights.checkpoints import save_encoder
from tests.conftest import tiny_net
from tests.encoders.test_voc import write_dummy_voc

pytestmark = pytest.mark.usefixtures("one_thread")

SWIN = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, patch_size=4, small_input=True, num_classes=5)
SHIFTS = [(1, 0), (0, 1), (3, 5), (-7, 2), (15, 9)]
# The shipped config shrunk to seconds: 32-px scenes, a 16-channel decoder, 6 steps.
TINY = [
    "train.steps=6",
    "train.batch_size=4",
    "train.data.size=32",
    "train.data.train_items=24",
    "train.data.val_items=4",
    "train.eval.images=4",
    "train.eval.max_crop_shift=8",
    "train.decoder.channels=16",
    "train.decoder.min_channels=8",
    "train.log_every=2",
    "train.device=cpu",
    "apply.device=cpu",
]


def segmenter(kind: str):
    if kind in ("lps", "stride"):
        return build_segmenter(
            tiny_net(downsample=kind), "layer3", SCENE_CLASSES, ["layer1", "layer2"], channels=16, min_channels=8
        ).eval()
    arch, equivariant = {"swin": ("swin_t", False), "swin_eq": ("swin_t", True), "swin_v2_eq": ("swin_v2_t", True)}[
        kind
    ]
    torch.manual_seed(0)
    encoder = create_encoder(arch, equivariant=equivariant, **SWIN)
    return build_segmenter(encoder, "stage2", SCENE_CLASSES, ["stage1"], channels=16, min_channels=8).eval()


@pytest.mark.parametrize("kind", ["lps", "swin_eq", "swin_v2_eq"])
def test_equivariant_segmenter_logits_shift_exactly_with_the_input(kind):
    seg, x = segmenter(kind), torch.rand(2, 3, 32, 32)
    assert seg.decoder.upsample == "lps"
    with torch.no_grad():
        logits = seg(x)
        assert logits.shape == (2, len(SCENE_CLASSES), 32, 32)
        for s in SHIFTS:
            assert (seg(x.roll(s, (2, 3))) - logits.roll(s, (2, 3))).abs().max() <= 1e-5, s


@pytest.mark.parametrize("kind", ["stride", "swin"])
def test_plain_segmenter_is_not_shift_equivariant(kind):
    seg, x = segmenter(kind), torch.rand(2, 3, 32, 32)
    assert seg.decoder.upsample == "nearest"
    with torch.no_grad():
        assert all((seg(x.roll(s, (2, 3))) - seg(x).roll(s, (2, 3))).abs().max() > 1e-3 for s in SHIFTS)


def test_miou_against_hand_computed_values():
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 0]])
    target = torch.tensor([[0, 1, 1, 1], [2, 255, 255, 0]])
    conf = confusion_matrix(pred, target, 4)
    # counted pairs (true, pred): (0,0) (1,0) (1,1) (1,1) (2,2) (0,0)
    assert conf.tolist() == [[2, 0, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    iou = class_iou(conf)
    assert iou[:3].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0]) and torch.isnan(iou[3])  # class 3: nowhere
    assert mean_iou(conf) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert pixel_accuracy(conf) == pytest.approx(5 / 6)


def test_masc_against_hand_computed_values():
    base = torch.arange(12).view(1, 3, 4) % 5
    a, b = torch.tensor([[1, 2]]), torch.tensor([[2, 3]])
    pa, pb = base.roll((1, 2), (1, 2)), base.roll((2, 3), (1, 2))
    assert circular_agreement(pa, pb, a, b).tolist() == [1.0]  # an equivariant prediction: every pixel agrees
    pb[0, 0, 0] = 4 if pb[0, 0, 0] != 4 else 3  # one pixel of 12 differs
    assert circular_agreement(pa, pb, a, b).tolist() == pytest.approx([11 / 12])
    # crops of a 4x5 map at (0, 0) and (1, 2): a 2x2 overlap, rows 1-2 and columns 2-3 of the map
    full = torch.arange(20).view(4, 5)
    ca, cb = full[0:3, 0:4].clone(), full[1:4, 2:6].clone()
    assert crop_agreement(ca[None], cb[None], torch.tensor([[0, 0]]), torch.tensor([[1, 2]])).tolist() == [1.0]
    cb[0, 0] = -1  # inside the overlap (map pixel (1, 2)): 1 of 4 disagrees
    cb[2, 2] = -1  # outside it: no effect
    assert crop_agreement(ca[None], cb[None], torch.tensor([[0, 0]]), torch.tensor([[1, 2]])).tolist() == [0.75]


def test_evaluation_of_an_equivariant_segmenter_gives_full_circular_consistency():
    seg = segmenter("lps")
    r = evaluate_segmenter(
        seg.predict,
        SceneSegmentation("val", 32, 4),
        len(SCENE_CLASSES),
        max_crop_shift=8,
        size_multiple=seg.size_multiple,
    )
    assert r["masc_circular"] == 1.0 and r["crop_size"] == 24 and 0 <= r["masc_crop"] <= 1 and 0 <= r["miou"] <= 1


@pytest.fixture(scope="module")
def lps_encoder(tmp_path_factory) -> Path:
    return save_encoder(tiny_net(downsample="lps"), tmp_path_factory.mktemp("encoder") / "encoder.pt")


@pytest.fixture(scope="module")
def trained(lps_encoder, tmp_path_factory) -> Path:
    """``rfi segment train`` of 6 steps on the tiny LPS encoder; the model file."""
    out = tmp_path_factory.mktemp("segment")
    argv = ["--quiet", "segment", "train", *TINY, f"train.encoder.checkpoint={lps_encoder}", "--out", str(out)]
    assert main(argv) == 0
    return out / "segmenter.pt"


def test_cli_train_then_apply_writes_label_pngs(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained)
    assert ckpt["train"]["step"] == 6 and ckpt["classes"] == list(SCENE_CLASSES)
    assert ckpt["eval"]["masc_circular"] == 1.0
    records = [json.loads(line) for line in (trained.parent / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "val_miou", "miou", "masc_crop"} <= {k for r in records for k in r}
    images = tmp_path / "in"
    images.mkdir()
    for name, size in (("a", (32, 32)), ("odd", (37, 51))):
        Image.fromarray((torch.rand(*size, 3) * 255).byte().numpy()).save(images / f"{name}.png")
    out = tmp_path / "labels"
    assert (
        main(
            [
                "--quiet",
                "segment",
                "apply",
                str(images),
                "--out",
                str(out),
                "--model",
                str(trained),
                "--overlay",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "odd.png", "odd_overlay.png"]
    with Image.open(out / "odd.png") as img:
        assert img.mode == "P" and img.size == (51, 37)
    assert int(read_label_png(out / "odd.png").max()) < len(SCENE_CLASSES)
    model = load_segmenter(trained)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(model.predict(x.roll((5, 3), (2, 3))), model.predict(x).roll((5, 3), (1, 2)))


def test_killed_run_resumes_to_identical_weights(lps_encoder, tmp_path, monkeypatch):
    """Fine-tuned LPS encoder (Gumbel-softmax phase draws), warm-up and mid-epoch checkpoints: a run killed at
    step 5 resumes from its step-4 checkpoint and ends bit-identical to an uninterrupted run."""
    extra = [
        *TINY,
        f"train.encoder.checkpoint={lps_encoder}",
        "train.finetune=true",
        "train.checkpoint_every=2",
        "train.optim.warmup_steps=2",
        "train.steps=7",
    ]
    full = train_segmenter(load_config(SegmentConfig, None, [*extra, f"train.out={tmp_path / 'full'}"]))
    cfg = load_config(SegmentConfig, None, [*extra, f"train.out={tmp_path / 'killed'}"])
    original = SegmenterTrainer.train_step

    def dies_at_step_5(self, x, labels):
        if self.step == 4:
            raise KeyboardInterrupt
        return original(self, x, labels)

    monkeypatch.setattr(SegmenterTrainer, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(cfg)
    assert load_checkpoint(tmp_path / "killed" / "segmenter.pt")["train"]["step"] == 4
    monkeypatch.setattr(SegmenterTrainer, "train_step", original)
    resumed = train_segmenter(cfg, resume=True)
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    for part in ("encoder", "decoder"):
        for key, value in a[part]["state_dict"].items():
            assert torch.equal(value, b[part]["state_dict"][key]), (part, key)
    assert a["eval"] == b["eval"]
    with pytest.raises(RFIError, match="--resume"):
        train_segmenter(cfg)


def test_bad_inputs_each_give_one_line(lps_encoder, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(list(args)) == 2
        return capsys.readouterr().err.strip()

    voc = write_dummy_voc(tmp_path / "voc")
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()

    def train_error(*overrides: str) -> str:
        return error(
            "segment",
            "train",
            *TINY,
            f"train.encoder.checkpoint={lps_encoder}",
            *overrides,
            "--out",
            str(tmp_path / "run"),
        )

    assert train_error("train.data.source=voc").startswith(
        "rfi: error: train.data.source=voc needs train.data.root (the VOC folder) (in "
    )
    msg = train_error(
        "train.data.source=voc", f"train.data.root={voc}", "train.data.num_classes=4", "train.data.size=16"
    )
    assert msg.startswith("rfi: error: ") and msg.endswith(
        f"val.txt is missing: a VOC tree lists its val images there (one id per line; data.root={voc})"
    )
    assert "train.data.num_classes=4: the scenes have 6 classes" in train_error("train.data.num_classes=4")
    assert "train.decoder.residual must be false" in train_error("train.decoder.residual=true")
    assert "train.optim.lr' in the command-line overrides must be > 0" in train_error("train.optim.lr=0")
    assert "segmenter model not found" in error(
        "segment", "apply", str(tmp_path), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none.pt")
    )
    assert "is not an RFI segmenter file" in error(
        "segment", "apply", str(tmp_path), "--out", str(tmp_path / "o"), "--model", str(lps_encoder)
    )


def test_a_fine_tuned_lps_encoder_keeps_its_final_gumbel_temperature(lps_encoder, tmp_path):
    """A trained LPS encoder ends at TAU_END; fine-tuning it at the fresh LPD's 1.0 would draw far softer phase
    mixtures than the argmax phases the segmenter is evaluated with."""
    from encoders.core.runtime import setup_distributed
    from encoders.nets.downsample import LPD, TAU_END

    def trainer(finetune: bool) -> SegmenterTrainer:
        given = [*TINY, f"train.encoder.checkpoint={lps_encoder}", f"train.finetune={str(finetune).lower()}"]
        return SegmenterTrainer(load_config(SegmentConfig, None, given).train, *setup_distributed("cpu"))

    taus = {m.tau for m in trainer(True).segmenter.encoder.modules() if isinstance(m, LPD)}
    assert taus == {TAU_END}
    assert not trainer(False).segmenter.encoder.training  # a frozen encoder stays in eval mode: argmax phases
