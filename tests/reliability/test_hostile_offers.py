"""Hostile ``POST /offer`` bodies: every failure releases its session, and says what was wrong.

Runs inside a loopback-only network namespace (an offer that parses makes the server gather
ICE candidates): run directly, the module contributes one test that re-runs it there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from helpers.streams_testing import (
    NEEDS_NETNS,
    TEST_RUNTIME,
    netns_module_runner,
    pattern,
    running_server,
    visible_tiny_bundle,
)
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.exceptions import OfferError
from livediff.ice import rtc_configuration
from livediff.models.bundle import ModelBundle
from livediff.streams import app_keys
from livediff.streams.sdp_check import check_offer_sdp
from livediff.streams.server_config import ServerConfig

test_in_loopback_netns = netns_module_runner(__file__)
LOOPBACK = ("127.0.0.1",)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


async def client_sdp(video: str | None = "sendrecv", channel: bool = True) -> str:
    pc = RTCPeerConnection(rtc_configuration())
    if channel:
        pc.createDataChannel("control")
    if video is not None:
        pc.addTransceiver("video", direction=video)
    await pc.setLocalDescription(await pc.createOffer())
    sdp: str = pc.localDescription.sdp
    await pc.close()
    return sdp


def without(sdp: str, prefix: str) -> str:
    return "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith(prefix))


async def post_offer(base: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        kwargs: dict[str, Any] = (
            {"data": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, (str, bytes))
            else {"json": body}
        )
        async with http.post(base + "/offer", **kwargs) as response:
            return response.status, await response.json()


@NEEDS_NETNS
async def test_a_hundred_failing_offers_leave_every_session_slot_free(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offers refused before, during and after a session opened; some whose teardown raises."""
    good = await client_sdp()
    kinds: list[tuple[Any, str]] = [
        ({"sdp": await client_sdp(video=None), "type": "offer"}, "no video section"),
        ({"sdp": await client_sdp(video="recvonly"), "type": "offer"}, "no video track"),
        ({"sdp": without(good, "a=setup"), "type": "offer"}, "no DTLS role"),
        (
            {"sdp": good.replace("a=ice-ufrag", "a=x-ufrag", 1), "type": "offer"},
            "ICE username fragment or password is missing",
        ),
        (
            {
                "sdp": good.replace("VP8/90000", "H263/90000").replace("H264", "H263"),
                "type": "offer",
            },
            "no codec",
        ),
        (
            {
                "sdp": "v=0\r\n" + "".join(random.Random(1).choice("ab=\r\n") for _ in range(300)),
                "type": "offer",
            },
            "SDP line",
        ),
        ("[" * 200_000, "nested too deeply"),
        ({"sdp": good, "type": "offer", "params": {"strength": 10**400}}, "strength="),
    ]
    runtime = dataclasses.replace(TEST_RUNTIME, max_sessions=3)
    config = ServerConfig(host_addresses=LOOPBACK, max_offer_bytes=1 << 20)
    original_close = RTCPeerConnection.close
    failing_teardowns = 0

    async def close_then_raise(pc: RTCPeerConnection) -> None:  # aiortc's sctp stop raising
        nonlocal failing_teardowns
        await original_close(pc)
        failing_teardowns += 1
        if failing_teardowns % 2:
            raise ConnectionError("sctp stop: transport is closed")

    monkeypatch.setattr(RTCPeerConnection, "close", close_then_raise)
    async with running_server(bundle, config, runtime) as (base, app, engine):
        for attempt in range(100):
            body, expected = kinds[attempt % len(kinds)]
            status, answer = await post_offer(base, body)
            assert status == 400 and expected in answer["error"], (attempt, status, answer)
            assert not answer["error"].rstrip().endswith(":"), answer
        assert failing_teardowns >= 10  # teardowns that raised were among them
        await asyncio.sleep(0.2)
        assert len(engine.sessions) == 0 and len(app[app_keys.PEERS]) == 0
        async with aiohttp.ClientSession() as http, http.get(base + "/stats") as response:
            stats = await response.json()
        assert stats["peers"] == [] and stats["engine"]["sessions"] == 0
        monkeypatch.setattr(RTCPeerConnection, "close", original_close)
        clients = [WebRTCClient(base) for _ in range(3)]  # every slot is free again
        try:
            for client in clients:
                await client.connect(ImageTrack(pattern(96, 96, seed=3)))
            frames = await asyncio.gather(*(client.recv_frame() for client in clients))
            assert all(f.shape == (128, 128, 3) for f in frames)
        finally:
            await asyncio.gather(*(client.close() for client in clients))


