"""Churn: 1000 connect/disconnect cycles each of websocket clients and aiortc peers, leak-free.

Both sides (server and clients) live in this process, so every leak on either side shows.
After a warm-up of 50 cycles the baseline is taken; after the last cycle these must be back
to it exactly: asyncio tasks, threads, open file descriptors, and live ``Session``,
``SessionCore``, ``WsConnection``, ``LivePeer`` and ``RTCPeerConnection`` objects (zero: a
leaked session, connection or peer fails here whatever its size). Resident memory may grow by
at most ``RSS_BOUND_MB`` (48 MiB), for leaks that are not such objects (buffers, frames,
codec state): 52 KiB kept per cycle (one 128×128 RGB output frame and its JPEG) would add
950 × 52 KiB = 48 MiB and fail. What grows without any leak is allocator state (glibc arenas
keep freed pages, torch's CPU allocator caches), and it grows early: on the 2-core CI
machine +3 MiB over the websocket cycles and +22 MiB over the WebRTC ones, nearly all of it
between cycles 50 and 250; a 2000-cycle WebRTC run then stayed within 636–646 MiB.

The default executor (decoding, encoding) starts threads lazily up to its maximum; it is
filled before the baseline, so that its growth is not mistaken for a leak.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiortc import RTCPeerConnection
from reliability_testing import Resources, live_instances
from websockets.asyncio.client import connect

from helpers.streams_testing import (
    NEEDS_NETNS,
    netns_module_runner,
    pattern,
    running_server,
    visible_tiny_bundle,
)
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.engine.session import Session, SessionCore
from livediff.models.bundle import ModelBundle
from livediff.streams import app_keys
from livediff.streams.drain import DRAIN
from livediff.streams.jpeg import encode_jpeg
from livediff.streams.peer import LivePeer
from livediff.streams.server_config import ServerConfig
from livediff.streams.ws_handler import WsConnection

test_in_loopback_netns = netns_module_runner(__file__)
pytestmark = pytest.mark.slow

CYCLES = 1000
WARMUP = 50
RSS_BOUND_MB = 48.0
WEBRTC_PARALLEL = 4  # peers connecting at once (each cycle is still connect → use → close)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


async def fill_default_executor() -> None:
    """Start every thread of the loop's default executor (it grows lazily up to its maximum)."""
    loop = asyncio.get_running_loop()
    size = min(32, (__import__("os").cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
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


async def test_websocket_clients_churn_without_leaks(bundle: ModelBundle) -> None:
    frame = encode_jpeg(pattern(96, 96, seed=1))
    async with running_server(bundle, ServerConfig()) as (base, app, engine):
        url = base.replace("http://", "ws://") + "/ws"

        async def cycle(index: int) -> None:
            client = await connect(url)
            session = json.loads(await client.recv())["session"]
            (server_side,) = [c for c in app[DRAIN].websockets if c.session.id == session]
            if index % 3 == 0:  # a frame and its answer, then a clean close
                await client.send(frame)
                assert isinstance(await client.recv(), bytes)
                await client.close()
            elif index % 3 == 1:  # a frame, and the client dies before its answer
                await client.send(frame)
                client.transport.abort()
            else:  # connect and leave at once
                await client.close()
            await server_side.wait_closed()

        before, after = await churn(cycle)
        await engine.wait_idle()
        assert len(engine.sessions) == 0 and len(app[app_keys.WEBSOCKETS]) == 0
        del cycle  # its closure holds the last connection objects
        assert_no_leaks("websocket churn", before, after)


@NEEDS_NETNS
async def test_webrtc_peers_churn_without_leaks(bundle: ModelBundle) -> None:
    image = pattern(64, 64, seed=2)
    config = ServerConfig(host_addresses=("127.0.0.1",))
    async with running_server(bundle, config) as (base, app, engine):
        peers = app[app_keys.PEERS]

        async def cycle(index: int) -> None:
            client = WebRTCClient(base)
            await client.connect(ImageTrack(image, fps=30))
            peer = peers.get(client.session or "")
            assert peer is not None
            if index % 25 == 0:  # now and then a frame all the way round
                assert (await client.recv_frame()).shape == (128, 128, 3)
            else:
                await connected(client.pc)
            await client.close()
            await peer.wait_closed()

        before, after = await churn(cycle, parallel=WEBRTC_PARALLEL)
        await engine.wait_idle()
        assert len(engine.sessions) == 0 and len(peers) == 0
        del cycle
        assert_no_leaks("webrtc churn", before, after)


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
