"""Reconstruct image files from their encoder features (the command ``rfi invert`` is :mod:`apps.commands.invert`).

``--method decoder`` (default) runs :meth:`RobustAutoencoder.reconstruct` (any size;
overlapping tiles with ``--tile``); ``--method optimize`` runs the optimisation baseline
(:func:`inversion.optimize.invert_by_optimization`). One PNG per input, same stem, in
``--out``. Inputs, outputs and exit codes follow :mod:`encoders.core.files`: a file that cannot
be read (truncated, not an image) or holds NaN/Inf is reported by name and skipped, the
others are still processed and the command exits with code 1 at the end; outputs never
overwrite inputs, and each is written atomically.

The encoder may be an RFI checkpoint, a ``robustness``-library checkpoint or a torchvision
state dict; for the last two the architecture comes from ``--arch`` or, by default, from
the decoder checkpoint (which records the encoder it was trained for). A decoder is used
only with that encoder (``--allow-mismatch`` pairs others on purpose, see
:func:`inversion.autoencoder.check_pair`), and a model file with NaN weights is refused as
it is read (:func:`encoders.core.serialization.load_checkpoint`).

Example:
    rfi invert photos/ --encoder runs/encoders/resnet18_robust/checkpoint.pt \\
        --decoder runs/decoders/resnet18_robust_layer3/decoder.pt --out inverted/
    rfi invert photos/ --encoder imagenet_l2_3_0.pt --arch resnet50 \\
        --decoder runs/decoders/resnet50_layer4/decoder.pt --out inverted/
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from encoders.core.files import FileBatch
from encoders.core.imageio import check_images

log = logging.getLogger("rfi")


def invert_files(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    invert: Callable[[Tensor], Tensor],
    device: torch.device | str = "cpu",
) -> int:
    """Invert image files one by one into ``out/<stem>.png`` (the policy of :mod:`encoders.core.files`).

    Args:
        inputs: image files and folders (a folder's image files are taken, sorted).
        out: output folder.
        invert: maps a batch (1, 3, H, W) in [0, 1] to its reconstruction (same shape).
        device: where the images are sent.

    Returns:
        The exit code: 0, or :data:`encoders.core.files.EXIT_PARTIAL` when some inputs failed
        (each named on stderr; the others are written).

    Raises:
        RFIError: before anything is written, when the outputs cannot be written or would
            overwrite an input; after, when no input could be inverted.
    """
    batch = FileBatch(inputs, out, desc="invert")
    return batch.run(lambda src, image: [invert(check_images(image[None].to(device), str(src)))[0]])
