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
from encoders.core.config import (  # noqa: E402
    config_path,
    config_to_dict,
    merge,
    parse_overrides,
    read_yaml,
    shipped_config,
    shipped_defaults,
    yaml_dataclass,
)

NO_DEFAULTS = {"apps.quickstart.RunSection"}  # a run's two config paths: required, no default to write


def _modules():
    """Every module of the three packages (so a new config class is checked without being listed here)."""
    import pkgutil

    for package in ("encoders", "inversion", "apps"):
        root = importlib.import_module(package)
        yield package
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            yield info.name


def _config_classes():
    for name in _modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, dataclasses.is_dataclass):
            if cls.__module__ == name and cls_name.endswith(("Config", "Section", "Flags")):
                yield f"{name}.{cls_name}", cls


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_every_config_default_is_its_shipped_yaml_value():
    """Each field's default equals its key in the shipped YAML; no field lacks a key; no class writes its own."""
    checked = 0
    for qualname, cls in _config_classes():
        if qualname in NO_DEFAULTS:
            assert all(
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                for f in dataclasses.fields(cls)
            ), qualname
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
    from apps.anomaly.config import AnomalyConfig
    from apps.denoise import DenoiseConfig
    from apps.style.config import StyleConfig

    assert AnomalyConfig().train.encoder.layer == "layer2" and AnomalyConfig().train.data.repeat == 8
    assert DenoiseConfig().train.decoder.skips == ["input", "layer1", "layer2"]
    assert StyleConfig().train.steps == read_yaml("configs/apps/style.yaml")["train"]["steps"]


def test_a_user_file_is_filled_from_the_shipped_yaml(tmp_path):
    """A partial section keeps the shipped keys; a free-form mapping (per_layer) is replaced whole."""
    from apps.style.config import StyleConfig
    from apps.style.pyramid import layer_config
    from inversion.train import TrainDecoderConfig

    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 5\nper_layer:\n  layer3: {steps: 7}\n")
    cfg = load_config(StyleConfig, path, ["train.loss.feature=0.5", "per_layer.layer2.decoder.blocks=2"])
    shipped = read_yaml("configs/apps/style.yaml")
    assert cfg.train.steps == 5 and cfg.train.loss.feature == 0.5 and cfg.layers == shipped["layers"]
    # the style file's value, not train-decoder's:
    assert (
        cfg.train.decoder.channels == shipped["train"]["decoder"]["channels"] != TrainDecoderConfig().decoder.channels
    )
    assert cfg.per_layer == {"layer3": {"steps": 7}, "layer2": {"decoder": {"blocks": 2}}}
    layer1, layer2, layer3 = (layer_config(cfg, k) for k in ("layer1", "layer2", "layer3"))
    assert (layer1.decoder.channels, layer1.steps, layer1.encoder.layer) == (128, 5, "layer1")
    assert (layer2.decoder.blocks, layer2.decoder.channels, layer2.steps) == (2, 128, 5)
    assert (layer3.steps, layer3.loss.feature, layer3.out.endswith("layer3")) == (7, 0.5, True)
    assert load_config(StyleConfig, None, ["per_layer={}"]).per_layer == {}
    assert load_config(StyleConfig, None, ["per_layer.layer1.steps=9"]).per_layer["layer1"] == {
        **shipped["per_layer"]["layer1"],
        "steps": 9,
    }  # one key set, the shipped ones kept
    with pytest.raises(RFIError, match=r"'train.steps' in the command-line overrides must be int"):
        load_config(StyleConfig, path, ["train.steps=x"])
    with pytest.raises(RFIError, match=r"'train.stepz' in .*mine.yaml"):
        path.write_text("train:\n  stepz: 5\n")
        load_config(StyleConfig, path)


