"""Batch overlap's timing (``RuntimeConfig.overlap``): when to gather the next batch.

With overlap on, a launched batch is not waited for at once: the worker waits until shortly
before the batch should end, gathers and launches the next one behind it on the same CUDA
stream, and only then waits for the first and answers it. :class:`OverlapClock` keeps what
that needs, all smoothed with the runtime's ``batch_time_smoothing``:

- the host time from gathering a batch to its launch (``launch_s``): the next batch is gathered
  ``LEAD_FACTOR`` times that (plus ``LEAD_MARGIN_S``) before the running one should end;
- the host time from a batch's end to its answers being posted (``land_s``): with overlap
  the deadline rule counts it, since an answer also waits for it;
- when the last batch was seen done (``last_done``): a batch launched behind another starts
  on the device when that one ends, not at its own launch.

Worker thread only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livediff.engine.batch_planning import GroupKey
    from livediff.engine.batch_step import Computed, Entry

LEAD_MARGIN_S = 0.001  # launch the next batch this much earlier than the host needs, at least
LEAD_FACTOR = 1.5  # ... and this many times the smoothed host time of a launch


@dataclass
class InFlight:
    """A launched batch that has not been waited for (overlap)."""

    key: GroupKey
    entries: list[Entry]
    computed: Computed
    session_ids: frozenset[str]
    expected_end: float  # clock time the batch should be done by, from the batch time estimate


class OverlapClock:
    """The host-side timings overlap decides by; see the module docstring."""

    def __init__(self, smoothing: float, clock: Callable[[], float]) -> None:
        self.smoothing = smoothing
        self.clock = clock
        self.launch_s = 0.0
        self.land_s = 0.0
        self.last_done = 0.0

    def lead(self) -> float:
        """How long before the running batch's end to start gathering the next one."""
        return LEAD_FACTOR * self.launch_s + LEAD_MARGIN_S

    def launched(self, t_gather: float, launched: float) -> None:
        self.launch_s += self.smoothing * (launched - t_gather - self.launch_s)

    def landed(self, done_at: float) -> None:
        """A batch that ended at ``done_at`` has had its answers posted (now)."""
        self.last_done = done_at
        self.land_s += self.smoothing * (self.clock() - done_at - self.land_s)

    def wait_until(
        self, target: float, cond: threading.Condition, stopping: Callable[[], bool]
    ) -> None:
        """Wait on ``cond`` (so ``stop`` still wakes it) until ``target`` on the engine's clock.

        The wait itself runs on the real monotonic clock for the span the engine's clock gives,
        so an injected clock that stands still cannot hang the thread.
        """
        span = target - self.clock()
        if span <= 0:
            return
        until = time.monotonic() + span
        with cond:
            while not stopping() and (left := until - time.monotonic()) > 0:
                cond.wait(left)
