"""Limits on the websocket side, each answered with a clear error; and the tools behind them."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers.streams_testing import TEST_RUNTIME, pattern, running_server, visible_tiny_bundle
from livediff.clients.ws_client import WsClient
from livediff.engine.runtime import RuntimeConfig
from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.streams import ws_handler
from livediff.streams.limits import Throttle, TokenBucket, jpeg_dimensions
from livediff.streams.server_config import ServerConfig
from livediff.wire import encode_jpeg


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def jpeg(width: int, height: int, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pattern(width, height, seed=width + height))
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (jpeg(64, 48), (64, 48)),
        (jpeg(333, 17, progressive=True), (333, 17)),
        (jpeg(40, 30, quality=20, optimize=True), (40, 30)),
        (jpeg(50, 20, exif=b"Exif\x00\x00" + bytes(300), comment=b"x" * 100), (50, 20)),
        (b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03", (65535, 65535)),  # header only
        (b"\xff\xd8\xff\xfe\x00\x04ab\xff\xff\xc2\x00\x0b\x08\x00\x10\x00\x20\x01", (32, 16)),
        (b"\xff\xd8", None),
        (b"\xff\xd8\xff\xe0\x00", None),
        (b"\xff\xd8\xff\xe0\x00\x01", None),  # a length below 2
        (b"\xff\xd8\xff\xda\x00\x02", None),  # a scan before any frame header
        (b"\xff\xd8\x00\x00\x00\x00", None),
        (b"GIF89a", None),
        (b"", None),
    ],
    ids=lambda value: f"{len(value)}-bytes" if isinstance(value, bytes) else str(value),
)
def test_the_jpeg_header_gives_the_size_without_decoding(data: bytes, size: Any) -> None:
    assert jpeg_dimensions(data) == size
    for cut in range(len(data)):  # truncated anywhere: an answer or None, never an exception
        jpeg_dimensions(data[:cut])


def test_the_token_bucket_allows_bursts_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.25
    assert not bucket.take()  # half a token
    clock.now += 0.25
    assert bucket.take() and not bucket.take()
    clock.now += 100
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]  # never above the burst
    assert bucket.refusal().startswith("rate limit: at most 2 control messages per second")


def test_the_throttle_lets_one_report_through_per_interval() -> None:
    clock = Clock()
    throttle = Throttle(1.0, clock=clock)
    assert [throttle.ready() for _ in range(3)] == [True, False, False]
    clock.now = 1.0
    assert throttle.ready() and throttle.suppressed == 2


async def test_a_frame_over_the_pixel_limit_is_refused_before_it_is_decoded(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []
    original = ws_handler.decode_jpeg

    def counting(data: bytes, **kwargs: Any) -> np.ndarray:
        decoded.append(len(data))
        return original(data, **kwargs)

    monkeypatch.setattr(ws_handler, "decode_jpeg", counting)
    config = ServerConfig(max_frame_pixels=100 * 100)
    async with running_server(bundle, config) as (base, _, _), connect(ws_url(base)) as client:
        assert "session" in json.loads(await client.recv())
        await client.send(jpeg(200, 100))
        answer = json.loads(await client.recv())
        assert answer == {
            "error": "frame 0: JPEG of 200×100 = 20000 pixels is too large: at most 10000 "
            "([server] max_frame_pixels)"
        }
        assert decoded == []
        await client.send(encode_jpeg(pattern(100, 100, seed=1)))  # at the limit: served
        assert (await client.recv())[:2] == b"\xff\xd8"
        assert len(decoded) == 1


async def test_control_messages_over_the_rate_are_refused_and_not_applied(
    bundle: ModelBundle,
) -> None:
    config = ServerConfig(control_rate_per_s=0.1, control_burst=2)
    async with (
        running_server(bundle, config) as (base, _, engine),
        connect(ws_url(base)) as client,
    ):
        session = json.loads(await client.recv())["session"]
        answers = []
        for request in ({"seed": 5, "id": 1}, {"seed": 6, "id": 2}, {"seed": 7, "id": 3}):
            await client.send(json.dumps(request))
            answers.append(json.loads(await client.recv()))
        await client.send("not json")  # a bad one counts too, and is refused for the rate
        answers.append(json.loads(await client.recv()))
        assert engine.sessions[session].params.seed == 6
    refusal = (
        "rate limit: at most 0.1 control messages per second (bursts of 2); "
        "this one was not applied"
    )
    assert answers == [
        {"ok": True, "id": 1},
        {"ok": True, "id": 2},
        {"error": refusal, "id": 3},
        {"error": refusal},
    ]


async def test_a_client_that_sends_no_frames_is_closed_after_the_idle_timeout(
    bundle: ModelBundle,
) -> None:
    async with running_server(bundle, ServerConfig(idle_timeout_s=0.3)) as (base, _, engine):
        async with connect(ws_url(base)) as idle:
            assert "session" in json.loads(await idle.recv())
            assert json.loads(await idle.recv()) == {"error": "idle timeout: no frame for 0.3 s"}
            with pytest.raises(ConnectionClosed) as closed:
                await idle.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            1008,
            "idle timeout: no frame for 0.3 s",
        )
        assert len(engine.sessions) == 0


async def test_sessions_per_device_over_the_cap_are_refused_with_1013(bundle: ModelBundle) -> None:
    runtime = RuntimeConfig(
        deadline_ms=TEST_RUNTIME.deadline_ms,
        max_sessions_per_device=1,
        degrade=TEST_RUNTIME.degrade,
    )
    async with (
        running_server(bundle, runtime=runtime) as (base, _, _),
        await WsClient.connect(ws_url(base)),
        connect(ws_url(base)) as second,
    ):
        answer = json.loads(await second.recv())
        assert answer["error"].startswith("every device is at its limit of 1 sessions")
        with pytest.raises(ConnectionClosed) as closed:
            await second.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013


BAD_LIMITS: list[tuple[dict[str, Any], str]] = [
    ({"max_frame_pixels": 10}, "max_frame_pixels=10 is out of range"),
    ({"control_rate_per_s": 0}, "control_rate_per_s=0 is out of range"),
    ({"control_rate_per_s": float("nan")}, "control_rate_per_s=nan is out of range"),
    ({"control_burst": 0}, "control_burst=0 is out of range"),
    ({"idle_timeout_s": -1}, "idle_timeout_s=-1 is out of range"),
    ({"connect_timeout_s": 0}, "connect_timeout_s=0 is out of range"),
    ({"shutdown_timeout_s": True}, "shutdown_timeout_s=True is out of range"),
]


@pytest.mark.parametrize(("table", "message"), BAD_LIMITS)
def test_bad_limits_are_refused(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(message)):
        ServerConfig.from_table(table)


def test_limit_defaults_are_bounded() -> None:
    config = ServerConfig()
    checks: list[tuple[str, Callable[[Any], bool]]] = [
        ("max_frame_pixels", lambda v: v == 3840 * 2160),
        ("control_rate_per_s", lambda v: v == 20.0),
        ("control_burst", lambda v: v == 40),
        ("idle_timeout_s", lambda v: v == 60.0),
        ("connect_timeout_s", lambda v: v == 20.0),
        ("shutdown_timeout_s", lambda v: v == 10.0),
        ("token", lambda v: v is None),
        ("metrics_require_token", lambda v: v is False),
        ("allowed_origins", lambda v: v == ()),
    ]
    assert [name for name, check in checks if not check(getattr(config, name))] == []
    assert ServerConfig(idle_timeout_s=0).idle_timeout_s == 0  # 0: never
    assert encode_jpeg(pattern(8, 8, 1))[:2] == b"\xff\xd8"
