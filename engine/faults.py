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

import logging
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from livediff.engine.degrade import DegradeController
    from livediff.engine.session import Session

log = logging.getLogger(__name__)
MAX_OOM_STRIKES = 3  # out-of-memory batches in a row before a session that ran alone fails


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
    """Prometheus counters of the faults above, in the engine's registry, one series per device."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("device",)
        self.oom_batches = Counter(
            "livediff_oom_batches",
            "Batches that ran out of device memory (their frames were shed)",
            labels,
            registry=registry,
        )
        self.oom_frames = Counter(
            "livediff_oom_frames",
            "Frames shed because the device ran out of memory",
            labels,
            registry=registry,
        )
        self.row_cap = Gauge(
            "livediff_batch_row_cap",
            "Most UNet rows one batch may take now",
            labels,
            registry=registry,
        )
        self.worker_restarts = Counter(
            "livediff_worker_restarts",
            "Times the worker thread failed and was restarted",
            labels,
            registry=registry,
        )

    def for_device(self, device: str) -> DeviceFaultMetrics:
        return DeviceFaultMetrics(
            self.oom_batches.labels(device),
            self.oom_frames.labels(device),
            self.row_cap.labels(device),
            self.worker_restarts.labels(device),
        )


class DeviceFaultMetrics:
    """One device's series of :class:`FaultMetrics`, with plain counts for ``/stats``."""

    def __init__(
        self, oom_batches: Any, oom_frames: Any, row_cap: Any, worker_restarts: Any
    ) -> None:
        self.oom_batches, self.oom_frames = oom_batches, oom_frames
        self.row_cap, self.worker_restarts = row_cap, worker_restarts
        self.oom_batch_count = 0
        self.oom_frame_count = 0


class FaultHandler:
    """What the worker does with a session or a batch that failed (see the module docstring).

    Owns the row cap and the fault counters; ``post`` hands a callback to the event loop,
    ``rebuild`` asks the control thread for a session's new Stream. Worker thread only.
    """

    def __init__(
        self,
        buckets: Sequence[int],
        metrics: DeviceFaultMetrics,
        degrade: DegradeController,
        post: Callable[[Callable[[], None]], None],
        rebuild: Callable[[Session], None],
        *,
        cuda: bool,
    ) -> None:
        self.row_cap = RowCap(buckets)
        self.metrics = metrics
        self.metrics.row_cap.set(self.row_cap.value)
        self.restarts = RestartBudget()
        self._degrade = degrade
        self._post = post
        self._rebuild = rebuild
        self._cuda = cuda

    def fail(self, session: Session, exc: BaseException) -> None:
        """End ``session`` with ``exc`` as its reason; the others go on."""
        log.error("[%s] session failed: %s", session.id, exc, exc_info=exc)
        reason = f"failed: {type(exc).__name__}: {exc}"
        session.core.close(reason)
        self._post(partial(session.end, reason))

    def out_of_memory(self, sessions: list[Session], rows: int, exc: BaseException) -> None:
        """Shed a batch of ``rows`` (padded) that ran out of device memory."""
        cap = self.row_cap.lower(rows)
        metrics = self.metrics
        metrics.row_cap.set(cap)
        metrics.oom_batches.inc()
        metrics.oom_frames.inc(len(sessions))
        metrics.oom_batch_count += 1
        metrics.oom_frame_count += len(sessions)
        if self._cuda:
            torch.cuda.empty_cache()
        self._degrade.observe(len(sessions), len(sessions))
        for session in sessions:
            core = session.core
            core.oom_strikes += 1
            if core.oom_strikes >= MAX_OOM_STRIKES and len(sessions) == 1:
                self.fail(session, exc)
                continue
            core.suspended = True
            self._rebuild(session)
        log.warning(
            "[engine] out of device memory in a batch of %d rows (sessions %s): frames shed, "
            "Streams rebuilt, batches now at most %d rows",
            rows,
            ", ".join(s.id for s in sessions),
            cap,
        )

    def succeeded(self, sessions: Sequence[Session]) -> None:
        """A batch went through: the cap may rise again, the sessions' strikes are cleared."""
        self.row_cap.succeeded()
        self.metrics.row_cap.set(self.row_cap.value)
        for session in sessions:
            session.core.oom_strikes = 0
