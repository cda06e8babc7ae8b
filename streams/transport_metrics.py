"""Prometheus metrics of the server's edges, registered beside the engine's own.

``/metrics`` exposes ``engine.registry``; these collectors join it while the app runs and leave
it at clean-up (:meth:`TransportMetrics.close`), so one engine can serve successive apps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class TransportMetrics:
    """Connections, frames and server-added latency per transport (``webrtc`` or ``websocket``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self.connections = Gauge(
            "livediff_transport_connections",
            "Open client connections",
            ["transport"],
            registry=registry,
        )
        self.frames = Counter(
            "livediff_transport_frames",
            "Frames through the server edge",
            ["transport", "direction"],
            registry=registry,
        )
        self.rejected = Counter(
            "livediff_transport_rejected",
            "Requests and messages answered with an error",
            ["transport", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "livediff_transport_server_latency_seconds",
            "Decoded input frame to processed output frame, at the server edge",
            ["transport"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._collectors = (self.connections, self.frames, self.rejected, self.latency)
        self._closed = False

    def close(self) -> None:
        """Unregister from the engine's registry; idempotent."""
        if self._closed:
            return
        self._closed = True
        for collector in self._collectors:
            self._registry.unregister(collector)
