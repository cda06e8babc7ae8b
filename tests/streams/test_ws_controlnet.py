"""ControlNets over the websocket: chosen in the URL, changed and refused by control messages.

That the frames themselves are right is proven below the server (tests/core and tests/engine:
against diffusers' ControlNet calls, and shared calls against single streams); here the
protocol carries the choice, and a bad choice gets its answer while the session streams on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from websockets.asyncio.client import connect

from helpers.streams_testing import FOX, distance, reference_output, running_server
from livediff.clients.ws_client import WsClient
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.streams.server_config import ServerConfig
from livediff.wire import decode_jpeg, encode_jpeg

EDGES = "edges:2:canny"


@pytest.fixture(scope="module")
def controlled(bundle: ModelBundle) -> ModelBundle:
    net = load_controlnet(ControlNetSpec("random", name="edges", seed=1), bundle)
    return bundle.with_controlnets([net])


@pytest.fixture(scope="module")
def expected(controlled: ModelBundle, frame: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs a single stream makes of what the server receives, as the server sends them
    (both ways through JPEG at the default quality: Canny sees JPEG's blocks too)."""

    def through_jpeg(image: np.ndarray) -> np.ndarray:
        return decode_jpeg(encode_jpeg(image.astype(np.uint8)))

    received = through_jpeg(frame)
    return {
        "edges": through_jpeg(reference_output(controlled, received, **FOX, controlnets=(EDGES,))),
        "plain": through_jpeg(reference_output(controlled, received, **FOX)),
    }


@pytest.fixture
async def server(controlled: ModelBundle) -> AsyncIterator[Any]:
    async with running_server(controlled) as running:
        yield running


def made_by(image: np.ndarray, expected: dict[str, np.ndarray], name: str) -> bool:
    """Much nearer the reference ``name`` than the other."""
    own = distance(image, expected[name])
    others = [distance(image, ref) for other, ref in expected.items() if other != name]
    assert all(own * 2 < d for d in others), (name, own, others)
    return True


async def test_a_session_picks_changes_and_drops_its_controlnet(
    server: Any, frame: np.ndarray, expected: dict[str, np.ndarray]
) -> None:
    base, _, engine = server
    url = base.replace("http://", "ws://") + "/ws"
    async with await WsClient.connect(url, params={**FOX, "controlnets": EDGES}) as client:
        await client.send_frame(frame)
        assert made_by(await client.recv_frame(), expected, "edges")
        (session,) = engine.sessions.values()
        assert [use.as_json() for use in session.core.stream.params.controlnets] == [
            {"controlnet": "edges", "scale": 2.0, "preprocessor": "canny"}
        ]
        assert (await client.update(controlnets=[]))["ok"] is True
        await client.send_frame(frame)
        assert made_by(await client.recv_frame(), expected, "plain")
        answer = await client.update(controlnets=[{"controlnet": "edges", "scale": 2}])
        assert answer["ok"] is True  # canny: the preprocessor a net outside the catalog gets
        await client.send_frame(frame)
        assert made_by(await client.recv_frame(), expected, "edges")


@pytest.mark.parametrize(
    ("uses", "message"),
    [
        (["depth-net"], "controlnet 'depth-net' is not loaded on this server; loaded: edges"),
        ([{"controlnet": "edges", "preprocessor": "pose"}], "unknown preprocessor 'pose'"),
        ([{"controlnet": "edges", "scale": 9}], "controlnet scale=9 is out of range"),
        ([{"controlnet": "edges", "params": {"low": 200, "high": 100}}], "must be below high"),
        (["edges"] * 5, "at most 4 ControlNets per session"),
        (42, "controlnets=42: expected a list of"),
        (["edges:1:depth"], "the depth preprocessor's network is not loaded on this server"),
    ],
)
async def test_a_bad_use_is_answered_and_the_session_keeps_its_own(
    server: Any, frame: np.ndarray, expected: dict[str, np.ndarray], uses: Any, message: str
) -> None:
    base, _, _ = server
    query = "?prompt=a+red+fox&seed=11&controlnets=" + EDGES
    async with connect(base.replace("http://", "ws://") + "/ws" + query) as client:
        assert "session" in json.loads(await client.recv())
        await client.send(json.dumps({"controlnets": uses, "id": 3}))
        answer = json.loads(await client.recv())
        assert message in answer["error"], answer
        assert answer["id"] == 3 and answer["field"] == "controlnets"
        assert answer["current"] == {
            "controlnets": [{"controlnet": "edges", "scale": 2.0, "preprocessor": "canny"}]
        }
        await client.send(encode_jpeg(frame))
        output = await client.recv()
        assert isinstance(output, bytes)
        assert made_by(decode_jpeg(output), expected, "edges")


async def test_the_server_lists_its_controlnets_behind_the_token(controlled: ModelBundle) -> None:
    token = "a-token-of-32-characters-0123456"
    async with (
        running_server(controlled, ServerConfig(token=token)) as (base, _, _),
        aiohttp.ClientSession() as http,
    ):
        async with http.get(base + "/controlnets") as refused:
            assert refused.status == 401
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(base + "/controlnets", headers=headers) as response:
            assert response.status == 200
            listed = await response.json()
    # A net outside the catalog takes every preprocessor this server runs (no depth or soft
    # edge network is loaded for it), client images included.
    assert listed == {
        "controlnets": [
            {
                "name": "edges",
                "preprocessors": ["canny", "passthrough", "previous_output", "client"],
                "default": "canny",
            }
        ],
        "feature_bank_frames": 0,  # this server runs no feature bank
    }
