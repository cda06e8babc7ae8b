"""``GET/POST /loras`` and ``DELETE /loras/{name}`` against a running server, with websocket
sessions streaming through the loads and unloads.

The LoRA files are real ``.safetensors`` files written by :mod:`helpers.lora_testing`; what a
styled session receives is checked against the model with the LoRA fused into a copy of its
weights (the oracle: no LoRA code of livediff involved).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from helpers.lora_testing import fused_copy, random_lora, save_kohya, save_peft
from helpers.streams_testing import FOX, distance, reference_output, running_server
from livediff.clients.ws_client import WsClient
from livediff.exceptions import LivediffError
from livediff.models.bundle import ModelBundle
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_merge import MERGE_AFTER_CALLS
from livediff.models.lora_store import LoraCapacity
from livediff.streams.server_config import ServerConfig
from livediff.wire import decode_jpeg, encode_jpeg

TOKEN = "lora-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCALE = 0.8


@pytest.fixture(scope="module")
def files(bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ink (PEFT, rank 8, alpha 8: file scale 1), pastel (kohya, rank 4), wide (rank 32, above
    the server's max_rank 16), a file that is not safetensors, and ink's layers for the oracle."""
    folder = tmp_path_factory.mktemp("loras")
    unet = bundle.unet
    ink = random_lora(unet, 8, 11, strength=1.0)
    broken = folder / "broken.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    return {
        "ink": str(save_peft(ink, folder / "ink.safetensors", alpha=8.0)),
        "pastel": str(save_kohya(random_lora(unet, 4, 12, every=2), folder / "pastel.safetensors")),
        "wide": str(save_peft(random_lora(unet, 32, 13), folder / "wide.safetensors", alpha=32.0)),
        "broken": str(broken),
        "ink_layers": ink,
    }


@pytest.fixture(scope="module")
def seen(frame: np.ndarray) -> np.ndarray:
    """The frame as the server decodes it from the client's JPEG: the references start here,
    so only the answer's JPEG loss separates a frame from its reference."""
    return decode_jpeg(encode_jpeg(frame))


def styled_bundle(bundle: ModelBundle) -> ModelBundle:
    """The visible tiny model on its own UNet copy, with an empty library of 2 slots."""
    own = dataclasses.replace(bundle, unet=copy.deepcopy(bundle.unet))
    library = LoraLibrary.attach(own.unet, LoraCapacity(max_loras=2, max_rank=16))
    return own.with_loras(library)


@pytest.fixture
async def server(bundle: ModelBundle) -> AsyncIterator[Any]:
    async with running_server(styled_bundle(bundle), ServerConfig(token=TOKEN)) as running:
        yield running


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + f"/ws?token={TOKEN}"


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, *, auth: bool = True
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=AUTH if auth else None) as answer:
        return answer.status, await answer.json()


async def frame_from(client: WsClient, frame: np.ndarray) -> np.ndarray:
    await client.send_frame(frame)
    return decode_jpeg(await client.recv_jpeg())


def as_served(reference: np.ndarray) -> np.ndarray:
    """``reference`` as ``/ws`` sends it back: JPEG at the server's quality (the same encoder)."""
    return decode_jpeg(encode_jpeg(reference.astype(np.uint8), quality=ServerConfig().jpeg_quality))


def assert_nearer(image: np.ndarray, own: np.ndarray, other: np.ndarray) -> None:
    """``image`` is ``own`` as served (within rounding), and clearly not ``other``."""
    mine, theirs = distance(image, as_served(own)), distance(image, as_served(other))
    assert mine < 1 and theirs > 3, f"{mine:.2f} from its reference, {theirs:.2f} from the other"


async def test_every_lora_call_needs_the_token(server: Any, files: dict[str, Any]) -> None:
    base, _, _ = server
    load = {"name": "ink", "source": files["ink"]}
    async with aiohttp.ClientSession() as http:
        for method, path, body in (
            ("GET", "/loras", None),
            ("POST", "/loras", load),
            ("DELETE", "/loras/ink", None),
        ):
            status, _ = await call(http, method, base + path, body, auth=False)
            assert status == 401, (method, path)
        assert (await call(http, "GET", base + "/loras"))[1]["loras"] == []  # nothing was loaded
        foreign = {**AUTH, "Origin": "http://elsewhere.example"}
        for method, path in (("POST", "/loras"), ("DELETE", "/loras/ink")):
            async with http.request(method, base + path, json=load, headers=foreign) as answer:
                assert answer.status == 403, (method, path)  # a foreign page may not change them
        assert (await call(http, "POST", base + "/loras", load))[0] == 201
        assert (await call(http, "DELETE", base + "/loras/ink"))[0] == 200


