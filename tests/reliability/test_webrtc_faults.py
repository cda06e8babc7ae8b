"""WebRTC faults with real aiortc peers: packet loss, a client killed mid-stream, graceful drain.

Every test here runs inside a loopback-only network namespace: run directly, the module
contributes one test that re-runs it under ``unshare --net`` (see ``streams_testing``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiortc.rtp import RTCP_RTPFB_NACK, RtcpRtpfbPacket
from reliability_testing import (
    ChannelLog,
    GatedBundle,
    LossyLink,
    derived,
    problems,
)

from helpers.streams_testing import (
    NEEDS_NETNS,
    REPO,
    netns_module_runner,
    pattern,
    running_server,
    visible_tiny_bundle,
    write_y4m,
)
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.models.bundle import ModelBundle
from livediff.streams import app_keys
from livediff.streams.drain import DRAIN
from livediff.streams.server_config import ServerConfig

test_in_loopback_netns = netns_module_runner(__file__)
LOOPBACK = ("127.0.0.1",)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


def moving(index: int) -> np.ndarray:
    """A picture that changes every frame, so the encoder keeps sending (inter) frames."""
    image = pattern(128, 96, seed=3)
    x = (index * 5) % 96
    image[32:64, x : x + 32] = (255, 255, 255)
    return image


@NEEDS_NETNS
async def test_a_lossy_link_keeps_streaming_and_survives_an_outage(
    bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    """Media packets (both ways) are lost at random, then all of them for a while.

    How: ``LossyLink`` wraps the client's ICE transport (see ``reliability_testing``). On
    loopback aiortc repairs random loss with NACKs and retransmissions; its keyframe request
    (PLI) only fires once 512 packets have piled up behind a hole, which a bounded test
    cannot wait for, so what is asserted is the NACKs and that video flows again after the
    outage.
    """
    caplog.set_level(logging.INFO, logger="livediff")
    async with running_server(bundle, ServerConfig(host_addresses=LOOPBACK)) as (base, app, _):
        client = WebRTCClient(base, codec="vp8")
        await client.connect(ImageTrack(moving, fps=30))
        try:
            await client.recv_frame()  # connected, media flowing both ways
            (transceiver,) = client.pc.getTransceivers()
            sender = transceiver.sender
            feedback: list[str] = []
            handle = sender._handle_rtcp_packet

            async def count_feedback(packet: Any) -> None:
                if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
                    feedback.append("nack")
                await handle(packet)

            sender._handle_rtcp_packet = count_feedback
            link = LossyLink(sender.transport.transport, loss=0.1)
            peer = app[app_keys.PEERS].get(client.session or "")
            assert peer is not None
            before = peer.flow.frames_in
            received = [await client.recv_frame() for _ in range(30)]
            assert "nack" in feedback  # the server asked again for what it lost
            link.loss = 1.0  # an outage: nothing gets through …
            await link.dropped(link.dropped_out + link.dropped_in + 100)
            link.loss = 0.1  # … then the lossy link is back
            received += [await client.recv_frame() for _ in range(30)]
        finally:
            await client.close()
    assert all(image.shape == (128, 128, 3) for image in received)
    assert link.dropped_out > 0 and link.dropped_in > 0
    assert peer.flow.frames_in - before >= 40  # the server kept decoding the lossy video
    assert [m for m in problems(caplog.records) if "livediff" in m] == []


@NEEDS_NETNS
async def test_a_client_killed_mid_stream_is_released_and_others_go_on(
    bundle: ModelBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="livediff")
    clip = write_y4m(tmp_path / "clip.y4m", [moving(i) for i in range(30)])
    config = ServerConfig(host_addresses=LOOPBACK, idle_timeout_s=1.0)
    async with running_server(bundle, config) as (base, app, engine):
        other = WebRTCClient(base)
        await other.connect(ImageTrack(moving, fps=30))
        await other.recv_frame()
        argv = [sys.executable, "-m", "livediff.clients.webrtc_client", "--url", base]
        argv += ["--input", str(clip), "--seconds", "120", "--host-address", "127.0.0.1"]
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            await app[app_keys.PEERS].wait_until(2)
            (victim,) = [p for p in app[app_keys.PEERS] if p.id != other.session]
            session = engine.sessions[victim.id]
            await session.recv()  # its video goes through the model: it is mid-stream
        finally:
            process.kill()  # SIGKILL: no BYE, no DTLS close, no SCTP abort
            await process.wait()
        await victim.wait_closed()
        assert session.close_reason == "idle timeout: no video frame for 1 s"
        assert list(engine.sessions) == [other.session]
        frames = [await other.recv_frame() for _ in range(5)]  # the other peer never noticed
        assert all(image.shape == (128, 128, 3) for image in frames)
        await other.close()
    assert [m for m in problems(caplog.records) if "livediff" in m] == []


@NEEDS_NETNS
async def test_shutdown_finishes_the_frame_in_flight_and_says_closing_on_the_data_channel() -> None:
    gated = derived(GatedBundle, visible_tiny_bundle())
    gated.gate.set()
    async with running_server(gated, ServerConfig(host_addresses=LOOPBACK)) as (base, app, engine):
        try:
            client = WebRTCClient(base)
            log = ChannelLog(client.channel)
            await client.connect(ImageTrack(moving, fps=30))
            await client.recv_frame()
            peer = app[app_keys.PEERS].get(client.session or "")
            assert peer is not None
            gated.gate.clear()
            gated.entered.clear()
            await asyncio.to_thread(gated.entered.wait)  # a frame is inside the model now
            shutdown = asyncio.ensure_future(app.shutdown())
            await asyncio.sleep(0)  # one step of the shutdown task: it begins to drain, then waits
            assert app[DRAIN].draining
            sent = peer.flow.frames_out
            gated.gate.set()
            await shutdown
            assert peer.flow.frames_out > sent  # the frame in flight went out to the client
            assert await log.first("closing") == {"closing": "server shutdown"}
            await log.closed.wait()
            assert peer.closed and len(engine.sessions) == 0
            assert engine.metrics()["closed_sessions_frames"]["dropped_outbox"] == 0
            await client.close()
        finally:
            gated.gate.set()
