"""Hostile HTTP clients and an overloaded engine: tokens never logged, slow clients cut, health,
degrade recovery, and the drain answering new clients instead of refusing their connections.

Raw sockets play the slow and oversized clients (no HTTP library would send what they send);
aiohttp and websockets clients play the rest; the server is real, on loopback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import torch
from reliability_testing import TOKEN, GatedBundle, all_log_text, derived
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers.streams_testing import TEST_RUNTIME, pattern, running_server, visible_tiny_bundle
from livediff.cmd_serve import serve
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine
from livediff.engine.runtime_config import RuntimeConfig
from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import UNetBatch
from livediff.streams.log_redaction import redact
from livediff.streams.server_config import ServerConfig
from livediff.wire import encode_jpeg

FRAME = encode_jpeg(pattern(96, 96, seed=5))


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/ws" + query


async def raw_exchange(base: str, data: bytes, *, wait_s: float = 10.0) -> bytes:
    """Send ``data`` on a fresh TCP connection; everything the server sends until it closes."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()


# ---------------------------------------------------------------- tokens in logs
def test_redaction_covers_queries_headers_and_the_literal_token() -> None:
    text = f"b'GET /ws?token={TOKEN}&seed=1 HTTP/1.1' Authorization: Bearer {TOKEN} x{TOKEN}y"
    clean = redact(text, TOKEN)
    assert TOKEN not in clean and clean.count("<redacted>") == 3
    assert redact("authorization=Basic abc123", None) == "authorization=Basic <redacted>"


async def test_oversized_requests_never_put_the_token_in_any_log(
    bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pad = "A" * 9000  # over aiohttp's 8190-byte line limit
    requests = [
        f"GET /ws?token={TOKEN}&pad={pad} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}{pad}\r\n\r\n",
        f"GET /stats?token={TOKEN} HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n",
        f"POST /offer?token={TOKEN}{pad} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}",
    ]
    async with running_server(bundle, ServerConfig(token=TOKEN)) as (base, _, _):
        for request in requests:
            answer = await raw_exchange(base, request.encode())
            assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:200]
    text = all_log_text(caplog)
    assert "Got more than 8190 bytes" in text  # aiohttp did log these requests ...
    assert "<redacted>" in text
    assert TOKEN not in text  # ... without the token


