"""Websocket faults: a client vanishing mid-frame, and the graceful drain at shutdown.

A frame is held "in flight" deterministically by a bundle whose UNet call waits for a gate
(``GatedBundle``): the test knows the engine is inside that frame's batch when ``entered`` is
set, and decides when it finishes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from reliability_testing import GatedBundle, derived, problems
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers.streams_testing import pattern, running_server, visible_tiny_bundle
from livediff.clients.ws_client import WsClient
from livediff.exceptions import SessionClosedError
from livediff.streams import app_keys
from livediff.streams.drain import DRAIN
from livediff.streams.server_config import ServerConfig
from livediff.wire import encode_jpeg

FRAME = encode_jpeg(pattern(96, 96, seed=4))


@pytest.fixture
def bundle() -> GatedBundle:
    return derived(GatedBundle, visible_tiny_bundle())


@pytest.fixture
async def server(bundle: GatedBundle) -> AsyncIterator[tuple[str, Any, Any]]:
    async with running_server(bundle, ServerConfig()) as running:
        yield running
    bundle.gate.set()  # never leave the worker waiting


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def entered(bundle: GatedBundle) -> None:
    """Return once the engine is inside a batch (the worker waits at the gate)."""
    await asyncio.to_thread(bundle.entered.wait)


async def test_a_client_that_vanishes_mid_frame_leaks_nothing_and_others_go_on(
    server: Any, bundle: GatedBundle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    base, app, engine = server
    async with await WsClient.connect(ws_url(base)) as other:
        vanishing = await connect(ws_url(base))
        session_id = json.loads(await vanishing.recv())["session"]
        session = engine.sessions[session_id]
        connections = list(app[DRAIN].websockets)  # the server's side of both
        await vanishing.send(FRAME)
        await entered(bundle)  # its frame is in the model now
        vanishing.transport.abort()  # no close frame, no FIN: the TCP connection just dies
        with pytest.raises(SessionClosedError):
            await session.recv()  # returns when the server has closed the session
        bundle.gate.set()  # the frame finishes for nobody
        await other.send_frame(pattern(96, 96, seed=5))
        assert (await other.recv_frame()).shape == (128, 128, 3)
        assert list(engine.sessions) == [other.session]
        stats = engine.metrics()["closed_sessions_frames"]
    await asyncio.gather(*(connection.wait_closed() for connection in connections))
    assert len(app[app_keys.WEBSOCKETS]) == 0 and len(app[DRAIN].websockets) == 0
    assert stats["submitted"] == 1  # the vanished session's frame, counted when it closed
    assert problems(caplog.records) == []  # no warning, no error, no traceback


async def test_shutdown_finishes_frames_in_flight_then_closes_with_1001(
    server: Any, bundle: GatedBundle
) -> None:
    base, app, engine = server
    client = await connect(ws_url(base))
    assert "session" in json.loads(await client.recv())
    await client.send(FRAME)
    await entered(bundle)
    shutdown = asyncio.ensure_future(app.shutdown())
    await asyncio.sleep(0)  # one step of the shutdown task: it begins to drain, then waits
    assert app[DRAIN].draining
    # while draining: no new clients
    async with connect(ws_url(base)) as late:
        assert json.loads(await late.recv()) == {"error": "the server is shutting down"}
        with pytest.raises(ConnectionClosed) as refused:
            await late.recv()
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 1013
    async with aiohttp.ClientSession() as http, http.post(base + "/offer", json={}) as response:
        assert response.status == 503
        assert await response.json() == {"error": "the server is shutting down"}
    bundle.gate.set()  # the frame in flight finishes …
    answer = await client.recv()
    assert isinstance(answer, bytes) and answer[:2] == b"\xff\xd8"  # … and its answer is sent
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "server shutdown")
    await shutdown
    assert len(engine.sessions) == 0 and len(app[app_keys.WEBSOCKETS]) == 0


async def test_a_drain_that_runs_out_of_time_still_closes_everything(
    bundle: GatedBundle,
) -> None:
    config = ServerConfig(shutdown_timeout_s=0.2)
    async with running_server(bundle, config) as (base, app, engine):
        try:
            client = await connect(ws_url(base))
            assert "session" in json.loads(await client.recv())
            await client.send(FRAME)
            await entered(bundle)
            (connection,) = app[DRAIN].websockets
            await app.shutdown()  # the gate stays shut: the frame cannot finish in time
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            await connection.wait_closed()
            assert len(engine.sessions) == 0
        finally:
            bundle.gate.set()
