"""The self-supervised methods: SimCLR and MoCo v2 on any RFI encoder, their losses, and the run's model.

- **SimCLR** (Chen et al., 2020): two views of each image, a 2-layer MLP projection head,
  the NT-Xent loss over the 2B views of a batch (:func:`nt_xent`).
- **MoCo v2** (He et al., 2020; Chen et al., 2020): a query encoder (backbone + 2-layer MLP
  head) trained by gradient, a key encoder that is its exponential moving average
  (``moco.momentum``), and a queue of the last ``moco.queue`` keys as negatives; InfoNCE at
  ``temperature`` 0.2, optionally symmetric. Single-device "shuffle BN": queries and
  shuffled keys go through batch norm in ``moco.bn_splits`` separate chunks, so a query
  and its key never share batch statistics (MoCo's multi-GPU trick, on one device).

Both embed images with the globally pooled features of one layer of an
:class:`encoders.Encoder` (:class:`SSLModel`), so the trained backbone is an RFI encoder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from apps.ssl.config import SSLConfig
from encoders import Encoder, create_encoder
from encoders.core.errors import RFIError


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's normalised-temperature cross entropy, over the global batch under DDP.

    Args:
        z1, z2: (B, D) projections of the two views; row i of each comes from the same image.
        temperature: softmax temperature.

    Returns:
        The mean loss over the 2B anchors: the other view of an anchor's image is its positive,
        the remaining projections its negatives: 2B - 2 of them, or under DDP the 2 W B - 2 of
        all W processes' batches (gathered with gradients, as SimCLR's large-batch training does),
        so W processes of B images compute the loss and gradients of one process of W B images.

    Example:
        >>> z = torch.randn(4, 8)
        >>> bool(nt_xent(z, z) < nt_xent(z, z.roll(1, 0)))
        True
    """
    rank, world = distributed()
    b = z1.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D): this process's anchors
    if world == 1:
        candidates, offset = anchors, 0
    else:  # every process's projections, differentiable: the gradient reaches the process they came from
        from torch.distributed.nn.functional import all_gather  # the collective with a backward

        gathered = [F.normalize(z, dim=1) for z in all_gather(torch.cat([z1, z2]))]
        candidates, offset = torch.cat(gathered), 2 * b * rank  # (2WB, D); this process's anchors start at offset
    sim = anchors @ candidates.t() / temperature
    own = torch.arange(2 * b, device=sim.device)
    sim[own, own + offset] = float("-inf")  # an anchor is not its own negative
    target = torch.cat([own[b:], own[:b]]) + offset
    return F.cross_entropy(sim, target)


