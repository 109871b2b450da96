"""``rfi ssl`` (apps/ssl/): SimCLR and MoCo v2, style augmentation in the views, resume, probes, bad input."""

from __future__ import annotations

import json
import typing

import pytest
import torch
import torch.nn.functional as F

from apps.cli import main
from apps.ssl import MoCo, SSLConfig, linear_probe, run_ssl
from apps.ssl.config import ProbeTask, ViewConfig
from apps.ssl.methods import nt_xent
from apps.ssl.probes import PROBE_TASKS, colour_statistics, fit_probe, grey_equalised, probe_data
from apps.ssl.train import SSLTrainer, train_ssl
from apps.ssl.views import Views, build_style
from encoders import create_encoder
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


CONFIG = "configs/apps/ssl.yaml"
TINY = [
    "data.crops=32",
    "data.crop_size=20",
    "data.view_size=16",
    "model.width=0.125",
    "batch_size=16",
    "steps=2",
    "probe.train_crops=48",
    "probe.val_crops=32",
    "moco.queue=32",
    "device=cpu",
    "log_every=1",
]


@pytest.fixture(scope="module")
def ae_file(tmp_path_factory):
    ae = RobustAutoencoder(tiny_net(), Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8))
    return ae.save(tmp_path_factory.mktemp("model") / "ae.pt")


def tiny(*extra: str) -> SSLConfig:
    return load_config(SSLConfig, CONFIG, [*TINY, *extra])


def tiny_moco(queue: int = 6, dim: int = 2) -> MoCo:
    return MoCo(tiny_net(), proj_dim=dim, queue_size=queue, momentum=0.9).train()


# ----------------------------------------------------------------------------- losses and MoCo mechanics
def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert nt_xent(z, z + 0.01 * torch.randn_like(z)) < nt_xent(z, z.roll(1, dims=0))


def test_moco_queue_pointer_and_wrap_around():
    model = tiny_moco(queue=6)
    keys = torch.arange(1, 13, dtype=torch.float32).view(6, 2)  # keys 1..6, two numbers each
    model.enqueue(keys[:2])
    assert int(model.queue_ptr) == 2 and torch.equal(model.queue[:2], keys[:2])
    model.enqueue(keys[2:4])
    model.enqueue(keys[4:6])
    assert int(model.queue_ptr) == 0 and torch.equal(model.queue, keys)  # full, pointer wrapped to the start
    model.enqueue(-keys[:2])
    assert int(model.queue_ptr) == 2
    assert torch.equal(model.queue[:2], -keys[:2]) and torch.equal(model.queue[2:], keys[2:])
    model.enqueue(10 * keys[:2])
    model.enqueue(100 * keys[:3])  # 3 keys from slot 4: slots 4, 5, then 0 (wrap-around)
    assert int(model.queue_ptr) == 1
    assert torch.equal(model.queue[4:], 100 * keys[:2]) and torch.equal(model.queue[0], 100 * keys[2])
    assert torch.equal(model.queue[2:4], 10 * keys[:2]) and torch.equal(model.queue[1], -keys[1])


def test_moco_momentum_update_is_an_ema_of_the_query_encoder():
    model = tiny_moco()
    key_before = [p.clone() for p in model.key_parameters()]
    with torch.no_grad():
        for p in model.query_parameters():
            p.add_(1.0)
    model.momentum_update()
    for k0, k, q in zip(key_before, model.key_parameters(), model.query_parameters()):
        torch.testing.assert_close(k, 0.9 * k0 + 0.1 * q)
        assert not k.requires_grad
    # A training step changes the key encoder only through that update: no gradient reaches it.
    opt = torch.optim.SGD(model.parameters_to_train(), lr=0.1)
    key_before = [p.clone() for p in model.key_parameters()]
    query_before = [p.clone() for p in model.query_parameters()]
    x1, x2 = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model.loss(x1, x2, torch.Generator().manual_seed(0)).backward()
    opt.step()
    assert all(p.grad is None for p in model.key_parameters())
    for k0, q0, k in zip(key_before, query_before, model.key_parameters()):
        torch.testing.assert_close(k, 0.9 * k0 + 0.1 * q0)


