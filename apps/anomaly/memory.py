"""Memory-bank anomaly scoring (PatchCore-style) on an encoder's patch features.

``rfi anomaly fit --method memory`` keeps, instead of a decoder, a *memory bank* of the
patch features of the normal training images (Roth et al., "Towards total recall in
industrial anomaly detection", CVPR 2022, as implemented by anomalib's ``PatchcoreModel``):

1. **Patch features**: the encoder's maps at a few mid-level taps (``layer2`` + ``layer3``
   for a ResNet, see :func:`default_memory_layers`), each locally aggregated by a
   ``pool`` x ``pool`` average (stride 1) and brought to the resolution of the shallowest
   one (bilinear), then concatenated: one D-dimensional vector per location.
2. **Coreset**: the greedy k-center subset (:func:`greedy_coreset`) of ``coreset`` x N of the N
   training patches, on a seeded random projection of the features, so that every training
   patch has a close representative in the bank.
3. **Scoring**: each test patch's Euclidean distance to its nearest neighbour(s) in the
   bank (:meth:`MemoryBank.distances`, ``torch.cdist`` in chunks of at most ``chunk_mb``
   MiB), upsampled to the image size and smoothed (``kornia.filters.gaussian_blur2d``); the
   detector standardises it on held-out normal images like the reconstruction errors.

The bank is a plain tensor (``weights_only``-safe) stored in the anomaly model file.

Example:
    >>> from encoders.nets.models import Encoder
    >>> enc = Encoder("resnet18", num_classes=8, width=0.25, small_input=True).eval()
    >>> cfg = MemoryConfig(coreset=0.25)
    >>> bank = MemoryBank.fit(enc, [torch.rand(3, 16, 16) for _ in range(2)], cfg, progress_bar=False)
    >>> tuple(bank.bank.shape), bank.layers
    ((32, 96), ['layer2', 'layer3'])
    >>> tuple(bank.maps(enc, torch.rand(1, 3, 16, 16)).shape)
    (1, 1, 16, 16)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from apps.anomaly.config import MemoryConfig
from apps.anomaly.maps import smooth
from encoders.core.config import check_config
from encoders.core.errors import RFIError
from encoders.core.runtime import progress

# Mid-level taps per architecture family (PatchCore: layer2 + layer3 of a ResNet); the first
# pair the encoder has wins, else its two middle taps.
DEFAULT_LAYER_PAIRS = (("layer2", "layer3"), ("relu3_1", "relu4_1"), ("stage2", "stage3"), ("conv2", "conv3"))


def default_memory_layers(encoder: Any) -> list[str]:
    """PatchCore's choice for ``encoder``: ``layer2`` + ``layer3`` (ResNet), ``relu3_1`` +
    ``relu4_1`` (VGG), ``stage2`` + ``stage3`` (Swin), ``conv2`` + ``conv3`` (AlexNet), else the
    two middle taps.

    Example:
        >>> from encoders.nets.models import Encoder
        >>> default_memory_layers(Encoder("vgg16", num_classes=8, width=0.125, small_input=True))
        ['relu3_1', 'relu4_1']
    """
    names = list(encoder.layer_names)
    for pair in DEFAULT_LAYER_PAIRS:
        if all(p in names for p in pair):
            return list(pair)
    mid = max(1, len(names) // 2)
    return names[mid - 1 : mid + 1]


@torch.no_grad()
def patch_features(encoder: Any, x: Tensor, layers: Sequence[str], pool: int = 3) -> Tensor:
    """Locally aggregated patch features at the shallowest layer's resolution.

    Args:
        encoder: an :class:`encoders.nets.models.Encoder` (images in [0, 1]).
        x: (B, 3, H, W) images in [0, 1].
        layers: taps, shallow to deep.
        pool: side of the average pooling (stride 1, borders averaged over valid pixels only).

    Shape:
        (B, 3, H, W) -> (B, D, h, w): D = sum of the layers' channels, (h, w) = the first layer's size.
    """
    feats = encoder(x, layers=list(layers))
    out: list[Tensor] = []
    size = None
    for name in layers:
        f = feats[name].float()
        if pool > 1:
            f = F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False)
        if size is None:
            size = f.shape[-2:]
        elif f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def greedy_coreset(
    x: Tensor, n: int, projection: int = 128, generator: torch.Generator | None = None, show_progress: bool = False
) -> Tensor:
    """Indices of ``n`` rows of ``x`` chosen by greedy k-center selection (PatchCore's coreset).

    Starting from one random row, repeatedly add the row farthest from everything chosen so
    far. Distances are measured after a Gaussian random projection to ``projection``
    dimensions (Johnson-Lindenstrauss: they are approximately preserved) when the features
    are wider than that.

    Args:
        x: (N, D) features.
        n: rows to keep, 1 <= n <= N.
        projection: projected dimension (0 or >= D: none).
        generator: seeds the projection and the first centre.
        show_progress: show a progress bar.

    Returns:
        (n,) int64 indices, distinct, in selection order.

    Example:
        >>> pts = torch.tensor([[0., 0.], [0.1, 0.], [5., 5.], [5., 5.1], [10., 0.]])  # 3 clusters
        >>> idx = greedy_coreset(pts, 3, generator=torch.Generator().manual_seed(0))
        >>> sorted(int(i) // 2 for i in idx)  # one point of each cluster
        [0, 1, 2]
    """
    N, D = x.shape
    if not 1 <= n <= N:
        raise RFIError(f"coreset size must be in [1, {N}], got {n}")
    if n == N:
        return torch.arange(N)
    x = x.float()
    if projection and projection < D:
        proj = torch.randn(D, projection, generator=generator, device="cpu").to(x.device) / math.sqrt(projection)
        x = x @ proj
    first = int(torch.randint(N, (1,), generator=generator))
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = first
    sq = x.pow(2).sum(1)
    dist = (sq - 2 * x @ x[first] + sq[first]).clamp_min_(0)  # squared distance to the chosen set
    steps = range(1, n)
    for i in progress(steps, desc="coreset", unit="pt") if show_progress else steps:
        j = int(torch.argmax(dist))
        chosen[i] = j
        torch.minimum(dist, (sq - 2 * x @ x[j] + sq[j]).clamp_min_(0), out=dist)
    return chosen


class MemoryBank:
    """A coreset of normal patch features and how to score with it.

    Args:
        bank: (M, D) patch features.
        layers: the encoder taps they come from.
        config: :class:`MemoryConfig` (``pool``, ``neighbours``, ``sigma``, ``chunk_mb`` are used here).
        patches: N, the number of training patches the coreset was chosen from (information).
    """

    def __init__(self, bank: Tensor, layers: Sequence[str], config: MemoryConfig, patches: int | None = None):
        if bank.dim() != 2 or bank.shape[0] < 1:
            raise RFIError(f"a memory bank must be a non-empty (M, D) tensor, got {tuple(bank.shape)}")
        self.bank, self.layers, self.config = bank.float(), list(layers), config
        self.patches = patches

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        encoder: Any,
        images: Iterable[Tensor],
        config: MemoryConfig,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        progress_bar: bool = True,
        count: int | None = None,
        max_pixels: int | None = None,
    ) -> MemoryBank:
        """Collect the patch features of ``images`` (batched) and keep the greedy coreset.

        Args:
            encoder: the (frozen) encoder.
            images: (3, H, W) normal images in [0, 1], at the working resolution.
            config: :class:`MemoryConfig`.
            batch_size: images per forward pass (consecutive images of equal size are batched).
            device: where features are computed (default: the encoder's).
            progress_bar: show progress bars.
            count: the number of images (for the memory estimate and progress bar), if known.
            max_pixels: at most this many pixels per batch (at least one image), whatever
                ``batch_size`` (e.g. :data:`apps.anomaly.detector.BATCH_PIXELS`); ``None``: no limit.

        Raises:
            RFIError: no images, a bad config (the key named), or patch features over
                ``config.max_mb`` (the message says how big they would be and what to set).
        """
        config = check_config(config, "the memory settings")
        layers = encoder.check_layers(config.layers) if config.layers else default_memory_layers(encoder)
        device = device or next(encoder.parameters()).device
        gen = torch.Generator().manual_seed(config.seed)
        chunks: list[Tensor] = []
        total, checked, images_seen = 0, False, 0

        def flush(batch: list[Tensor]) -> None:
            nonlocal total, checked, images_seen
            f = patch_features(encoder, torch.stack(batch).to(device), layers, config.pool).cpu()
            f = f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1])  # (B, h*w, D)
            if config.patches_per_image is not None and config.patches_per_image < f.shape[1]:
                keep = torch.stack(
                    [torch.randperm(f.shape[1], generator=gen)[: config.patches_per_image] for _ in range(f.shape[0])]
                )
                f = torch.gather(f, 1, keep[..., None].expand(-1, -1, f.shape[2]))
            f = f.reshape(-1, f.shape[-1])
            if not checked and count:  # estimate the whole bank from the first batch, before filling memory
                checked = True
                cls._check_size(f.shape[0] / len(batch) * count, f.shape[1], count, config)
            total += f.shape[0]
            images_seen += len(batch)
            cls._check_size(total, f.shape[1], images_seen, config)
            chunks.append(f)

        batch: list[Tensor] = []
        for img in progress(images, desc="memory bank", unit="img", total=count) if progress_bar else images:
            full = len(batch) == batch_size or (
                max_pixels is not None and (len(batch) + 1) * img.shape[-2] * img.shape[-1] > max_pixels
            )
            if batch and (full or batch[0].shape != img.shape):
                flush(batch)
                batch = []
            batch.append(img)
        if batch:
            flush(batch)
        if not chunks:
            raise RFIError("no normal images to build the memory bank from")
        feats = torch.cat(chunks)
        chunks.clear()  # the features are in feats now: free the pieces
        n = max(1, int(round(config.coreset * feats.shape[0])))
        idx = greedy_coreset(feats, n, config.projection, gen, show_progress=progress_bar)
        return cls(feats[idx].clone(), layers, config, patches=feats.shape[0])

    @staticmethod
    def _check_size(patches: float, dims: int, images: int, config: MemoryConfig) -> None:
        """Refuse patch features over ``config.max_mb``: say how big and what to set."""
        mb = patches * dims * 4 / 2**20
        if mb > config.max_mb:
            fit = max(1, int(config.max_mb * 2**20 / 4 / dims / max(images, 1) / 2))
            raise RFIError(
                f"the memory bank would hold {int(patches):,} patches x {dims} dims = {mb:,.0f} MiB before the "
                f"coreset (over memory.max_mb={config.max_mb:g}): set memory.patches_per_image={fit} (random "
                f"patches per image), a smaller image_size, or a larger memory.max_mb"
            )

    @property
    def dims(self) -> int:
        return int(self.bank.shape[1])

    @torch.no_grad()
    def distances(self, queries: Tensor) -> Tensor:
        """Mean distance of each query to its ``neighbours`` nearest bank entries.

        Computed in chunks so that no distance matrix exceeds ``chunk_mb`` MiB.

        Shape:
            (Q, D) -> (Q,)
        """
        bank = self.bank.to(queries.device)
        k = min(self.config.neighbours, bank.shape[0])
        rows = max(1, int(self.config.chunk_mb * 2**20 / 4 / bank.shape[0]))
        out = []
        for q in queries.float().split(rows):
            d = torch.cdist(q, bank)
            out.append(d.min(1).values if k == 1 else d.topk(k, dim=1, largest=False).values.mean(1))
        return torch.cat(out) if out else queries.new_zeros(0)

    @torch.no_grad()
    def maps(self, encoder: Any, x: Tensor) -> Tensor:
        """Raw anomaly maps: nearest-neighbour distances, upsampled to the image size and smoothed.

        Shape:
            (B, 3, H, W) -> (B, 1, H, W)
        """
        f = patch_features(encoder, x, self.layers, self.config.pool)
        b, d, h, w = f.shape
        if d != self.dims:
            raise RFIError(
                f"the encoder gives {d}-dim patch features at {self.layers}, the memory bank holds {self.dims}"
            )
        dist = self.distances(f.permute(0, 2, 3, 1).reshape(-1, d)).reshape(b, 1, h, w)
        dist = F.interpolate(dist, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return smooth(dist, self.config.sigma)

    # ------------------------------------------------------------------------- files
    def state(self) -> dict[str, Any]:
        """What the model file stores (tensors and plain values only)."""
        from dataclasses import asdict

        return {
            "bank": self.bank.contiguous(),
            "layers": list(self.layers),
            "config": asdict(self.config),
            "patches": self.patches,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MemoryBank:
        return cls(state["bank"], state["layers"], MemoryConfig(**state["config"]), state.get("patches"))
