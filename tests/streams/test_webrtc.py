"""WebRTC sessions with a real aiortc peer: media both ways, the data channel, /offer errors, teardown.

Every test here runs inside a loopback-only network namespace: run directly, the module
contributes one test that re-runs it under ``unshare --net`` (see ``streams_testing``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aioice.ice
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from helpers.streams_testing import (
    FOX,
    NEEDS_NETNS,
    WHALE,
    closest,
    distance,
    netns_module_runner,
    pattern,
    running_server,
)
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.ice import rtc_configuration
from livediff.models.bundle import ModelBundle
from livediff.streams import app_keys
from livediff.streams.server_config import ServerConfig

test_in_loopback_netns = netns_module_runner(__file__)

CONFIG = ServerConfig(host_addresses=("127.0.0.1",), stats_interval_s=0.2)


@pytest.fixture
async def server(bundle: ModelBundle) -> AsyncIterator[Any]:
    async with running_server(bundle, CONFIG) as running:
        yield running


def made_by(image: np.ndarray, references: dict[str, np.ndarray]) -> str:
    """The session whose reference ``image`` is (clearly) nearest; fails when it is ambiguous."""
    ranked = sorted((distance(image, ref), name) for name, ref in references.items())
    (best, name), (runner_up, _) = ranked[0], ranked[1]
    assert best * 2 < runner_up, f"ambiguous frame: {ranked}"
    return name


async def open_client(
    base: str, frame: np.ndarray, params: dict[str, Any], codec: str | None = None
) -> WebRTCClient:
    client = WebRTCClient(base, params=params, codec=codec)
    await client.connect(ImageTrack(frame, fps=30))
    return client


@NEEDS_NETNS
async def test_two_sessions_get_their_own_outputs_and_never_each_others(
    server: Any, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    base, app, engine = server
    fox = await open_client(base, frame, FOX, codec="vp8")
    whale = await open_client(base, frame, WHALE, codec="h264")
    try:
        assert len(engine.sessions) == 2
        peers = app[app_keys.PEERS]
        assert peers.get(fox.session or "").codec == "video/VP8"
        assert peers.get(whale.session or "").codec == "video/H264"

        async def collect(client: WebRTCClient, count: int) -> list[np.ndarray]:
            return [await client.recv_frame() for _ in range(count)]

        fox_frames, whale_frames = await asyncio.gather(collect(fox, 4), collect(whale, 4))
    finally:
        await asyncio.gather(fox.close(), whale.close())
    assert all(image.shape == (128, 128, 3) for image in fox_frames + whale_frames)
    assert [made_by(image, references) for image in fox_frames] == ["fox"] * 4
    assert [made_by(image, references) for image in whale_frames] == ["whale"] * 4


@NEEDS_NETNS
async def test_data_channel_updates_change_the_output_and_stats_come_back(
    server: Any, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    base, _, _ = server
    client = await open_client(base, frame, FOX)
    try:
        assert made_by(await client.recv_frame(), references) == "fox"
        assert await client.update(**WHALE) == {"ok": True, "id": 1}
        assert await client.update(strength=3) == {
            "error": "strength=3 is out of range: expected a number in (0, 1]",
            "id": 2,
            "field": "strength",
            "current": {"strength": 0.5},
        }
        unknown = await client.update(colour="red")
        assert unknown["id"] == 3 and unknown["error"].startswith("unknown parameter(s): colour")
        # frames already past the engine (its outbox, the encoder) still carry the old prompt
        # (the encoder may need a frame or two to settle on the new picture: nearest, not strict)
        frames = [await client.recv_frame() for _ in range(12)]
        seen = [closest(image, references) for image in frames]
        assert "fox" not in seen[seen.index("whale") :], seen
        assert [made_by(image, references) for image in frames[-3:]] == ["whale"] * 3
        stats = await client.next_stats()
    finally:
        await client.close()
    assert stats["session"] == client.session and stats["engine"]["id"] == client.session
    assert stats["frames_in"] >= stats["frames_out"] > 0
    assert stats["codec"] in ("video/VP8", "video/H264")


async def _post(base: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(base + "/offer", **kwargs) as response:
        return response.status, await response.json()


async def _offer_sdp(*, video: bool = True) -> str:
    pc = RTCPeerConnection(rtc_configuration())
    if video:
        pc.addTransceiver("video", direction="sendrecv")
    else:
        pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@NEEDS_NETNS
async def test_offer_errors_are_json_4xx_and_the_server_keeps_serving(
    server: Any, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    base, app, engine = server
    good_sdp = await _offer_sdp()
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [  # …, the field to blame
        (
            {"data": "sdp=v=0", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            415,
            "Content-Type: application/json",
            None,
        ),
        (
            {"data": "{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "not valid JSON",
            None,
        ),
        ({"json": ["an", "array"]}, 400, "must be a JSON object", None),
        ({"json": {"type": "offer"}}, 400, "missing field: sdp", "sdp"),
        ({"json": {"sdp": good_sdp}}, 400, 'type must be "offer"', "type"),
        ({"json": {"sdp": good_sdp, "type": "answer"}}, 400, 'type must be "offer"', "type"),
        (
            {"json": {"sdp": good_sdp, "type": "offer", "extra": 1}},
            400,
            "unknown field(s): extra",
            "extra",
        ),
        (
            {"json": {"sdp": good_sdp, "type": "offer", "params": "fox"}},
            400,
            "params must be a JSON object",
            "params",
        ),
        (
            {"json": {"sdp": good_sdp, "type": "offer", "params": {"colour": "red"}}},
            400,
            "unknown parameter(s): colour",
            "colour",
        ),
        (
            {"json": {"sdp": good_sdp, "type": "offer", "params": {"strength": 2}}},
            400,
            "strength=2 is out of range",
            "strength",
        ),
        (
            {"json": {"sdp": "this is not SDP", "type": "offer"}},
            400,
            "the SDP must start with 'v=0' (line 1 is 'this is not SDP')",
            "sdp",
        ),
        (
            {"json": {"sdp": "v=0\r\nm=video port UDP/TLS/RTP/SAVPF 96\r\n", "type": "offer"}},
            400,
            "SDP line 2 ('m=video port UDP/TLS/RTP/SAVPF 96'): a media line must be",
            "sdp",
        ),
        (
            {"json": {"sdp": good_sdp.replace("a=ice-ufrag", "a=x-removed"), "type": "offer"}},
            400,
            "the SDP has no ICE credentials",
            "sdp",
        ),
        (
            {"json": {"sdp": await _offer_sdp(video=False), "type": "offer"}},
            400,
            "the offer has no video section (audio)",
            "sdp",
        ),
        ({"json": {"sdp": "v=0\r\n" + "a=x\r\n" * 40_000, "type": "offer"}}, 413, "", None),
    ]
    for kwargs, status, message, field in cases:
        got_status, body = await _post(base, **kwargs)
        keys = {"error"} if field is None else {"error", "field"}
        assert (got_status, set(body)) == (status, keys), (kwargs, got_status, body)
        assert message in body["error"], (message, body)
        assert body.get("field") == field, (field, body)
    async with aiohttp.ClientSession() as http, http.get(base + "/offer") as response:
        assert response.status == 405 and "error" in await response.json()
    assert len(engine.sessions) == 0 and len(app[app_keys.PEERS]) == 0  # nothing leaked
    client = await open_client(base, frame, FOX)  # and the server still serves
    try:
        assert made_by(await client.recv_frame(), references) == "fox"
    finally:
        await client.close()


@NEEDS_NETNS
async def test_offer_is_refused_with_503_at_capacity(bundle: ModelBundle) -> None:
    config = ServerConfig(host_addresses=("127.0.0.1",), max_connections=1)
    async with running_server(bundle, config) as (base, _, _):
        first = WebRTCClient(base)
        await first.connect(ImageTrack(pattern(64, 64, 1)))
        try:
            status, body = await _post(base, json={"sdp": await _offer_sdp(), "type": "offer"})
        finally:
            await first.close()
    assert status == 503 and "connections" in body["error"]


@NEEDS_NETNS
async def test_session_closes_when_the_peer_goes_away(server: Any, frame: np.ndarray) -> None:
    base, app, engine = server
    client = await open_client(base, frame, FOX)
    await client.recv_frame()
    assert len(engine.sessions) == 1 and len(app[app_keys.PEERS]) == 1
    peer = app[app_keys.PEERS].get(client.session or "")
    assert peer is not None
    await client.close()
    await peer.wait_closed()
    await app[app_keys.PEERS].wait_until(0)
    assert len(engine.sessions) == 0
    assert peer.pc.connectionState == "closed"


@NEEDS_NETNS
async def test_answer_offers_only_the_configured_host_address_and_restores_aioice(
    bundle: ModelBundle, frame: np.ndarray
) -> None:
    original = aioice.ice.get_host_addresses
    async with running_server(bundle, CONFIG) as (base, _, _):
        assert aioice.ice.get_host_addresses is not original
        client = WebRTCClient(base)
        await client.connect(ImageTrack(frame))
        answer = client.pc.remoteDescription.sdp
        await client.close()
    addresses = set(re.findall(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) ", answer, re.MULTILINE))
    assert addresses == {"127.0.0.1"}
    assert aioice.ice.get_host_addresses is original