def test_moco_contrast_is_infonce_against_the_queue_before_this_step():
    model = tiny_moco(queue=6, dim=4)
    q = F.normalize(torch.randn(3, 4), dim=1)
    k = F.normalize(torch.randn(3, 4), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue.t()], 1) / model.temperature
    torch.testing.assert_close(model.contrast(q, k), F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)))
    queue_before = model.queue.clone()
    x1, x2 = torch.rand(2, 2, 3, 16, 16)
    model.loss(x1, x2, torch.Generator().manual_seed(0))
    assert int(model.queue_ptr) == 2 and torch.equal(model.queue[2:], queue_before[2:])
    torch.testing.assert_close(model.queue[:2].norm(dim=1), torch.ones(2))  # unit keys went in


# ----------------------------------------------------------------------------- views and probes
def test_views_are_a_pure_function_of_the_generator():
    views = Views(ViewConfig(), size=16)
    x = torch.rand(6, 3, 24, 24)
    a = views.colour(views.geometry(x, torch.Generator().manual_seed(3)), torch.Generator().manual_seed(4))
    b = views.colour(views.geometry(x, torch.Generator().manual_seed(3)), torch.Generator().manual_seed(4))
    c = views.colour(views.geometry(x, torch.Generator().manual_seed(5)), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 3, 16, 16) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_grey_tasks_defeat_colour_statistics():
    x, _ = probe_data("texture", "train", 16, 16)
    stats = colour_statistics(x)
    torch.testing.assert_close(stats, stats[:1].expand_as(stats))  # every crop: the same colour statistics
    assert torch.equal(grey_equalised(x), x)  # already equalised: a fixed point
    cfg = tiny("probe.train_crops=64", "probe.val_crops=64")
    acc = linear_probe(None, cfg)
    assert acc["photo_grey"] <= 0.2 and acc["texture"] <= 0.2  # chance (1/8): colour statistics cannot solve them
    assert acc["photo"] > 0.3  # the colour task is partly solved by colour statistics


# ----------------------------------------------------------------------------- training runs
@pytest.mark.parametrize(
    "method,position", [("simclr", "after_crop"), ("mocov2", "before_crop"), ("mocov2", "after_jitter")]
)
def test_tiny_runs_with_style(ae_file, method, position, tmp_path):
    """``style.position`` decides what StyleAugment restyles: the source crops (``before_crop``: crop_size
    20), the cropped views (16) before colour jitter and grayscale, or after them (``after_jitter``)."""
    cfg = tiny(
        f"method={method}",
        "style.enabled=true",
        f"style.model={ae_file}",
        "style.p=1",
        f"style.position={position}",
        "views.gray_p=1",  # every view ends grey: visible before the style
        f"out={tmp_path}",
    )
    style = build_style(cfg.style, torch.device("cpu"))
    seen = []
    style.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    result = run_ssl(cfg, style=style)
    assert len(seen) == 2 * 2  # two views per step, two steps
    side = cfg.data.crop_size if position == "before_crop" else cfg.data.view_size
    assert all(x.shape == (cfg.batch_size, 3, side, side) for x in seen)
    grey = [torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]) for x in seen]
    assert grey == [position == "after_jitter"] * len(seen)
    assert result["steps"] == 2 and result["step_ms"] > 0 and result["style_ms"] > 0
    assert set(result["probe"]) == {"photo", "photo_grey", "texture", "unseen"}
    val_crops = 32  # probe.val_crops in TINY: each accuracy counts correct crops out of these
    assert all(a * val_crops == round(a * val_crops) for a in result["probe"].values()), result["probe"]


