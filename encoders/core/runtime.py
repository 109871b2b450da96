"""What every training job shares: seeding, devices, resumable RNG state, metrics logs, image
grids, the DDP process group, mixed precision and memory format.

Training jobs draw every random number from torch's generators (never ``random`` or
``numpy``), so :func:`rng_state` / :func:`set_rng_state` stored in a checkpoint make
``--resume`` continue exactly where an uninterrupted run would be.

Scale (used by ``rfi train-encoder`` and ``rfi train-decoder``, see ``docs/training_at_scale.md``):

- :func:`setup_distributed` joins the process group ``torchrun`` describes (NCCL on GPU,
  gloo on CPU) and returns a :class:`DistContext` (rank, world size, collectives).
- :func:`autocast` / :func:`grad_scaler`: ``precision`` ``fp32`` (default, no autocast),
  ``bf16`` or ``fp16`` (``torch.autocast``; fp16 adds a ``torch.amp.GradScaler``).
- :func:`memory_format`: ``channels_last`` for convolutions on GPU.
- :func:`seed_everything` with ``deterministic``: deterministic kernels on or off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from encoders.core.errors import RFIError
from encoders.core.imageio import write_image
from encoders.core.serialization import atomic_write


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed python, torch (CPU and CUDA) and return a CPU generator for data order.

    Args:
        seed: the seed.
        deterministic: request deterministic kernels (see :func:`set_deterministic`).

    Example:
        >>> g = seed_everything(0)
        >>> torch.are_deterministic_algorithms_enabled()
        True
    """
    random.seed(seed)
    torch.manual_seed(seed)
    set_deterministic(deterministic)
    return torch.Generator().manual_seed(seed)


def set_deterministic(on: bool = True) -> None:
    """Deterministic kernels on or off (the ``deterministic`` key of the training configs).

    ``True`` (the default of every job): ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` (ops without a deterministic kernel still run, with a warning),
    cuDNN's deterministic algorithms and no cuDNN autotuning, and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (it takes effect only if CUDA
    has not yet initialised cuBLAS). On CPU this costs nothing measurable; on GPU it rules
    out the fastest (non-deterministic) convolution and scatter kernels, often 10-30 %
    of training speed, more for ops such as ``index_add``/``scatter_add`` with atomics.
    ``False``: torch's defaults plus ``cudnn.benchmark`` (autotuned convolutions: fastest
    for fixed input sizes, results may vary from run to run).
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RFIError(f"unknown device '{name}' (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RFIError(f"device '{name}' asked for, but CUDA is not available here")
    return device


def rng_state() -> dict[str, Any]:
    """torch's global RNG states (CPU and CUDA) in a form a ``weights_only`` checkpoint holds."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal or ``RFI_NO_PROGRESS`` is set)."""
    disable = True if os.environ.get("RFI_NO_PROGRESS") else None
    return tqdm(iterable, dynamic_ncols=True, disable=disable, **kwargs)


def json_line(record: Any) -> str:
    """``record`` as one line of strict JSON: numbers of any kind (0-d tensors, numpy scalars) as floats, and
    those that are not finite (NaN, Inf) as ``null``.

    Example:
        >>> json_line({"step": 3, "loss": torch.tensor(float("nan")), "lr": [0.1, float("inf")]})
        '{"step": 3, "loss": null, "lr": [0.1, null]}'
    """
    return json.dumps(_finite_or_null(record), allow_nan=False, default=float)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if value is None or isinstance(value, (str, int)):  # bools are ints
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return number if math.isfinite(number) else None


class MetricsLog:
    """Append-only JSON-lines metrics log (one object per line, each with a ``step``).

    Every line is valid JSON: a number that is not finite (a NaN loss) is written as ``null``.

    Args:
        path: the ``.jsonl`` file.
        resume_step: when resuming, lines with ``step`` beyond it (written after the
            checkpoint being resumed) are dropped, so the log matches an uninterrupted run.
        enabled: ``False`` on non-zero DDP ranks: nothing is written.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write(self.path, lambda tmp: open(tmp, "w").close())
        elif self.path.exists():
            keep = [json_line(r) for r in self.read() if r.get("step", 0) <= resume_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json_line(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The records; a torn line (a write cut by a power loss or a full disk) is skipped with a warning."""
        records = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                logging.getLogger("rfi").warning("%s line %d is torn or not a record: skipped", self.path, number)
                continue
            records.append(record)
        return records


