"""The stochastic similarity filter: the paper's probability, forced runs, and its use in a Stream."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from livediff.engine.config import StreamConfig
from livediff.engine.similarity import SimilarityFilter, similarity_signal, skip_probability
from livediff.engine.stream import Stream
from livediff.models.bundle import ModelBundle


def _frame(seed: int, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_skip_probability_formula() -> None:
    assert skip_probability(1.0, 0.98) == 1.0
    assert skip_probability(0.99, 0.98) == pytest.approx(0.5)
    assert skip_probability(0.97, 0.98) == 0.0
    assert skip_probability(0.5, 0.0) == pytest.approx(0.5)
    assert skip_probability(1.0, 1.0) == 0.0


def test_identical_frames_skip_until_forced() -> None:
    max_skip = 3
    flt = SimilarityFilter(threshold=0.9, max_skip_frames=max_skip, seed=0)
    signal = similarity_signal(_frame(1))
    decisions = [flt.should_skip(signal) for _ in range(1 + 4 * (max_skip + 1))]
    # The first frame runs (no reference yet); then `max_skip` skips and one forced run, repeating.
    assert decisions[0] is False
    assert decisions[1:] == ([True] * max_skip + [False]) * 4
    assert flt.skipped == 4 * max_skip and flt.processed == 5


def test_skip_rate_follows_probability() -> None:
    """Frames whose similarity gives p = 0.5 are skipped about half the time (seeded, so exact)."""
    base = np.asarray(similarity_signal(_frame(2)))
    noise = np.random.default_rng(3).standard_normal(base.shape).astype(np.float32)
    noise -= noise.dot(base) / base.dot(base) * base  # orthogonal to base
    angle = np.arccos(0.99)  # similarity 0.99
    other = np.cos(angle) * base + np.sin(angle) * noise * np.linalg.norm(base) / np.linalg.norm(
        noise
    )
    flt = SimilarityFilter(threshold=0.98, max_skip_frames=10_000, seed=5)
    trials = 4000
    skips = 0
    for _ in range(trials):
        flt._reference = base  # compare each trial against the same reference
        skips += flt.should_skip(other)
    assert 0.46 < skips / trials < 0.54  # binomial sd is 0.008: these bounds are ~5 sd


def test_threshold_one_never_skips() -> None:
    flt = SimilarityFilter(threshold=1.0, max_skip_frames=100, seed=0)
    signal = similarity_signal(_frame(4))
    assert not any(flt.should_skip(signal) for _ in range(50))


def test_disabled_filter_never_skips() -> None:
    flt = SimilarityFilter(threshold=None, max_skip_frames=100, seed=0)
    signal = similarity_signal(_frame(4))
    assert not any(flt.should_skip(signal) for _ in range(50))


def test_stream_reemits_previous_output_and_skips_the_unet(tiny_bundle: ModelBundle) -> None:
    calls = []

    class CountingBundle:  # a spy around the real bundle: counts UNet calls, changes nothing
        def __getattr__(self, name: str) -> object:
            return getattr(tiny_bundle, name)

        def predict_noise(self, batch: object) -> torch.Tensor:
            calls.append(1)
            return tiny_bundle.predict_noise(batch)  # type: ignore[arg-type]

    stream = Stream(
        CountingBundle(), StreamConfig(), prompt="x", similarity_threshold=0.95, max_skip_frames=2
    )  # type: ignore[arg-type]
    frame = _frame(6)
    outputs = [stream.process(frame)[0] for _ in range(7)]
    # The first frame is the reference; identical frames are skipped from the second on.
    assert [o.skipped for o in outputs] == [False, True, True, False, True, True, False]
    assert [o.index for o in outputs] == list(range(7))
    assert len(calls) == 3  # skipped frames cost no UNet call
    for previous, current in itertools.pairwise(outputs):
        if current.skipped:
            assert torch.equal(current.image, previous.image)
    different = stream.process(_frame(7))[0]
    assert not different.skipped