async def test_a_loaded_lora_styles_the_session_that_asks_for_it_and_only_that_one(
    server: Any, bundle: ModelBundle, frame: np.ndarray, seen: np.ndarray, files: dict[str, Any]
) -> None:
    base, _, engine = server
    plain_ref = reference_output(bundle, seen, **FOX)
    fused = dataclasses.replace(
        bundle, unet=fused_copy(bundle.unet, [(files["ink_layers"], SCALE)])
    )
    styled_ref = reference_output(fused, seen, **FOX)
    assert distance(styled_ref, plain_ref) > 3  # the LoRA shows
    async with aiohttp.ClientSession() as http:
        status, loaded = await call(
            http, "POST", base + "/loras", {"name": "ink", "source": files["ink"]}
        )
        assert status == 201
        assert (loaded["name"], loaded["slot"], loaded["rank"]) == ("ink", 0, 8)
        status, listing = await call(http, "GET", base + "/loras")
        assert status == 200
        (entry,) = listing["loras"]
        assert {k: entry[k] for k in ("name", "slot", "rank", "sessions")} == {
            "name": "ink", "slot": 0, "rank": 8, "sessions": 0,
        }  # fmt: skip
        assert entry["bytes"] > 0 and entry["slot_bytes"] >= entry["bytes"]
        capacity = listing["capacity"]
        assert (capacity["max_loras"], capacity["max_rank"], capacity["free_slots"]) == (2, 16, 1)
        assert capacity["reserved_bytes"] == 2 * capacity["slot_bytes"]
        # The engine-level reference: a Stream over the server's own model with the library.
        served_ref = reference_output(engine.bundle, seen, **FOX, loras=[f"ink:{SCALE}"])
        assert np.abs(served_ref - styled_ref).max() <= 1  # equals the fused oracle

        query = {**FOX, "loras": f"ink:{SCALE}"}
        async with (
            await WsClient.connect(ws_url(base), params=query) as styled,
            await WsClient.connect(ws_url(base), params=FOX) as plain,
        ):
            assert_nearer(await frame_from(styled, frame), styled_ref, plain_ref)
            assert_nearer(await frame_from(plain, frame), plain_ref, styled_ref)
            listing = (await call(http, "GET", base + "/loras"))[1]
            assert listing["loras"][0]["sessions"] == 1

            status, refused = await call(http, "DELETE", base + "/loras/ink")
            assert status == 409 and refused["field"] == "name" and refused["limit"] == 1
            assert "used by 1 session" in refused["error"], refused
            assert_nearer(await frame_from(styled, frame), styled_ref, plain_ref)  # kept it

            assert await styled.update(loras=[]) == {"ok": True, "id": 1}
            status, unloaded = await call(http, "DELETE", base + "/loras/ink")
            assert status == 200 and unloaded["name"] == "ink"
            assert (await call(http, "GET", base + "/loras"))[1]["loras"] == []
            assert_nearer(await frame_from(styled, frame), plain_ref, styled_ref)
            assert_nearer(await frame_from(plain, frame), plain_ref, styled_ref)


async def test_a_lone_styled_session_is_merged_and_get_loras_says_so(
    server: Any, bundle: ModelBundle, frame: np.ndarray, seen: np.ndarray, files: dict[str, Any]
) -> None:
    """One session in one style: after a few frames the weights hold its LoRA (GET /loras
    names it, with the base weights' copy), and its frames stay the fused model's."""
    base, _, engine = server
    plain_ref = reference_output(bundle, seen, **FOX)
    fused = dataclasses.replace(
        bundle, unet=fused_copy(bundle.unet, [(files["ink_layers"], SCALE)])
    )
    styled_ref = reference_output(fused, seen, **FOX)
    async with aiohttp.ClientSession() as http:
        assert (await call(http, "POST", base + "/loras", {"name": "ink", "source": files["ink"]}))[
            0
        ] == 201
        merge = (await call(http, "GET", base + "/loras"))[1]["merge"]
        assert merge == {"enabled": True, "merged": [], "base_copy_bytes": 0, "refused": None}
        query = {**FOX, "loras": f"ink:{SCALE}"}
        async with await WsClient.connect(ws_url(base), params=query) as styled:
            for _ in range(MERGE_AFTER_CALLS + 2):
                assert_nearer(await frame_from(styled, frame), styled_ref, plain_ref)
            merge = (await call(http, "GET", base + "/loras"))[1]["merge"]
            assert merge["merged"] == [{"name": "ink", "scale": SCALE}]
            assert merge["base_copy_bytes"] == engine.bundle.loras.merge.base_bytes > 0
            assert await styled.update(loras=[]) == {"ok": True, "id": 1}
            assert_nearer(await frame_from(styled, frame), plain_ref, styled_ref)
            assert (await call(http, "GET", base + "/loras"))[1]["merge"]["merged"] == []


