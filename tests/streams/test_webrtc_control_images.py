"""Client control images over the WebRTC data channel: the same ``b"LDCN"`` message and answers
as on the websocket (``test_ws_control_images.py`` proves the frames; VP8's error on this tiny
model is larger than a random net's effect, so here the control input is read where it enters
the UNet).

Run directly, the module contributes one test that re-runs it in a loopback-only network
namespace (see ``streams_testing``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import fields, replace
from typing import Any

import numpy as np
import pytest
import torch

from helpers.client_control_testing import Recording, drawn, fitted_reference, png
from helpers.streams_testing import FOX, NEEDS_NETNS, netns_module_runner, running_server
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.streams.server_config import ServerConfig

test_in_loopback_netns = netns_module_runner(__file__)

CONFIG = ServerConfig(host_addresses=("127.0.0.1",), stats_interval_s=0.2)


@pytest.fixture(scope="module")
def controlled(bundle: ModelBundle) -> Recording:
    net = load_controlnet(ControlNetSpec("random", name="pose", seed=1), bundle)
    model = bundle.with_controlnets([net])
    return Recording(**{f.name: getattr(model, f.name) for f in fields(ModelBundle)})


@pytest.fixture
async def server(controlled: Recording) -> AsyncIterator[Any]:
    async with running_server(controlled, CONFIG) as running:
        yield running


@NEEDS_NETNS
async def test_a_control_image_on_the_data_channel_feeds_the_next_frames(
    server: Any, controlled: Recording, frame: np.ndarray
) -> None:
    base, _, _ = server
    client = WebRTCClient(base, params={**FOX, "controlnets": "pose:1.5:client"})
    await client.connect(ImageTrack(frame, fps=30))
    try:
        assert client.awaiting_control_images == ["pose"]  # the /offer answer says so
        await client.recv_frame()
        assert controlled.calls[-1][1][0].tolist() == [0.0]  # scale 0 until the first image
        refused = await client.send_control_image("pose", b"not an image")
        assert refused["field"] == "control_image" and "does not decode" in refused["error"]
        refused = await client.send_control_image("hands", png(drawn(1)))
        assert refused["field"] == "control_image" and "'hands' is not loaded" in refused["error"]
        answer = await client.send_control_image("pose", png(drawn(1)))
        assert answer == {"ok": True, "control_image": "pose"}
        for _ in range(3):  # frames taken after the answer run with it
            await client.recv_frame()
        images, scales = controlled.calls[-1]
        assert scales[0].tolist() == [1.5]
        torch.testing.assert_close(images[0, 0], fitted_reference(drawn(1), 128))
    finally:
        await client.close()


@NEEDS_NETNS
async def test_control_previews_on_the_data_channel_show_the_nets_control_input(
    server: Any, frame: np.ndarray
) -> None:
    base, _, _ = server
    client = WebRTCClient(base, params={**FOX, "controlnets": "pose:1:client"})
    await client.connect(ImageTrack(frame, fps=30))
    try:
        assert (await client.send_control_image("pose", png(drawn(2))))["ok"] is True
        assert (await client.ask_control_previews())["ok"] is True
        await client.recv_frame()
        name, image = await asyncio.wait_for(client.recv_control_preview(), 30)
        assert name == "pose" and image.shape == (128, 128, 3)
        expected = (fitted_reference(drawn(2), 128).permute(1, 2, 0) * 255).numpy()
        assert float(np.abs(image.astype(np.float32) - expected).mean()) < 6.0  # JPEG's error
        refused = await client.update(control_preview="on")
        assert refused["field"] == "control_preview"
    finally:
        await client.close()


@NEEDS_NETNS
async def test_a_rate_limited_control_image_is_answered_in_its_turn(
    controlled: Recording, frame: np.ndarray
) -> None:
    """The answers carry no id: a refusal over the rate must come after the answers of the
    uploads sent before it, and name the field, so that a client pairs each with its own."""
    config = replace(CONFIG, control_rate_per_s=0.1, control_burst=2)
    async with running_server(controlled, config) as (base, _, _):
        client = WebRTCClient(base, params={**FOX, "controlnets": "pose:1:client"})
        await client.connect(ImageTrack(frame, fps=30))
        try:
            answers = await asyncio.gather(
                *(client.send_control_image("pose", png(drawn(seed))) for seed in (1, 2, 3))
            )
            assert answers[0] == answers[1] == {"ok": True, "control_image": "pose"}
            assert answers[2]["field"] == "control_image" and "rate" in answers[2]["error"]
        finally:
            await client.close()
