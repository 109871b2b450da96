import json

import pytest

from apps.cli import main
from encoders import RFIError, create_encoder
from encoders.data.embedded import EmbeddedCrops
from encoders.robust.evaluate import evaluate_encoder


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
    code = main(["eval-encoder", "--checkpoint", str(trained_checkpoint), "--eps", "0.25", "1.0",
                 "--steps", "10", "--max-images", "64", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "clean acc" in printed and "PGD acc" in printed and "16px" in printed  # the training data's size
    results = json.loads(out.read_text())["results"]
    assert [r["eps"] for r in results] == [0.25, 1.0] and all(r["norm"] == "l2" for r in results)
    assert results[1]["pgd_acc"] <= results[0]["pgd_acc"]
    assert f"{100 * results[0]['pgd_acc']:.1f}%" in printed
