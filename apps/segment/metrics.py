"""Segmentation metrics as the shift-equivariance papers define them: mIoU and mASC.

- **mIoU**: per class, intersection over union of the predicted and the true pixels, from the
  confusion matrix over the whole set; the mean over the classes that occur (in the labels or
  the predictions). Pixels labelled :data:`~encoders.data.voc.IGNORE_INDEX` (255) count nowhere.
- **mASC** (mean-average semantic-segmentation consistency; Zhang, "Making convolutional
  networks shift-invariant again", ICML 2019, used by the LPS paper, NeurIPS 2022, and
  Rojas-Gomez et al., CVPR 2024): each image is seen as two shifted copies, and the score is
  the fraction of pixels whose predicted class agrees between the two, on the pixels both
  copies show, averaged over images. **Circular**: the copies are ``T_a x`` and ``T_b x``
  (circular shifts, uniform over all offsets), compared after undoing the shifts; every pixel
  is shown by both. **Crop**: the copies are two crops of ``x`` at different offsets (new
  content enters at the borders, as when a camera moves), compared on their overlap.

Example:
    >>> pred = torch.tensor([[0, 0, 1], [1, 1, 2]])
    >>> target = torch.tensor([[0, 1, 1], [1, 255, 2]])
    >>> conf = confusion_matrix(pred, target, 3)
    >>> class_iou(conf).tolist(), round(mean_iou(conf), 4)
    ([0.5, 0.6666666865348816, 1.0], 0.7222)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from encoders.core.errors import RFIError
from encoders.data.voc import IGNORE_INDEX


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Counts ``[true class, predicted class]`` over all pixels not labelled ``ignore_index``.

    Shape: pred, target (...) integers of one shape -> (num_classes, num_classes) int64.
    """
    if pred.shape != target.shape:
        raise RFIError(f"predictions {tuple(pred.shape)} and labels {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index.cpu(), minlength=num_classes**2).view(num_classes, num_classes)


def class_iou(confusion: Tensor) -> Tensor:
    """Intersection over union of each class (NaN for a class in neither the labels nor the predictions).

    Shape: (K, K) -> (K,) float32.
    """
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp_min(1), torch.nan).float()


def mean_iou(confusion: Tensor) -> float:
    """The mean of :func:`class_iou` over the classes that occur."""
    return float(class_iou(confusion).nanmean())


def pixel_accuracy(confusion: Tensor) -> float:
    """The fraction of counted pixels whose class is right."""
    return float(confusion.diagonal().sum() / confusion.sum().clamp_min(1))


def circular_agreement(pred_a: Tensor, pred_b: Tensor, offset_a: Tensor, offset_b: Tensor) -> Tensor:
    """Per image, the fraction of pixels where the label maps of ``T_a x`` and ``T_b x`` agree, shifts undone.

    Args:
        pred_a, pred_b: (B, H, W) label maps of the circularly shifted copies.
        offset_a, offset_b: (B, 2) their shifts (dy, dx): ``T_a x = x.roll(offset_a, (-2, -1))``.

    Returns:
        (B,) float32 in [0, 1].

    Example:
        >>> p = torch.tensor([[[0, 1, 2, 3]]])
        >>> circular_agreement(p, p.roll(1, -1), torch.tensor([[0, 0]]), torch.tensor([[0, 1]])).tolist()
        [1.0]
    """
    out = []
    for a, b, oa, ob in zip(pred_a, pred_b, offset_a.tolist(), offset_b.tolist()):
        back_a = a.roll((-oa[0], -oa[1]), (-2, -1))
        back_b = b.roll((-ob[0], -ob[1]), (-2, -1))
        out.append((back_a == back_b).float().mean())
    return torch.stack(out)


def crop_agreement(pred_a: Tensor, pred_b: Tensor, offset_a: Tensor, offset_b: Tensor) -> Tensor:
    """Per image, the fraction of the overlap where the label maps of two crops of it agree.

    Args:
        pred_a, pred_b: (B, h, w) label maps of two crops of the same images.
        offset_a, offset_b: (B, 2) the crops' top-left corners (y, x) in the images.

    Returns:
        (B,) float32 in [0, 1].

    Example:
        >>> a = torch.tensor([[[0, 1, 2]]]); b = torch.tensor([[[1, 5, 9]]])  # b starts 1 px to the right of a
        >>> crop_agreement(a, b, torch.tensor([[0, 0]]), torch.tensor([[0, 1]])).tolist()  # overlap: [1, 2] vs [1, 5]
        [0.5]
    """
    h, w = pred_a.shape[-2:]
    out = []
    for a, b, (ya, xa), (yb, xb) in zip(pred_a, pred_b, offset_a.tolist(), offset_b.tolist()):
        top, left = max(ya, yb), max(xa, xb)
        bottom, right = min(ya, yb) + h, min(xa, xb) + w
        if bottom <= top or right <= left:
            raise RFIError(f"crops at {ya, xa} and {yb, xb} of size {h}x{w} do not overlap")
        out.append(
            (a[top - ya : bottom - ya, left - xa : right - xa] == b[top - yb : bottom - yb, left - xb : right - xb])
            .float()
            .mean()
        )
    return torch.stack(out)


