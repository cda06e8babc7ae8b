"""Control previews over the websocket: ``{"control_preview": true}``, then ``b"LDCP"`` messages.

A connection that asks gets, after each new output (at most twice a second), one JPEG per
ControlNet its session uses, of the control image that net took for the newest frame: the
test compares it with the control input the UNet got (a recording model). A connection that
does not ask, or stops, gets none; a net waiting for its client image has none; bad requests
are answered with ``field: "control_preview"`` and change nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import fields
from typing import Any

import numpy as np
import pytest

from helpers.client_control_testing import Recording, drawn, png
from helpers.streams_testing import FOX, running_server
from livediff import wire
from livediff.clients.ws_client import WsClient
from livediff.models.bundle import ModelBundle
from livediff.models.control_images import to_preview
from livediff.models.control_uses import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.streams.control_previews import MAX_PREVIEW_BYTES, MAX_PREVIEW_SIDE, encode_preview

USES = "pose:2:client,edges:1:canny"
SLOTS = {"pose": 0, "edges": 1}
QUIET_S = 1.5  # three preview intervals: a preview that is due has come by then
JPEG_TOLERANCE = 6.0  # mean absolute difference in grey levels after a JPEG round trip


@pytest.fixture(scope="module")
def controlled(bundle: ModelBundle) -> Recording:
    nets = [
        load_controlnet(ControlNetSpec("random", name=name, seed=seed), bundle)
        for name, seed in (("pose", 1), ("edges", 2))
    ]
    model = bundle.with_controlnets(nets)
    return Recording(**{f.name: getattr(model, f.name) for f in fields(ModelBundle)})


@pytest.fixture
async def server(controlled: Recording) -> AsyncIterator[Any]:
    async with running_server(controlled) as running:
        yield running


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def previews(client: WsClient, count: int) -> dict[str, np.ndarray]:
    got = {}
    for _ in range(count):
        name, image = await asyncio.wait_for(client.recv_control_preview(), 30)
        got[name] = image
    return got


async def no_preview(client: WsClient) -> bool:
    try:
        name, _ = await asyncio.wait_for(client.recv_control_preview(), QUIET_S)
    except asyncio.TimeoutError:
        return True
    raise AssertionError(f"an unexpected preview of {name}")


def unet_input(controlled: Recording, net: str) -> np.ndarray:
    """The control image ``net`` took in the last UNet call, as the page would show it."""
    images, _ = controlled.calls[-1]
    return to_preview(images[0, SLOTS[net]].unsqueeze(0).float())[0].numpy()


def close_to(preview: np.ndarray, expected: np.ndarray) -> float:
    assert preview.shape == expected.shape
    return float(np.abs(preview.astype(np.float32) - expected.astype(np.float32)).mean())


async def test_asking_sends_what_each_net_took_and_a_waiting_net_has_none(
    server: Any, controlled: Recording, frame: np.ndarray
) -> None:
    base, _, _ = server
    async with await WsClient.connect(ws_url(base), params={**FOX, "controlnets": USES}) as client:
        assert await client.ask_control_previews() == {"ok": True, "id": 1}
        await client.send_frame(frame)
        await client.recv_frame()
        first = await previews(client, 1)
        assert list(first) == ["edges"]  # pose waits for its image: at scale 0, no preview
        assert close_to(first["edges"], unet_input(controlled, "edges")) < JPEG_TOLERANCE
        assert first["edges"].max() == 255 and first["edges"].min() == 0  # edges, not a blank
        assert await no_preview(client)  # nothing new came out: nothing more is sent

        assert (await client.send_control_image("pose", png(drawn(1))))["ok"] is True
        await client.send_frame(frame)
        await client.recv_frame()
        second = await previews(client, 2)
        assert sorted(second) == ["edges", "pose"]
        for net, image in second.items():
            expected = unet_input(controlled, net)
            assert close_to(image, expected) < JPEG_TOLERANCE, net
        other = close_to(second["pose"], unet_input(controlled, "edges"))
        assert other > 4 * close_to(second["pose"], unet_input(controlled, "pose"))

        assert (await client.ask_control_previews(False))["ok"] is True
        await client.send_frame(frame)
        await client.recv_frame()
        assert await no_preview(client)
        assert client.errors == []


async def test_without_asking_no_preview_comes(server: Any, frame: np.ndarray) -> None:
    base, _, _ = server
    async with await WsClient.connect(ws_url(base), params={**FOX, "controlnets": USES}) as client:
        for _ in range(3):
            await client.send_frame(frame)
            await client.recv_frame()
        assert await no_preview(client)


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"control_preview": "yes"}, "control_preview must be true or false"),
        ({"control_preview": 1, "seed": 5}, "control_preview must be true or false"),
        ({"control_preview": True, "seed": -1}, "seed"),
    ],
)
async def test_a_bad_request_is_refused_and_changes_nothing(
    server: Any, frame: np.ndarray, request_: dict[str, Any], error: str
) -> None:
    base, _, engine = server
    async with await WsClient.connect(ws_url(base), params={**FOX, "controlnets": USES}) as client:
        reply = await client.update(**request_)
        assert "error" in reply and error in reply["error"], reply
        if "seed" not in error:
            assert reply["field"] == wire.CONTROL_PREVIEW_FIELD
        (session,) = engine.sessions.values()
        assert session.params.seed == FOX["seed"]
        await client.send_frame(frame)
        await client.recv_frame()
        assert await no_preview(client)  # the refused request did not turn previews on


async def test_a_server_without_controlnets_refuses_previews(bundle: ModelBundle) -> None:
    async with (
        running_server(bundle) as (base, _, _),
        await WsClient.connect(ws_url(base), params=FOX) as client,
    ):
        reply = await client.ask_control_previews()
        assert reply["field"] == "control_preview" and "has no ControlNet" in reply["error"]
        assert (await client.ask_control_previews(False))["ok"] is True  # off is always fine


def test_a_large_preview_fits_a_data_channel_message() -> None:
    noise = np.random.default_rng(3).integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    jpeg = encode_preview(noise)
    image = wire.decode_jpeg(jpeg)
    assert len(jpeg) <= MAX_PREVIEW_BYTES and max(image.shape[:2]) <= MAX_PREVIEW_SIDE
    assert image.shape[0] * 768 == image.shape[1] * 1024  # the aspect is kept
    message = wire.control_preview_message("edges", jpeg)
    assert wire.control_preview_of(message) == ("edges", jpeg) and len(message) < 64 * 1024