def distributed() -> tuple[int, int]:
    """``(rank, world size)`` of the process group, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(t: Tensor) -> Tensor:
    """Every process's ``t`` (same shape on each), concatenated in rank order along dim 0; no gradient.

    ``t`` itself outside a process group (MoCo v2's ``concat_all_gather``).

    Shape: (N, ...) -> (world * N, ...).
    """
    _, world = distributed()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def projection_head(dim: int, hidden: int, out: int) -> nn.Sequential:
    """The 2-layer MLP head of SimCLR and MoCo v2: Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class SSLModel(nn.Module):
    """Backbone (pooled features of one layer) + projection head; the base of :class:`SimCLR` and :class:`MoCo`.

    Args:
        backbone: an RFI encoder; its feature taps are set to ``layer``.
        layer: the pooled tap (``None``: the backbone's last layer).
        proj_dim: output width of the projection head.
        hidden_dim: hidden width of the head (``None``: the tap's channel count).

    Shape:
        - :meth:`embed`: (B, 3, H, W) in [0, 1] -> (B, C) globally pooled features.
        - forward: (B, 3, H, W) -> (B, proj_dim) projections.
    """

    def __init__(self, backbone: Encoder, layer: str | None = None, proj_dim: int = 64, hidden_dim: int | None = None):
        super().__init__()
        self.layer = layer or backbone.layer_names[-1]
        backbone.layers = backbone.check_layers([self.layer])
        self.backbone = backbone
        dim = backbone.feature_info()[self.layer][0]
        self.head = projection_head(dim, hidden_dim or dim, proj_dim)

    def embed(self, x: Tensor) -> Tensor:
        """Globally pooled features of ``layer``: what the linear probes see."""
        return self.backbone(x)[self.layer].mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Projections of the pooled features (what the contrastive loss compares)."""
        return self.head(self.embed(x))

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates."""
        return list(self.parameters())


class SimCLR(SSLModel):
    """SimCLR: NT-Xent over the two views of a batch (under DDP: negatives from every process's share).

    Example:
        >>> model = SimCLR(create_encoder("resnet18", width=0.125, small_input=True, num_classes=8), proj_dim=8)
        >>> x1, x2 = torch.rand(2, 4, 3, 16, 16)
        >>> bool(torch.isfinite(model.loss(x1, x2)))
        True
    """

    def __init__(
        self,
        backbone: Encoder,
        layer: str | None = None,
        proj_dim: int = 64,
        hidden_dim: int | None = None,
        temperature: float = 0.2,
    ):
        super().__init__(backbone, layer, proj_dim, hidden_dim)
        self.temperature = temperature

    def loss(self, x1: Tensor, x2: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """NT-Xent of the two views (one forward pass through both)."""
        return nt_xent(*self(torch.cat([x1, x2])).chunk(2), self.temperature)


class MoCo(SSLModel):
    """MoCo v2: query encoder, momentum key encoder and a queue of negative keys.

    Args:
        backbone: the query backbone (the key backbone is a copy of it).
        layer, proj_dim, hidden_dim: see :class:`SSLModel`.
        queue_size: number of negative keys kept (MoCo: a multiple of the batch size).
        momentum: key encoder update ``k = m * k + (1 - m) * q`` before each step's keys.
        temperature: InfoNCE temperature (MoCo v2: 0.2).
        symmetric: both views serve as queries (and both key batches are enqueued).
        bn_splits: queries and (shuffled) keys go through batch norm in this many chunks.

    Buffers: ``queue`` (queue_size, proj_dim) of unit keys, ``queue_ptr`` (where the next keys go).

    Example:
        >>> model = MoCo(create_encoder("resnet18", width=0.125, small_input=True, num_classes=8), proj_dim=8,
        ...              queue_size=8)
        >>> x1, x2 = torch.rand(2, 4, 3, 16, 16)
        >>> loss = model.loss(x1, x2, torch.Generator().manual_seed(0))
        >>> int(model.queue_ptr)
        4
    """

    def __init__(
        self,
        backbone: Encoder,
        layer: str | None = None,
        proj_dim: int = 64,
        hidden_dim: int | None = None,
        queue_size: int = 4096,
        momentum: float = 0.99,
        temperature: float = 0.2,
        symmetric: bool = False,
        bn_splits: int = 1,
    ):
        super().__init__(backbone, layer, proj_dim, hidden_dim)
        self.momentum, self.temperature, self.symmetric, self.bn_splits = momentum, temperature, symmetric, bn_splits
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query_parameters(self) -> list[nn.Parameter]:
        """The query encoder's parameters (backbone, head): the ones trained by gradient."""
        return [*self.backbone.parameters(), *self.head.parameters()]

    def key_parameters(self) -> list[nn.Parameter]:
        """The key encoder's parameters, moved only by :meth:`momentum_update`."""
        return [*self.key_backbone.parameters(), *self.key_head.parameters()]

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The query encoder's parameters (the key encoder follows them by :meth:`momentum_update`)."""
        return self.query_parameters()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``key = momentum * key + (1 - momentum) * query`` for every parameter."""
        torch._foreach_lerp_(self.key_parameters(), self.query_parameters(), 1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (N, D) over the oldest entries, from ``queue_ptr`` on, wrapping around."""
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise RFIError(f"cannot enqueue {n} keys in a queue of {size}")
        idx = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + n) % size))

    def _chunked(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self.bn_splits <= 1:
            return fn(x)
        return torch.cat([fn(c) for c in x.chunk(self.bn_splits)])

    def queries(self, x: Tensor) -> Tensor:
        """Unit query projections (batch norm in ``bn_splits`` chunks)."""
        return F.normalize(self._chunked(self, x), dim=1)

    @torch.no_grad()
    def keys(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Unit keys of the key encoder; with ``bn_splits`` > 1 the batch is shuffled first (shuffle BN).

        Under DDP the global batch is shuffled across the processes (``generator`` must draw the same on
        every process), each computes the keys of its share of the shuffled batch and gets back those of
        its own images, as in MoCo's reference code.
        """

        def key_fn(c: Tensor) -> Tensor:
            return self.key_head(self.key_backbone(c)[self.layer].mean(dim=(2, 3)))

        rank, world = distributed()
        if world > 1:
            everything = concat_all_gather(x)
            b = x.shape[0]
            perm = torch.randperm(everything.shape[0], generator=generator).to(x.device)
            mine = everything[perm[rank * b : (rank + 1) * b]]
            k = concat_all_gather(self._chunked(key_fn, mine))[torch.argsort(perm)]
            return F.normalize(k[rank * b : (rank + 1) * b], dim=1)
        if self.bn_splits <= 1:
            return F.normalize(key_fn(x), dim=1)
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        k = self._chunked(key_fn, x[perm])
        return F.normalize(k[torch.argsort(perm)], dim=1)

    def contrast(self, q: Tensor, k: Tensor) -> Tensor:
        """InfoNCE: the key of the same image against the queue's keys (the queue as it was before this step)."""
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ self.queue.clone().t()
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    def loss(self, x1: Tensor, x2: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One step's loss: momentum update, keys, InfoNCE against the queue, then the keys are enqueued
        (under DDP: the keys of every process, in rank order)."""
        self.momentum_update()
        self.key_backbone.train(self.training)
        k2 = self.keys(x2, generator)
        loss = self.contrast(self.queries(x1), k2)
        if self.symmetric:
            k1 = self.keys(x1, generator)
            loss = (loss + self.contrast(self.queries(x2), k1)) / 2
            self.enqueue(concat_all_gather(torch.cat([k1, k2])))
        else:
            self.enqueue(concat_all_gather(k2))
        return loss


def build_model(cfg: SSLConfig) -> SimCLR | MoCo:
    """The run's model (weights drawn from torch's global generator: seed first)."""
    m = cfg.model
    backbone = create_encoder(m.arch, width=m.width, small_input=m.small_input, num_classes=m.num_classes)
    if cfg.method == "simclr":
        return SimCLR(backbone, m.layer, m.proj_dim, m.hidden_dim, cfg.temperature)
    c = cfg.moco
    return MoCo(
        backbone, m.layer, m.proj_dim, m.hidden_dim, c.queue, c.momentum, cfg.temperature, c.symmetric, c.bn_splits
    )