def save_grid(columns: Sequence[Tensor], path: str | os.PathLike, max_rows: int = 8, pad: int = 2) -> Path:
    """Write a PNG grid with one row per image and one column per tensor (e.g. input | reconstruction).

    Args:
        columns: tensors (B, 3, H, W) in [0, 1]; images of different sizes are resized to the first's.
        path: output PNG (written atomically).
        max_rows: at most this many rows.
    """
    ref = columns[0][:max_rows]
    cols = [
        torch.nn.functional.interpolate(c[:max_rows].float(), size=ref.shape[-2:], mode="bilinear", align_corners=False)
        if c.shape[-2:] != ref.shape[-2:]
        else c[:max_rows]
        for c in columns
    ]
    tiles = torch.stack([c.detach().float().cpu().clamp(0, 1) for c in cols], dim=1).flatten(0, 1)
    return write_image(make_grid(tiles, nrow=len(columns), padding=pad, pad_value=1.0), path)


# ----------------------------------------------------------------------------- precision, memory format
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str | None = None, key: str = "precision") -> None:
    """Refuse an unknown ``precision`` or one the device cannot run, naming the config key.

    ``fp16`` and ``bf16`` autocast both run on CPU with current torch (slowly: most CPUs
    have no fast fp16/bf16 matrix units, so ``fp32`` stays the CPU default); on CUDA,
    ``bf16`` needs a GPU that supports it (Ampere or newer).

    Raises:
        RFIError: unknown value, or bf16 on a CUDA device without bf16 support.
    """
    if precision not in PRECISIONS:
        raise RFIError(f"unknown {key} '{precision}' (valid: {', '.join(PRECISIONS)})")
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RFIError(f"{key}=bf16: this GPU does not support bfloat16; use {key}=fp16 or fp32")


def autocast(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device``'s type; ``fp32`` is a plain no-op context.

    (A no-op rather than ``autocast(enabled=False)``, which would switch off an autocast
    region the caller opened around it.)

    Example:
        >>> with autocast("cpu", "bf16"):
        ...     y = torch.nn.Linear(4, 2)(torch.rand(3, 4))
        >>> y.dtype
        torch.bfloat16
    """
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device | str, precision: str = "fp32") -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler``, enabled for ``fp16`` only (a disabled scaler passes losses and
    steps through unchanged, so fp32/bf16 runs are exactly as without one)."""
    check_precision(precision)
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` (NHWC: faster convolutions on GPU tensor cores) or ``torch.contiguous_format``."""
    return torch.channels_last if channels_last else torch.contiguous_format


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    """This process's place in a (possibly one-process) DDP job.

    Attributes:
        rank: global rank (0 for a single process).
        world: number of processes.
        local_rank: rank on this machine (the GPU index).
        owns_group: this process created the group (and destroys it at the end).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, t: Tensor) -> Tensor:
        """The mean of ``t`` over processes (``t`` itself for one process)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over processes (``t`` itself for one process)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Overwrite ``module``'s buffers (e.g. batch-norm running statistics) with rank 0's."""
        if self.world > 1:
            for buf in module.buffers():
                dist.broadcast(buf, 0)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order (``[obj]`` for one process)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def setup_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group ``torchrun`` describes (env ``WORLD_SIZE`` > 1), or run alone.

    The backend is NCCL when the job runs on CUDA, gloo on CPU; each process uses GPU
    ``LOCAL_RANK``. An already initialised group is used as it is (and left to its owner).

    Args:
        device_name: ``auto``, ``cpu``, ``cuda``... (see :func:`resolve_device`).

    Returns:
        The context (call ``dist.destroy_process_group()`` at the end when ``owns_group``)
        and this process's device.
    """
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = resolve_device(device_name).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), local, owns_group=True)
    else:
        ctx = DistContext()
    device = resolve_device(device_name)
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", ctx.local_rank)
    return ctx, device


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak for :func:`peak_memory_mib`: CUDA's peak statistics, or on CPU the process's
    peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` where Linux allows it)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: str | torch.device = "cpu") -> float:
    """Peak memory in MiB since the process started or :func:`reset_peak_memory`: CUDA memory allocated
    on a GPU; on CPU the process's peak RSS (``VmHWM``, per address space, so fresh after ``exec``;
    ``ru_maxrss``, which carries over a forking parent's peak, where ``/proc`` is missing).

    Example:
        >>> peak_memory_mib("cpu") > 0
        True
    """
    import resource

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
