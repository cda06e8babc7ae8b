"""What the worker does when the device or the worker itself fails.

Out of device memory in a batch
    ``torch.cuda.OutOfMemoryError`` (or any ``RuntimeError`` whose message says "out of
    memory", as other backends and the CUDA caching allocator word it) is caught around one
    batch. The batch's frames are shed, the device cache is emptied, and the batch's sessions
    degrade: each gets a fresh Stream built on the control thread (frames the old one held
    count as ``dropped_reconfigure``; until the new one is in place the session is not
    scheduled), the shed frames count as late for the degrade controller (so sustained
    pressure moves the engine to fewer steps, then lower resolution), and batches are capped
    one bucket below the size that failed (:class:`RowCap`; the cap rises again one bucket per
    ``recover_after`` successful batches). A session caught in ``MAX_OOM_STRIKES`` (3)
    out-of-memory batches in a row, the last of them alone, cannot run at all: it fails with
    that reason, and the others go on.

The worker thread dies
    An exception that escapes the worker's loop (a bug, a broken device) ends every session
    on that worker with a reason, and the worker starts a new thread. At most
    ``max_restarts`` restarts happen in ``restart_window_s``; after that the worker stays down
    and new sessions are refused (:class:`RestartBudget`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the device running out of memory (CUDA's own error, or a backend's RuntimeError)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class RowCap:
    """The most UNet rows one batch may take: lowered after out-of-memory, raised back slowly."""

    def __init__(self, buckets: Sequence[int], recover_after: int = 256) -> None:
        self.buckets = tuple(buckets)
        self.recover_after = recover_after
        self.value = self.buckets[-1]
        self._successes = 0

    def lower(self, failed_rows: int) -> int:
        """A batch of ``failed_rows`` (padded) ran out of memory: cap below it; returns the cap."""
        smaller = [b for b in self.buckets if b < failed_rows]
        self.value = max(smaller) if smaller else self.buckets[0]
        self._successes = 0
        return self.value

    def succeeded(self) -> None:
        if self.value >= self.buckets[-1]:
            return
        self._successes += 1
        if self._successes >= self.recover_after:
            self._successes = 0
            self.value = min(b for b in self.buckets if b > self.value)


class RestartBudget:
    """At most ``max_restarts`` in any ``window_s`` seconds."""

    def __init__(self, max_restarts: int = 5, window_s: float = 60.0) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: deque[float] = deque()
        self.total = 0

    def allow(self, now: float) -> bool:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        self.total += 1
        return True


class FaultMetrics:
    """Prometheus counters of the faults above, in the engine's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.oom_batches = Counter(
            "livediff_oom_batches",
            "Batches that ran out of device memory (their frames were shed)",
            registry=registry,
        )
        self.oom_frames = Counter(
            "livediff_oom_frames",
            "Frames shed because the device ran out of memory",
            registry=registry,
        )
        self.row_cap = Gauge(
            "livediff_batch_row_cap", "Most UNet rows one batch may take now", registry=registry
        )
        self.worker_restarts = Counter(
            "livediff_worker_restarts",
            "Times the worker thread failed and was restarted",
            registry=registry,
        )
        self.oom_batch_count = 0
        self.oom_frame_count = 0
