"""Access control: the bearer token, the origin policy, the security headers, secrets in logs.

Only HTTP and websockets here (no ICE): the WebRTC side of the token is in test_webrtc_faults.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from reliability_testing import TOKEN, all_log_text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from helpers.streams_testing import pattern, running_server, visible_tiny_bundle
from livediff.clients.ws_client import WsClient
from livediff.cmd_serve import add_parser, server_config_from_args
from livediff.exceptions import ParameterError, SessionClosedError
from livediff.models.bundle import ModelBundle
from livediff.streams.auth import UNAUTHORIZED, resolve_token
from livediff.streams.security_headers import CONTENT_SECURITY_POLICY
from livediff.streams.server_config import ServerConfig

WRONG = "wrong-token-0123456789abcdef"


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


@pytest.fixture
async def server(bundle: ModelBundle) -> AsyncIterator[tuple[str, Any, Any]]:
    config = ServerConfig(token=TOKEN, allowed_origins=("https://studio.example.org",))
    async with running_server(bundle, config) as running:
        yield running


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/ws" + query


async def http(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, dict(r.headers), body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_http_routes_need_the_token_and_refuse_with_401_json(server: Any) -> None:
    base, _, engine = server
    offer = {"sdp": "v=0", "type": "offer"}
    for headers, query in [({}, ""), (bearer(WRONG), ""), ({}, f"?token={WRONG}")]:
        status, answer_headers, body = await http(
            "POST", f"{base}/offer{query}", json=offer, headers=headers
        )
        assert (status, body) == (401, {"error": UNAUTHORIZED})
        assert answer_headers["WWW-Authenticate"] == "Bearer"
        status, _, body = await http("GET", f"{base}/stats{query}", headers=headers)
        assert (status, body) == (401, {"error": UNAUTHORIZED})
    # with the token (header or query) the request reaches the handler: a 400 for this SDP
    for headers, query in [(bearer(TOKEN), ""), ({}, f"?token={TOKEN}")]:
        status, _, body = await http("POST", f"{base}/offer{query}", json=offer, headers=headers)
        assert status == 400 and "the SDP's session part lacks" in body["error"]
    status, _, body = await http("GET", f"{base}/stats", headers=bearer(TOKEN))
    assert status == 200 and body["peers"] == []
    assert len(engine.sessions) == 0
    # open: the page, its files, health and (by default) metrics
    for path in ("/", "/static/app.js", "/healthz", "/metrics"):
        status, _, _ = await http("GET", base + path)
        assert status == 200, path


async def test_metrics_need_the_token_when_configured(bundle: ModelBundle) -> None:
    config = ServerConfig(token=TOKEN, metrics_require_token=True)
    async with running_server(bundle, config) as (base, _, _):
        assert (await http("GET", f"{base}/metrics"))[:3:2] == (401, {"error": UNAUTHORIZED})
        status, _, text = await http("GET", f"{base}/metrics", headers=bearer(TOKEN))
        assert status == 200 and "livediff_sessions" in text


async def test_websocket_needs_the_token_and_refuses_with_1008(server: Any) -> None:
    base, _, engine = server
    for query in ("", f"?token={WRONG}"):
        async with connect(ws_url(base, query)) as refused:
            assert json.loads(await refused.recv()) == {"error": UNAUTHORIZED}
            with pytest.raises(ConnectionClosed) as closed:
                await refused.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert len(engine.sessions) == 0
    frame = pattern(64, 64, seed=3)
    async with await WsClient.connect(ws_url(base, f"?token={TOKEN}")) as by_query:
        await by_query.send_frame(frame)
        assert (await by_query.recv_frame()).shape == (128, 128, 3)
    async with connect(ws_url(base), additional_headers=bearer(TOKEN)) as by_header:
        assert "session" in json.loads(await by_header.recv())


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # not a browser
        ("SAME", True),
        ("http://localhost:3000", True),
        ("http://127.0.0.1:9", True),
        ("http://[::1]:8000", True),
        ("https://studio.example.org", True),  # listed
        ("https://studio.example.org/", True),
        ("https://evil.example", False),
        ("http://studio.example.org", False),  # listed with https only
        ("null", False),
        ("http://127.0.0.1.evil.example", False),
    ],
)
async def test_cross_origin_offers_and_websockets_are_refused_with_403(
    server: Any, origin: str | None, allowed: bool
) -> None:
    base, _, _ = server
    headers = {} if origin is None else {"Origin": base if origin == "SAME" else origin}
    status, _, body = await http(
        "POST",
        f"{base}/offer",
        json={"sdp": "v=0", "type": "offer"},
        headers={**headers, **bearer(TOKEN)},
    )
    if allowed:
        assert status == 400  # past the origin check, refused for its SDP
    else:
        assert status == 403 and body["error"].startswith(f"origin {origin!r} is not allowed")
    if allowed:
        async with connect(ws_url(base, f"?token={TOKEN}"), origin=headers.get("Origin")) as ws:  # type: ignore[arg-type]
            assert "session" in json.loads(await ws.recv())
    else:
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url(base, f"?token={TOKEN}"), origin=origin)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403


async def test_the_page_carries_security_headers(server: Any) -> None:
    base, _, _ = server
    for path in ("/", "/static/app.js", "/healthz", "/offer"):
        _, headers, _ = await http("GET", base + path)
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
    policy = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert policy["default-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert (
        "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "http" not in CONTENT_SECURITY_POLICY
    )


async def test_tokens_are_compared_in_constant_time(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _, _ = server
    compared: list[tuple[int, int]] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((len(a), len(b)))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for token in ("x" * 3, WRONG, TOKEN, TOKEN + "-longer-than-the-real-one"):
        await http("GET", f"{base}/stats", headers=bearer(token))
    assert compared == [(32, 32)] * 4  # SHA-256 digests: equal lengths whatever was presented


async def test_no_token_ever_reaches_the_logs(
    bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # the idle timeout closes the session at the end (a log line to search); 0.2 s closed it
    # before its first frame came back on a loaded 2-core CI machine
    config = ServerConfig(token=TOKEN, idle_timeout_s=2.0)
    async with running_server(bundle, config) as (base, _, _):
        await http("POST", f"{base}/offer?token={WRONG}", json={"sdp": "v=0", "type": "offer"})
        await http(
            "POST", f"{base}/offer", json={"sdp": "v=0", "type": "offer"}, headers=bearer(TOKEN)
        )
        await http("GET", f"{base}/stats?token={TOKEN}")
        async with connect(ws_url(base, f"?token={WRONG}")) as refused:
            await refused.recv()
        async with await WsClient.connect(ws_url(base, f"?token={TOKEN}")) as client:
            await client.send_frame(np.zeros((64, 64, 3), np.uint8))
            await client.recv_frame()
            await client.connection.send(b"\xff\xd8 garbage")
            with pytest.raises(SessionClosedError, match="1008"):
                await client.recv_jpeg()  # closed by the idle timeout after the error
    # The server's side: everything but the test's own websocket client library, which logs
    # the URL it requests at debug level (its business, on the client's machine).
    text = all_log_text(caplog, exclude=("websockets.client",))
    assert "refused: auth" in text and "idle timeout" in text  # the logs are there …
    assert TOKEN not in text and WRONG not in text  # … and hold neither token
    assert TOKEN not in repr(config) and TOKEN not in str(config)


def test_the_flag_wins_over_the_environment_which_wins_over_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    from_file = {"server": {"token": "from-the-config-file-0001"}}
    monkeypatch.delenv("LIVEDIFF_TOKEN", raising=False)
    assert server_config_from_args(parser.parse_args(["serve"]), from_file).token == (
        "from-the-config-file-0001"
    )
    monkeypatch.setenv("LIVEDIFF_TOKEN", "from-the-environment-0002")
    assert server_config_from_args(parser.parse_args(["serve"]), from_file).token == (
        "from-the-environment-0002"
    )
    args = parser.parse_args(["serve", "--token", "from-the-command-line-3"])
    assert server_config_from_args(args, from_file).token == "from-the-command-line-3"
    monkeypatch.setenv("LIVEDIFF_TOKEN", "")  # empty: unset
    assert resolve_token(None, {"LIVEDIFF_TOKEN": ""}, None) is None
    assert server_config_from_args(parser.parse_args(["serve"]), {}).token is None


@pytest.mark.parametrize("token", ["short", "has a space in it 123", "tab\there-0123456789", 12345])
def test_unusable_tokens_are_refused_without_echoing_them(token: Any) -> None:
    with pytest.raises(ParameterError, match=r"token .* is not usable") as refused:
        ServerConfig(token=token)
    assert str(token) not in str(refused.value)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"allowed_origins": ["example.org"]}, "allowed_origins='example.org' is out of range"),
        ({"allowed_origins": ["https://example.org/path"]}, "is out of range"),
        ({"allowed_origins": "https://example.org"}, "allowed_origins must be a list"),
        ({"metrics_require_token": 1}, "metrics_require_token=1 is out of range"),
    ],
)
def test_bad_access_settings_are_refused(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        ServerConfig.from_table(table)
