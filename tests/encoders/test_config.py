from dataclasses import dataclass, field

import pytest

from encoders import RFIError
from encoders.config import load_config


@dataclass
class Inner:
    eps: float = 0.5
    norm: str = "l2"


@dataclass
class Job:
    epochs: int = 1
    layers: list[str] = field(default_factory=lambda: ["layer3"])
    adv: Inner = field(default_factory=Inner)
    out: str | None = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("epochs: 4\nadv:\n  eps: 1\n")
    cfg = load_config(Job, path, ["adv.norm=linf", "layers=[layer1, layer2]", "out=runs/x"])
    assert cfg == Job(epochs=4, layers=["layer1", "layer2"], adv=Inner(eps=1.0, norm="linf"), out="runs/x")
    assert isinstance(cfg.adv.eps, float)


def test_exception_misspelt_key_is_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("adv:\n  epsilon: 1\n")
    with pytest.raises(RFIError, match=r"unknown config key 'adv.epsilon' in .*job.yaml.*eps, norm"):
        load_config(Job, path)
    with pytest.raises(RFIError, match="'epoch'"):
        load_config(Job, None, ["epoch=3"])


def test_exception_wrong_type_and_bad_yaml(tmp_path):
    with pytest.raises(RFIError, match="'epochs'.*must be int"):
        load_config(Job, None, ["epochs=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(RFIError, match="not valid YAML"):
        load_config(Job, bad)
    with pytest.raises(RFIError, match="not found"):
        load_config(Job, tmp_path / "missing.yaml")
