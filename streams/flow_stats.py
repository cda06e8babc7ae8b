"""Counters for one session's media flow at the server edge: frames in and out, rates, latency.

"In" is a decoded frame handed to the server by the transport (after RTP depacketising and
decoding, or after JPEG decoding); "out" is a processed frame handed back to the transport
(before encoding). The time between the two for the same ``pts`` is the latency the server adds.
Everything here is O(1) per frame and never blocks.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np

_PENDING_LIMIT = 512  # pts still waiting for an answer; older ones were dropped by the engine
_RATE_WINDOW_S = 2.0


class FlowStats:
    """Per-session counters; call :meth:`frame_in` and :meth:`frame_out`, read :meth:`snapshot`."""

    def __init__(self, *, latency_window: int = 256) -> None:
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

    def frame_out(self, key: Any, now: float | None = None) -> float | None:
        """Count an output; returns the server-added latency in ms if ``key`` came in here."""
        now = time.perf_counter() if now is None else now
        self.frames_out += 1
        self._out_times.append(now)
        arrived = self._arrivals.pop(key, None)
        if arrived is None:
            return None
        latency = (now - arrived) * 1000.0
        self._latencies_ms.append(latency)
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
