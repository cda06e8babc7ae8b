"""Churn tests' shared part: 1000 connect/disconnect cycles, leak-free (test_churn_ws, test_churn_webrtc).

Both sides (server and clients) live in this process, so every leak on either side shows.
After a warm-up of 50 cycles the baseline is taken; after the last cycle these must be back
to it exactly: asyncio tasks, threads, open file descriptors, and live ``Session``,
``SessionCore``, ``WsConnection``, ``LivePeer`` and ``RTCPeerConnection`` objects (zero: a
leaked session, connection or peer fails here whatever its size). Resident memory may grow by
at most ``RSS_BOUND_MB`` (48 MiB), for leaks that are not such objects (buffers, frames,
codec state): 52 KiB kept per cycle (one 128×128 RGB output frame and its JPEG) would add
950 × 52 KiB = 48 MiB and fail. What grows without any leak is allocator state (glibc arenas
keep freed pages, torch's CPU allocator caches), and it grows early: on the 2-core CI
machine +3 to +11 MiB over the websocket cycles and +22 MiB over the WebRTC ones, nearly all
of it between cycles 50 and 250; a 2000-cycle WebRTC run then stayed within 636–646 MiB.

The default executor (decoding, encoding) starts threads lazily up to its maximum; it is
filled before the baseline, so that its growth is not mistaken for a leak.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCPeerConnection
from reliability_testing import Resources, live_instances

from livediff.engine.session import Session, SessionCore
from livediff.streams.peer import LivePeer
from livediff.streams.ws_handler import WsConnection

CYCLES = 1000
WARMUP = 50
RSS_BOUND_MB = 48.0
WEBRTC_PARALLEL = 4  # peers connecting at once (each cycle is still connect → use → close)


async def fill_default_executor() -> None:
    """Start every thread of the loop's default executor (it grows lazily up to its maximum)."""
    loop = asyncio.get_running_loop()
    size = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
    barrier = threading.Barrier(size)
    await asyncio.gather(*(loop.run_in_executor(None, barrier.wait) for _ in range(size)))


async def churn(
    cycle: Callable[[int], Awaitable[None]], parallel: int = 1
) -> tuple[Resources, Resources]:
    """Warm up, take the baseline, run the rest of the cycles, measure again."""

    async def run(indices: range) -> None:
        queue = list(indices)

        async def worker() -> None:
            while queue:
                await cycle(queue.pop(0))

        await asyncio.gather(*(worker() for _ in range(parallel)))

    await run(range(WARMUP))
    await fill_default_executor()
    before = Resources.now()
    await run(range(WARMUP, CYCLES))
    return before, Resources.now()


def report(name: str, before: Resources, after: Resources) -> str:
    return (
        f"{name}: rss {before.rss_mb:.1f} -> {after.rss_mb:.1f} MiB "
        f"(+{after.rss_mb - before.rss_mb:.1f}), tasks {before.tasks} -> {after.tasks}, "
        f"threads {before.threads} -> {after.threads}, fds {before.fds} -> {after.fds}"
    )


def assert_no_leaks(name: str, before: Resources, after: Resources) -> None:
    print(report(name, before, after))
    assert (after.tasks, after.threads, after.fds) == (before.tasks, before.threads, before.fds), (
        report(name, before, after),
        before.thread_names,
        after.thread_names,
    )
    assert after.rss_mb - before.rss_mb < RSS_BOUND_MB, report(name, before, after)
    alive = live_instances(Session, SessionCore, WsConnection, LivePeer, RTCPeerConnection)
    assert alive == dict.fromkeys(alive, 0), alive


async def connected(pc: RTCPeerConnection) -> None:
    if pc.connectionState == "connected":
        return
    done = asyncio.Event()

    def changed() -> Any:
        if pc.connectionState in ("connected", "failed", "closed"):
            done.set()

    pc.on("connectionstatechange", changed)
    await done.wait()
    assert pc.connectionState == "connected"
