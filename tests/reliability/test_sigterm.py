"""SIGTERM to a real ``livediff serve`` (tiny model, random weights): drained clients, exit 0.

The server is a subprocess with its token in ``LIVEDIFF_TOKEN`` and logging at INFO; a
websocket client and an aiortc peer stream through it when SIGTERM arrives. Runs inside a
loopback-only network namespace (the module contributes one test that re-runs it there).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from reliability_testing import TOKEN, ChannelLog, connect_with_headers
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers.streams_testing import NEEDS_NETNS, REPO, netns_module_runner, pattern
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.ice import HostAddressRestriction
from livediff.wire import encode_jpeg

test_in_loopback_netns = netns_module_runner(__file__)
pytestmark = pytest.mark.slow

CONFIG = """
[server]
host_addresses = ["127.0.0.1"]

[runtime]
deadline_ms = 600000

[runtime.degrade]
enabled = false
"""


class Server:
    def __init__(self, process: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    config = tmp_path / "livediff.toml"
    config.write_text(CONFIG)
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "livediff", "-v", "serve", "--model", "tiny"]
    argv += ["--weights", "random", "--port", "0", "--config", str(config)]
    with open(log, "w") as stderr:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "LIVEDIFF_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"},
        )
    assert process.stdout is not None
    line = (await process.stdout.readline()).decode()
    assert "listening on" in line, f"serve did not start: {line!r}\n{log.read_text()[-3000:]}"
    try:
        yield Server(process, line.rsplit(" ", 1)[1].strip().rstrip("/"), log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@NEEDS_NETNS
async def test_sigterm_drains_every_client_and_exits_0(server: Server) -> None:
    frame = pattern(96, 96, seed=1)
    ws = await connect(server.url.replace("http://", "ws://") + f"/ws?token={TOKEN}")
    assert "session" in json.loads(await ws.recv())
    await ws.send(encode_jpeg(frame))
    assert isinstance(await ws.recv(), bytes)  # the pipeline works end to end
    peer = WebRTCClient(server.url)
    channel = ChannelLog(peer.channel)
    with HostAddressRestriction(["127.0.0.1"]):  # aioice offers no loopback candidate by itself
        await connect_with_headers(peer, ImageTrack(frame), {"Authorization": f"Bearer {TOKEN}"})
    assert (await peer.recv_frame()).shape == (128, 128, 3)
    await ws.send(encode_jpeg(frame))  # probably still in flight when the signal lands
    server.process.send_signal(signal.SIGTERM)

    answers = 0
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            message = await ws.recv()
            assert isinstance(message, bytes), message  # outputs only, no error
            answers += 1
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "server shutdown")
    assert answers <= 1
    assert await channel.first("closing") == {"closing": "server shutdown"}
    await channel.closed.wait()
    assert await asyncio.wait_for(server.process.wait(), 60) == 0
    await peer.close()
    log = server.log.read_text()
    assert "shutting down" in log and "drain: 2 connections finished" in log
    assert "Traceback" not in log and "ERROR" not in log
    assert TOKEN not in log  # logged at INFO, and no trace of the secret