def distinct_offsets(n: int, span_y: int, span_x: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two (n, 2) offsets, uniform in ``[0, span_y) x [0, span_x)`` and never equal (a real shift each)."""

    def draw() -> Tensor:
        return torch.stack(
            [torch.randint(span_y, (n,), generator=generator), torch.randint(span_x, (n,), generator=generator)], 1
        )

    a, b = draw(), draw()
    same = (a == b).all(1)
    b[same, 1] = (b[same, 1] + 1) % span_x
    return a, b


@torch.no_grad()
def _rolled(x: Tensor, offsets: Tensor) -> Tensor:
    """Each image of ``x`` circularly shifted by its (dy, dx) row of ``offsets``."""
    return torch.stack([xi.roll(tuple(o), (-2, -1)) for xi, o in zip(x, offsets.tolist())])


def _cropped(x: Tensor, offsets: Tensor, size: int) -> Tensor:
    """Each image of ``x`` cropped to ``size`` x ``size`` at its (top, left) row of ``offsets``."""
    return torch.stack([xi[:, i : i + size, j : j + size] for xi, (i, j) in zip(x, offsets.tolist())])


def evaluate_segmenter(
    predict: Callable[[Tensor], Tensor],
    dataset: Dataset,
    num_classes: int,
    max_images: int | None = None,
    max_crop_shift: int = 16,
    size_multiple: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """mIoU, pixel accuracy and circular and crop mASC of a segmenter on a labelled set.

    Args:
        predict: images (B, 3, H, W) -> label maps (B, H, W), e.g. ``Segmenter.predict`` (eval mode).
        dataset: items ``(image (3, H, W), labels (H, W))``, all of one size.
        num_classes: the number of classes.
        max_images: use this many images, evenly spread over the set (default: all).
        max_crop_shift: crop mASC: the crops' side is the image side less this (rounded down to
            ``size_multiple``), so their offsets differ by up to that many px.
        size_multiple: image sides the model takes (e.g. ``Segmenter.size_multiple``).
        batch_size: images per forward pass.
        seed: the random shifts.
        device: where the images go.

    Returns:
        ``images``, ``miou``, ``pixel_acc``, ``class_iou`` (a list, NaN as ``None``),
        ``masc_circular``, ``masc_crop``, ``crop_size``.

    Raises:
        RFIError: an empty set, or images too small for a crop of ``size_multiple`` px.
    """
    if len(dataset) == 0:
        raise RFIError("the validation set is empty")
    n = len(dataset) if max_images is None else max(1, min(max_images, len(dataset)))
    if n < len(dataset):
        dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, n).round().long().tolist())
    g = torch.Generator().manual_seed(seed)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    circular: list[Tensor] = []
    crop: list[Tensor] = []
    crop_size = None
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x = x.to(device)
        h, w = x.shape[-2:]
        if crop_size is None:
            crop_size = (min(h, w) - max_crop_shift) // size_multiple * size_multiple
            if crop_size < size_multiple:
                raise RFIError(
                    f"{h}x{w} images are too small for crop shifts of up to {max_crop_shift} px with crops "
                    f"of a multiple of {size_multiple} px (lower train.eval.max_crop_shift)"
                )
        confusion += confusion_matrix(predict(x).cpu(), y, num_classes)
        a, b = distinct_offsets(len(x), h, w, g)
        circular.append(circular_agreement(predict(_rolled(x, a)).cpu(), predict(_rolled(x, b)).cpu(), a, b))
        a, b = distinct_offsets(len(x), h - crop_size + 1, w - crop_size + 1, g)
        crop.append(
            crop_agreement(predict(_cropped(x, a, crop_size)).cpu(), predict(_cropped(x, b, crop_size)).cpu(), a, b)
        )
    iou = class_iou(confusion)
    return {
        "images": n,
        "miou": mean_iou(confusion),
        "pixel_acc": pixel_accuracy(confusion),
        "class_iou": [None if v != v else float(v) for v in iou.tolist()],
        "masc_circular": float(torch.cat(circular).mean()),
        "masc_crop": float(torch.cat(crop).mean()),
        "crop_size": crop_size,
    }