def test_fit_probe_known_values():
    """The probe's accuracy on constructed features: separable -> 1; uninformative -> the train majority class."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(10)
    separable = F.one_hot(labels, 4).float() + 0.01 * torch.randn(40, 4, generator=g)
    assert fit_probe((separable, labels), (separable, labels)) == 1.0
    # Constant features: logistic regression can only learn the class priors, so it predicts the train
    # majority class (1) for every validation crop; a quarter of the (balanced) validation crops are 1s.
    train_labels = torch.tensor([0, 1, 1, 1, 2, 3])
    assert fit_probe((torch.zeros(6, 3), train_labels), (torch.zeros(40, 3), labels)) == 0.25


def test_background_stylisation_trains_the_same_weights(ae_file, tmp_path):
    style = ["method=mocov2", "style.enabled=true", f"style.model={ae_file}", "style.p=1", "steps=3"]
    sync = train_ssl(tiny(*style, "style.background=false", f"out={tmp_path / 'sync'}"))
    bg = train_ssl(tiny(*style, "style.background=true", f"out={tmp_path / 'bg'}"))
    assert bg.metrics["background"]
    for (name, a), b in zip(sync.model.state_dict().items(), bg.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_is_bit_identical_and_the_backbone_is_an_encoder_checkpoint(tmp_path, monkeypatch):
    cfg = tiny("method=mocov2", "steps=4", f"out={tmp_path / 'straight'}")
    straight = train_ssl(cfg).model
    step = SSLTrainer.train_step

    def dies_in_step_3(self, v1, v2):  # killed after the checkpoint of step 2 (the end of epoch 1)
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self, v1, v2)

    monkeypatch.setattr(SSLTrainer, "train_step", dies_in_step_3)
    cut = tiny("method=mocov2", "steps=4", f"out={tmp_path / 'cut'}")
    with pytest.raises(KeyboardInterrupt):
        train_ssl(cut)
    monkeypatch.setattr(SSLTrainer, "train_step", step)
    with pytest.raises(RFIError, match="--resume"):
        train_ssl(cut)
    result = train_ssl(cut, resume=True)
    resumed = result.model
    assert result.metrics["steps"] == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    enc = create_encoder(checkpoint=str(tmp_path / "cut" / "checkpoint.pt"))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, resumed.backbone.state_dict()[k]), k
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    straight_lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 4] and lines[-1]["summary"]
    assert [r["loss"] for r in lines[:4]] == [r["loss"] for r in straight_lines[:4]]
    with pytest.raises(RFIError, match="batch_size"):
        train_ssl(
            tiny("method=mocov2", "steps=4", "batch_size=8", "moco.queue=32", f"out={tmp_path / 'cut'}"), resume=True
        )


def test_rfi_ssl_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["ssl", "--config", CONFIG, *TINY, "method=simclr", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "checkpoint.pt") in printed and "linear probe texture" in printed
    for name in ("checkpoint.pt", "metrics.jsonl", "config.yaml", "result.json"):
        assert (out / name).is_file(), name
    assert not (out / ".lock").exists()
    # resuming the finished run: no step runs, no timing is invented, and result.json stays valid JSON
    assert main(["ssl", "--config", CONFIG, *TINY, "method=simclr", "--out", str(out), "--resume"]) == 0
    assert "no step ran (the run was already finished)" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["step_ms"] is None and result["loss_first"] is None and result["loss_last"] is None


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "override,key",
    [
        ("method=byol", "method"),
        ("moco.queue=40", "moco.queue"),  # not a multiple of batch_size=16
        ("style.p=1.5", "style.p"),
        ("style.alpha=[0.2,1.3]", "style.alpha"),
        ("style.beta=[0.5,0.1]", "style.beta"),
        ("style.position=middle", "style.position"),
        ("probe.tasks=[photo,cifar]", "probe.tasks"),
        ("moco.momentum=1.5", "moco.momentum"),
        ("moco.bn_splits=3", "moco.bn_splits"),  # does not divide batch_size=16
        ("views.hue=0.7", "views.hue"),
        ("views.crop_scale=[0.8,0.2]", "views.crop_scale"),
        ("temperature=0", "temperature"),
        ("data.view_size=24", "data.view_size"),  # larger than data.crop_size=20
    ],
)
def test_bad_input_names_the_key(override, key, capsys):
    code = main(["ssl", "--config", CONFIG, *TINY, "method=mocov2", override, "--out", "/nonexistent/never"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and key in err, err


def test_empty_style_folder_names_the_key(tmp_path):
    (tmp_path / "styles").mkdir()
    with pytest.raises(RFIError, match="style.styles.*no image"):
        tiny("style.enabled=true", f"style.styles={tmp_path / 'styles'}")


def test_probe_tasks_are_the_config_choices():
    assert list(PROBE_TASKS) == list(typing.get_args(ProbeTask))


# ----------------------------------------------------------------------------- the GPU recipe, at tiny sizes
def image_folder(root, classes=("a", "b"), per_class=(8, 4)):
    """An ImageNet-style folder of random images: train/<class>/*.png and val/<class>/*.png."""
    from encoders.core.imageio import write_image

    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            for i in range(n):
                img = torch.rand(3, 36 + 4 * i, 44, generator=g) * 0.5 + 0.5 * c  # class b is brighter
                write_image(img.clamp(0, 1), root / split / name / f"{i}.png")
    return root


def test_sassl_imagenet_recipe_runs_two_steps_on_cpu(ae_file, tmp_path):
    root = image_folder(tmp_path / "imagenet")
    cfg = load_config(
        SSLConfig,
        "configs/apps/sassl_imagenet.yaml",
        [
            f"data.root={root}",
            "data.crop_size=40",
            "data.view_size=32",
            "data.num_workers=0",
            "model.width=0.125",
            "model.hidden_dim=32",
            "model.proj_dim=16",
            "batch_size=8",
            "moco.queue=16",
            "steps=2",
            "device=cpu",
            "precision=fp32",
            f"style.model={ae_file}",
            "probe.train_crops=16",
            "probe.val_crops=8",
            f"out={tmp_path / 'run'}",
        ],
    )
    assert (cfg.method, cfg.model.arch, cfg.moco.queue, cfg.style.enabled) == ("mocov2", "resnet50", 16, True)
    assert cfg.style.alpha == cfg.style.beta == [0.1, 0.3] and cfg.style.background
    result = run_ssl(cfg)
    assert result["steps"] == 2 and result["loss_last"] > 0 and result["style_ms"] > 0
    assert set(result["probe"]) == {"folder"} and 0 <= result["probe"]["folder"] <= 1


def test_snapshots_keep_the_backbone_at_given_steps(tmp_path):
    from apps.ssl.train import snapshot_path
    from encoders.weights.checkpoints import load_encoder

    cfg = tiny("method=simclr", "steps=3", "snapshot_steps=[1,3]", "probe.enabled=false", f"out={tmp_path}")
    trained = train_ssl(cfg)
    assert [p.name for p in sorted(tmp_path.glob("checkpoint_step*.pt"))] == [
        "checkpoint_step1.pt",
        "checkpoint_step3.pt",
    ]
    last = load_encoder(snapshot_path(tmp_path, 3))
    assert all(
        torch.equal(a, b) for a, b in zip(last.state_dict().values(), trained.model.backbone.state_dict().values())
    )


def test_a_missing_data_root_and_a_folder_probe_without_one_name_the_key(tmp_path):
    with pytest.raises(RFIError, match="data.root"):
        tiny(f"data.root={tmp_path / 'nothing'}")
    with pytest.raises(RFIError, match="probe.tasks.*folder"):
        tiny("probe.tasks=[folder]")
