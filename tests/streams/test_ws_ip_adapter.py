"""Style images over the websocket: uploaded as a ``b"LDIM"`` binary message, answered with
their key, used from the next frame on; bad uploads are answered and the session goes on.

That a styled frame is right is proven below the server (tests/models/test_ip_adapter.py
against diffusers' IP-Adapter, tests/engine/test_ip_adapter_sessions.py: shared calls against
single streams); here the protocol carries the image to the right session and nowhere else.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from helpers.streams_testing import FOX, distance, reference_output, running_server
from livediff.clients.ws_client import WsClient
from livediff.models.bundle import ModelBundle
from livediff.models.ip_adapter_loading import load_ip_adapter
from livediff.models.ip_adapter_spec import IPAdapterSpec
from livediff.wire import STYLE_IMAGE_MAGIC, decode_jpeg, encode_jpeg


def image_file(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def huge_png() -> bytes:
    """A 4100×4100 PNG of one colour: a few kilobytes, over the pixel limit."""
    out = io.BytesIO()
    Image.new("RGB", (4100, 4100)).save(out, format="PNG")
    return out.getvalue()


STYLE = image_file(5)


@pytest.fixture(scope="module")
def styled(bundle: ModelBundle) -> ModelBundle:
    adapter = load_ip_adapter(IPAdapterSpec("random", variant="plus", seed=3), bundle)
    return bundle.with_ip_adapter(adapter)


@pytest.fixture
async def server(styled: ModelBundle) -> AsyncIterator[Any]:
    async with running_server(styled) as running:
        yield running


def through_jpeg(image: np.ndarray) -> np.ndarray:
    return decode_jpeg(encode_jpeg(image.astype(np.uint8)))


def expected(styled: ModelBundle, frame: np.ndarray, **params: Any) -> np.ndarray:
    """What a single stream makes of what the server receives, as the server sends it."""
    return through_jpeg(reference_output(styled, through_jpeg(frame), **FOX, **params))


def made_by(image: np.ndarray, references: dict[str, np.ndarray], name: str) -> bool:
    """Much nearer the reference ``name`` than every other."""
    own = distance(image, references[name])
    others = [distance(image, ref) for other, ref in references.items() if other != name]
    assert all(own * 2 < d for d in others), (name, own, others)
    return True


async def test_an_uploaded_image_styles_the_next_frames_of_its_session_only(
    server: Any, styled: ModelBundle, frame: np.ndarray
) -> None:
    base, _, engine = server
    url = base.replace("http://", "ws://") + "/ws"
    assert styled.image_prompts is not None
    key = styled.image_prompts.cache_key(STYLE)
    async with (
        await WsClient.connect(url, params=FOX) as client,
        await WsClient.connect(url, params=FOX) as bystander,
    ):
        answer = await client.send_style_image(STYLE)
        assert answer == {"ok": True, "ip_image": key}
        references = {
            "plain": expected(styled, frame),
            "styled": expected(styled, frame, ip_image=key),
            "half": expected(styled, frame, ip_image=key, ip_scale=0.5),
        }
        await client.send_frame(frame)
        assert made_by(await client.recv_frame(), references, "styled")
        await bystander.send_frame(frame)
        assert made_by(await bystander.recv_frame(), references, "plain")
        assert (await client.update(ip_scale=0.5))["ok"] is True
        await client.send_frame(frame)
        assert made_by(await client.recv_frame(), references, "half")
        assert (await bystander.update(ip_image=key))["ok"] is True  # the key is the server's
        await bystander.send_frame(frame)
        assert made_by(await bystander.recv_frame(), references, "styled")
        assert (await client.update(ip_image=None))["ok"] is True
        await client.send_frame(frame)
        assert made_by(await client.recv_frame(), references, "plain")
        assert client.errors == [] and bystander.errors == []
    assert engine.bundle.image_prompts.misses == 1  # encoded once, by the upload


@pytest.mark.parametrize(
    ("upload", "message"),
    [
        (b"not an image at all", "does not decode as an image file"),
        (b"", "does not decode as an image file"),
        (huge_png(), "at most 16777216 pixels are accepted"),
    ],
    ids=["not-an-image", "empty", "too-many-pixels"],
)
async def test_a_bad_upload_is_answered_and_the_session_streams_on(
    server: Any, styled: ModelBundle, frame: np.ndarray, upload: bytes, message: str
) -> None:
    base, _, _ = server
    async with connect(base.replace("http://", "ws://") + "/ws?prompt=a+red+fox&seed=11") as ws:
        assert "session" in json.loads(await ws.recv())
        await ws.send(STYLE_IMAGE_MAGIC + upload)
        answer = json.loads(await ws.recv())
        assert message in answer["error"], answer
        assert answer["field"] == "ip_image" and "id" not in answer
        await ws.send(b"\xff\xd8 not a jpeg")  # frame 0: uploads are not counted as frames
        refused = json.loads(await ws.recv())
        assert refused["error"].startswith("frame 0:"), refused
        await ws.send(encode_jpeg(frame))
        output = await ws.recv()
        assert isinstance(output, bytes)
        assert distance(decode_jpeg(output), expected(styled, frame)) < 3


async def test_a_server_without_ip_adapter_refuses_uploads_and_keys(
    bundle: ModelBundle, frame: np.ndarray
) -> None:
    async with running_server(bundle) as (base, _, _):
        url = base.replace("http://", "ws://") + "/ws"
        async with await WsClient.connect(url, params=FOX) as client:
            answer = await client.send_style_image(STYLE)
            assert "--ip-adapter" in answer["error"] and answer["field"] == "ip_image"
            refused = await client.update(ip_image="ab" * 32)
            assert "--ip-adapter" in refused["error"] and refused["field"] == "ip_image"
            await client.send_frame(frame)
            plain = through_jpeg(reference_output(bundle, through_jpeg(frame), **FOX))
            assert distance(await client.recv_frame(), plain) < 3
