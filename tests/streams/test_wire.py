"""The wire module both sides speak, and the clients' own media helpers."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pytest

from helpers.streams_testing import pattern, read_video, write_y4m
from livediff import wire
from livediff.clients.media import FrameSource, FrameWriter
from livediff.engine.session import DropReason
from livediff.exceptions import FrameShapeError, FrameTooLargeError, MediaError, ProtocolError
from livediff.streams.control_messages import params_from_query


def test_every_server_message_has_one_kind() -> None:
    kinds = {
        wire.hello("s1"): wire.MessageKind.HELLO,
        wire.ok_reply(3): wire.MessageKind.REPLY,
        wire.ok_reply(): wire.MessageKind.REPLY,
        wire.error_reply("no", 4, field="seed", current={"seed": 1}): wire.MessageKind.REPLY,
        wire.error_reply("frame 2: not a JPEG"): wire.MessageKind.ERROR,
        wire.dropped(5, "deadline"): wire.MessageKind.DROPPED,
        '{"stats": {"fps": 30}}': wire.MessageKind.STATS,
        '{"closing": "server shutdown"}': wire.MessageKind.CLOSING,
        '{"something": "new"}': wire.MessageKind.UNKNOWN,
    }
    assert {text: wire.kind_of(wire.parse_message(text)) for text in kinds} == kinds
    assert wire.parse_message(wire.error_reply("no", 4, field="seed", current={"seed": 1})) == {
        "error": "no",
        "id": 4,
        "field": "seed",
        "current": {"seed": 1},
    }


@pytest.mark.parametrize("text", ["[1, 2]", "not json", b"\xff"])
def test_a_message_that_is_not_a_json_object_is_a_protocol_error(text: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.parse_message(text)


def test_the_drop_reasons_are_the_engines() -> None:
    assert set(wire.DROP_REASONS) == {reason.value for reason in DropReason}


def test_query_strings_read_back_as_the_same_parameters() -> None:
    params = {"prompt": "a cat & a dog", "seed": 3, "t_index_list": [10, 30]}
    query = dict(parse_qsl(wire.query_string({**params, "similarity_threshold": None})))
    assert params_from_query(query) == {
        "prompt": "a cat & a dog",
        "seed": 3,
        "t_index_list": (10, 30),
        "similarity_threshold": None,
    }


def test_control_messages_and_offers() -> None:
    assert wire.parse_message(wire.control_message({"strength": 0.5}, 7)) == {
        "strength": 0.5,
        "id": 7,
    }
    assert wire.offer_request("v=0", {"seed": 1}) == {
        "sdp": "v=0",
        "type": "offer",
        "params": {"seed": 1},
    }


def test_close_codes_read_as_words() -> None:
    assert (
        wire.close_meaning(wire.CLOSE_TRY_AGAIN) == "code 1013: the server is busy: try again later"
    )
    assert wire.close_meaning(4000) == "code 4000: closed" and wire.close_meaning(None)


def test_a_jpeg_too_large_says_its_limit() -> None:
    data = wire.encode_jpeg(np.zeros((8, 600, 3), np.uint8))
    with pytest.raises(FrameTooLargeError) as wide:
        wire.decode_jpeg(data, max_side=512)
    with pytest.raises(FrameShapeError) as many:  # FrameTooLargeError is a FrameShapeError
        wire.decode_jpeg(data, max_pixels=1000)
    assert wide.value.limit == 512 and many.value.limit == 1000
    assert isinstance(many.value, ValueError)  # callers that catch ValueError still do


def test_frame_source_loops_a_file_with_rising_times(tmp_path: Path) -> None:
    frames = [pattern(32, 24, seed=k) for k in range(3)]
    clip = write_y4m(tmp_path / "in.y4m", frames, fps=10)
    source = FrameSource(str(clip), loop=True, realtime=False, max_frames=7)
    read = list(source.frames())
    assert source.frame_rate == 10 and [f.index for f in read] == list(range(7))
    assert [round(f.seconds, 3) for f in read] == [round(k / 10, 3) for k in range(7)]
    assert all(np.array_equal(f.image, read[k % 3].image) for k, f in enumerate(read))


def test_frame_writer_writes_what_it_is_given(tmp_path: Path) -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]
    frames = [np.full((24, 32, 3), colour, np.uint8) for colour in colours]  # yuv420p keeps them
    with FrameWriter(tmp_path / "out.y4m", width=32, height=24, frame_rate=Fraction(15)) as out:
        for frame in frames:
            out.write(frame)
    back = read_video(tmp_path / "out.y4m")
    assert len(back) == 4 and all(
        np.abs(a.astype(int) - b.astype(int)).max() <= 3 for a, b in zip(back, frames, strict=True)
    )


def test_client_media_errors_are_media_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="cannot open"):
        FrameSource(str(tmp_path / "missing.mp4"))
    with pytest.raises(MediaError, match="not one of"):
        FrameWriter(tmp_path / "out.gif", width=8, height=8, frame_rate=Fraction(30))


def test_a_style_image_message_is_told_apart_from_a_frame() -> None:
    image_file = b"\x89PNG\r\n\x1a\n rest of the file"
    message = wire.style_image_message(image_file)
    assert message[:4] == wire.STYLE_IMAGE_MAGIC == b"LDIM"
    assert wire.style_image_of(message) == image_file
    assert wire.style_image_of(wire.STYLE_IMAGE_MAGIC) == b""  # an empty upload: refused later
    jpeg = wire.encode_jpeg(pattern(16, 16, seed=1))
    assert wire.style_image_of(jpeg) is None and wire.style_image_of(b"LDI") is None
    reply = wire.parse_message(wire.style_image_reply("ab" * 32))
    assert reply == {"ok": True, "ip_image": "ab" * 32}
    assert wire.kind_of(reply) is wire.MessageKind.REPLY


def test_an_rgb_jpeg_decodes_into_the_callers_buffer_itself() -> None:
    """The copy-free websocket path rests on Pillow decoding into a core mapped on our buffer
    (its internals); if a Pillow stops doing that, frames stay right but cost a copy."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(wire.encode_jpeg(pattern(64, 48, 3))))
    target = np.zeros((48, 64, 4), dtype=np.uint8)
    core = Image.core.map_buffer(target, image.size, "raw", 0, ("RGB", 4 * 64, 1))
    image.im = core
    image.load()
    assert image.im is core  # decoded in place: no fallback copy
    np.testing.assert_array_equal(
        target[..., :3], wire.decode_jpeg(wire.encode_jpeg(pattern(64, 48, 3)))
    )
