import warnings

import pytest
import torch
import torchvision

from encoders.core.errors import RFIError
from inversion import perceptual
from inversion.perceptual import (
    backbone_cache_path,
    backbone_url,
    load_lpips,
    lpips_status,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/inversion/conftest.py


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


@pytest.fixture(scope="module")
def alexnet_state():
    torch.manual_seed(123)
    return torchvision.models.alexnet().state_dict()


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory, alexnet_state):
    """A real torchvision AlexNet state-dict file (random weights), written once."""
    path = tmp_path_factory.mktemp("backbone") / "alexnet-owt-7be5be79.pth"
    torch.save(alexnet_state, path)
    return path


def test_missing_backbone_says_what_to_fetch_and_where(empty_hub):
    ok, note = lpips_status("alex")
    assert not ok
    assert backbone_url("alex") in note and str(empty_hub / "checkpoints") in note and "--lpips-weights" in note
    with pytest.raises(RFIError, match="alexnet-owt-7be5be79.pth"):
        load_lpips("alex")
    with pytest.raises(RFIError, match="not found: .*nowhere.pth"):
        load_lpips("alex", weights=empty_hub / "nowhere.pth")


def test_backbone_file_is_loaded_and_used(empty_hub, alexnet_file, alexnet_state):
    path = alexnet_file
    assert lpips_status("alex", path)[0]
    model = load_lpips("alex", weights=path)
    assert torch.equal(model.net.slice1.get_submodule("0").weight, alexnet_state["features.0.weight"])
    assert torch.equal(model.net.slice5.get_submodule("10").weight, alexnet_state["features.10.weight"])
    # The calibrated linear layers from the lpips wheel are there too (not random).
    import lpips as lp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rand = lp.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    assert torch.equal(model.lin0.model[1].weight, rand.lin0.model[1].weight)
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model(x, y, normalize=True), rand(x, y, normalize=True))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_hub_cache_is_used_by_default(empty_hub, alexnet_file, alexnet_state):
    dst = backbone_cache_path("alex")
    assert dst.parent == empty_hub / "checkpoints" and dst.name == "alexnet-owt-7be5be79.pth"
    dst.parent.mkdir(parents=True)
    dst.symlink_to(alexnet_file)
    ok, note = lpips_status("alex")
    assert ok and str(dst) in note
    assert torch.equal(load_lpips().net.slice2.get_submodule("3").weight, alexnet_state["features.3.weight"])


def test_wrong_or_truncated_backbone_file_is_refused(tmp_path, alexnet_file):
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(RFIError, match="not torchvision's alex"):
        load_lpips("alex", weights=wrong)
    cut = tmp_path / "cut.pth"
    with open(alexnet_file, "rb") as f:
        cut.write_bytes(f.read(5000))
    with pytest.raises(RFIError, match="cut.pth"):
        load_lpips("alex", weights=cut)


def test_unknown_net_and_vgg_file_name():
    ok, note = lpips_status("resnet")
    assert not ok and "unknown LPIPS network" in note
    with pytest.raises(RFIError, match="unknown LPIPS network"):
        load_lpips("resnet")
    assert perceptual.backbone_cache_path("vgg").name == "vgg16-397923af.pth"
