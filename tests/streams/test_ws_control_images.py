"""Client control images over the websocket: ``b"LDCN"`` + the net's name + an image file.

A session that feeds a ControlNet ``client`` images runs it at scale 0 and is told so until
the first image arrives; each image is the net's control input (fitted to the model's size
as frames are) from the next frame on, until the next; every bad upload gets its own answer
with ``field: "control_image"`` and the session streams on with what it had. The control
input is read where it enters the UNet (a recording model), and the frames are compared with
single Streams given the same image.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.client_control_testing import Recording, drawn, fitted_reference, png
from helpers.streams_testing import FOX, distance, running_server
from livediff import wire
from livediff.clients.ws_client import WsClient
from livediff.engine.client_control import fit_control_image
from livediff.engine.config import GenerationParams
from livediff.engine.stream import Stream
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.wire import decode_jpeg, encode_jpeg

POSE = "pose:2:client"
IMAGE_GAIN = 300.0  # a random net is nearly blind to its image (tests/core/test_stream_controlnet)


def through_jpeg(image: np.ndarray) -> np.ndarray:
    return decode_jpeg(encode_jpeg(image.astype(np.uint8)))


@pytest.fixture(scope="module")
def controlled(bundle: ModelBundle) -> Recording:
    nets = [
        load_controlnet(ControlNetSpec("random", name=name, seed=seed), bundle)
        for name, seed in (("pose", 1), ("edges", 2))
    ]
    with torch.no_grad():
        nets[0].net.controlnet_cond_embedding.conv_out.weight.mul_(IMAGE_GAIN)
    model = bundle.with_controlnets(nets)
    return Recording(**{f.name: getattr(model, f.name) for f in fields(ModelBundle)})


def reference(model: ModelBundle, frame: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """A single one-step Stream with the pose use, given ``image`` (``None``: no image yet)."""
    base = GenerationParams.for_preset(model.preset).updated(**FOX, controlnets=(POSE,))
    stream = Stream(model, params=base)
    if image is not None:
        stream.set_client_image(0, fit_control_image(image, stream.config, model))
    (output,) = stream.process(frame)
    return through_jpeg(output.numpy())


@pytest.fixture(scope="module")
def expected(controlled: Recording, frame: np.ndarray) -> dict[str, np.ndarray]:
    received = through_jpeg(frame)
    return {
        "none": reference(controlled, received, None),
        "a": reference(controlled, received, drawn(1)),
        "b": reference(controlled, received, drawn(2)),
    }


def made_by(image: np.ndarray, expected: dict[str, np.ndarray], name: str) -> bool:
    own = distance(image, expected[name])
    others = [distance(image, ref) for other, ref in expected.items() if other != name]
    assert all(own * 2 < d for d in others), (name, own, others)
    return True


@pytest.fixture
async def server(controlled: Recording) -> AsyncIterator[Any]:
    async with running_server(controlled) as running:
        yield running


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def next_output(client: WsClient, frame: np.ndarray) -> np.ndarray:
    await client.send_frame(frame)
    return await client.recv_frame()


async def test_a_client_image_feeds_its_net_from_the_next_frame_until_replaced(
    server: Any, controlled: Recording, frame: np.ndarray, expected: dict[str, np.ndarray]
) -> None:
    base, _, engine = server
    async with await WsClient.connect(ws_url(base), params={**FOX, "controlnets": POSE}) as client:
        assert client.awaiting_control_images == ["pose"]  # told: scale 0 until the first image
        assert made_by(await next_output(client, frame), expected, "none")
        images, scales = controlled.calls[-1]
        assert scales[0].tolist() == [0.0, 0.0] and not images[0].any()

        reply = await client.send_control_image("pose", png(drawn(1)))
        assert reply == {"ok": True, "control_image": "pose"}
        assert made_by(await next_output(client, frame), expected, "a")
        images, scales = controlled.calls[-1]
        assert scales[0].tolist() == [2.0, 0.0]
        torch.testing.assert_close(images[0, 0], fitted_reference(drawn(1), 128))
        assert made_by(await next_output(client, frame), expected, "a")  # kept until replaced

        assert (await client.send_control_image("pose", png(drawn(2))))["ok"] is True
        assert made_by(await next_output(client, frame), expected, "b")
        torch.testing.assert_close(controlled.calls[-1][0][0, 0], fitted_reference(drawn(2), 128))
        (session,) = engine.sessions.values()
        assert engine.awaiting_control_images(session.id) == []


async def test_a_session_told_when_it_picks_a_client_net_live(server: Any) -> None:
    base, _, _ = server
    async with await WsClient.connect(ws_url(base), params=FOX) as client:
        assert client.awaiting_control_images == []
        answer = await client.update(controlnets=[{"controlnet": "pose", "preprocessor": "client"}])
        assert answer["ok"] is True and answer[wire.AWAITING_CONTROL_IMAGES] == ["pose"]
        assert (await client.send_control_image("pose", png(drawn(1))))["ok"] is True
        answer = await client.update(controlnets=["pose:1:client", "edges:1:canny"])
        assert answer["ok"] is True and wire.AWAITING_CONTROL_IMAGES not in answer  # kept


def huge_png() -> bytes:
    out = io.BytesIO()
    Image.new("1", (4097, 4097)).save(out, format="PNG")  # bilevel: a few KB on the wire
    return out.getvalue()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (wire.control_image_message("pose", b"not an image"), "does not decode"),
        (wire.control_image_message("pose", huge_png()), "at most 16777216 pixels"),
        (wire.control_image_message("nope", png(drawn(3))), "'nope' is not loaded"),
        (wire.control_image_message("edges", png(drawn(3))), "does not feed controlnet 'edges'"),
        (b"LDCN\x00" + png(drawn(3)), "has no valid name"),
        (b"LDCN\x09pose", "has no valid name"),
    ],
)
async def test_a_bad_control_image_is_answered_and_nothing_else_changes(
    server: Any,
    controlled: Recording,
    frame: np.ndarray,
    expected: dict[str, np.ndarray],
    message: bytes,
    error: str,
) -> None:
    base, _, _ = server
    params = {**FOX, "controlnets": f"{POSE},edges:0:canny"}
    async with await WsClient.connect(ws_url(base), params=params) as client:
        assert (await client.send_control_image("pose", png(drawn(1))))["ok"] is True
        await client.connection.send(message)
        # Messages are handled in order: once this reply is in, the upload's answer is too.
        assert (await client.update(seed=FOX["seed"]))["ok"] is True
        assert len(client.errors) == 1 and error in client.errors[0], client.errors
        assert made_by(await next_output(client, frame), expected, "a")  # the kept image
        torch.testing.assert_close(controlled.calls[-1][0][0, 0], fitted_reference(drawn(1), 128))


async def test_a_server_without_controlnets_refuses_control_images(bundle: ModelBundle) -> None:
    async with (
        running_server(bundle) as (base, _, _),
        await WsClient.connect(ws_url(base), params=FOX) as client,
    ):
        refused = await client.send_control_image("pose", png(drawn(1)))
        assert refused["field"] == "control_image" and "has no ControlNet" in refused["error"]
        await client.send_frame(np.zeros((64, 64, 3), np.uint8))
        assert (await client.recv_frame()).shape == (128, 128, 3)
