"""Asynchronous stylisation (SASSL): :class:`StyledLoader` prepares style-augmented batches ahead,
in a background thread, while the training step runs.

Every random draw of a batch comes from generators seeded by :func:`batch_seed` (seed, batch
index, stream), so the background pipeline yields exactly what the synchronous one does, and
a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from apps.style.augment import StyleAugment
from encoders.core.errors import RFIError

log = logging.getLogger("rfi")

BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
"""A batch transform that draws every random number from the generator it is given: ``fn(x, generator)``."""


def batch_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of batch ``index`` (random stream ``stream``): a pure function of its arguments.

    :class:`StyledLoader` seeds one generator per batch, view and purpose from it, so a batch's
    random draws depend on neither the thread that computes it nor on where a run resumed.

    Example:
        >>> batch_seed(0, 5) == batch_seed(0, 5), batch_seed(0, 5) != batch_seed(0, 6)
        (True, True)
    """
    return ((seed * 1_000_003 + index) * 1_009 + stream) % (2**63)


def _with_generator(style: StyleAugment, generator: torch.Generator) -> StyleAugment:
    """A shallow copy of ``style`` (same autoencoder, same cached styles) drawing from ``generator``."""
    twin = copy.copy(style)
    twin.generator = generator
    return twin


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class StyledLoader:
    """Batches of ``loader`` passed through ``before`` -> ``style_augment`` -> ``after``, prepared ahead
    in a background thread while the training step runs (SASSL's asynchronous stylisation).

    For batch ``i`` (counted from ``start``) and view ``v``, ``before`` and ``after`` draw from
    ``torch.Generator().manual_seed(batch_seed(seed, i, 2 * v))`` and StyleAugment from a
    generator seeded with ``batch_seed(seed, i, 2 * v + 1)``: the output is a pure function of
    the batch, its index and ``seed``. So the background thread yields exactly what
    ``background=False`` (the same work, in the calling thread) yields, a run resumed at batch
    ``start`` continues exactly, and a run without StyleAugment (``style_augment=None``) sees the
    same crops and colour draws as a run with it.

    The worker thread runs torch ops, which release the GIL: on CPU it computes on another core
    (``threads`` sets its intra-op threads; the training loop's are not changed), on CUDA it
    enqueues its kernels on a side stream; the main stream waits for a batch's event before
    using it. It only helps when a core (or the GPU) has spare capacity: on a machine whose
    cores are all busy, it takes them from the training step.

    Memory: at most ``prefetch`` prepared batches wait in the queue, one is being prepared and
    one is in use, so about ``(prefetch + 2) x views x batch bytes`` (e.g. batch 128 of
    3x32x32 float32, 2 views, prefetch 2: 4 x 2 x 1.5 MiB = 12 MiB), plus StyleAugment's
    activations for one batch.

    Shutdown: an error in the worker is re-raised in the training loop (at the next batch);
    when the loop raises, breaks or is interrupted (Ctrl-C), leaving the ``with`` block (or
    :meth:`close`, or the iterator being closed or collected) stops the worker and waits for
    it (at most the batch it is computing). The thread is a daemon: it never keeps the
    interpreter alive.

    Args:
        loader: an iterable of batches: tensors (B, 3, H, W) in [0, 1], or tuples / lists whose
            first item is one (the other items pass through, e.g. labels).
        style_augment: a :class:`StyleAugment`, or ``None`` for the pipeline without it.
        before: ``fn(x, generator)`` applied before StyleAugment (e.g. crop and flip), or ``None``.
        after: ``fn(x, generator)`` applied after it (e.g. colour jitter), or ``None``.
        views: independent views per batch: 1 yields a tensor per batch, more yield a list.
        seed: base seed of the per-batch generators.
        start: index of the first batch (a resumed run passes its step).
        prefetch: batches prepared ahead (queue bound, >= 1).
        background: ``True``: a worker thread; ``False``: in the calling thread (synchronous).
        device: move each batch there (non-blocking) before the transforms (default: as is).
        threads: torch intra-op threads of the worker thread (default: torch's default for a new thread).

    Shape:
        - Input: ``loader`` batches (B, 3, H, W) in [0, 1].
        - Output: (B, 3, H', W') per view (as ``after`` makes them), or a list of ``views`` of them;
          for tuple batches, the same tuple with the images replaced.

    Attributes:
        style_seconds: seconds spent in StyleAugment per batch (all views), in order.
        wait_seconds: seconds the consumer waited for each batch (0 when it was ready).

    Raises:
        RFIError: ``prefetch`` or ``views`` < 1, a batch that is not an image tensor.

    Example:
        >>> from encoders import create_encoder
        >>> from inversion.autoencoder import RobustAutoencoder
        >>> from inversion.decoders import Decoder
        >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
        >>> aug = StyleAugment(RobustAutoencoder(enc, Decoder(32, 4, "layer3", channels=16)), p=0.5)
        >>> batches = [torch.rand(4, 3, 16, 16) for _ in range(3)]
        >>> with StyledLoader(batches, aug, seed=0) as loader:
        ...     fast = [x for x in loader]
        >>> slow = list(StyledLoader(batches, aug, seed=0, background=False))
        >>> all(torch.equal(a, b) for a, b in zip(fast, slow))
        True
    """

    def __init__(
        self,
        loader: Any,
        style_augment: StyleAugment | None = None,
        *,
        before: BatchTransform | None = None,
        after: BatchTransform | None = None,
        views: int = 1,
        seed: int = 0,
        start: int = 0,
        prefetch: int = 2,
        background: bool = True,
        device: str | torch.device | None = None,
        threads: int | None = None,
    ):
        if prefetch < 1 or views < 1:
            raise RFIError(f"StyledLoader needs prefetch >= 1 and views >= 1, got prefetch={prefetch}, views={views}")
        self.loader, self.style, self.before, self.after = loader, style_augment, before, after
        self.views, self.seed, self.start, self.prefetch = views, seed, start, prefetch
        self.background, self.threads = background, threads
        self.device = torch.device(device) if device is not None else None
        self.style_seconds: list[float] = []
        self.wait_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None

    # ------------------------------------------------------------------ the work of one batch
    def process(self, batch: Any, index: int) -> Any:
        """Views of one batch (what the loader yields for batch number ``index``)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise RFIError(
                f"StyledLoader batches must be (B, 3, H, W) image tensors (or tuples starting with "
                f"one), got {type(images).__name__}"
            )
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
        out, spent = [], 0.0
        for v in range(self.views):
            g = torch.Generator().manual_seed(batch_seed(self.seed, index, 2 * v))
            x = self.before(images, g) if self.before is not None else images
            if self.style is not None:
                t0 = time.perf_counter()
                style_generator = torch.Generator().manual_seed(batch_seed(self.seed, index, 2 * v + 1))
                x = _with_generator(self.style, style_generator)(x)
                spent += time.perf_counter() - t0
            out.append(self.after(x, g) if self.after is not None else x)
        self.style_seconds.append(spent)
        result: Any = out[0] if self.views == 1 else out
        if isinstance(batch, (tuple, list)):
            return type(batch)([result, *batch[1:]]) if isinstance(batch, tuple) else [result, *batch[1:]]
        return result

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        self.close()  # one active pass at a time
        if not self.background:
            return self._synchronous()
        self._warm_up()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(
            target=self._work, args=(self._queue, self._stop), daemon=True, name="StyledLoader"
        )
        self._thread.start()
        return self._consume(self._queue, self._thread)

    def _warm_up(self) -> None:
        """Build the style encoder's feature extractor here, before the worker starts.

        ``torch.fx`` tracing (which RFI encoders run on their first forward) patches
        ``nn.Module.__call__`` process-wide, so it must not run in one thread while another
        computes: models the training loop uses must likewise have run once before iterating.
        """
        if self.style is None:
            return
        p = next(self.style.autoencoder.parameters())
        side = 2 * self.style.stride
        with torch.no_grad():
            self.style._encode(torch.zeros(2, 3, side, side, device=p.device, dtype=p.dtype))

    def _synchronous(self):
        for i, batch in enumerate(self.loader):
            t0 = time.perf_counter()
            out = self.process(batch, self.start + i)
            self.wait_seconds.append(time.perf_counter() - t0)
            yield out

    def _put(self, q: queue.Queue, stop: threading.Event, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, q: queue.Queue, stop: threading.Event) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's intra-op threads only
        cuda = self.device is not None and self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)  # a new thread starts on GPU 0: this process's GPU (DDP rank)
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            for i, batch in enumerate(self.loader):
                if stop.is_set():
                    return
                if stream is not None:
                    with torch.cuda.stream(stream):
                        out = self.process(batch, self.start + i)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    out, event = self.process(batch, self.start + i), None
                if not self._put(q, stop, (out, event)):
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            self._put(q, stop, _Failure(e))
            return
        self._put(q, stop, _DONE)

    def _consume(self, q: queue.Queue, thread: threading.Thread):
        try:
            while True:
                t0 = time.perf_counter()
                while True:
                    try:
                        item = q.get(timeout=0.1)
                        break
                    except queue.Empty:
                        if not thread.is_alive() and q.empty():
                            raise RFIError("StyledLoader's worker thread stopped without a result") from None
                self.wait_seconds.append(time.perf_counter() - t0)
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                out, event = item
                if event is not None:  # the training stream waits for the side stream's work on this batch
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in _tensors(out):
                        t.record_stream(current)
                yield out
        finally:
            if self._thread is thread:  # not a newer pass's worker
                self.close()

    def close(self) -> None:
        """Stop the worker thread (if any) and wait for it; safe to call more than once."""
        thread, q = self._thread, self._queue
        self._stop.set()
        if q is not None:
            while True:  # unblock a worker waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
            if thread.is_alive():
                log.warning("StyledLoader: the worker thread did not stop within 60 s")
        self._thread, self._queue = None, None

    def __enter__(self) -> StyledLoader:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.loader)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []
