"""LPIPS (the ``lpips`` package) built without any download.

The ``lpips`` wheel ships its calibrated linear layers, but the backbone (torchvision's
ImageNet AlexNet or VGG-16) is normally downloaded on first use. Here the backbone is
built randomly initialised (``pnet_rand=True``, so nothing downloads) and its weights are
then loaded from a local torchvision state-dict file: the one passed as ``weights``, or
torchvision's own file in the torch hub cache (``torch.hub.get_dir()/checkpoints/``),
where ``torchvision.models.alexnet(weights="DEFAULT")`` would have put it. When neither
exists, :func:`load_lpips` raises :class:`~encoders.core.errors.RFIError` naming the URL to
fetch and where to put it, and :func:`lpips_status` says the same without raising.

Example:
    >>> ok, note = lpips_status("alex")   # (False, "LPIPS needs ...") on a fresh machine
    >>> if ok:
    ...     model = load_lpips("alex")
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from encoders.core.errors import RFIError
from encoders.core.serialization import load_checkpoint

# LPIPS backbone name -> torchvision weights enum (its URL gives the hub-cache file name).
_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights"}
NETS = tuple(_BACKBONES)


def _check_net(net: str) -> str:
    net = "vgg" if net == "vgg16" else net
    if net not in _BACKBONES:
        raise RFIError(f"unknown LPIPS network '{net}' (valid: {', '.join(NETS)})")
    return net


def backbone_url(net: str = "alex") -> str:
    """URL of torchvision's ImageNet weights for the LPIPS backbone ``net`` (``alex`` or ``vgg``)."""
    import torchvision.models as tvm

    return getattr(tvm, _BACKBONES[_check_net(net)]).IMAGENET1K_V1.url


def backbone_cache_path(net: str = "alex") -> Path:
    """Where torchvision caches the backbone file: ``torch.hub.get_dir()/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / backbone_url(net).rsplit("/", 1)[-1]


def _find_backbone(net: str, weights: str | os.PathLike | None) -> Path:
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise RFIError(f"LPIPS backbone weights not found: {path} (download {backbone_url(net)} and pass its path)")
        return path
    path = backbone_cache_path(net)
    if not path.is_file():
        raise RFIError(
            f"LPIPS ({net}) needs torchvision's ImageNet backbone weights, not found locally: "
            f"download {backbone_url(net)} to {path}, or point --lpips-weights "
            f"(lpips_weights= in configs) at a copy"
        )
    return path


def lpips_status(net: str = "alex", weights: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether LPIPS can be built here without a download, and a one-line note.

    Returns:
        ``(True, "LPIPS (alex) backbone: <path>")`` or ``(False, "<what to fetch, where to put it>")``.
    """
    try:
        path = _find_backbone(_check_net(net), weights)
    except RFIError as e:
        return False, str(e)
    return True, f"LPIPS ({_check_net(net)}) backbone: {path}"


def load_lpips(net: str = "alex", weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """Build ``lpips.LPIPS`` from local files only.

    Args:
        net: backbone, ``alex`` (default, as in the LPIPS paper) or ``vgg``.
        weights: a torchvision state-dict file of that backbone (e.g. ``alexnet-owt-7be5be79.pth``);
            default: the torch hub cache (see :func:`backbone_cache_path`).
        device: where to put the model.

    Returns:
        An ``lpips.LPIPS`` module in eval mode with frozen parameters. Call it as
        ``model(x, y, normalize=True)`` for images in [0, 1].

    Raises:
        RFIError: the backbone file is missing, unreadable or not the right network.
    """
    import lpips

    net = _check_net(net)
    path = _find_backbone(net, weights)
    state = load_checkpoint(path)  # weights_only=True; clear errors for truncated files
    state = state.get("state_dict", state)
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated ``pretrained=`` argument
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    # lpips splits torchvision's ``features`` into ``slice1..5`` keeping each module's index,
    # so ``sliceK.<i>.weight`` is torchvision's ``features.<i>.weight``.
    own = model.net.state_dict()
    mapped = {}
    for key in own:
        _, index, param = key.split(".")
        source = f"features.{index}.{param}"
        if source not in state or state[source].shape != own[key].shape:
            raise RFIError(
                f"{path} is not torchvision's {net} ImageNet state dict (missing or misshapen "
                f"'{source}'); download {backbone_url(net)}"
            )
        mapped[key] = state[source]
    model.net.load_state_dict(mapped, strict=True)
    return model.eval().requires_grad_(False).to(device)
