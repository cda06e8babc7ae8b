"""OSC control: a real python-osc client on loopback drives the sessions of a real engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.udp_client import SimpleUDPClient

from helpers.streams_testing import FOX, TEST_RUNTIME, WHALE, distance
from livediff.engine.config import BlendMethod, GenerationParams
from livediff.engine.runtime import Engine
from livediff.models.bundle import ModelBundle
from livediff.streams import osc_addresses
from livediff.streams.osc_config import OscConfig
from livediff.streams.osc_control import OscControl

REPO = Path(__file__).resolve().parents[2]
REPLY_WAIT_S = 30.0  # a guard against a hang, not a measurement
OK, ERROR = osc_addresses.OK_ADDRESS, osc_addresses.ERROR_ADDRESS


class Replies(asyncio.DatagramProtocol):
    """The test's OSC reply port: every message the server sends back, in order."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[str, list[Any]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        message = OscMessage(data)
        self.messages.put_nowait((message.address, list(message.params)))

    async def next(self) -> tuple[str, list[Any]]:
        return await asyncio.wait_for(self.messages.get(), REPLY_WAIT_S)


class Rig:
    """An engine's OSC listener, a python-osc client aimed at it, and the reply port."""

    def __init__(self, engine: Engine, control: OscControl, replies: Replies) -> None:
        self.engine, self.control, self.replies = engine, control, replies
        assert control.address is not None
        self.client = SimpleUDPClient(*control.address)

    async def send(self, address: str, value: Any) -> tuple[str, list[Any]]:
        """Send one message; return the server's answer to it."""
        self.client.send_message(address, value)
        return await self.replies.next()

    async def send_tagged(self, address: str, *args: tuple[Any, str]) -> tuple[str, list[Any]]:
        builder = OscMessageBuilder(address)
        for value, tag in args:
            builder.add_arg(value, tag)
        self.client.send(builder.build())
        return await self.replies.next()


@contextlib.asynccontextmanager
async def osc_rig(
    engine: Engine, *, rate_per_s: float = 1000.0, burst: int = 1000, clock: Any = None
) -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    transport, replies = await loop.create_datagram_endpoint(Replies, local_addr=("127.0.0.1", 0))
    reply_port = transport.get_extra_info("sockname")[1]
    extra = {} if clock is None else {"clock": clock}
    control = OscControl(
        engine,
        OscConfig(port=0, reply_port=reply_port),
        host="127.0.0.1",
        rate_per_s=rate_per_s,
        burst=burst,
        **extra,
    )
    try:
        async with control:
            yield Rig(engine, control, replies)
    finally:
        transport.close()


@pytest.fixture
async def engine(bundle: ModelBundle) -> AsyncIterator[Engine]:
    engine = Engine(bundle, None, TEST_RUNTIME, None)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def test_readme_holds_the_address_table() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert osc_addresses.address_table() in readme


# Every documented address: what the client sends, and the live parameter it must produce.
SAMPLES: dict[str, tuple[Any, Any]] = {
    "prompt": (["a fox", 0.75, "a whale", 0.25], (("a fox", 0.75), ("a whale", 0.25))),
    "negative_prompt": ("blurry", "blurry"),
    "blend": ("slerp", BlendMethod.SLERP),
    "seed": (22, 22),
    "steps": (2, 2),
    "strength": (0.7, 0.7),  # a 32-bit float on the wire, 0.7 exactly here
    "t_index_list": ([20, 35], (20, 35)),
    "guidance_scale": (1.5, 1.5),
    "delta": (0.8, 0.8),
    "similarity_threshold": (0.9, 0.9),
    "max_skip_frames": (5, 5),
    "controlnets": ([], ()),  # the tiny model loads none: an empty list is the valid value
    "loras": ([], ()),  # nor a LoRA library
    "feature_bank": (0, 0),  # nor a feature bank: 0 (off) is the valid value
    "bank_interval": (2, 2),
    "feature_fusion": (0.5, 0.5),  # values a 32-bit float holds exactly
    "fusion_threshold": (0.875, 0.875),
    "latent_feedback": (0.25, 0.25),
    "scene_cut": (0.375, 0.375),
    "ip_image": ([None], None),  # nil; the tiny model loads no IP-Adapter: none is the valid value
    "ip_scale": (0.5, 0.5),
}


