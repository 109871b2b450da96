"""The one place that makes the MadryLab ``robustness`` library (1.2.1.post2) usable here.

The project itself never needs the library (checkpoints are converted by
:mod:`encoders.weights.interop` without it); tests and reference attacks use it to cross-check
ours. Its last release (2020) needs three shims, all applied by :func:`import_robustness`:

1. ``robustness.imagenet_models`` imports ``torchvision.models.utils``, which torchvision
   removed: a stand-in module with ``load_state_dict_from_url = torch.hub.load_state_dict_from_url``
   is registered under that name (only when the real one is missing).
2. ``model_utils.make_and_restore_model`` ends with an unconditional ``model.cuda()``:
   on machines without CUDA, ``AttackerModel.cuda`` (the library's own class, nothing
   else) is patched to return the model unchanged. The library's function is called as is.
3. ``Attacker.forward`` calls ``orig_input.cuda()`` unconditionally: :func:`robustness_pgd`
   passes ``orig_input`` as a tensor whose ``.cuda()`` stays on its current device, so no
   global patch is needed.

Example:
    >>> rb = import_robustness()  # doctest: +SKIP
    >>> model = attacker_model(rb.imagenet_models.resnet18(num_classes=8))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from encoders.nets.models import IMAGENET_MEAN, IMAGENET_STD, Encoder


@functools.cache
def import_robustness() -> types.SimpleNamespace:
    """Import the library with the shims above.

    Returns:
        A namespace with the library's modules ``datasets``, ``attacker``, ``model_utils``,
        ``imagenet_models`` and ``helpers``.

    Raises:
        ImportError: the library is not installed (``pip install robustness==1.2.1.post2``).
    """
    try:
        importlib.import_module("torchvision.models.utils")
    except ModuleNotFoundError:
        stand_in = types.ModuleType("torchvision.models.utils")
        stand_in.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules["torchvision.models.utils"] = stand_in
    from robustness import attacker, datasets, imagenet_models, model_utils
    from robustness.tools import helpers

    if not torch.cuda.is_available():
        attacker.AttackerModel.cuda = lambda self, *args, **kwargs: self  # shim 2: nowhere to move it
    return types.SimpleNamespace(
        attacker=attacker, datasets=datasets, imagenet_models=imagenet_models, model_utils=model_utils, helpers=helpers
    )


class _StayOnDevice(Tensor):
    """A tensor whose ``.cuda()`` returns itself (as a plain tensor) on its current device (shim 3)."""

    def cuda(self, *args, **kwargs):  # noqa: D102
        return self.as_subclass(Tensor)


def imagenet_dataset(
    num_classes: int = 1000, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
):
    """The library's ``ImageNet`` dataset object (no files are read) with the given classes and normalisation."""
    rb = import_robustness()
    return rb.datasets.ImageNet("/nonexistent", num_classes=num_classes, mean=torch.tensor(mean), std=torch.tensor(std))


def attacker_model(classifier: nn.Module, dataset=None) -> nn.Module:
    """Wrap a classifier in the library's ``AttackerModel`` (its ``InputNormalize`` + ``Attacker``).

    Args:
        classifier: one of the library's architectures (``forward(x, with_latent=...)``), or
            any module (wrapped in the library's ``DummyModel``, as its ``add_custom_forward`` does).
        dataset: gives the normalisation; default: ImageNet mean/std.
    """
    rb = import_robustness()
    dataset = dataset or imagenet_dataset()
    if "with_latent" not in classifier.forward.__code__.co_varnames:
        classifier = rb.model_utils.DummyModel(classifier)
    return rb.attacker.AttackerModel(classifier, dataset)


def encoder_attacker_model(encoder: Encoder) -> nn.Module:
    """Our encoder's network inside the library's ``AttackerModel``, with the same normalisation.

    The weights are shared, so the library's attacker attacks exactly our model.
    """
    mean, std = encoder.normalizer.new_mean.flatten().tolist(), encoder.normalizer.new_std.flatten().tolist()
    return attacker_model(encoder.model, imagenet_dataset(encoder.num_classes, mean, std))


def robustness_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float,
    norm: str = "l2",
    random_start: bool = True,
    use_best: bool = False,
) -> Tensor:
    """The library's PGD (``AttackerModel(..., make_adv=True)``) on images in [0, 1].

    Args:
        model: an ``AttackerModel`` (see :func:`attacker_model`).
        norm: ``"l2"`` or ``"linf"`` (the library's constraints ``"2"`` and ``"inf"``).
        use_best: return the iterate with the highest loss (the library's default) instead of the last.

    Returns:
        The adversarial images, detached.
    """
    constraint = {"l2": "2", "linf": "inf"}[norm]
    _, x_adv = model(
        x,
        y,
        make_adv=True,
        constraint=constraint,
        eps=eps,
        step_size=step_size,
        iterations=steps,
        random_start=random_start,
        use_best=use_best,
        orig_input=x.detach().as_subclass(_StayOnDevice),
    )
    return x_adv.detach()
