"""Fuzzing the websocket protocol and ``POST /offer`` with hypothesis: no crash, documented answers.

Every answer must be one the protocol documents, and the server must serve a good client
afterwards:

- websocket text: exactly one reply, ``{"ok": true}`` or ``{"error": "<text>"}`` (plus the
  request's ``"id"`` when it had a valid one);
- websocket binary: exactly one reply, ``{"error": "frame <n>: …"}`` or a JPEG;
- websocket closes: 1009 (message too big) and 1007 (text that is not UTF-8) only;
- ``/offer``: ``{"error": "<text>"}`` with 400, 413 or 415 (or a real answer, 200).

Bounds: ``EXAMPLES`` examples per strategy (300; a few seconds each on two cores),
``deadline=None`` (a first JPEG decode or peer connection may be slow), no example database
(nothing written to the checkout). The server runs on its own loop in a thread so that the
synchronous hypothesis examples can drive it with synchronous clients. Runs inside a
loopback-only network namespace: an offer that happens to parse makes the server start ICE
towards whatever candidates the fuzzer wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_testing import ThreadedServer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from helpers.streams_testing import NEEDS_NETNS, netns_module_runner, pattern, visible_tiny_bundle
from livediff.engine.config import LIVE_PARAMETER_NAMES
from livediff.streams import app_keys
from livediff.streams.server_config import ServerConfig

test_in_loopback_netns = netns_module_runner(__file__)
pytestmark = pytest.mark.slow

EXAMPLES = 300
MAX_MESSAGE = 64 * 1024
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CONFIG = ServerConfig(
    host_addresses=("127.0.0.1",),
    ws_max_message_bytes=MAX_MESSAGE,
    control_rate_per_s=10_000,  # the parser is what is fuzzed here, not the rate limit
    control_burst=100_000,
    idle_timeout_s=0,
)
DOCUMENTED_CLOSES = {1007, 1009}
OBJECT_REPR = re.compile(r"object at 0x|<[a-zA-Z_.]+ object")


def real_jpeg(width: int, height: int, progressive: bool = False) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(width, height, seed=width)).save(
        buffer, format="JPEG", progressive=progressive
    )
    return buffer.getvalue()


def junk_resynced_jpeg(junk: int, width: int, height: int) -> bytes:
    """A JFIF header, ``junk`` non-marker bytes (decoders skip them), then a frame header that
    claims ``width`` × ``height``: readers that stop at the junk never see the size.
    """
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big")
    sof0 += b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + bytes(range(1, junk + 1)) + sof0 + JPEG[2:]


JPEG = real_jpeg(48, 32)
surrogates = st.text(  # lone UTF-16 surrogates: valid in JSON ("\\ud800"), not in UTF-8
    alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.integers(min_value=10**300, max_value=10**400)  # beyond float: OverflowError bait
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.tuples(st.text(max_size=10), surrogates).map("".join),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
control_shaped = st.dictionaries(
    st.sampled_from(sorted(LIVE_PARAMETER_NAMES | {"id", "prompt", "unknown"})),
    json_values,
    max_size=4,
)
wrong_types = st.tuples(  # every live key with a value of another JSON type
    st.sampled_from(sorted(LIVE_PARAMETER_NAMES)),
    st.sampled_from([7, 10**400, -1.5, "7", [], [7], {}, {"a": 1}, None, True, [["x", "y"]]]),
).map(lambda item: {item[0]: item[1]})
text_messages = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    control_shaped.map(json.dumps),
    wrong_types.map(json.dumps),
    surrogates.map(lambda text: json.dumps({"prompt": text})),
    st.integers(min_value=1, max_value=60_000).map(lambda n: "[" * n),  # deep nesting
    st.integers(min_value=1, max_value=30_000).map(lambda n: '{"seed": ' + "9" * n + "}"),
    st.integers(min_value=MAX_MESSAGE // 2, max_value=MAX_MESSAGE - 16).map(
        lambda n: json.dumps({"prompt": "x" * n})  # over the 64 KiB control limit or near it
    ),
)
binary_messages = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"\xff\xd8" + b),
    st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=40)).map(
        lambda t: (
            b"\xff\xd8\xff\xc0\x00\x11\x08"
            + t[1].to_bytes(2, "big")
            + t[0].to_bytes(2, "big")
            + b"\x03"
            + t[2]
        )
    ),
    st.integers(0, len(JPEG)).map(lambda n: JPEG[:n]),  # truncated
    st.tuples(st.integers(0, len(JPEG) - 1), st.integers(0, 255)).map(
        lambda t: JPEG[: t[0]] + bytes([t[1]]) + JPEG[t[0] + 1 :]  # one corrupted byte
    ),
    st.just(real_jpeg(40, 24, progressive=True)),
    st.tuples(st.integers(1, 40), st.integers(0, 65535), st.integers(0, 65535)).map(
        lambda t: junk_resynced_jpeg(t[0], t[1], t[2])
    ),
    st.integers(MAX_MESSAGE + 1, 2 * MAX_MESSAGE).map(lambda n: b"\xff\xd8" + bytes(n)),
)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    with ThreadedServer(visible_tiny_bundle(), CONFIG) as running:
        yield running


class Client:
    """One websocket connection, reopened when the server closes it (as documented)."""

    def __init__(self, base: str) -> None:
        self.url = base.replace("http://", "ws://") + "/ws"
        self.connection: ClientConnection | None = None
        self.closes: list[int] = []
        self._stack = contextlib.ExitStack()

    def open(self) -> ClientConnection:
        if self.connection is None:
            connection = connect(self.url, max_size=None, open_timeout=30, compression=None)
            self.connection = self._stack.enter_context(connection)
            assert "session" in json.loads(self.connection.recv(timeout=30))
        return self.connection

    def exchange(self, message: str | bytes, *, raw_text: bool = False) -> str | bytes | None:
        """Send one message; its one answer, or ``None`` when the server closed (code recorded)."""
        connection = self.open()
        try:
            if raw_text:
                assert isinstance(message, bytes)
                connection.send(message, text=True)  # a text frame, unchecked: maybe not UTF-8
            else:
                connection.send(message)
            return connection.recv(timeout=60)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "the server dropped the connection without a close"
            self.closes.append(closed.rcvd.code)
            self.connection = None
            return None

    def close(self) -> None:
        self._stack.close()


def assert_reply(answer: dict[str, Any], sent: Any) -> None:
    assert isinstance(answer, dict), answer
    if "ok" in answer:
        assert set(answer) <= {"ok", "id"} and answer["ok"] is True, answer
    else:
        assert {"error"} <= set(answer) <= {"error", "id", "field", "current"}, answer
        assert isinstance(answer["error"], str) and answer["error"], answer
        assert not OBJECT_REPR.search(answer["error"]), answer  # never a Python object
        if "current" in answer:  # the values kept, for keys the request tried to change
            assert isinstance(sent, dict) and set(answer["current"]) <= set(sent), (answer, sent)
    if "id" in answer:
        assert isinstance(sent, dict) and answer["id"] == sent.get("id"), (answer, sent)


@NEEDS_NETNS
def test_fuzzed_control_messages_get_one_documented_answer_each(server: ThreadedServer) -> None:
    client = Client(server.base)
    kinds: dict[str, int] = {}

    @FUZZ
    @given(text_messages)
    def check(message: str) -> None:
        answer = client.exchange(message)
        kind = "closed" if answer is None else next(iter(json.loads(answer)))
        kinds[kind] = kinds.get(kind, 0) + 1
        if answer is None:
            assert client.closes[-1] in DOCUMENTED_CLOSES, client.closes
            assert len(message.encode()) > MAX_MESSAGE
            return
        assert isinstance(answer, str), answer
        try:
            sent = json.loads(message)
        except (ValueError, RecursionError):
            sent = None
        assert_reply(json.loads(answer), sent)

    try:
        check()
    finally:
        client.close()
    assert sum(kinds.values()) >= EXAMPLES and kinds.get("error", 0) > 0, kinds
    print("control answers:", kinds)
    assert_still_serves(server)


@NEEDS_NETNS
def test_fuzzed_frames_get_one_documented_answer_each(server: ThreadedServer) -> None:
    client = Client(server.base)
    frames = 0
    kinds = {"jpeg": 0, "error": 0}

    @FUZZ
    @given(binary_messages | st.binary(max_size=64).map(lambda b: ("text", b)))
    def check(message: bytes | tuple[str, bytes]) -> None:
        nonlocal frames
        if isinstance(message, tuple):  # a text frame whose bytes may not be UTF-8
            answer = client.exchange(message[1], raw_text=True)
            if answer is None:
                assert client.closes[-1] == 1007
                frames = 0
            else:
                assert isinstance(answer, str)
                assert_reply(json.loads(answer), None)
            return
        answer = client.exchange(message)
        if answer is None:
            assert client.closes[-1] == 1009 and len(message) > MAX_MESSAGE
            frames = 0
            return
        index, frames = frames, frames + 1
        kinds["jpeg" if isinstance(answer, bytes) else "error"] += 1
        if isinstance(answer, bytes):
            assert answer[:2] == b"\xff\xd8"  # an output frame
        else:
            reply = json.loads(answer)
            assert set(reply) == {"error"} and reply["error"].startswith(f"frame {index}: "), reply

    try:
        check()
    finally:
        client.close()
    print("frame answers:", kinds, "closes:", client.closes)
    assert kinds["jpeg"] > 0 and kinds["error"] > 0, kinds  # both kinds of answer were reached
    assert_still_serves(server)


def post(base: str, body: bytes, content_type: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        base + "/offer", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


sdp_texts = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "v=0",
                "m=video 9 UDP/TLS/RTP/SAVPF 96",
                "a=rtpmap:96 VP8/90000",
                "a=sendrecv",
                "a=ice-ufrag:abcd",
                "a=ice-pwd:0123456789abcdef012345",
                "c=IN IP4 0.0.0.0",
                "a=fingerprint:sha-256 00:11",
                "a=setup:actpass",
                "a=mid:0",
                "m=audio 9 RTP/AVP 0",
                "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
            ]
        ),
        st.text(max_size=60).map(lambda t: t.replace("\r", "").replace("\n", "")),
    ),
    max_size=20,
).map(lambda lines: "\r\n".join(lines) + "\r\n")
offer_bodies = st.one_of(
    json_values.map(lambda v: (json.dumps(v).encode(), "application/json")),
    st.fixed_dictionaries(
        {"sdp": st.one_of(sdp_texts, json_values), "type": st.sampled_from(["offer", "answer", 1])},
        optional={"params": st.one_of(control_shaped, json_values), "extra": json_values},
    ).map(lambda v: (json.dumps(v).encode(), "application/json")),
    st.binary(max_size=200).map(lambda b: (b, "application/json")),
    st.tuples(
        st.binary(max_size=50), st.sampled_from(["text/plain", "application/x-www-form-urlencoded"])
    ),
    st.integers(CONFIG.max_offer_bytes + 1, 2 * CONFIG.max_offer_bytes).map(
        lambda n: (b'{"sdp": "' + b"a" * n + b'"}', "application/json")
    ),
)


@NEEDS_NETNS
def test_fuzzed_offers_get_documented_json_errors(server: ThreadedServer) -> None:
    statuses: dict[int, int] = {}

    @FUZZ
    @given(offer_bodies)
    def check(body: tuple[bytes, str]) -> None:
        status, answer = post(server.base, *body)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            assert set(answer) == {"sdp", "type", "session", "params"}
            return
        assert status in (400, 413, 415), (status, answer)
        assert {"error"} <= set(answer) <= {"error", "field"}, answer
        assert isinstance(answer["error"], str) and isinstance(answer.get("field", ""), str), answer
        error = answer["error"]
        assert error and not error.rstrip().endswith(":") and not OBJECT_REPR.search(error), answer
        assert "AssertionError" not in error, answer  # an SDP error says what is wrong

    check()
    print("offer statuses:", statuses)
    assert statuses.get(400, 0) > EXAMPLES // 3, statuses  # the fuzzer reached the parsers
    if 200 not in statuses:  # every refused offer released its peer and session at once
        assert server.call(lambda: len(server.app[app_keys.PEERS])) == 0
    assert_still_serves(server)


def assert_still_serves(server: ThreadedServer) -> None:
    """A good client after all that: a frame in, the model's output back; nothing left open."""
    client = Client(server.base)
    answer = client.exchange(real_jpeg(64, 64))
    client.close()
    assert isinstance(answer, bytes) and answer[:2] == b"\xff\xd8"
