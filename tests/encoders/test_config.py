from dataclasses import dataclass, field
from pathlib import Path

import pytest

from encoders import RFIError
from encoders.core.config import load_config


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


# ----------------------------------------------------------------------------- shipped defaults (configs/)
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402

import encoders.core.config as config_module  # noqa: E402
from encoders.core.config import (config_path, config_to_dict, merge, parse_overrides, read_yaml,  # noqa: E402
                             shipped_config, shipped_defaults, yaml_dataclass)

CONFIG_MODULES = ["encoders.data.embedded", "encoders.robust.train", "inversion.train", "apps.anomaly.detector", "apps.anomaly.data",
                  "apps.anomaly.memory", "apps.style.augment", "apps.denoise", "apps.quickstart", "apps.ssl.train",
                  "apps.style.pyramid"]
NO_DEFAULTS = {"apps.quickstart.RunSection"}  # a run's two config paths: required, no default to write


def _config_classes():
    for name in CONFIG_MODULES:
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, dataclasses.is_dataclass):
            if cls.__module__ == name and cls_name.endswith(("Config", "Section")):
                yield f"{name}.{cls_name}", cls


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_every_config_default_is_its_shipped_yaml_value():
    """Each field's default equals its key in the shipped YAML; no field lacks a key; no class writes its own."""
    checked = 0
    for qualname, cls in _config_classes():
        if qualname in NO_DEFAULTS:
            assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                       for f in dataclasses.fields(cls)), qualname
            continue
        assert cls in config_module._SHIPPED_DEFAULTS, f"{qualname} is not a yaml_dataclass: its defaults are in code"
        yaml_values = shipped_defaults(cls)
        assert set(yaml_values) == {f.name for f in dataclasses.fields(cls)}, qualname
        built = load_config(cls)  # the YAML's values, typed
        for f in dataclasses.fields(cls):
            assert _default(f) == getattr(built, f.name), f"{qualname}.{f.name}"
            checked += 1
    assert checked > 150


def test_app_sections_name_only_real_train_decoder_keys():
    """The ``train:``/``decoder:`` sections of the app YAMLs override train-decoder keys (typos fail)."""
    from apps.anomaly.detector import AnomalyConfig
    from apps.denoise import TrainDenoiserConfig
    from apps.style.pyramid import TrainDecodersConfig
    assert AnomalyConfig().decoder.encoder.layer == "layer2" and AnomalyConfig().decoder.data.repeat == 8
    assert TrainDenoiserConfig().train.decoder.skips == ["input", "layer1", "layer2"]
    assert TrainDecodersConfig().train.steps == read_yaml("configs/apps/style.yaml")["train"]["steps"]


def test_a_user_file_is_filled_from_the_shipped_yaml(tmp_path):
    """A partial section keeps the shipped keys; a free-form mapping (per_layer) is replaced whole."""
    from apps.style.pyramid import TrainDecodersConfig, layer_config
    from inversion.train import TrainDecoderConfig
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 5\nper_layer:\n  layer3: {steps: 7}\n")
    cfg = load_config(TrainDecodersConfig, path, ["train.loss.feature=0.5", "per_layer.layer2.decoder.blocks=2"])
    shipped = read_yaml("configs/apps/style.yaml")
    assert cfg.train.steps == 5 and cfg.train.loss.feature == 0.5 and cfg.layers == shipped["layers"]
    # the style file's value, not train-decoder's:
    assert cfg.train.decoder.channels == shipped["train"]["decoder"]["channels"] != TrainDecoderConfig().decoder.channels
    assert cfg.per_layer == {"layer3": {"steps": 7}, "layer2": {"decoder": {"blocks": 2}}}
    layer1, layer2, layer3 = (layer_config(cfg, k) for k in ("layer1", "layer2", "layer3"))
    assert (layer1.decoder.channels, layer1.steps, layer1.encoder.layer) == (128, 5, "layer1")
    assert (layer2.decoder.blocks, layer2.decoder.channels, layer2.steps) == (2, 128, 5)
    assert (layer3.steps, layer3.loss.feature, layer3.out.endswith("layer3")) == (7, 0.5, True)
    assert load_config(TrainDecodersConfig, None, ["per_layer={}"]).per_layer == {}
    assert load_config(TrainDecodersConfig, None, ["per_layer.layer1.steps=9"]).per_layer["layer1"] == {
        **shipped["per_layer"]["layer1"], "steps": 9}  # one key set, the shipped ones kept
    with pytest.raises(RFIError, match=r"'train.steps' in the command-line overrides must be int"):
        load_config(TrainDecodersConfig, path, ["train.steps=x"])
    with pytest.raises(RFIError, match=r"'train.stepz' in .*mine.yaml"):
        path.write_text("train:\n  stepz: 5\n")
        load_config(TrainDecodersConfig, path)