@NEEDS_NETNS
async def test_offers_from_real_peers_pass_the_sdp_check() -> None:
    for video in ("sendrecv", "sendonly"):
        for channel in (True, False):
            check_offer_sdp(await client_sdp(video=video, channel=channel))


CHROME_LIKE = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "a=group:BUNDLE 0 1\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS stream\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n"
    "a=candidate:1 1 udp 2113937151 127.0.0.1 50000 typ host generation 0 network-cost 999\r\n"
    "a=ice-ufrag:AbCd\r\na=ice-pwd:0123456789abcdefABCDEFGH\r\na=ice-options:trickle\r\n"
    "a=fingerprint:sha-256 AA:BB:CC:DD\r\na=setup:actpass\r\na=mid:0\r\n"
    "a=extmap:1 urn:ietf:params:rtp-hdrext:toffset\r\na=sendrecv\r\na=msid:stream track\r\n"
    "a=rtcp-mux\r\na=rtcp-rsize\r\na=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 goog-remb\r\n"
    "a=rtcp-fb:96 nack pli\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n"
    "a=rtpmap:102 H264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;"
    "profile-level-id=42001f\r\na=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n"
    "a=ssrc-group:FID 1111 2222\r\na=ssrc:1111 cname:abc\r\na=ssrc:2222 cname:abc\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n"
    "a=ice-ufrag:AbCd\r\na=ice-pwd:0123456789abcdefABCDEFGH\r\n"
    "a=fingerprint:sha-256 AA:BB:CC:DD\r\na=setup:actpass\r\na=mid:1\r\n"
    "a=sctp-port:5000\r\na=max-message-size:262144\r\n"
)

BAD_LINES: list[tuple[Callable[[str], str], str]] = [
    (
        lambda s: s.replace("a=candidate:1 1 udp 2113937151", "a=candidate:1 x udp 2113937151"),
        "SDP line 11 ('a=candidate:1 x udp",
    ),
    (lambda s: s.replace("a=rtpmap:96 VP8/90000", "a=rtpmap:96 VP8"), "a=rtpmap must be"),
    (
        lambda s: s.replace("a=fmtp:97 apt=96", "a=fmtp:97 apt=x"),
        "parameter apt must be an integer",
    ),
    (lambda s: s.replace("a=fmtp:97 apt=96", "a=fmtp:98 apt=96"), "no a=rtpmap line"),
    (
        lambda s: s.replace("a=setup:actpass\r\na=mid:0", "a=setup:sideways\r\na=mid:0"),
        "a=setup must be",
    ),
    (lambda s: s.replace("a=ssrc:1111 cname:abc", "a=ssrc:one cname:abc"), "a=ssrc must be"),
    (
        lambda s: s.replace("m=video 9 UDP/TLS/RTP/SAVPF 96", "m=video 9 UDP/TLS/RTP/SAVPF 72 96"),
        "RTCP reserves",
    ),
    (lambda s: s.replace("c=IN IP4 0.0.0.0", "c=IN IPX nowhere", 1), "a connection line must be"),
    (lambda s: s.replace("a=fingerprint:sha-256 AA:BB:CC:DD", "a=fingerprint"), "needs a value"),
    (lambda s: s.replace("s=-\r\n", ""), "lacks 's='"),
    (lambda s: s.replace("\r\na=mid:0", "\r\nmid:0"), "every SDP line must be"),
]


@pytest.mark.parametrize(("change", "expected"), BAD_LINES)
def test_each_malformed_line_is_named_with_what_was_expected(
    change: Callable[[str], str], expected: str
) -> None:
    check_offer_sdp(CHROME_LIKE)  # the unbroken offer passes
    with pytest.raises(OfferError, match=expected.replace("(", r"\(")) as refused:
        check_offer_sdp(change(CHROME_LIKE))
    assert refused.value.field == "sdp"


def test_fuzzed_text_is_refused_with_a_message_not_a_crash() -> None:
    rng = random.Random(7)
    alphabet = "v=0amcst:/ \r\n-1xIP4"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        try:
            check_offer_sdp(text)
        except OfferError as exc:
            assert str(exc) and not str(exc).endswith(":")
