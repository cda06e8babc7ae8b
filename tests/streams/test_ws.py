"""``GET /ws``: JPEG round trips, live control, and every documented error answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from helpers.streams_testing import (
    FOX,
    TEST_RUNTIME,
    WHALE,
    distance,
    pattern,
    read_video,
    reference_output,
    running_server,
    write_y4m,
)
from livediff.clients.ws_client import WsClient, build_parser, stream_file
from livediff.engine.runtime import RuntimeConfig
from livediff.exceptions import LivediffError
from livediff.models.bundle import ModelBundle
from livediff.streams import app_keys
from livediff.streams.server_config import ServerConfig
from livediff.wire import decode_jpeg, encode_jpeg

MAX_MESSAGE = 64 * 1024


@pytest.fixture
async def server(bundle: ModelBundle) -> AsyncIterator[Any]:
    async with running_server(bundle, ServerConfig(ws_max_message_bytes=MAX_MESSAGE)) as running:
        yield running


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/ws" + query


def assert_made_by(image: np.ndarray, references: dict[str, np.ndarray], name: str) -> None:
    """``image`` is the model's output for session ``name``: much nearer its reference than the other's."""
    own = distance(image, references[name])
    others = {
        other: round(distance(image, ref), 1) for other, ref in references.items() if other != name
    }
    assert all(own * 2 < d for d in others.values()), (
        f"{name}: {own:.1f} from its own reference, {others} from others"
    )


async def closed_code(connection: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await connection.recv()
    return None if closed.value.rcvd is None else closed.value.rcvd.code


async def test_jpeg_round_trip_answers_with_the_models_output(
    server: Any, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    base, _, _ = server
    async with await WsClient.connect(ws_url(base), params=FOX) as client:
        await client.send_frame(frame)
        jpeg = await client.recv_jpeg()
    assert jpeg.startswith(b"\xff\xd8")
    output = decode_jpeg(jpeg)
    assert output.shape == (128, 128, 3)  # the model's resolution, not the 160×120 input's
    assert_made_by(output, references, "fox")
    assert distance(output[:120], frame[:, 16:144]) > 30  # not an echo of the input


async def test_control_message_takes_effect_for_the_next_frame(
    server: Any, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    base, _, _ = server
    async with await WsClient.connect(ws_url(base), params=FOX) as client:
        await client.send_frame(frame)
        assert_made_by(await client.recv_frame(), references, "fox")
        assert await client.update(**WHALE) == {"ok": True, "id": 1}
        await client.send_frame(frame)
        assert_made_by(await client.recv_frame(), references, "whale")


def _error(
    start: str = "",
    contains: str = "",
    request_id: Any = None,
    *,
    field: str | None = None,
    current: dict[str, Any] | None = None,
) -> Callable[[dict[str, Any]], None]:
    """A check of one error reply: its text, its id, and (for a refused key) the field and the
    values the session keeps."""
    expected = {"error"} | {
        key
        for key, value in (("id", request_id), ("field", field), ("current", current))
        if value is not None
    }

    def check(answer: dict[str, Any]) -> None:
        assert set(answer) == expected, answer
        assert answer["error"].startswith(start) and contains in answer["error"], answer
        assert answer.get("id") == request_id
        assert answer.get("field") == field and answer.get("current") == current, answer

    return check


BAD_INPUTS: list[tuple[str, str | bytes, Callable[[dict[str, Any]], None]]] = [
    ("garbage binary", b"\x00\x01 not an image", _error("frame 0: ", "not a JPEG")),
    (
        "truncated JPEG",
        b"\xff\xd8\xff\xe0" + bytes(100),
        _error("frame 1: ", "not a decodable JPEG"),
    ),
    ("empty binary", b"", _error("frame 2: ", "empty")),
    ("bad JSON", "{prompt: fox", _error("control message is not valid JSON")),
    ("not an object", "[1, 2]", _error("a control message must be a JSON object")),
    ("no parameters", "{}", _error("a control message needs at least one of")),
    (
        "unknown key",
        json.dumps({"prompt": "x", "colour": "red", "id": 7}),
        _error(
            "unknown parameter(s): colour",
            request_id=7,
            field="colour",
            current={"prompt": "a red fox"},
        ),
    ),
    (
        "out of range",
        json.dumps({"strength": 5, "id": "s"}),
        _error(
            "strength=5 is out of range",
            request_id="s",
            field="strength",
            current={"strength": 0.5},
        ),
    ),
    (
        "wrong type",
        json.dumps({"seed": "seven"}),
        _error("seed='seven' is out of range", field="seed", current={"seed": 11}),
    ),
]


async def test_each_bad_input_gets_its_answer_while_another_client_streams(
    server: Any, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    base, _, engine = server
    async with (
        await WsClient.connect(ws_url(base), params=WHALE) as good,
        connect(ws_url(base, "?prompt=a+red+fox&seed=11")) as bad,
    ):
        assert "session" in json.loads(await bad.recv())
        for name, message, check in BAD_INPUTS:
            await bad.send(message)
            answer = await bad.recv()
            assert isinstance(answer, str), name
            check(json.loads(answer))
            await good.send_frame(frame)  # the other client is served between every bad message
            assert_made_by(await good.recv_frame(), references, "whale")
        await bad.send(encode_jpeg(frame))  # the bad client's connection survived all of that
        answer = await bad.recv()
        assert isinstance(answer, bytes)
        assert_made_by(decode_jpeg(answer), references, "fox")
        await bad.send(b"\xff\xd8" + bytes(MAX_MESSAGE))  # over ws_max_message_bytes
        assert await closed_code(bad) == 1009
        await good.send_frame(frame)
        assert_made_by(await good.recv_frame(), references, "whale")
        assert good.errors == []
        assert len(engine.sessions) == 1  # the bad client's session ended with its connection


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?strength=7", "strength=7.0 is out of range"),
        ("?colour=red", "unknown parameter(s): colour"),
        ("?seed=x", "seed='x' is not a number"),
    ],
)
async def test_bad_session_parameters_are_refused_with_1008(
    server: Any, query: str, message: str
) -> None:
    base, _, engine = server
    async with connect(ws_url(base, query)) as refused:
        answer = json.loads(await refused.recv())
        assert message in answer["error"]
        assert await closed_code(refused) == 1008
    with pytest.raises(LivediffError, match="refused"):
        await WsClient.connect(ws_url(base, query))
    assert len(engine.sessions) == 0


async def test_at_capacity_the_server_closes_with_1013(bundle: ModelBundle) -> None:
    runtime = RuntimeConfig(
        deadline_ms=TEST_RUNTIME.deadline_ms, max_sessions=1, degrade=TEST_RUNTIME.degrade
    )
    async with (
        running_server(bundle, runtime=runtime) as (base, _, _),
        await WsClient.connect(ws_url(base)),
        connect(ws_url(base)) as second,
    ):
        answer = json.loads(await second.recv())
        assert "at capacity" in answer["error"]
        assert await closed_code(second) == 1013


async def test_shutdown_closes_connections_with_1001_and_ends_their_sessions(
    bundle: ModelBundle, frame: np.ndarray
) -> None:
    async with running_server(bundle) as (base, app, engine):
        client = await connect(ws_url(base))
        assert "session" in json.loads(await client.recv())
        assert len(engine.sessions) == 1
        await app.shutdown()  # what runner.cleanup() starts with
        assert await closed_code(client) == 1001
        assert len(engine.sessions) == 0
        assert len(app[app_keys.WEBSOCKETS]) == 0


async def test_ws_client_streams_a_file_and_saves_the_answers(
    server: Any, bundle: ModelBundle, tmp_path: Path
) -> None:
    base, _, _ = server
    clip = write_y4m(tmp_path / "in.y4m", [pattern(160, 120, seed=1)] * 6)
    output = tmp_path / "out.y4m"
    argv = ["--url", ws_url(base), "--input", str(clip), "--output", str(output), "--no-realtime"]
    args = build_parser().parse_args([*argv, "--prompt", FOX["prompt"], "--seed", str(FOX["seed"])])
    summary = await stream_file(args)
    assert summary["sent"] == 6 and summary["errors"] == []
    frames = read_video(output)
    assert len(frames) == summary["received"] >= 1
    reference = reference_output(bundle, read_video(clip)[0], **FOX)
    assert all(frame.shape == (128, 128, 3) and distance(frame, reference) < 15 for frame in frames)


async def test_metrics_and_health_count_websocket_frames(server: Any, frame: np.ndarray) -> None:
    base, _, _ = server
    async with await WsClient.connect(ws_url(base)) as client:
        await client.send_frame(frame)
        await client.recv_frame()
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as response:
                assert await response.json() == {
                    "status": "ok",
                    "sessions": 1,
                    "max_sessions": 32,
                    "full_for_s": None,
                    "degrade_level": "normal",
                    "degrade_reason": None,
                    "devices": {"cpu": {"degrade_level": "normal", "failed": False, "sessions": 1}},
                    "peers": 0,
                    "websockets": 1,
                }
            async with http.get(base + "/metrics") as response:
                assert response.content_type == "text/plain"
                text = await response.text()
    assert 'livediff_transport_frames_total{direction="in",transport="websocket"} 1.0' in text
    assert 'livediff_transport_frames_total{direction="out",transport="websocket"} 1.0' in text
    assert "livediff_transport_server_latency_seconds_count" in text


async def test_skipped_frames_are_answered_with_the_previous_output(
    server: Any, frame: np.ndarray
) -> None:
    base, _, engine = server
    async with await WsClient.connect(
        ws_url(base), params={**FOX, "similarity_threshold": 0.5}
    ) as client:
        answers = []
        for _ in range(4):  # one at a time: none is dropped, each gets exactly one answer
            await client.send_frame(frame)
            answers.append(await client.recv_jpeg())
        stats = engine.sessions[client.session].stats()
    assert (
        stats["skipped"] >= 1
        and stats["processed"] + stats["skipped"] == 4
        and stats["dropped"] == 0
    )
    assert len(set(answers)) == 1