def test_merge_and_parse_overrides():
    base = {"steps": 1, "optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "per_layer": {"layer1": {"decoder.channels": 8}}}
    merged = merge(base, {"optim.lr": 0.5}, {"optim": {"betas": [0.5]}, "per_layer": {"layer2": {"steps": 3}}})
    assert merged == {"steps": 1, "optim": {"lr": 0.5, "betas": [0.5]},
                      "per_layer": {"layer1": {"decoder.channels": 8}, "layer2": {"steps": 3}}}
    assert base["optim"] == {"lr": 0.1, "betas": [0.9, 0.99]}  # inputs untouched
    merged["optim"]["betas"].append(1)
    assert merge(base)["optim"]["betas"] == [0.9, 0.99]  # a copy, not a reference
    parsed = parse_overrides(["a.b=1", "a.c=[x, y]", "d=", "a.e=yes", "f={}"])
    assert parsed == {"a.b": 1, "a.c": ["x", "y"], "d": "", "a.e": "yes", "f": {}}
    with pytest.raises(RFIError, match="override 'oops' must look like key=value"):
        parse_overrides(["oops"])
    with pytest.raises(RFIError, match="'a' is not a section"):
        merge({"a": 1}, {"a.b": 2})


def test_configs_paths_work_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_path("configs/apps/style.yaml") == shipped_config("apps/style.yaml")
    assert read_yaml("configs/encoder/resnet18_robust.yaml")["adv"]["enabled"] is True
    with pytest.raises(RFIError, match="config file not found: configs/apps/nope.yaml"):
        read_yaml("configs/apps/nope.yaml")
    local = tmp_path / "configs" / "apps" / "style.yaml"  # a file of that name in the working directory wins
    local.parent.mkdir(parents=True)
    local.write_text("layers: [layer1]\n")
    assert config_path("configs/apps/style.yaml") == Path("configs/apps/style.yaml")
    from apps.style.pyramid import TrainDecodersConfig
    assert load_config(TrainDecodersConfig, "configs/apps/style.yaml").layers == ["layer1"]


def test_yaml_dataclass_refuses_a_missing_key_an_extra_key_and_a_code_default(tmp_path, monkeypatch):
    (tmp_path / "job.yaml").write_text("epochs: 2\nlr: 0.5\nadv: {eps: 0.25}\n")
    monkeypatch.setattr(config_module, "shipped_config", lambda name: tmp_path / name)

    @yaml_dataclass("job.yaml", "adv")
    class Adv:
        eps: float = config_module.bounded(low=0)

    @yaml_dataclass("job.yaml")
    class Job:
        epochs: int
        lr: float
        adv: Adv

    assert Job() == Job(epochs=2, lr=0.5, adv=Adv(eps=0.25)) and isinstance(Job().lr, float)
    assert load_config(Job, None, ["adv.eps=1"]).adv.eps == 1.0
    with pytest.raises(RFIError, match="must be >= 0"):
        load_config(Job, None, ["adv.eps=-1"])
    with pytest.raises(RFIError, match="job.yaml has no default for config key 'momentum'"):
        @yaml_dataclass("job.yaml")
        class Missing:
            epochs: int
            lr: float
            adv: Adv
            momentum: float
    with pytest.raises(RFIError, match="unknown config key 'adv' in configs/job.yaml"):
        @yaml_dataclass("job.yaml")
        class Extra:
            epochs: int
            lr: float
    with pytest.raises(RFIError, match=r"Twice.epochs has a default in code: write it in configs/job.yaml"):
        @yaml_dataclass("job.yaml")
        class Twice:
            epochs: int = 3
            lr: float
            adv: Adv
    assert config_to_dict(Job())["adv"] == {"eps": 0.25}
