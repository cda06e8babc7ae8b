"""Churn: 1000 connect/disconnect cycles of aiortc peers, leak-free (see ``churn_testing``).

Runs inside a loopback-only network namespace: run directly, the module contributes one test
that re-runs it under ``unshare --net`` (see ``streams_testing``).
"""

from __future__ import annotations

import pytest
from churn_testing import WEBRTC_PARALLEL, assert_no_leaks, churn, connected

from helpers.streams_testing import (
    NEEDS_NETNS,
    netns_module_runner,
    pattern,
    running_server,
    visible_tiny_bundle,
)
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.models.bundle import ModelBundle
from livediff.streams import app_keys
from livediff.streams.server_config import ServerConfig

test_in_loopback_netns = netns_module_runner(__file__)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


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