def test_merge_and_parse_overrides():
    base = {"steps": 1, "optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "per_layer": {"layer1": {"decoder.channels": 8}}}
    merged = merge(base, {"optim.lr": 0.5}, {"optim": {"betas": [0.5]}, "per_layer": {"layer2": {"steps": 3}}})
    assert merged == {
        "steps": 1,
        "optim": {"lr": 0.5, "betas": [0.5]},
        "per_layer": {"layer1": {"decoder.channels": 8}, "layer2": {"steps": 3}},
    }
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
    from apps.style.pyramid import StyleConfig

    assert load_config(StyleConfig, "configs/apps/style.yaml").layers == ["layer1"]


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


# ----------------------------------------------------------------------------- the rules a config class declares
def test_literal_bounded_and_check_are_checked_when_loaded_and_in_code(tmp_path, monkeypatch):
    """Choices are a Literal, ranges bounded(low=, high=), rules across keys check(): load_config and
    check_config apply all three, and name the key (or the flag) that breaks them."""
    from typing import Literal

    from encoders.core.config import FLAGS, bounded, check_config

    (tmp_path / "job.yaml").write_text("mode: fast\nsteps: 10\nwarmup: 2\ntile: null\n")
    monkeypatch.setattr(config_module, "shipped_config", lambda name: tmp_path / name)

    @yaml_dataclass("job.yaml")
    class Rules:
        mode: Literal["fast", "slow"]
        steps: int = bounded(low=1)
        warmup: int = bounded(low=0)
        tile: int | None = bounded(low=1, high=4096)

        def check(self) -> None:
            if self.warmup > self.steps:
                raise RFIError(f"warmup ({self.warmup}) must be <= steps ({self.steps})")

    assert load_config(Rules, None, ["tile=256"]).tile == 256
    with pytest.raises(RFIError, match=r"config key 'mode' in the command-line overrides: 'quick' is not one of"):
        load_config(Rules, None, ["mode=quick"])
    with pytest.raises(RFIError, match=r"config key 'tile' .* must be in \[1, 4096\], got 0$"):
        load_config(Rules, None, ["tile=0"])
    with pytest.raises(RFIError, match=r"warmup \(20\) must be <= steps \(10\) \(in the command-line overrides\)"):
        load_config(Rules, None, ["warmup=20"])
    assert load_config(Rules, None, ["warmup=20", "steps=30"]).warmup == 20  # checked once every key is set
    bad = tmp_path / "bad.yaml"
    bad.write_text("warmup: 20\n")
    with pytest.raises(RFIError, match=rf"must be <= steps .*in {bad}"):
        load_config(Rules, bad)
    assert load_config(Rules, bad, ["steps=40"]).steps == 40  # the override fixes what the file breaks
    with pytest.raises(RFIError, match="^--steps must be >= 1, got 0$"):
        check_config(Rules(steps=0), FLAGS)
    with pytest.raises(RFIError, match="must be <= steps"):
        check_config(Rules(warmup=11))
    assert check_config(Rules(steps=3)) == Rules(steps=3)


@pytest.mark.parametrize(
    "value, low, high, expected",
    [
        (25, 0, None, (25.0, 25.0)),
        ([5, 50], 0, None, (5.0, 50.0)),
        ((0.2, 0.8), 0, 1, (0.2, 0.8)),
        ([0.5], 0, 1, (0.5, 0.5)),
    ],
)
def test_value_range_accepts_one_number_or_a_pair(value, low, high, expected):
    from encoders.core.config import value_range

    assert value_range(value, "k", low, high) == expected


@pytest.mark.parametrize("value", [[-1], [30, 10], [1, 2, 3], ["a"], [True, 2], 2, [0.5, 1.5]])
def test_value_range_refuses_in_one_line_naming_the_key(value):
    from encoders.core.config import value_range

    rule = r"^style\.alpha must be one number or a range \[lo, hi\] with 0 <= lo <= hi <= 1,"
    with pytest.raises(RFIError, match=rule):
        value_range(value, "style.alpha", 0, 1)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("eval:\n  num: 4  # r\xe9glage\n".encode("latin-1"))
    with pytest.raises(RFIError, match=r"latin1\.yaml is not UTF-8 text \(byte 0xe9 at position 19\): save it as"):
        read_yaml(path)


def test_a_config_named_inside_a_users_config_falls_back_to_the_shipped_one(tmp_path):
    from encoders.core.config import referenced_config, shipped_config

    user = tmp_path / "my_quickstart.yaml"
    assert referenced_config(user, "encoder/resnet18_robust.yaml") == shipped_config("encoder/resnet18_robust.yaml")
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "resnet18_robust.yaml").write_text("epochs: 1\n")
    assert referenced_config(user, "encoder/resnet18_robust.yaml") == tmp_path / "encoder" / "resnet18_robust.yaml"
    assert referenced_config(user, "encoder/mine.yaml") == tmp_path / "encoder" / "mine.yaml"  # named as not found
