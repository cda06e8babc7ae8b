"""WebRTC access and limits with real aiortc peers: token, connect and idle timeouts, pixels, rate.

Every test here runs inside a loopback-only network namespace: run directly, the module
contributes one test that re-runs it under ``unshare --net`` (see ``streams_testing``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from reliability_testing import TOKEN, ChannelLog, SilentTrack, connect_with_headers

from helpers.streams_testing import (
    NEEDS_NETNS,
    netns_module_runner,
    pattern,
    running_server,
    visible_tiny_bundle,
)
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.exceptions import LivediffError
from livediff.ice import rtc_configuration
from livediff.models.bundle import ModelBundle
from livediff.streams import app_keys
from livediff.streams.server_config import ServerConfig

test_in_loopback_netns = netns_module_runner(__file__)
LOOPBACK = ("127.0.0.1",)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return pattern(96, 96, seed=2)


def rejected(app: Any, reason: str) -> float:
    value = app[app_keys.ENGINE].registry.get_sample_value(
        "livediff_transport_rejected_total", {"transport": "webrtc", "reason": reason}
    )
    return float(value or 0.0)


@NEEDS_NETNS
async def test_offers_need_the_token_and_the_data_channel_comes_with_it(
    bundle: ModelBundle, frame: np.ndarray
) -> None:
    config = ServerConfig(host_addresses=LOOPBACK, token=TOKEN)
    async with running_server(bundle, config) as (base, app, engine):
        refused = WebRTCClient(base)
        with pytest.raises(LivediffError, match=r"refused the offer \(401\): unauthorized"):
            await refused.connect(ImageTrack(frame))
        assert len(engine.sessions) == 0 and len(app[app_keys.PEERS]) == 0
        client = WebRTCClient(base)
        await connect_with_headers(client, ImageTrack(frame), {"Authorization": f"Bearer {TOKEN}"})
        try:
            assert (await client.recv_frame()).shape == (128, 128, 3)
            assert await client.update(seed=4) == {"ok": True, "id": 1}
        finally:
            await client.close()


@NEEDS_NETNS
async def test_a_peer_that_never_connects_is_closed_and_its_session_released(
    bundle: ModelBundle,
) -> None:
    config = ServerConfig(host_addresses=LOOPBACK, connect_timeout_s=0.5)
    async with running_server(bundle, config) as (base, app, engine):
        pc = RTCPeerConnection(rtc_configuration())
        pc.addTransceiver("video", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer"}
        async with aiohttp.ClientSession() as http, http.post(base + "/offer", json=body) as r:
            assert r.status == 200  # answered, but the client never applies the answer
        assert len(engine.sessions) == 1
        (peer,) = app[app_keys.PEERS]
        session = engine.sessions[peer.id]
        await peer.wait_closed()
        assert session.close_reason == "connect timeout: not connected within 0.5 s"
        await app[app_keys.PEERS].wait_until(0)
        assert len(engine.sessions) == 0
        assert rejected(app, "connect_timeout") == 1
        await pc.close()


@NEEDS_NETNS
async def test_a_peer_without_video_is_told_and_closed_after_the_idle_timeout(
    bundle: ModelBundle,
) -> None:
    config = ServerConfig(host_addresses=LOOPBACK, idle_timeout_s=0.5)
    async with running_server(bundle, config) as (base, app, engine):
        client = WebRTCClient(base)
        log = ChannelLog(client.channel)
        await client.connect(SilentTrack())
        peer = app[app_keys.PEERS].get(client.session or "")
        assert peer is not None
        try:
            assert await log.first("closing") == {
                "closing": "idle timeout: no video frame for 0.5 s"
            }
            await log.closed.wait()  # then the channel closes …
            await peer.wait_closed()  # … and the peer with its session
        finally:
            await client.close()
        assert len(engine.sessions) == 0 and rejected(app, "idle") == 1


@NEEDS_NETNS
async def test_video_over_the_pixel_limit_is_refused_with_one_message_a_second(
    bundle: ModelBundle,
) -> None:
    config = ServerConfig(host_addresses=LOOPBACK, max_frame_pixels=64 * 64)
    async with running_server(bundle, config) as (base, app, engine):
        client = WebRTCClient(base)
        log = ChannelLog(client.channel)
        await client.connect(ImageTrack(pattern(160, 120, seed=1), fps=30))
        try:
            error = await log.first("error")
            assert error == {
                "error": "frame 160×120 = 19200 pixels is too large: at most 4096 "
                "([server] max_frame_pixels)"
            }
            assert await client.update(seed=3) == {"ok": True, "id": 1}  # the channel works
            peer = app[app_keys.PEERS].get(client.session or "")
            assert peer is not None
            stats = engine.sessions[peer.id].stats()
            assert peer.flow.errors >= 1 and peer.flow.frames_in == 0 and stats["submitted"] == 0
            errors = [m for m in log.messages if "error" in m]
            assert len(errors) <= 1 + peer.flow.errors // 30  # throttled: not one per frame
        finally:
            await client.close()


@NEEDS_NETNS
async def test_control_messages_over_the_rate_are_refused_on_the_data_channel(
    bundle: ModelBundle, frame: np.ndarray
) -> None:
    config = ServerConfig(host_addresses=LOOPBACK, control_rate_per_s=0.1, control_burst=2)
    async with running_server(bundle, config) as (base, _, engine):
        client = WebRTCClient(base)
        await client.connect(ImageTrack(frame))
        try:
            replies = [await client.update(seed=seed) for seed in (5, 6, 7)]
            assert engine.sessions[client.session or ""].params.seed == 6
        finally:
            await client.close()
    assert replies == [
        {"ok": True, "id": 1},
        {"ok": True, "id": 2},
        {
            "error": "rate limit: at most 0.1 control messages per second (bursts of 2); "
            "this one was not applied",
            "id": 3,
        },
    ]
    json.dumps(replies)  # plain JSON all the way


@NEEDS_NETNS
async def test_sessions_keep_working_next_to_a_refused_peer(
    bundle: ModelBundle, frame: np.ndarray
) -> None:
    """The limits of one peer never touch another: one streams while another is refused."""
    config = ServerConfig(host_addresses=LOOPBACK, max_frame_pixels=100 * 100)
    async with running_server(bundle, config) as (base, _, _):
        good, bad = WebRTCClient(base), WebRTCClient(base)
        await good.connect(ImageTrack(frame))
        await bad.connect(ImageTrack(pattern(200, 200, seed=9)))
        try:
            frames = [await good.recv_frame() for _ in range(3)]
            assert all(f.shape == (128, 128, 3) for f in frames)
        finally:
            await asyncio.gather(good.close(), bad.close())