# ---------------------------------------------------------------- slow clients
async def test_slow_headers_and_slow_bodies_are_cut(bundle: ModelBundle) -> None:
    config = ServerConfig(header_timeout_s=0.3, body_timeout_s=0.3)
    async with running_server(bundle, config) as (base, _, _):
        started = time.monotonic()
        slow = [
            raw_exchange(base, b""),  # connects, says nothing
            raw_exchange(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"),  # never ends its headers
            raw_exchange(  # promises 1000 bytes of body, sends 10
                base,
                b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"sdp": "v',
            ),
        ]
        answers = await asyncio.gather(*(slow * 5))  # five of each at once
        elapsed = time.monotonic() - started
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert "did not arrive within 0.3 s" in body["error"], body
        assert elapsed < 8  # cut by the server, not by the clients' own 10 s wait
        # a client that keeps a connection alive between requests is still served
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(base + "/healthz") as response:
                    assert response.status == 200
                await asyncio.sleep(0.4)  # longer than the header timeout, between requests


# ---------------------------------------------------------------- health
async def test_healthz_reports_sessions_against_the_cap_and_degraded_when_full_for_long(
    bundle: ModelBundle,
) -> None:
    runtime = RuntimeConfig(
        max_sessions=2, deadline_ms=600_000, degrade=DegradePolicy(enabled=False)
    )
    config = ServerConfig(health_full_after_s=0.3)

    async def health(base: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(base + "/healthz") as response:
            assert response.status == 200
            return dict(await response.json())

    async with running_server(bundle, config, runtime) as (base, _, _):
        assert (await health(base))["status"] == "ok"
        async with connect(ws_url(base)) as first, connect(ws_url(base)) as second:
            await first.recv(), await second.recv()
            now = await health(base)
            assert (now["sessions"], now["max_sessions"]) == (2, 2)
            assert now["status"] == "ok" and now["full_for_s"] is not None
            await asyncio.sleep(0.4)
            assert (await health(base))["status"] == "degraded"  # every slot taken for long
            async with connect(ws_url(base)) as third:
                refusal = json.loads(await third.recv())
                assert "capacity" in refusal["error"]
        await asyncio.sleep(0.1)  # the handlers see the closes
        now = await health(base)
        assert (now["status"], now["sessions"], now["full_for_s"]) == ("ok", 0, None)


# ---------------------------------------------------------------- degrade recovery
@dataclass
class SlowBundle(ModelBundle):
    """Every UNet call takes ``delay_s``: with a shorter deadline every frame is late."""

    delay_s: float = 0.15

    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().predict_noise(batch)


async def test_a_burst_degrades_and_the_engine_is_back_to_normal_within_seconds(
    bundle: ModelBundle,
) -> None:
    policy = DegradePolicy(window_s=0.2, degrade_after=1, recover_after=2)
    runtime = RuntimeConfig(deadline_ms=50, degrade=policy)
    async with running_server(derived(SlowBundle, bundle), runtime=runtime) as (base, _, engine):

        async def stats() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http, http.get(base + "/stats") as response:
                return dict((await response.json())["engine"])

        async with connect(ws_url(base)) as client:
            sid = json.loads(await client.recv())["session"]
            for _ in range(40):  # a burst: every frame is late
                await client.send(FRAME)
                await asyncio.sleep(0.05)
                if engine.metrics()["degrade"]["level"] == "refuse_sessions":
                    break
            degraded = await stats()
            assert degraded["degrade"]["level"] == "refuse_sessions", degraded["degrade"]
            assert degraded["degrade"]["reason"].startswith("overloaded: "), degraded["degrade"]
            session_view = degraded["per_session"][sid]["degrade"]
            assert session_view["level"] == "refuse_sessions" and session_view["reason"]
            async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as response:
                exposition = await response.text()
            assert re.search(r"^livediff_degrade_level 3\.0$", exposition, re.MULTILINE)
            assert re.search(r"^livediff_degrade_pressure ", exposition, re.MULTILINE)
            burst_over = time.monotonic()  # the client stops sending: load falls to nothing
            while engine.metrics()["degrade"]["level"] != "normal":
                assert time.monotonic() - burst_over < 10, engine.metrics()["degrade"]
                await asyncio.sleep(0.05)
            recovered_in = time.monotonic() - burst_over
        back = await stats()
        assert back["degrade"]["level"] == "normal" and back["degrade"]["reason"] is None
        history = [label for _, label, _ in back["degrade"]["history"]]
        assert history[-1] == "normal" and "refuse_sessions" in history
        print(f"back to normal {recovered_in:.2f} s after the burst")
        async with connect(ws_url(base)) as again:  # new sessions are accepted again
            assert "session" in json.loads(await again.recv())


# ---------------------------------------------------------------- drain
async def test_new_clients_during_the_drain_get_503_and_1013_not_a_refused_connection(
    bundle: ModelBundle, capsys: pytest.CaptureFixture[str]
) -> None:
    """``livediff serve``'s own shutdown path, signalled for real: SIGTERM to this process."""
    gated = derived(GatedBundle, bundle)
    engine = Engine(gated, None, TEST_RUNTIME, None)
    config = ServerConfig(port=0, shutdown_timeout_s=30)
    serving = asyncio.ensure_future(serve(engine, config))
    try:
        base = await _listening(capsys)
        async with connect(ws_url(base)) as client:
            await client.recv()
            await client.send(FRAME)  # in the model, at the gate: the drain waits for it
            await asyncio.to_thread(gated.entered.wait, 60)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.3)  # the drain has begun; the server still listens
            async with connect(ws_url(base)) as late:
                assert json.loads(await late.recv()) == {"error": "the server is shutting down"}
                with pytest.raises(ConnectionClosed) as closed:
                    await late.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            async with (
                aiohttp.ClientSession() as http,
                http.post(base + "/offer", json={"sdp": "v=0", "type": "offer"}) as response,
            ):
                assert response.status == 503 and response.headers["Retry-After"] == "5"
                assert (await response.json())["error"] == "the server is shutting down"
            gated.gate.set()
            output = await client.recv()  # the frame in flight is finished and delivered
            assert isinstance(output, bytes) and output[:2] == b"\xff\xd8"
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert await asyncio.wait_for(serving, 60) == 0
    finally:
        gated.gate.set()
        if not serving.done():
            serving.cancel()


async def _listening(capsys: pytest.CaptureFixture[str]) -> str:
    for _ in range(600):
        out = capsys.readouterr().out
        if "listening on" in out:
            return out.split("listening on ", 1)[1].split()[0].rstrip("/")
        await asyncio.sleep(0.05)
    raise AssertionError("serve did not start")


@pytest.fixture(autouse=True)
def _no_leftover_signal_handlers() -> Iterator[None]:
    yield
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
