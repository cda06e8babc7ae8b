"""Hostile websocket input: every message gets its documented answer and the connection stays.

Each case here broke a promise of the README before it was fixed: numbers too large for a
float, values of the wrong JSON type, lone surrogates, JPEG headers hidden behind junk bytes,
many-scan progressive JPEGs, a message of exactly the size limit, frames dropped with no
answer. A real websockets client talks to a real server on loopback.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image
from reliability_testing import GatedBundle, derived
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from helpers.streams_testing import TEST_RUNTIME, pattern, running_server, visible_tiny_bundle
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime_config import RuntimeConfig
from livediff.models.bundle import ModelBundle
from livediff.streams import ws_handler
from livediff.streams.limits import read_jpeg_header
from livediff.streams.server_config import ServerConfig
from livediff.wire import encode_jpeg

OBJECT_REPR = re.compile(r"object at 0x|<[a-zA-Z_.]+ object")
FRAME = encode_jpeg(pattern(96, 96, seed=4))


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def opened(client: ClientConnection) -> str:
    hello = json.loads(await client.recv())
    assert "session" in hello, hello
    return str(hello["session"])


async def answer_to(client: ClientConnection, message: str | bytes) -> Any:
    """Send one message; its one answer (a JSON object, or the bytes of an output)."""
    await client.send(message)
    reply = await asyncio.wait_for(client.recv(), 60)
    return reply if isinstance(reply, bytes) else json.loads(reply)


async def assert_still_serves(client: ClientConnection) -> None:
    assert (await answer_to(client, json.dumps({"seed": 3, "id": "last"}))) == {
        "ok": True,
        "id": "last",
    }
    output = await answer_to(client, FRAME)
    assert isinstance(output, bytes) and output[:2] == b"\xff\xd8"


def progressive_jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(width, height, seed=9)).save(buffer, format="JPEG", progressive=True)
    return buffer.getvalue()


def many_scan_jpeg(width: int, height: int, repeats: int) -> bytes:
    """A progressive JPEG whose scans (each with its tables) are repeated ``repeats`` times.

    libjpeg decodes every repeat, so the cost grows with ``repeats`` while the image does not.
    """
    data = progressive_jpeg(width, height)
    first_scan = data.index(b"\xff\xda")
    tables_start = data.rindex(b"\xff\xc2", 0, first_scan)  # scans and their tables follow SOF2
    tables_start += 2 + int.from_bytes(data[tables_start + 2 : tables_start + 4], "big")
    body = data[tables_start:-2]  # everything between the frame header and EOI
    return data[:tables_start] + body * repeats + b"\xff\xd9"


def junk_resynced_jpeg(width: int, height: int) -> bytes:
    """JFIF, 8 junk bytes (decoders skip them and resync), then a frame header of ``width``×``height``."""
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big")
    sof0 += b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + b"\x01\x02\x03\x04\x05\x06\x07\x08" + sof0 + FRAME[2:]


HUGE = 10**400
CONTROL_CASES: list[tuple[str, str]] = [
    *((json.dumps({key: HUGE}), key) for key in ("strength", "guidance_scale", "delta")),
    (json.dumps({"similarity_threshold": HUGE}), "similarity_threshold"),
    (json.dumps({"seed": HUGE}), "seed"),
    (json.dumps({"t_index_list": 7}), "t_index_list"),
    (json.dumps({"t_index_list": [HUGE]}), "t_index_list"),
    (json.dumps({"t_index_list": {"a": 1}}), "t_index_list"),
    (json.dumps({"prompt": "\ud800"}), "prompt"),
    (json.dumps({"prompt": [["a cat \udfff", 1.0]]}), "prompt"),
    (json.dumps({"negative_prompt": "\udbff"}), "negative_prompt"),
    (json.dumps({"prompt": {"text": "a cat"}}), "prompt"),
    (json.dumps({"prompt": [[{"x": 1}, 1.0]]}), "prompt"),
    (json.dumps({"prompt": [["a", HUGE]]}), "prompt"),
    (json.dumps({"negative_prompt": ["a"]}), "negative_prompt"),
    (json.dumps({"blend": {}}), "blend"),
    (json.dumps({"blend": []}), "blend"),
    (json.dumps({"steps": [1]}), "steps"),
    (json.dumps({"max_skip_frames": "3"}), "max_skip_frames"),
    (json.dumps({"\ud800": 1}), "\ud800"),
]


async def test_hostile_control_messages_get_an_error_each_and_the_connection_stays(
    bundle: ModelBundle,
) -> None:
    async with (
        running_server(bundle) as (base, _, engine),
        connect(ws_url(base), max_size=None) as client,
    ):
        sid = await opened(client)
        before = engine.sessions[sid].params
        for message, field in CONTROL_CASES:
            reply = await answer_to(client, message)
            assert set(reply) <= {"error", "field", "current"} and reply["error"], (message, reply)
            assert reply.get("field") == field, (message, reply)
            assert len(reply["error"]) < 400 and not OBJECT_REPR.search(reply["error"]), reply
            assert "digits" in reply["error"] or "10000000000" not in reply["error"], reply
        assert engine.sessions[sid].params == before  # nothing changed
        await assert_still_serves(client)


async def test_a_refused_change_names_the_field_and_the_value_kept(bundle: ModelBundle) -> None:
    async with running_server(bundle) as (base, _, _), connect(ws_url(base)) as client:
        await opened(client)
        assert await answer_to(client, json.dumps({"guidance_scale": 1.5, "id": 1})) == {
            "ok": True,
            "id": 1,
        }
        reply = await answer_to(client, json.dumps({"guidance_scale": 99, "seed": 5, "id": 2}))
        assert reply["id"] == 2 and reply["field"] == "guidance_scale"
        assert reply["current"] == {"guidance_scale": 1.5, "seed": 2}  # what the session keeps
        assert "guidance_scale=99 is out of range" in reply["error"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (junk_resynced_jpeg(60000, 60000), "60000×60000 = 3600000000 pixels is too large"),
        (b"\xff\xd8" + bytes(range(256)) * 4, "not a decodable JPEG image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 100, "not a decodable JPEG image"),
        (FRAME[: len(FRAME) // 3], "not a decodable JPEG image"),
    ],
    ids=["junk-then-huge-header", "random-after-soi", "header-only", "truncated"],
)
async def test_hostile_frames_get_an_error_each_and_the_connection_stays(
    bundle: ModelBundle, data: bytes, expected: str
) -> None:
    async with running_server(bundle) as (base, _, _), connect(ws_url(base)) as client:
        await opened(client)
        reply = await answer_to(client, data)
        assert isinstance(reply, dict) and set(reply) == {"error"}, reply
        assert reply["error"].startswith("frame 0: ") and expected in reply["error"], reply
        assert not OBJECT_REPR.search(reply["error"]), reply
        await assert_still_serves(client)


def test_the_header_reader_resyncs_like_the_decoder_and_counts_scans() -> None:
    header = read_jpeg_header(junk_resynced_jpeg(60000, 50000))
    assert header is not None and (header.width, header.height) == (60000, 50000)
    baseline = read_jpeg_header(FRAME)
    assert baseline is not None and (baseline.progressive, baseline.scans) == (False, 1)
    progressive = read_jpeg_header(progressive_jpeg(64, 48))
    assert progressive is not None and progressive.progressive and 6 <= progressive.scans <= 12
    repeated = read_jpeg_header(many_scan_jpeg(64, 48, 10))
    assert repeated is not None and repeated.scans == 10 * progressive.scans
    # the repeated file still decodes, and costs more the more it repeats (what the limit is for)
    assert Image.open(io.BytesIO(many_scan_jpeg(64, 48, 10))).convert("RGB").size == (64, 48)


async def test_many_scan_jpegs_are_refused_before_decoding_and_a_bystander_keeps_streaming(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []
    original = ws_handler.decode_jpeg

    def counting(data: bytes, **kwargs: Any) -> np.ndarray:
        decoded.append(len(data))
        return original(data, **kwargs)

    monkeypatch.setattr(ws_handler, "decode_jpeg", counting)
    bomb = many_scan_jpeg(640, 480, 40)
    scans = read_jpeg_header(bomb)
    assert scans is not None and scans.scans > ServerConfig().max_jpeg_scans
    async with running_server(bundle) as (base, _, _):
        url = ws_url(base)
        async with connect(url) as bystander:
            await opened(bystander)

            async def attack() -> list[Any]:
                async with connect(url, max_size=None) as attacker:
                    await opened(attacker)
                    return [await answer_to(attacker, bomb) for _ in range(5)]

            attacks = [asyncio.ensure_future(attack()) for _ in range(4)]
            outputs = [await answer_to(bystander, FRAME) for _ in range(10)]
            refusals = [reply for replies in await asyncio.gather(*attacks) for reply in replies]
    assert all(isinstance(o, bytes) and o[:2] == b"\xff\xd8" for o in outputs)
    assert len(refusals) == 20
    for reply in refusals:
        assert f"JPEG with {scans.scans} scans: at most 32" in reply["error"], reply
    assert decoded == [len(FRAME)] * 10  # no attacker frame reached the decoder


async def test_a_message_of_exactly_the_limit_is_served_and_one_byte_more_closes_1009(
    bundle: ModelBundle,
) -> None:
    limit = 64 * 1024
    config = ServerConfig(ws_max_message_bytes=limit)
    async with running_server(bundle, config) as (base, _, _):
        async with connect(ws_url(base), max_size=None) as client:
            await opened(client)
            reply = await answer_to(client, b"\xff\xd8" + bytes(limit - 2))
            assert reply["error"].startswith("frame 0: ")  # answered, not closed
            await assert_still_serves(client)
        async with connect(ws_url(base), max_size=None) as client:
            await opened(client)
            with pytest.raises(ConnectionClosed) as closed:
                await answer_to(client, bytes(limit + 1))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_a_lock_step_client_gets_an_answer_for_every_frame_even_when_frames_are_dropped(
    bundle: ModelBundle,
) -> None:
    """One frame in flight at a time: a frame that waits behind another session's batch past its
    deadline is dropped and answered ``{"dropped": i, "reason": "deadline"}``, never left
    unanswered; the client goes on."""
    runtime = RuntimeConfig(deadline_ms=400, degrade=DegradePolicy(enabled=False))
    gated = derived(GatedBundle, bundle)
    gated.gate.set()  # free-running while both sessions warm up
    async with (
        running_server(gated, runtime=runtime) as (base, _, _),
        connect(ws_url(base)) as busy,
        connect(ws_url(base)) as client,
    ):
        await opened(busy), await opened(client)
        for _ in range(2):  # the batch-time estimate learns that a batch is quick
            assert isinstance(await answer_to(busy, FRAME), bytes)
            assert isinstance(await answer_to(client, FRAME), bytes)
        gated.gate.clear()
        gated.entered.clear()
        await busy.send(FRAME)  # the other session's frame holds the model at the gate ...
        await asyncio.to_thread(gated.entered.wait, 60)
        await client.send(FRAME)  # ... while this one waits, past its 400 ms deadline
        await asyncio.sleep(0.8)
        gated.gate.set()
        reply = json.loads(await asyncio.wait_for(client.recv(), 60))
        assert reply == {"dropped": 2, "reason": "deadline"}  # answered, not left waiting
        assert isinstance(await asyncio.wait_for(busy.recv(), 60), bytes)
        assert isinstance(await answer_to(client, FRAME), bytes)  # and the client goes on


async def test_a_frame_replaced_by_a_newer_one_is_answered_dropped_replaced(
    bundle: ModelBundle,
) -> None:
    gated = derived(GatedBundle, bundle)
    async with (
        running_server(gated, runtime=TEST_RUNTIME) as (base, _, _),
        connect(ws_url(base)) as client,
    ):
        await opened(client)
        await client.send(FRAME)  # frame 0 goes into the model, which waits at the gate
        await asyncio.to_thread(gated.entered.wait, 60)
        await client.send(FRAME)  # frame 1 waits in the inbox (one place) ...
        await client.send(FRAME)  # ... until frame 2 takes its place
        notice = json.loads(await asyncio.wait_for(client.recv(), 60))
        assert notice == {"dropped": 1, "reason": "replaced"}
        gated.gate.set()
        outputs = [await asyncio.wait_for(client.recv(), 60) for _ in range(2)]
    assert all(isinstance(o, bytes) and o[:2] == b"\xff\xd8" for o in outputs)
