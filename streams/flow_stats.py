"""Counters for one session's media flow at the server edge: frames in and out, rates, latency.

"In" is a decoded frame handed to the server by the transport (after RTP depacketising and
decoding, or after JPEG decoding); "out" is a processed frame handed back to the transport
(before encoding). The time between the two for the same ``pts`` is the latency the server adds.
Everything here is O(1) per frame and never blocks.

This is the one place a transport counts its frames: bound to the server's
:class:`~livediff.streams.transport_metrics.TransportMetrics`, each call also moves that
transport's Prometheus series (``livediff_transport_frames{direction}`` and the server
latency histogram), so a connection's figures and ``/metrics`` cannot disagree.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from livediff.streams.transport_metrics import TransportMetrics

_PENDING_LIMIT = 512  # pts still waiting for an answer; older ones were dropped by the engine
_RATE_WINDOW_S = 2.0


class FlowStats:
    """Per-session counters; call :meth:`frame_in`, :meth:`frame_out` and :meth:`frame_dropped`,
    read :meth:`snapshot`. With ``metrics`` the ``transport``'s Prometheus series count too."""

    def __init__(
        self,
        *,
        latency_window: int = 256,
        transport: str = "",
        metrics: TransportMetrics | None = None,
    ) -> None:
        self._series: tuple[Any, Any, Any, Any] | None = None  # in, out, dropped, latency
        if metrics is not None:
            self._series = (
                metrics.frames.labels(transport, "in"),
                metrics.frames.labels(transport, "out"),
                metrics.frames.labels(transport, "dropped"),
                metrics.latency.labels(transport),
            )
        self.frames_in = 0
        self.frames_out = 0
        self.errors = 0
        self._arrivals: OrderedDict[Any, float] = OrderedDict()
        self._in_times: deque[float] = deque()
        self._out_times: deque[float] = deque()
        self._latencies_ms: deque[float] = deque(maxlen=latency_window)

    def frame_in(self, key: Any, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.frames_in += 1
        self._in_times.append(now)
        self._arrivals[key] = now
        if len(self._arrivals) > _PENDING_LIMIT:
            self._arrivals.popitem(last=False)
        if self._series is not None:
            self._series[0].inc()

    def frame_dropped(self) -> None:
        """The engine gave one of this session's frames no output (a drop notice went out)."""
        if self._series is not None:
            self._series[2].inc()

    def frame_out(self, key: Any, now: float | None = None) -> float | None:
        """Count an output; returns the server-added latency in ms if ``key`` came in here."""
        now = time.perf_counter() if now is None else now
        self.frames_out += 1
        self._out_times.append(now)
        if self._series is not None:
            self._series[1].inc()
        arrived = self._arrivals.pop(key, None)
        if arrived is None:
            return None
        latency = (now - arrived) * 1000.0
        self._latencies_ms.append(latency)
        if self._series is not None:
            self._series[3].observe(latency / 1000.0)
        return latency

    def latencies_ms(self) -> list[float]:
        return list(self._latencies_ms)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.perf_counter() if now is None else now
        result: dict[str, Any] = {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "errors": self.errors,
            "fps_in": round(_rate(self._in_times, now), 2),
            "fps_out": round(_rate(self._out_times, now), 2),
        }
        if self._latencies_ms:
            values = np.fromiter(self._latencies_ms, dtype=np.float64)
            result["server_latency_ms_p50"] = round(float(np.percentile(values, 50)), 2)
            result["server_latency_ms_p99"] = round(float(np.percentile(values, 99)), 2)
        return result


def _rate(times: deque[float], now: float) -> float:
    while times and times[0] < now - _RATE_WINDOW_S:
        times.popleft()
    if len(times) < 2:
        return 0.0
    span = max(now - times[0], 1e-6)
    return (len(times) - 1) / span if span >= 0.25 else 0.0
