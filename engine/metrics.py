"""Counters, rates and latency percentiles per session and for the engine, and their Prometheus export.

Two views of the same numbers:

- Python: :meth:`Session.stats` and :meth:`Engine.metrics` return plain dicts (percentiles over
  the last ``window`` samples, rates over the last couple of seconds).
- Prometheus: every engine owns a :class:`prometheus_client.CollectorRegistry` (never the
  global default) holding the ``livediff_*`` metrics below; per-session series carry a
  ``session`` label and are removed when the session closes, so cardinality stays bounded by
  ``max_sessions``.

Frame accounting (exact at every instant, under the session lock)::

    submitted = processed + skipped + dropped_inbox + dropped_deadline + dropped_reconfigure + in_flight
    processed + skipped = received + dropped_outbox + outbox_depth      (outputs, once delivered)

``dropped_outbox`` also counts outputs that arrive after their session was closed.

``late`` counts processed frames that finished after their deadline (they are not drops).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("queue", "encode", "unet", "decode", "total")
DROP_REASONS = ("inbox", "deadline", "outbox", "reconfigure")
# fmt: off
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
# fmt: on
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Window:
    """The last ``size`` samples of one quantity; not thread-safe (callers hold a lock)."""

    def __init__(self, size: int) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._samples.append(value)

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self) -> dict[str, float | None]:
        if not self._samples:
            return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
        values = np.fromiter(self._samples, dtype=np.float64, count=len(self._samples))
        p50, p95, p99 = np.percentile(values, (50, 95, 99))
        return {
            "p50": float(p50),
            "p95": float(p95),
            "p99": float(p99),
            "mean": float(values.mean()),
            "max": float(values.max()),
        }


class RateMeter:
    """Events per second over the last ``horizon_s`` seconds; not thread-safe."""

    def __init__(self, horizon_s: float = 2.0, size: int = 1024) -> None:
        self.horizon_s = horizon_s
        self._times: deque[float] = deque(maxlen=size)

    def tick(self, now: float, count: int = 1) -> None:
        for _ in range(count):
            self._times.append(now)

    def rate(self, now: float) -> float:
        while self._times and now - self._times[0] > self.horizon_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = max(now, self._times[-1]) - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0


@dataclass
class FrameCounts:
    """What happened to a session's frames (see the module docstring for the identities)."""

    submitted: int = 0
    processed: int = 0
    skipped: int = 0
    late: int = 0
    dropped_inbox: int = 0
    dropped_deadline: int = 0
    dropped_reconfigure: int = 0
    dropped_outbox: int = 0
    received: int = 0

    def add(self, other: FrameCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def dropped(self) -> int:
        return self.dropped_inbox + self.dropped_deadline + self.dropped_reconfigure


class StageWindows:
    """Latency windows per stage (milliseconds)."""

    def __init__(self, size: int) -> None:
        self.windows = {stage: Window(size) for stage in STAGES}

    def add(self, stage: str, ms: float) -> None:
        self.windows[stage].add(ms)

    def summary(self) -> dict[str, dict[str, float | None]]:
        return {stage: window.summary() for stage, window in self.windows.items()}


@dataclass(frozen=True)
class SessionSeries:
    """One session's Prometheus series (children bound to its ``session`` label) and the
    engine-wide latency windows its frames also feed (:meth:`EngineMetrics.session_series`)."""

    submitted: Any
    processed: Any
    skipped: Any
    late: Any
    dropped: dict[str, Any]  # by reason (DROP_REASONS)
    inbox: Any
    outbox: Any
    latency: Any
    stage: Callable[[str, float], None]  # the engine's stage windows and histogram


class SessionMetrics:
    """One session's frame ledger: every event of its frames is recorded here, once.

    Each call updates the session's counts, rates and windows (what ``Session.stats()`` and
    the engine's totals read) and, when bound to :class:`SessionSeries`, its Prometheus series
    and the engine's stage windows (what ``/metrics`` and ``Engine.metrics()`` read) in the same
    step, so the two views cannot disagree. Guarded by the session's lock.
    """

    def __init__(self, window: int, series: SessionSeries | None = None) -> None:
        self.counts = FrameCounts()
        self.stages = StageWindows(window)
        self.gpu_ms_per_frame = Window(window)
        self.input_rate = RateMeter()
        self.output_rate = RateMeter()
        self._series = series

    # ------------------------------------------------------------------ a frame's events
    def submitted(self, now: float) -> None:
        self.counts.submitted += 1
        self.input_rate.tick(now)
        if self._series is not None:
            self._series.submitted.inc()

    def dropped(self, reason: str, count: int = 1) -> None:
        """``count`` frames got no output for ``reason`` (one of :data:`DROP_REASONS`)."""
        if count <= 0:
            return
        field = f"dropped_{reason}"
        setattr(self.counts, field, getattr(self.counts, field) + count)
        if self._series is not None:
            self._series.dropped[reason].inc(count)

    def waited(self, seconds: float) -> None:
        """A frame was taken by the worker after ``seconds`` in the inbox."""
        self.stages.add("queue", seconds * 1000.0)
        if self._series is not None:
            self._series.stage("queue", seconds)

    def answered(self, *, skipped: bool, late: bool, latency_s: float) -> None:
        """One output (generated, or the previous one again for a skip)."""
        counts = self.counts
        if skipped:
            counts.skipped += 1
        else:
            counts.processed += 1
            counts.late += late
        self.stages.add("total", latency_s * 1000.0)
        if self._series is not None:
            series = self._series
            (series.skipped if skipped else series.processed).inc()
            if late and not skipped:
                series.late.inc()
            series.latency.observe(latency_s)
            series.stage("total", latency_s)

    def received(self) -> None:
        """The reader took one output."""
        self.counts.received += 1

    def inbox_depth(self, depth: int) -> None:
        if self._series is not None:
            self._series.inbox.set(depth)

    def outbox_depth(self, depth: int) -> None:
        if self._series is not None:
            self._series.outbox.set(depth)

    def summary(self, now: float) -> dict[str, object]:
        counts = self.counts
        return {
            **asdict(counts),
            "dropped": counts.dropped,
            "fps_in": self.input_rate.rate(now),
            "fps_out": self.output_rate.rate(now),
            "latency_ms": self.stages.summary(),
            "gpu_ms_per_frame": self.gpu_ms_per_frame.summary(),
        }


class StageTimer:
    """Marks between stages: CUDA events on CUDA (read after the output event), else the clock."""

    def __init__(self, cuda: bool, clock: Callable[[], float]) -> None:
        self.cuda, self.clock = cuda, clock
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, self.clock()))

    def durations(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (_, start), (name, end) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = start.elapsed_time(end) / 1000.0 if self.cuda else end - start
        return out


class EngineMetrics:
    """The Prometheus metrics of one engine plus engine-wide windows; thread-safe."""

    def __init__(self, window: int = 1024) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._lock = threading.Lock()
        self.stages = StageWindows(window)
        self.batch_rows = Window(window)
        self.batch_sessions = Window(window)
        self.gpu_ms_per_frame = Window(window)
        self.batches = 0
        self.refused_counts = {"capacity": 0, "degraded": 0}
        self.closed_counts = FrameCounts()
        self._sessions_gauge = Gauge("livediff_sessions", "Open sessions", registry=reg)
        self._level = Gauge(
            "livediff_degrade_level",
            "Degrade level (0 normal ... 3 refusing sessions)",
            registry=reg,
        )
        self.degrade_pressure = Gauge(
            "livediff_degrade_pressure",
            "Share of the frames of the last degrade window that were late or dropped for it",
            registry=reg,
        )
        self._transitions = Counter(
            "livediff_degrade_transitions",
            "Degrade level changes, by the level entered",
            ["level"],
            registry=reg,
        )
        self._refused = Counter(
            "livediff_sessions_refused", "Sessions refused", ["reason"], registry=reg
        )
        self._submitted = Counter(
            "livediff_frames_submitted", "Frames submitted", ["session"], registry=reg
        )
        self._processed = Counter(
            "livediff_frames_processed", "Frames generated", ["session"], registry=reg
        )
        self._skipped = Counter(
            "livediff_frames_skipped",
            "Frames skipped by the similarity filter",
            ["session"],
            registry=reg,
        )
        self._late = Counter(
            "livediff_frames_late",
            "Frames generated after their deadline",
            ["session"],
            registry=reg,
        )
        self._dropped = Counter(
            "livediff_frames_dropped", "Frames dropped", ["session", "reason"], registry=reg
        )
        self._inbox = Gauge(
            "livediff_inbox_depth", "Frames waiting in the inbox", ["session"], registry=reg
        )
        self._outbox = Gauge(
            "livediff_outbox_depth", "Outputs waiting to be received", ["session"], registry=reg
        )
        self._latency = Histogram(
            "livediff_frame_latency_seconds",
            "Arrival to output ready",
            ["session"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self._stage = Histogram(
            "livediff_stage_seconds",
            "Per-stage latency",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self._rows = Histogram(
            "livediff_batch_rows",
            "UNet rows per call (before padding)",
            buckets=_ROW_BUCKETS,
            registry=reg,
        )
        self._padded = Histogram(
            "livediff_batch_padded_rows",
            "UNet rows per call (bucket)",
            buckets=_ROW_BUCKETS,
            registry=reg,
        )
        self._batch_sessions = Histogram(
            "livediff_batch_sessions", "Sessions per UNet call", buckets=_ROW_BUCKETS, registry=reg
        )
        self._gpu = Histogram(
            "livediff_gpu_seconds_per_frame",
            "Device time per generated frame",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )

    # ------------------------------------------------------------------ sessions
    def session_series(self, session_id: str) -> SessionSeries:
        """The series a new session's :class:`SessionMetrics` records into (created at zero)."""
        return SessionSeries(
            submitted=self._submitted.labels(session_id),
            processed=self._processed.labels(session_id),
            skipped=self._skipped.labels(session_id),
            late=self._late.labels(session_id),
            dropped={reason: self._dropped.labels(session_id, reason) for reason in DROP_REASONS},
            inbox=self._inbox.labels(session_id),
            outbox=self._outbox.labels(session_id),
            latency=self._latency.labels(session_id),
            stage=self.stage,
        )

    def session_opened(self, session_id: str, open_sessions: int) -> None:
        self._sessions_gauge.set(open_sessions)

    def session_closed(self, session_id: str, open_sessions: int, counts: FrameCounts) -> None:
        self._sessions_gauge.set(open_sessions)
        with self._lock:
            self.closed_counts.add(counts)
        for metric in (
            self._submitted,
            self._processed,
            self._skipped,
            self._late,
            self._inbox,
            self._outbox,
            self._latency,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(session_id)
        for reason in DROP_REASONS:
            with contextlib.suppress(KeyError):
                self._dropped.remove(session_id, reason)

    def refused(self, reason: str) -> None:
        with self._lock:
            self.refused_counts[reason] += 1
        self._refused.labels(reason).inc()

    def level_changed(self, level: int, label: str) -> None:
        self._level.set(level)
        self._transitions.labels(label).inc()

    # ------------------------------------------------------------------ frames
    # A frame's own events go through its session's SessionMetrics (bound to session_series).
    def stage(self, stage: str, seconds: float, count: int = 1) -> None:
        """``count`` frames spent ``seconds`` in ``stage`` (one of :data:`STAGES`)."""
        with self._lock:
            for _ in range(count):
                self.stages.add(stage, seconds * 1000.0)
        for _ in range(count):
            self._stage.labels(stage).observe(seconds)

    def batch(self, rows: int, padded_rows: int, sessions: int, gpu_s_per_frame: float) -> None:
        with self._lock:
            self.batches += 1
            self.batch_rows.add(rows)
            self.batch_sessions.add(sessions)
            self.gpu_ms_per_frame.add(gpu_s_per_frame * 1000.0)
        self._rows.observe(rows)
        self._padded.observe(padded_rows)
        self._batch_sessions.observe(sessions)
        self._gpu.observe(gpu_s_per_frame)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "latency_ms": self.stages.summary(),
                "batches": self.batches,
                "batch_rows": self.batch_rows.summary(),
                "batch_sessions": self.batch_sessions.summary(),
                "gpu_ms_per_frame": self.gpu_ms_per_frame.summary(),
                "sessions_refused": dict(self.refused_counts),
                "closed_sessions_frames": asdict(self.closed_counts),
            }