async def test_a_lora_loaded_while_a_session_streams_applies_from_its_update(
    server: Any, bundle: ModelBundle, frame: np.ndarray, seen: np.ndarray, files: dict[str, Any]
) -> None:
    base, _, _ = server
    plain_ref = reference_output(bundle, seen, **FOX)
    fused = dataclasses.replace(bundle, unet=fused_copy(bundle.unet, [(files["ink_layers"], 1.0)]))
    styled_ref = reference_output(fused, seen, **FOX)
    async with (
        aiohttp.ClientSession() as http,
        await WsClient.connect(ws_url(base), params=FOX) as client,
    ):
        assert_nearer(await frame_from(client, frame), plain_ref, styled_ref)
        refused = await client.update(loras=["ink"])
        assert refused["field"] == "loras" and "unknown LoRA 'ink'" in refused["error"], refused
        status, _ = await call(
            http, "POST", base + "/loras", {"name": "ink", "source": files["ink"]}
        )
        assert status == 201
        assert_nearer(await frame_from(client, frame), plain_ref, styled_ref)  # not asked for yet
        assert (await client.update(loras=["ink"]))["ok"] is True
        assert_nearer(await frame_from(client, frame), styled_ref, plain_ref)


async def test_refusals_are_answered_clearly_and_a_bystander_streams_on(
    server: Any, bundle: ModelBundle, frame: np.ndarray, seen: np.ndarray, files: dict[str, Any]
) -> None:
    base, _, _ = server
    plain_ref = reference_output(bundle, seen, **FOX)
    other_ref = reference_output(bundle, seen, prompt="a blue whale", seed=22)
    url = base + "/loras"
    # fmt: off
    cases: list[tuple[str, str, Any, int, str | None, str]] = [
        ("POST", url, {"name": "x", "source": files["broken"]}, 400, "source", "broken.safetensors"),
        ("POST", url, {"name": "x", "source": "/no/such/lora.safetensors"}, 400, "source", "no such"),
        ("POST", url, {"name": "wide", "source": files["wide"]}, 400, "source", "rank 32"),
        ("POST", url, {"name": "a:b", "source": files["ink"]}, 400, "name", "without ':'"),
        ("POST", url, {"name": "x"}, 400, "source", "source is missing"),
        ("POST", url, {"name": "x", "source": files["ink"], "scale": 2}, 400, "scale", "unknown"),
        ("POST", url, "not an object", 400, "body", "expected"),
        ("POST", url, {"name": "ink", "source": files["ink"]}, 201, None, ""),
        ("POST", url, {"name": "ink", "source": files["pastel"]}, 409, "name", "loaded already"),
        ("POST", url, {"name": "pastel", "source": files["pastel"]}, 201, None, ""),
        ("POST", url, {"name": "third", "source": files["pastel"]}, 409, "name", "all 2 LoRA slots"),
        ("DELETE", url + "/nope", None, 404, "name", "no LoRA named 'nope'"),
    ]
    # fmt: on
    async with (
        aiohttp.ClientSession() as http,
        await WsClient.connect(ws_url(base), params=FOX) as bystander,
    ):
        for method, target, body, status, field, message in cases:
            got, answer = await call(http, method, target, body)
            assert got == status, (body, answer)
            if status >= 400:
                assert answer["field"] == field and message in answer["error"], answer
            assert_nearer(await frame_from(bystander, frame), plain_ref, other_ref)
        listing = (await call(http, "GET", url))[1]
        assert [lora["name"] for lora in listing["loras"]] == ["ink", "pastel"]
        assert listing["capacity"]["free_slots"] == 0
        with pytest.raises(LivediffError, match="unknown LoRA 'nope'"):
            await WsClient.connect(ws_url(base), params={**FOX, "loras": "nope"})
        assert_nearer(await frame_from(bystander, frame), plain_ref, other_ref)


async def test_a_server_without_a_library_says_so(
    bundle: ModelBundle, files: dict[str, Any]
) -> None:
    async with running_server(bundle) as (base, _, _), aiohttp.ClientSession() as http:
        assert await call(http, "GET", base + "/loras") == (200, {"loras": [], "capacity": None})
        status, answer = await call(
            http, "POST", base + "/loras", {"name": "ink", "source": files["ink"]}
        )
        assert status == 409 and answer["field"] == "library"
        assert "--lora-library" in answer["error"]
