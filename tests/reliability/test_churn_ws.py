"""Churn: 1000 connect/disconnect cycles of websocket clients, leak-free (see ``churn_testing``)."""

from __future__ import annotations

import json

import pytest
from churn_testing import assert_no_leaks, churn
from websockets.asyncio.client import connect

from helpers.streams_testing import pattern, running_server, visible_tiny_bundle
from livediff.models.bundle import ModelBundle
from livediff.streams import app_keys
from livediff.streams.drain import DRAIN
from livediff.streams.server_config import ServerConfig
from livediff.wire import encode_jpeg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


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
