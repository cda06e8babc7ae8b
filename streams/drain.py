"""Graceful shutdown of the app: refuse new clients, finish the frames in flight, say goodbye.

On SIGTERM (or SIGINT) ``livediff serve`` runs :func:`drain_connections` while it still
listens (:func:`livediff.streams.app.drain_app`), bounded by ``[server] shutdown_timeout_s``;
only then does it stop listening:

1. New ``/offer`` and ``/ws`` requests are refused (503 ``{"error": "the server is shutting
   down"}`` with ``Retry-After``, websocket ``{"error": …}`` then close 1013), never with a
   refused connection.
2. Every connection stops taking input: frames already received are submitted, later ones
   are ignored.
3. The engine answers everything submitted (``Engine.wait_idle``; frames held inside a
   Stream Batch pipeline, ``steps - 1`` per session, need later frames and stay unanswered).
4. Every connection sends its session's remaining outputs, then its closing message:
   websocket close 1001 with reason ``"server shutdown"``; WebRTC data channel
   ``{"closing": "server shutdown"}``, then the channel and the peer close.

Whatever is still open when the time runs out is closed at once (close 1001 without the
remaining outputs). Then the engine stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from aiohttp import web

from livediff.streams.engine_protocol import EngineLike

log = logging.getLogger(__name__)
SHUTDOWN_REASON = "server shutdown"
SHUTTING_DOWN = "the server is shutting down"


class Drainable(Protocol):
    """A client connection that can be drained (a websocket or a WebRTC peer)."""

    async def stop_input(self) -> None:
        """Take no more input; return once everything received has been submitted."""

    async def finish(self, reason: str) -> None:
        """Send the outputs still due, then the closing message, and close."""

    async def wait_closed(self) -> None:
        """Return once the connection is completely over (its session closed, unregistered)."""


class Drain:
    """The app's lifecycle flag and its open websocket connections (peers are in the registry)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.websockets: set[Drainable] = set()

    @property
    def draining(self) -> bool:
        return self.reason is not None

    def begin(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


DRAIN = web.AppKey("drain", Drain)


async def drain_connections(
    drain: Drain, peers: list[Drainable], engine: EngineLike, timeout_s: float
) -> bool:
    """Steps 1–4 of the module docstring; ``True`` when all finished in time."""
    drain.begin(SHUTDOWN_REASON)
    connections: list[Drainable] = [*drain.websockets, *peers]
    if not connections:
        return True

    async def run() -> None:
        await asyncio.gather(*(c.stop_input() for c in connections))
        if getattr(getattr(engine, "state", None), "value", None) == "running":
            await engine.wait_idle()
        results = await asyncio.gather(*(_finish(c) for c in connections), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("drain: a connection failed to finish: %r", result)

    try:
        await asyncio.wait_for(run(), timeout=timeout_s)
    except asyncio.TimeoutError:
        log.warning(
            "drain: %d connections not finished after %.1f s; closing them now",
            len(connections),
            timeout_s,
        )
        return False
    log.info("drain: %d connections finished", len(connections))
    return True


async def _finish(connection: Drainable) -> None:
    await connection.finish(SHUTDOWN_REASON)
    await connection.wait_closed()
