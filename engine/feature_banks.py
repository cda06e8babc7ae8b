"""A session's feature bank and latent feedback, as the host keeps them between frames.

The bank's contents live on the device (:mod:`livediff.models.feature_bank`); here is which of
its frames hold something, where the next frame goes, and when it starts over. StreamV2V's
rule: the features of every ``interval``-th call are kept, the oldest of ``size`` frames
giving way to the newest. A session starts over (nothing kept, no latent fed back) on a new
prompt, a new bank size, a new step count, and on a scene cut: consecutive input frames whose
similarity signal (the one the stochastic similarity filter compares) falls below
``scene_cut``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from livediff.engine.similarity import cosine_similarity
from livediff.models.unet_batch import UNetBatch


def bank_inputs(batches: Sequence[UNetBatch], full: Sequence[bool]) -> list[UNetBatch]:
    """One call's ``batches`` (``full``: whether each one's rows hold every frame of the bank)
    as the UNet takes them: without ``bank_frames`` when every row of the call banks and holds
    all its frames, so the bank's attention runs without a mask (the steady state of banking
    streams); otherwise as they are (masked: rows that hold fewer frames, or none, share it)."""
    if batches and all(full) and all(b.bank_slots is not None for b in batches):
        return [replace(b, bank_frames=None) for b in batches]
    return list(batches)


@dataclass
class BankState:
    """Which of a session's bank frames hold one, and where the next call writes."""

    size: int  # frames kept, 0..pool frames
    interval: int
    calls: int = 0
    held: int = 0
    next_frame: int = 0

    def reset(self) -> None:
        self.calls = self.held = self.next_frame = 0

    def advance(self) -> tuple[int, int | None]:
        """For the next call: (frames held before it, the frame it writes or ``None``)."""
        held, write = self.held, None
        if self.size and self.calls % self.interval == 0:
            write = self.next_frame
            self.held = min(self.held + 1, self.size)
            self.next_frame = (self.next_frame + 1) % self.size
        self.calls += 1
        return held, write


@dataclass
class SceneCuts:
    """Tells a scene cut from the similarity of consecutive input frames."""

    threshold: float
    _previous: np.ndarray | torch.Tensor | None = None

    def is_cut(self, signal: np.ndarray | torch.Tensor) -> bool:
        previous, self._previous = self._previous, signal
        if previous is None or previous.shape != signal.shape:
            return False
        return cosine_similarity(previous, signal) < self.threshold
