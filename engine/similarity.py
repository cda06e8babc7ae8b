"""Stochastic similarity filter (StreamDiffusion §3.4).

The cosine similarity ``s`` between a frame and the last frame that was processed gives the
probability of skipping the new one::

    p_skip = max(0, 1 - (1 - s) / (1 - threshold))        # 0 when threshold >= 1

so frames less similar than ``threshold`` always run, identical frames are always skipped,
and in between the chance rises smoothly. After ``max_skip_frames`` skips in a row the next
frame runs whatever its similarity, so a static scene still refreshes. The filter never
waits: a skipped frame is answered at once with the previous output.

The similarity is computed on a cheap signal (:func:`similarity_signal`): every
``stride``-th pixel, scaled to [-1, 1]. For frames in host memory this costs no GPU work and
no GPU sync.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

SIGNAL_SIDE = 64


def similarity_signal(
    frame: np.ndarray | torch.Tensor, side: int = SIGNAL_SIDE
) -> np.ndarray | torch.Tensor:
    """A ~``side``×``side`` subsample of an ``[H, W, 3]`` uint8 frame, flattened, in [-1, 1]."""
    height, width = frame.shape[0], frame.shape[1]
    sy, sx = max(1, height // side), max(1, width // side)
    sample = frame[::sy, ::sx]
    if isinstance(sample, torch.Tensor):
        return sample.reshape(-1).to(torch.float32) / 127.5 - 1.0
    return sample.reshape(-1).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def cosine_similarity(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, eps: float = 1e-6
) -> float:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        value = torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1), eps=eps)
        return float(value.item())
    a_np = np.asarray(a, dtype=np.float64).ravel()
    b_np = np.asarray(b, dtype=np.float64).ravel()
    denominator = max(float(np.linalg.norm(a_np) * np.linalg.norm(b_np)), eps)
    return float(np.dot(a_np, b_np) / denominator)


def skip_probability(similarity: float, threshold: float) -> float:
    """The paper's skip probability for a similarity and threshold."""
    if threshold >= 1.0 or not math.isfinite(similarity):
        return 0.0
    return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))


class SimilarityFilter:
    """Decides per frame whether to skip it; holds the last processed signal and a seeded RNG."""

    def __init__(self, threshold: float | None, max_skip_frames: int, seed: int = 0) -> None:
        self.threshold = threshold
        self.max_skip_frames = max_skip_frames
        self._rng = random.Random(seed)
        self._reference: np.ndarray | torch.Tensor | None = None
        self.consecutive_skips = 0
        self.skipped = 0
        self.processed = 0

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    def configure(self, threshold: float | None, max_skip_frames: int) -> None:
        self.threshold = threshold
        self.max_skip_frames = max_skip_frames

    def reseed(self, seed: int) -> None:
        self._rng.seed(seed)

    def should_skip(self, signal: np.ndarray | torch.Tensor, *, can_skip: bool = True) -> bool:
        """True when this frame should be skipped; records the frame as the reference if it runs.

        ``can_skip=False`` (nothing to re-emit yet) runs the frame but still takes it as the
        reference, so the next identical frame can already be skipped.
        """
        skip = False
        if (
            can_skip
            and self.threshold is not None
            and self._reference is not None
            and self._reference.shape == signal.shape
        ):
            probability = skip_probability(
                cosine_similarity(self._reference, signal), self.threshold
            )
            forced = self.consecutive_skips >= self.max_skip_frames
            skip = not forced and self._rng.random() < probability
        if skip:
            self.consecutive_skips += 1
            self.skipped += 1
        else:
            self._reference = signal
            self.consecutive_skips = 0
            self.processed += 1
        return skip
