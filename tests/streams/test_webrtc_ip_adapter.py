"""Style images over the WebRTC data channel: ``b"LDIM"`` + an image file, as on the websocket.

Run directly, the module contributes one test that re-runs it in a loopback-only network
namespace (see ``streams_testing``).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from helpers.streams_testing import FOX, NEEDS_NETNS, netns_module_runner, running_server
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.models.bundle import ModelBundle
from livediff.models.ip_adapter_loading import load_ip_adapter
from livediff.models.ip_adapter_spec import IPAdapterSpec
from livediff.streams.server_config import ServerConfig

test_in_loopback_netns = netns_module_runner(__file__)

CONFIG = ServerConfig(host_addresses=("127.0.0.1",), stats_interval_s=0.2)


def image_file(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (40, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def styled(bundle: ModelBundle) -> ModelBundle:
    adapter = load_ip_adapter(IPAdapterSpec("random", variant="plus", seed=3), bundle)
    return bundle.with_ip_adapter(adapter)


@pytest.fixture
async def server(styled: ModelBundle) -> AsyncIterator[Any]:
    async with running_server(styled, CONFIG) as running:
        yield running


@NEEDS_NETNS
async def test_a_style_image_on_the_data_channel_styles_the_next_frames(
    server: Any, styled: ModelBundle, frame: np.ndarray
) -> None:
    base, _, engine = server
    style = image_file(5)
    assert styled.image_prompts is not None
    key = styled.image_prompts.cache_key(style)
    client = WebRTCClient(base, params=FOX)
    await client.connect(ImageTrack(frame, fps=30))
    try:
        await client.recv_frame()
        refused = await client.send_style_image(b"not an image")
        assert refused["field"] == "ip_image" and "does not decode" in refused["error"]
        assert await client.send_style_image(style) == {"ok": True, "ip_image": key}
        # The session runs with it from the next frame on. (That its frames are styled is
        # proven on the websocket and in the engine: here VP8's error, ~8 grey levels on this
        # tiny model, is larger than the random adapter's effect, ~1.6.)
        (session,) = engine.sessions.values()
        assert session.params.ip_image == key  # what the session runs from the next frame
        for _ in range(4):
            await client.recv_frame()
        assert session.core.stream.params.ip_image == key  # and did run
        assert styled.image_prompts.misses == 1  # encoded once, by the upload
        assert (await client.update(ip_image=None))["ok"] is True
        for _ in range(4):
            await client.recv_frame()
        assert session.core.stream.params.ip_image is None
    finally:
        await client.close()


@NEEDS_NETNS
async def test_a_rate_limited_style_image_is_answered_in_its_turn_and_names_its_field(
    styled: ModelBundle, frame: np.ndarray
) -> None:
    """Upload answers carry no id: a client pairs them with its uploads in order, so the one
    refused over the rate comes after the others' answers and says what it refuses."""
    config = replace(CONFIG, control_rate_per_s=0.1, control_burst=2)
    async with running_server(styled, config) as (base, _, _):
        client = WebRTCClient(base, params=FOX)
        await client.connect(ImageTrack(frame, fps=30))
        try:
            answers = await asyncio.gather(
                *(client.send_style_image(image_file(seed)) for seed in (1, 2, 3))
            )
            assert [a.get("ok") for a in answers[:2]] == [True, True], answers
            assert answers[2]["field"] == "ip_image" and "rate" in answers[2]["error"], answers
        finally:
            await client.close()
