"""``apps.style.loader.StyledLoader``: background stylisation equals the synchronous pipeline; clean shutdown."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from apps.ssl.config import ViewConfig
from apps.ssl.views import Views
from apps.style.augment import StyleAugment
from apps.style.loader import StyledLoader, batch_seed
from encoders.core.errors import RFIError
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def style():
    encoder = tiny_net()  # seeds torch's generator: the decoder's initial weights follow from it
    decoder = Decoder(32, stride=4, layer="layer3", channels=16, min_channels=8)
    return StyleAugment(RobustAutoencoder(encoder, decoder), p=0.7, alpha=(0.1, 0.3), beta=(0.1, 0.3))


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(6, 3, 20, 20, generator=g), torch.arange(6) + i) for i in range(5)]


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "StyledLoader" and t.is_alive()]


def test_background_yields_exactly_the_synchronous_pipeline(style, batches):
    views = Views(ViewConfig(), size=16)
    kwargs = {"before": views.geometry, "after": views.colour, "views": 2, "seed": 3}
    with StyledLoader(batches, style, **kwargs) as loader:
        fast = list(loader)
    slow = list(StyledLoader(batches, style, background=False, **kwargs))
    # ... and what a hand-written loop with the documented per-batch generators gives
    by_hand = []
    for i, (x, y) in enumerate(batches):
        out = []
        for v in range(2):
            g = torch.Generator().manual_seed(batch_seed(3, i, 2 * v))
            aug = StyleAugment.__new__(StyleAugment)
            aug.__dict__.update(style.__dict__)
            aug.generator = torch.Generator().manual_seed(batch_seed(3, i, 2 * v + 1))
            out.append(views.colour(aug(views.geometry(x, g)), g))
        by_hand.append((out, y))
    assert len(fast) == len(slow) == len(by_hand) == 5
    for (f, fy), (s, sy), (h, hy) in zip(fast, slow, by_hand):
        assert torch.equal(fy, sy) and torch.equal(fy, hy)
        for a, b, c in zip(f, s, h):
            assert a.shape == (6, 3, 16, 16) and torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(fast[0][0][0], fast[0][0][1])  # two different views
    # Resuming at batch 2 continues exactly; a plain pipeline sees the same crops and colours.
    resumed = list(StyledLoader(batches[2:], style, start=2, **kwargs))
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(resumed, fast[2:]))
    plain = list(StyledLoader(batches, None, **kwargs))
    plain_by_hand = views.colour(views.geometry(batches[0][0], g := torch.Generator().manual_seed(batch_seed(3, 0))), g)
    assert torch.equal(plain[0][0][0], plain_by_hand)
    assert not _workers()


def test_stops_cleanly_when_the_training_loop_raises(style, batches):
    with (
        pytest.raises(ValueError, match="training step failed"),
        StyledLoader(batches * 4, style, prefetch=1) as loader,
    ):
        for i, _ in enumerate(loader):
            if i == 1:
                raise ValueError("training step failed")
    assert not _workers()
    # A loop that breaks out, without a with block: closing the iterator stops the worker.
    loader = StyledLoader(batches * 4, style, prefetch=1)
    it = iter(loader)
    next(it)
    assert _workers()
    it.close()
    assert not _workers()


def test_worker_errors_are_raised_in_the_training_loop(style, batches):
    def broken():
        yield from batches[:2]
        raise OSError("disk gone")

    seen = 0
    with pytest.raises(OSError, match="disk gone"), StyledLoader(broken(), style) as loader:
        for _ in loader:
            seen += 1
    assert seen == 2 and not _workers()
    with pytest.raises(RFIError, match="image tensors"):
        list(StyledLoader(["not a batch"], style))
    assert not _workers()


def test_prefetch_is_bounded_and_threads_are_the_workers_own(style, batches):
    made = []

    def counting():
        for b in batches * 3:
            made.append(1)
            yield b

    threads = torch.get_num_threads()
    with StyledLoader(counting(), style, prefetch=2, threads=2) as loader:
        it = iter(loader)
        next(it)
        time.sleep(0.5)
        # one consumed, at most 2 queued and 1 being prepared (blocked on the full queue)
        assert len(made) <= 1 + 2 + 1
        assert torch.get_num_threads() == threads
    assert not _workers()
    with pytest.raises(RFIError, match="prefetch"):
        StyledLoader(batches, style, prefetch=0)
