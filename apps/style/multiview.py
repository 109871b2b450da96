"""N independently augmented views of each batch (:class:`MultiView`), as contrastive learning needs.

Any batch transform works (a :class:`~apps.style.augment.StyleAugment`, a torchvision v2
pipeline, kornia's ``AugmentationSequential``); it is the lightly-style multi-view wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from encoders.core.errors import RFIError


class MultiView(nn.Module):
    """N independently augmented views of each batch, for contrastive learning (lightly-style).

    Args:
        transforms: one batch transform used for every view, or one per view.
        views: number of views when a single transform is given (default 2).

    Shape:
        - Input: (B, 3, H, W).
        - Output: a list of ``views`` tensors (B, 3, H', W').

    Raises:
        RFIError: no view, or a list of transforms whose length is not ``views``.

    Example:
        >>> import torch
        >>> from torchvision.transforms import v2
        >>> two = MultiView(v2.RandomHorizontalFlip(), views=2)
        >>> [tuple(v.shape) for v in two(torch.rand(3, 3, 8, 8))]
        [(3, 3, 8, 8), (3, 3, 8, 8)]
    """

    def __init__(
        self, transforms: Callable[[Tensor], Tensor] | Sequence[Callable[[Tensor], Tensor]], views: int | None = None
    ):
        super().__init__()
        if callable(transforms):
            transforms = [transforms] * (2 if views is None else views)
        elif views is not None and views != len(transforms):
            raise RFIError(f"MultiView got {len(transforms)} transforms but views={views}")
        if len(transforms) < 1:
            raise RFIError("MultiView needs at least one view")
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):  # register modules so .to(device) reaches them
            if isinstance(t, nn.Module):
                self.add_module(f"view{i}", t)

    def forward(self, x: Tensor) -> list[Tensor]:
        """One output per view, each from its own call of the view's transform."""
        return [t(x) for t in self.transforms]