def test_the_samples_cover_every_documented_address() -> None:
    assert set(SAMPLES) == {decl.name for decl in osc_addresses.controls()}


async def test_every_address_of_a_session_changes_that_session_only(engine: Engine) -> None:
    own = await engine.open_session(FOX)
    other = await engine.open_session(WHALE)
    before = other.params
    async with osc_rig(engine) as rig:
        for name, (sent, expected) in SAMPLES.items():
            address = f"/livediff/{own.id}/{name}"
            assert await rig.send(address, sent) == (OK, [address])
            assert getattr(own.params, name) == expected, name
        # A prompt as one text, and an optional setting turned off with nil.
        assert (await rig.send(f"/livediff/{own.id}/prompt", "a heron"))[0] == OK
        assert own.params.prompt == (("a heron", 1.0),)
        nil = (None, "N")
        assert (await rig.send_tagged(f"/livediff/{own.id}/similarity_threshold", nil))[0] == OK
        assert own.params.similarity_threshold is None
        assert (await rig.send_tagged(f"/livediff/{own.id}/t_index_list", nil))[0] == OK
        assert own.params.t_index_list is None
    assert other.params == before


async def test_a_change_takes_effect_on_the_next_frame(
    engine: Engine, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    session = await engine.open_session(FOX)
    session.submit(frame)
    first = (await session.recv()).image.astype(np.float32)
    assert distance(first, references["fox"]) < 1.0
    async with osc_rig(engine) as rig:
        for name, value in WHALE.items():
            address = f"/livediff/{session.id}/{name}"
            assert await rig.send(address, value) == (OK, [address])
    session.submit(frame)
    after = (await session.recv()).image.astype(np.float32)
    assert distance(after, references["whale"]) < 1.0
    assert distance(after, references["fox"]) > 10.0


async def test_the_server_wide_address_changes_every_session_and_the_default(
    engine: Engine,
) -> None:
    sessions = [await engine.open_session(FOX), await engine.open_session(WHALE)]
    async with osc_rig(engine) as rig:
        for name, (sent, expected) in SAMPLES.items():
            address = f"/livediff/{name}"
            assert await rig.send(address, sent) == (OK, [address])
            assert [getattr(s.params, name) for s in sessions] == [expected, expected], name
            assert getattr(engine.default_params, name) == expected
    later = await engine.open_session({})
    assert later.params.strength == 0.7 and later.params.seed == 22


async def test_a_bundle_applies_its_messages_in_order(engine: Engine) -> None:
    session = await engine.open_session(FOX)
    async with osc_rig(engine) as rig:
        bundle = OscBundleBuilder(IMMEDIATELY)
        for seed in (5, 6, 7):
            message = OscMessageBuilder(f"/livediff/{session.id}/seed")
            message.add_arg(seed)
            bundle.add_content(message.build())
        rig.client.send(bundle.build())
        answers = [await rig.replies.next() for _ in range(3)]
    assert [address for address, _ in answers] == [OK] * 3
    assert session.params.seed == 7


async def test_doubles_are_taken_as_sent(engine: Engine) -> None:
    session = await engine.open_session(FOX)
    async with osc_rig(engine) as rig:
        address = f"/livediff/{session.id}/strength"
        assert (await rig.send_tagged(address, (0.123456789012, "d")))[0] == OK
    assert session.params.strength == 0.123456789012


def bad_messages(sid: str) -> list[tuple[str, list[tuple[Any, str]], str, str]]:
    """(address, tagged arguments, field replied, start of the message replied)."""
    return [
        (f"/livediff/{sid}/strength", [("strong", "s")], "strength", "strength='strong'"),
        (f"/livediff/{sid}/strength", [(5.0, "f")], "strength", "strength=5"),
        (f"/livediff/{sid}/strength", [(0.0, "f")], "strength", "strength=0"),
        (f"/livediff/{sid}/strength", [(True, "T")], "strength", "strength=True"),
        (f"/livediff/{sid}/seed", [(7.5, "f")], "seed", "seed=7.5"),
        (f"/livediff/{sid}/seed", [(-1, "i")], "seed", "seed=-1"),
        (f"/livediff/{sid}/seed", [(1, "i"), (2, "i")], "seed", "seed takes one argument"),
        (f"/livediff/{sid}/seed", [], "seed", "seed takes one argument"),
        (f"/livediff/{sid}/seed", [(b"\x01", "b")], "seed", "seed: OSC type 'b'"),
        (f"/livediff/{sid}/guidance_scale", [(99.0, "f")], "guidance_scale", "guidance_scale=99"),
        (f"/livediff/{sid}/blend", [("mix", "s")], "blend", "blend='mix'"),
        (f"/livediff/{sid}/prompt", [(42, "i")], "prompt", "prompt takes s, or pairs"),
        (f"/livediff/{sid}/prompt", [("a", "s"), (1.0, "f"), ("b", "s")], "prompt", "prompt takes"),
        (f"/livediff/{sid}/steps", [(99, "i")], "steps", "steps=99"),
        (f"/livediff/{sid}/t_index_list", [(30, "i"), (20, "i")], "t_index_list", "t_index_list"),
        (f"/livediff/{sid}/controlnets", [("no-such-net", "s")], "controlnets", ""),
        (f"/livediff/{sid}/colour", [(1, "i")], "colour", "unknown OSC address"),
        ("/livediff/nosuchsession/strength", [(0.6, "f")], "strength", "no open session"),
        ("/elsewhere/strength", [(0.6, "f")], "", "unknown OSC address"),
        ("/livediff/a/b/strength", [(0.6, "f")], "", "unknown OSC address"),
    ]


async def test_bad_types_and_values_are_refused_logged_and_answered(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    session = await engine.open_session(FOX)
    before = session.params
    async with osc_rig(engine) as rig:
        with caplog.at_level(logging.INFO, logger="livediff.streams.osc_control"):
            for address, args, field, start in bad_messages(session.id):
                reply, (got_field, message) = await rig.send_tagged(address, *args)
                assert (reply, got_field) == (ERROR, field), (address, message)
                assert message.startswith(start) or start in message, (address, message)
                assert session.params == before, address
                logged = [r.getMessage() for r in caplog.records if address in r.getMessage()]
                assert logged and message in logged[-1], (address, logged)
            own = [
                r.getMessage()
                for r in caplog.records
                if f"/livediff/{session.id}/" in r.getMessage()
            ]
            assert all(line.startswith(f"[{session.id}] ") for line in own), own
            # Not OSC at all: answered too, with no field to blame.
            rig.client._sock.sendto(b"hello", rig.control.address)
            reply, (got_field, message) = await rig.replies.next()
            assert (reply, got_field) == (ERROR, "") and message.startswith("not an OSC packet")
        # The listener goes on: a good message after all of these is applied.
        address = f"/livediff/{session.id}/seed"
        assert await rig.send(address, 9) == (OK, [address])
    assert session.params == before.updated(seed=9)


async def test_a_bad_server_wide_value_changes_nothing_anywhere(engine: Engine) -> None:
    sessions = [await engine.open_session(FOX), await engine.open_session(WHALE)]
    before = [s.params for s in sessions], engine.default_params
    async with osc_rig(engine) as rig:
        reply, (field, message) = await rig.send("/livediff/strength", 2.0)
    assert (reply, field) == (ERROR, "strength") and message.startswith("strength=2")
    assert ([s.params for s in sessions], engine.default_params) == before


async def test_the_rate_limit_holds_per_session(engine: Engine) -> None:
    now = [0.0]
    fox, whale = await engine.open_session(FOX), await engine.open_session(WHALE)
    async with osc_rig(engine, rate_per_s=0.5, burst=3, clock=lambda: now[0]) as rig:
        answers = [await rig.send(f"/livediff/{fox.id}/seed", seed) for seed in range(1, 6)]
        assert [a for a, _ in answers] == [OK, OK, OK, ERROR, ERROR]
        assert answers[3][1][0] == "seed" and answers[3][1][1].startswith("rate limit: at most 0.5")
        assert fox.params.seed == 3  # the refused ones were not applied
        # Another session, and the server-wide addresses, have buckets of their own.
        assert (await rig.send(f"/livediff/{whale.id}/seed", 40))[0] == OK
        assert (await rig.send("/livediff/delta", 0.5))[0] == OK
        now[0] += 2.0  # one token back
        assert (await rig.send(f"/livediff/{fox.id}/seed", 8))[0] == OK
        assert (await rig.send(f"/livediff/{fox.id}/seed", 9))[0] == ERROR
    assert (fox.params.seed, whale.params.seed) == (8, 40)


async def test_a_closed_session_is_answered(engine: Engine) -> None:
    session = await engine.open_session(FOX)
    async with osc_rig(engine) as rig:
        await session.close()
        reply, (field, message) = await rig.send(f"/livediff/{session.id}/seed", 3)
    assert (reply, field) == (ERROR, "seed") and "no open session" in message


def test_the_address_rules_refuse_what_is_not_an_address() -> None:
    from livediff.exceptions import ParameterError

    for address in ("", "/", "/livediff", "/livediff/", "/livediff//strength", "livediff/seed"):
        with pytest.raises(ParameterError, match="unknown OSC address"):
            osc_addresses.parse_address(address)
    target = osc_addresses.parse_address("/livediff/abc123/seed")
    assert (target.session, target.name) == ("abc123", "seed")
    assert set(GenerationParams.__dataclass_fields__) >= {d.name for d in osc_addresses.controls()}


# ---------------------------------------------------------------- livediff serve --osc-port
async def _serve_lines(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """stdout + stderr of ``serve`` so far, once every one of ``words`` is in it."""
    seen = ""
    for _ in range(1200):
        out = capsys.readouterr()
        seen += out.out + out.err
        if all(word in seen for word in words):
            return seen
        await asyncio.sleep(0.05)  # polling the captured output, not a measurement
    raise AssertionError(f"serve did not print {words}: {seen}")


async def test_serve_with_osc_port_steers_a_websocket_session(
    bundle: ModelBundle,
    frame: np.ndarray,
    references: dict[str, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``livediff serve``'s own start-up path: a websocket client's session, changed over OSC."""
    from livediff.clients.ws_client import WsClient
    from livediff.cmd_serve import serve
    from livediff.streams.server_config import ServerConfig

    loop = asyncio.get_running_loop()
    transport, replies = await loop.create_datagram_endpoint(Replies, local_addr=("127.0.0.1", 0))
    osc = OscConfig(port=0, reply_port=transport.get_extra_info("sockname")[1])
    engine = Engine(bundle, None, TEST_RUNTIME, None)
    serving = asyncio.ensure_future(serve(engine, ServerConfig(port=0), osc))
    try:
        lines = await _serve_lines(capsys, "listening on", "OSC control on udp")
        base = lines.split("listening on ", 1)[1].split()[0].rstrip("/")
        osc_port = int(lines.split("OSC control on udp 127.0.0.1:", 1)[1].split()[0])
        client = SimpleUDPClient("127.0.0.1", osc_port)
        async with await WsClient.connect(base.replace("http", "ws") + "/ws", params=FOX) as ws:
            await ws.send_frame(frame)
            assert distance(await ws.recv_frame(), references["fox"]) < 12  # JPEG loss
            for name, value in WHALE.items():
                client.send_message(f"/livediff/{ws.session}/{name}", value)
                assert await replies.next() == (OK, [f"/livediff/{ws.session}/{name}"])
            await ws.send_frame(frame)
            after = await ws.recv_frame()
        assert distance(after, references["whale"]) < 12 < distance(after, references["fox"])
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 60) == 0
    finally:
        transport.close()
        if not serving.done():
            serving.cancel()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_osc_port_and_ndi_out_are_refused_with_ray() -> None:
    import argparse

    from livediff.cmd_serve import add_parser
    from livediff.exceptions import ParameterError

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for flags in (["--osc-port", "9000"], ["--ndi-out", "livediff"]):
        args = parser.parse_args(["serve", "--ray", *flags])
        with pytest.raises(ParameterError, match=f"{flags[0]} .* cannot be used with --ray"):
            args.handler(args)


class CountingSink:
    """A frame sink (called on executor threads) that keeps its frames and can be waited on."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self._changed = threading.Condition()

    def send(self, image: np.ndarray, time: Any = None) -> None:
        with self._changed:
            self.frames.append(np.array(image))
            self._changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.frames) >= count, REPLY_WAIT_S)

    def close(self) -> None:
        pass


async def test_camera_with_osc_port_steers_its_session(
    bundle: ModelBundle,
    tmp_path: Path,
    references: dict[str, np.ndarray],
    frame: np.ndarray,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``livediff camera``'s own loop: the server-wide addresses reach its one session."""
    from helpers.streams_testing import write_y4m
    from livediff.cmd_camera import _camera
    from livediff.streams.camera_source import CameraSource
    from livediff.streams.server_config import ServerConfig

    clip = write_y4m(tmp_path / "in.y4m", [frame] * 10, fps=20)
    source = CameraSource(str(clip), loop=True)  # paced at 20 fps, until stopped
    sink = CountingSink()
    loop = asyncio.get_running_loop()
    transport, replies = await loop.create_datagram_endpoint(Replies, local_addr=("127.0.0.1", 0))
    osc = OscConfig(port=0, reply_port=transport.get_extra_info("sockname")[1])
    params = GenerationParams.for_preset(bundle.preset, **FOX)
    engine = Engine(bundle, None, TEST_RUNTIME, params)
    running = asyncio.ensure_future(_camera(engine, source, [sink], osc, ServerConfig()))
    try:
        lines = await _serve_lines(capsys, "OSC control on udp")
        osc_port = int(lines.split("OSC control on udp 127.0.0.1:", 1)[1].split()[0])
        await asyncio.to_thread(sink.wait_for, 2)
        client = SimpleUDPClient("127.0.0.1", osc_port)
        for name, value in WHALE.items():
            client.send_message(f"/livediff/{name}", value)
            assert await replies.next() == (OK, [f"/livediff/{name}"])
        changed_at = len(sink.frames)
        await asyncio.to_thread(sink.wait_for, changed_at + 4)
        source.stop()
        assert await asyncio.wait_for(running, REPLY_WAIT_S) == 0
    finally:
        transport.close()
        source.stop()
    # The clip's frames went through yuv420p on the way in: compare by which is nearer.
    assert all(
        distance(f, references["fox"]) * 2 < distance(f, references["whale"])
        for f in sink.frames[:2]
    )
    after = sink.frames[changed_at + 2 :]
    assert after and all(
        distance(f, references["whale"]) * 2 < distance(f, references["fox"]) for f in after
    )


async def test_a_server_wide_value_sessions_refuse_is_reported_per_session(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A ControlNet this model does not have: the settings take the name, every session refuses."""
    sessions = [await engine.open_session(FOX), await engine.open_session(WHALE)]
    before = engine.default_params
    async with osc_rig(engine) as rig:
        with caplog.at_level(logging.INFO, logger="livediff.streams.osc_control"):
            answers = [await rig.send("/livediff/controlnets", "no-such-net")]
            answers.append(await rig.replies.next())
        assert {(a, fields[0]) for a, fields in answers} == {(ERROR, "controlnets")}
        for session in sessions:
            assert any(fields[1].startswith(f"session {session.id}: ") for _, fields in answers)
            assert any(r.getMessage().startswith(f"[{session.id}] OSC") for r in caplog.records)
            assert session.params.controlnets == ()
        assert engine.default_params == before  # later sessions do not start refused
        # Nothing more was sent for it (no acknowledgement): the next answer is the next message's.
        assert await rig.send("/livediff/seed", 3) == (OK, ["/livediff/seed"])


async def test_without_python_osc_it_says_what_to_install(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livediff.exceptions import LivediffError

    monkeypatch.setitem(sys.modules, "pythonosc", None)  # import pythonosc now raises ImportError
    control = OscControl(engine, OscConfig(port=0), host="127.0.0.1", rate_per_s=1, burst=1)
    with pytest.raises(LivediffError, match=r"pip install 'livediff\[creative\]'"):
        await control.start()
    assert control.address is None
