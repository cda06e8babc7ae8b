"""``livediff serve --ray`` on a real two-node Ray cluster on one machine (``ray.cluster_utils``).

One cluster for the module: a head node and a worker node of one CPU each, Ray Serve with its
HTTP proxy on the head, and the application ``livediff serve --ray`` deploys
(:func:`livediff.cmd_serve_ray.build_application`): the ingress and two CPU engine replicas,
one per node, each running the visible tiny model (``helpers.streams_testing``) with two
session slots, behind an access token. Sessions are told apart by their outputs: each frame
must match the reference of its own session's prompt and seed.

Everything runs inside a loopback-only network namespace (the module contributes one test that
re-runs it there), so the Ray nodes, the replicas' servers and the WebRTC media all use
127.0.0.1. Skipped when Ray Serve is not installed (``pip install 'livediff[ray]'``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'livediff[ray]'")

from aiortc import RTCSessionDescription
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from helpers.streams_testing import (
    FOX,
    NEEDS_NETNS,
    WHALE,
    distance,
    export_visible_tiny,
    netns_module_runner,
    pattern,
    reference_output,
)
from livediff import wire
from livediff.bench.ray_ingress import measure
from livediff.bench.records import REQUIRED_KEYS
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.clients.ws_client import WsClient
from livediff.cmd_serve_ray import app_builder
from livediff.exceptions import ParameterError, SessionClosedError
from livediff.ice import HostAddressRestriction
from livediff.models.loading import ModelSpec, load_model
from livediff.streams.ray_ingress import REPLICA_HEADER

test_in_loopback_netns = netns_module_runner(__file__)
pytestmark = pytest.mark.slow

TOKEN = "ray-test-token-7d1c40a9e2b3"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOTS = 2  # sessions per replica
QUIET = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    # replicas report their sessions to Serve's autoscaler twice a second, not every 10 s
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
RAY_TABLE = {
    "num_cpus": 1,
    "max_replicas_per_node": 1,  # one replica per node: two nodes, two replicas
    "heartbeat_s": 0.5,
    "replica_timeout_s": 3.0,
    "drain_timeout_s": 0.0,
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def two_node_serve(model_dir: Path) -> Iterator[str]:
    """The cluster, Serve and the application; yields the ingress's base URL."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from livediff.cli import build_parser
    from livediff.cmd_serve_ray import build_application

    saved = {k: os.environ.get(k) for k in QUIET}
    os.environ.update(QUIET)  # the nodes (and so the replicas) inherit it
    temp = tempfile.mkdtemp(prefix="ldray-", dir="/tmp")  # short: Ray's socket paths
    # Ray 2.60's Cluster writes its address into the *default* temp folder whatever temp_dir
    # says, and fails when that folder does not exist yet (a fresh machine).
    from ray._private.utils import get_ray_address_file

    os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "include_dashboard": False, "temp_dir": temp},
    )
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        argv = ["serve", "--model", "tiny", "--source", str(model_dir), "--dtype", "fp32"]
        argv += ["--device", "cpu", "--deadline-ms", "600000", "--no-degrade"]
        argv += ["--max-sessions", str(SLOTS), "--replicas", "2", "--token", TOKEN]
        args = build_parser().parse_args(argv)
        serve.run(build_application(args, {"ray": RAY_TABLE}), name="livediff", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_visible_tiny(tmp_path_factory.mktemp("ray") / "model")


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return pattern(160, 120, seed=1)


@pytest.fixture(scope="module")
def references(model_dir: Path, frame: np.ndarray) -> dict[str, np.ndarray]:
    bundle = load_model(ModelSpec(preset="tiny", source=str(model_dir)), device="cpu", dtype="fp32")
    return {
        "fox": reference_output(bundle, frame, **FOX),
        "whale": reference_output(bundle, frame, **WHALE),
    }


@pytest.fixture(scope="module")
def base(model_dir: Path) -> Iterator[str]:
    with HostAddressRestriction(["127.0.0.1"]), two_node_serve(model_dir) as url:
        yield url


# ---------------------------------------------------------------- helpers
async def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, await response.json()


async def replicas(base: str) -> list[dict[str, Any]]:
    status, body = await get_json(base + "/stats", AUTH)
    assert status == 200, body
    return body["replicas"]


async def settled(base: str, count: int = 2, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Wait until ``count`` replicas answer and hold no session (the previous test's are gone)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        _, health = await get_json(base + "/healthz")
        rows = [row for row in health.get("replicas", []) if row.get("status") == "ok"]
        if len(rows) == count and health["sessions"] == 0:
            return await replicas(base)
        assert loop.time() < deadline, f"replicas never settled: {health}"
        await asyncio.sleep(0.25)


async def sessions_fall_to(base: str, count: int, timeout_s: float = 30.0) -> None:
    """Wait until the ingress counts ``count`` sessions (a closed one is released by its
    replica after the close handshake, not at once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        _, health = await get_json(base + "/healthz")
        if health["sessions"] <= count:
            return
        assert loop.time() < deadline, f"the closed session was never released: {health}"
        await asyncio.sleep(0.1)


def ws_url(base: str, **params: Any) -> str:
    query = wire.query_string({**params, "token": TOKEN})
    return base.replace("http://", "ws://") + "/ws?" + query


async def open_ws(base: str, params: dict[str, Any]) -> tuple[WsClient, str]:
    client = await WsClient.connect(ws_url(base, **params))
    return client, client.connection.response.headers[REPLICA_HEADER]


async def round_trip(client: WsClient, frame: np.ndarray) -> np.ndarray:
    await client.send_frame(frame)
    return await asyncio.wait_for(client.recv_frame(), 60)


def made_by(image: np.ndarray, references: dict[str, np.ndarray]) -> str:
    ranked = sorted((distance(image, ref), name) for name, ref in references.items())
    (best, name), (runner_up, _) = ranked[0], ranked[1]
    assert best * 2 < runner_up, f"ambiguous frame: {ranked}"
    return name


async def open_peer(
    base: str, params: dict[str, Any], frame: np.ndarray
) -> tuple[WebRTCClient, str]:
    """A WebRTC session through the ingress (the token in the header); (client, its replica)."""
    client = WebRTCClient(base, params=params)
    client.pc.addTransceiver(ImageTrack(frame, fps=10), direction="sendrecv")
    await client.pc.setLocalDescription(await client.pc.createOffer())
    body = wire.offer_request(client.pc.localDescription.sdp, params)
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "/offer", json=body, headers=AUTH) as response,
    ):
        answer = await response.json()
        assert response.status == 200, answer
        replica = response.headers[REPLICA_HEADER]
    client.session = answer["session"]
    await client.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    return client, replica


async def offer_body() -> dict[str, Any]:
    from aiortc import RTCPeerConnection

    from livediff.ice import rtc_configuration

    pc = RTCPeerConnection(rtc_configuration())
    pc.addTransceiver("video", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return wire.offer_request(sdp, FOX)


# ---------------------------------------------------------------- tests
@NEEDS_NETNS
async def test_websocket_sessions_go_to_both_nodes_and_never_cross(
    base: str, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    known = {r["id"]: r for r in await settled(base)}
    fox, fox_replica = await open_ws(base, FOX)
    whale, whale_replica = await open_ws(base, WHALE)
    try:
        assert fox_replica != whale_replica  # the second went where the most slots were free
        assert known[fox_replica]["node_id"] != known[whale_replica]["node_id"]
        for _ in range(3):
            outputs = await asyncio.gather(round_trip(fox, frame), round_trip(whale, frame))
            assert [made_by(image, references) for image in outputs] == ["fox", "whale"]
        assert (await fox.update(**WHALE))["ok"] is True  # control goes through the relay too
        assert made_by(await round_trip(fox, frame), references) == "whale"
    finally:
        await asyncio.gather(fox.close(), whale.close())


@NEEDS_NETNS
async def test_webrtc_sessions_are_answered_by_the_replicas_on_both_nodes(
    base: str, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    known = {r["id"]: r for r in await settled(base)}
    (fox, fox_replica), (whale, whale_replica) = [
        await open_peer(base, FOX, frame),
        await open_peer(base, WHALE, frame),
    ]
    try:
        assert known[fox_replica]["node_id"] != known[whale_replica]["node_id"]
        frames = await asyncio.gather(
            *(asyncio.wait_for(c.recv_frame(), 60) for c in (fox, fox, whale, whale))
        )
        assert [made_by(image, references) for image in frames] == ["fox"] * 2 + ["whale"] * 2
        peers = {
            p["session"]: p["replica"] for p in (await get_json(base + "/stats", AUTH))[1]["peers"]
        }
        assert peers == {fox.session: fox_replica, whale.session: whale_replica}
    finally:
        await asyncio.gather(fox.close(), whale.close())


@NEEDS_NETNS
async def test_full_replicas_refuse_with_503_and_1013(base: str, frame: np.ndarray) -> None:
    await settled(base)
    clients = [await open_ws(base, FOX) for _ in range(2 * SLOTS)]
    try:
        placed = collections.Counter(replica for _, replica in clients)
        assert sorted(placed.values()) == [SLOTS, SLOTS]  # every slot of both replicas
        async with connect(ws_url(base, **FOX)) as refused:
            error = wire.parse_message(await refused.recv())
            with pytest.raises(ConnectionClosed) as closed:
                await refused.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == wire.CLOSE_TRY_AGAIN
        assert "every engine replica is at capacity" in error["error"]
        body = await offer_body()
        async with (
            aiohttp.ClientSession() as http,
            http.post(base + "/offer", json=body, headers=AUTH) as response,
        ):
            assert response.status == 503
            assert int(response.headers["Retry-After"]) >= 1
            assert "capacity" in (await response.json())["error"]
        await clients.pop()[0].close()  # a slot frees: the next session gets it
        await sessions_fall_to(base, 2 * SLOTS - 1)  # once the replica has let it go
        client, _ = await open_ws(base, WHALE)
        clients.append((client, ""))
        assert (await round_trip(client, frame)).shape == (128, 128, 3)
    finally:
        await asyncio.gather(*(client.close() for client, _ in clients))


@NEEDS_NETNS
async def test_the_token_is_enforced_at_the_ingress_and_the_replicas(base: str) -> None:
    rows = await settled(base)
    async with aiohttp.ClientSession() as http:
        for headers in (None, {"Authorization": "Bearer wrong-token-0123456789"}):
            async with http.post(base + "/offer", json=await offer_body(), headers=headers) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                assert (await r.json())["error"].startswith("unauthorized")
            async with http.get(base + "/stats", headers=headers) as r:
                assert r.status == 401
        async with http.get(f"{base}/stats?token={TOKEN}") as r:
            assert r.status == 200
        async with http.get(base + "/controlnets") as r:
            assert r.status == 401
        async with http.get(base + "/controlnets", headers=AUTH) as r:  # a replica's answer
            assert r.status == 200
            assert await r.json() == {"controlnets": [], "feature_bank_frames": 0}
        async with http.get(rows[0]["url"] + "/stats") as r:  # a replica's own port, directly
            assert r.status == 401
        async with http.get(base + "/") as r:  # the page and /healthz stay open
            assert r.status == 200 and r.headers["Referrer-Policy"] == "no-referrer"
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.post(
            base + "/offer",
            json=await offer_body(),
            headers={**AUTH, "Origin": "https://evil.example"},
        ) as r:
            assert r.status == 403
        async with http.get(base + "/metrics") as r:
            metrics = await r.text()
    async with connect(base.replace("http://", "ws://") + "/ws") as ws:
        assert wire.parse_message(await ws.recv())["error"].startswith("unauthorized")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == wire.CLOSE_POLICY
    with pytest.raises(InvalidStatus) as status:
        await connect(ws_url(base), additional_headers={"Origin": "https://evil.example"})
    assert status.value.response.status_code == 403
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    labelled = {s.labels.get("replica") for s in families["livediff_sessions"].samples}
    assert labelled == {row["id"] for row in rows}
    assert families["livediff_ray_replicas"].samples[0].value == 2


@NEEDS_NETNS
async def test_the_ingress_benchmark_writes_records(base: str, tmp_path: Path) -> None:
    await settled(base)
    records = await measure(base, token=TOKEN, frames=3, offers=1)
    assert {(r["path"], r["what"]) for r in records} >= {
        ("ingress", "offer"),
        ("direct", "offer"),
        ("ingress", "ws_frame"),
        ("direct", "ws_frame"),
        ("ingress", "ws_echo"),
        ("direct", "ws_echo"),
    }
    for record in records:
        assert set(REQUIRED_KEYS) <= set(record) and record["ms_median"] > 0, record


@NEEDS_NETNS
def test_serves_application_builder_takes_livediff_serve_flags(base: str, model_dir: Path) -> None:
    from ray.serve import Application

    built = app_builder(
        {"argv": ["--model", "tiny", "--source", str(model_dir), "--replicas", "3"]}
    )
    assert isinstance(built, Application)
    with pytest.raises(ParameterError, match="argv"):
        app_builder({"argv": "--model tiny"})
    with pytest.raises(ParameterError, match="no GPU"):  # a CPU cluster: how many replicas?
        app_builder({"argv": ["--model", "tiny"]})


@NEEDS_NETNS
async def test_a_dead_replica_ends_only_its_sessions_and_serve_replaces_it(
    base: str, frame: np.ndarray, references: dict[str, np.ndarray]
) -> None:
    known = {r["id"]: r for r in await settled(base)}
    sockets = {"fox": await open_ws(base, FOX), "whale": await open_ws(base, WHALE)}
    peer, survivor = await open_peer(base, WHALE, frame)  # one more on one of the two
    doomed = next(replica for replica in known if replica != survivor)
    (lost, lost_client), (kept, kept_client) = sorted(
        ((name, client) for name, (client, replica) in sockets.items()),
        key=lambda item: sockets[item[0]][1] != doomed,
    )
    assert sockets[lost][1] == doomed and sockets[kept][1] == survivor
    try:
        assert made_by(await round_trip(lost_client, frame), references) == lost
        os.kill(known[doomed]["pid"], signal.SIGKILL)
        with contextlib.suppress(ConnectionClosed):  # still sending: the relay finds it gone
            await lost_client.send_frame(frame)
        with pytest.raises(SessionClosedError):
            await asyncio.wait_for(lost_client.recv_frame(), 30)
        assert lost_client.errors == [f"session ended: replica {doomed} failed"]
        assert lost_client.connection.close_code == wire.CLOSE_INTERNAL
        for _ in range(3):  # the other node goes on, over both transports
            assert made_by(await round_trip(kept_client, frame), references) == kept
            assert made_by(await asyncio.wait_for(peer.recv_frame(), 30), references) == "whale"
        await (
            peer.close()
        )  # a slot frees on the survivor: a new session goes there, not to the dead
        newcomer, placed = await open_ws(base, FOX)
        await newcomer.close()
        assert placed == survivor
    finally:
        await asyncio.gather(lost_client.close(), kept_client.close(), peer.close())
    replaced = {r["id"] for r in await settled(base)}  # Serve starts a replacement by itself
    assert survivor in replaced and doomed not in replaced and len(replaced) == 2


@NEEDS_NETNS
async def test_serve_scales_the_replicas_by_sessions(base: str, model_dir: Path) -> None:
    """Last: it redeploys the application with ``[ray.autoscaling]`` instead of two replicas."""
    from ray import serve

    from livediff.cli import build_parser
    from livediff.cmd_serve_ray import build_application

    argv = ["serve", "--model", "tiny", "--source", str(model_dir), "--dtype", "fp32"]
    argv += ["--device", "cpu", "--deadline-ms", "600000", "--no-degrade", "--token", TOKEN]
    argv += ["--max-sessions", str(SLOTS)]
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_sessions_per_replica": 1}
    scaling.update(upscale_delay_s=0, downscale_delay_s=600, look_back_period_s=11)
    table = {**RAY_TABLE, "autoscaling": scaling}
    app = build_application(build_parser().parse_args(argv), {"ray": table})
    await asyncio.to_thread(serve.run, app, name="livediff", route_prefix="/")
    await settled(base, count=1)
    clients = [await open_ws(base, FOX) for _ in range(SLOTS)]  # both on the one replica
    try:
        assert len({replica for _, replica in clients}) == 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while len([r for r in await replicas(base) if r["reachable"]]) < 2:
            assert loop.time() < deadline, "Serve did not add a replica for 2 sessions at 1 each"
            await asyncio.sleep(0.5)
    finally:
        await asyncio.gather(*(client.close() for client, _ in clients))
