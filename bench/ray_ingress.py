"""What the Ray ingress adds: ``/offer`` and the websocket through it vs straight to a replica.

    livediff bench --suite ray --netns                         # a local Ray, 1 CPU replica, tiny
    livediff bench --suite ray --url http://HEAD:8000 --token "$LIVEDIFF_TOKEN" --frames 200

Without ``--url`` it starts Ray on this machine and deploys ``livediff serve --ray`` with
``--replicas`` CPU replicas of the tiny model (random weights); with ``--url`` it measures a
running deployment. The direct path is the first replica's own server (its URL from the
ingress's ``/stats``), with the same token: the same replica code, minus the ingress.

Measured per session, the two paths alternating so that drift hits both alike:

- ``offer``: ``POST /offer`` → the WebRTC answer (client clock; the peer then connects and
  its first frame is awaited before it closes, so every offer is a real session);
- ``ws_open``: websocket connect → the server's ``{"session": …}``;
- ``ws_frame``: one JPEG frame in → its processed frame back (the model's time included);
- ``ws_echo``: a ``--echo-bytes`` binary message that is not a JPEG → the server's
  ``{"error": …}`` (no model time: the transport's round trip alone).

One JSON line per (path, measurement), suite ``ray``, with ``path`` (``ingress`` or
``direct``), ``what``, ``ms_median``/``ms_p99``, and on ``ingress`` lines ``added_ms_median``
(ingress median − direct median). ``--netns`` runs inside a loopback-only network namespace
(:mod:`livediff.bench.netns`): WebRTC then connects over 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCSessionDescription
from websockets.asyncio.client import ClientConnection, connect

from livediff import wire
from livediff.bench.netns import in_loopback_netns, loopback_netns_argv
from livediff.bench.records import emit, environment, record_sinks, summarize
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.ice import HostAddressRestriction

BENCH_TOKEN = "bench-ray-token-0c9f2e8d7a61"
FIRST_FRAME_TIMEOUT_S = 30.0


def _frame() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _ws_url(base: str, token: str | None) -> str:
    query = f"?{wire.query_string({'token': token})}" if token else ""
    return base.replace("http://", "ws://").replace("https://", "wss://") + "/ws" + query


async def _open(base: str, token: str | None) -> tuple[ClientConnection, float]:
    started = time.perf_counter()
    connection = await connect(_ws_url(base, token), max_size=None, compression=None)
    hello = wire.parse_message(await connection.recv())
    if wire.kind_of(hello) is not wire.MessageKind.HELLO:
        raise SystemExit(f"ray bench: {base} refused a websocket: {hello}")
    return connection, (time.perf_counter() - started) * 1000


async def _round_trip(
    connection: ClientConnection, message: bytes, *, want_bytes: bool
) -> float | None:
    """Milliseconds until the answer (binary or text as wanted); ``None``: the frame was dropped."""
    started = time.perf_counter()
    await connection.send(message)
    while True:
        answer = await connection.recv()
        if isinstance(answer, bytes) == want_bytes:
            return (time.perf_counter() - started) * 1000
        if want_bytes and "dropped" in wire.parse_message(answer):
            return None


async def _offer(base: str, token: str | None) -> float:
    """One real WebRTC session: the answer's time, then its first frame, then close."""
    client = WebRTCClient(base)
    try:
        client.pc.addTransceiver(ImageTrack(_frame(), fps=10), direction="sendrecv")
        await client.pc.setLocalDescription(await client.pc.createOffer())
        body = wire.offer_request(client.pc.localDescription.sdp)
        started = time.perf_counter()
        async with (
            aiohttp.ClientSession() as http,
            http.post(base + "/offer", json=body, headers=_auth(token)) as response,
        ):
            answer = await response.json()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise SystemExit(f"ray bench: {base}/offer answered {response.status}: {answer}")
        await client.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await asyncio.wait_for(client.recv_frame(), FIRST_FRAME_TIMEOUT_S)
        return elapsed
    finally:
        await client.close()


async def measure(
    base: str,
    *,
    token: str | None = None,
    frames: int = 50,
    offers: int = 5,
    echo_bytes: int = 20_000,
) -> list[dict[str, Any]]:
    """The records of the module docstring for the deployment at ``base`` (not emitted)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(base + "/stats", headers=_auth(token)) as response,
    ):
        stats = await response.json()
    replica = stats["replicas"][0]
    paths = {"ingress": base.rstrip("/"), "direct": replica["url"]}
    samples: dict[tuple[str, str], list[float]] = {}

    def add(path: str, what: str, ms: float | None) -> None:
        if ms is not None:
            samples.setdefault((path, what), []).append(ms)

    jpeg = wire.encode_jpeg(_frame())
    garbage = b"\x00" * echo_bytes
    connections = {}
    for path, url in paths.items():
        connections[path], _ = await _open(url, token)
        await _round_trip(connections[path], jpeg, want_bytes=True)  # warm-up, not counted
    size = await _output_size(connections["direct"], jpeg)
    try:
        for _ in range(frames):
            for path, connection in connections.items():
                add(path, "ws_frame", await _round_trip(connection, jpeg, want_bytes=True))
                add(path, "ws_echo", await _round_trip(connection, garbage, want_bytes=False))
    finally:
        for connection in connections.values():
            await connection.close()
    for _ in range(offers):
        for path, url in paths.items():
            connection, ms = await _open(url, token)
            await connection.close()
            add(path, "ws_open", ms)
            add(path, "offer", await _offer(url, token))
    return _records(samples, replica, len(stats["replicas"]), size)


async def _output_size(connection: ClientConnection, jpeg: bytes) -> tuple[int, int]:
    await connection.send(jpeg)
    while True:
        answer = await connection.recv()
        if isinstance(answer, bytes):
            height, width = wire.decode_jpeg(answer).shape[:2]
            return width, height


def _records(
    samples: dict[tuple[str, str], list[float]],
    replica: dict[str, Any],
    replicas: int,
    size: tuple[int, int],
) -> list[dict[str, Any]]:
    engine = replica.get("engine") or {}
    common = {
        "system": "livediff-ray",
        "suite": "ray",
        "model": engine.get("model", "unknown"),
        "weights": "n/a",
        "width": size[0],
        "height": size[1],
        "steps": None,
        "mode": None,
        "rcfg": None,
        "sessions": 1,
        "replicas": replicas,
        **environment(),
        "device": engine.get("device", "unknown"),
    }
    records = []
    for (path, what), values in samples.items():
        record = {**common, "path": path, "what": what, **summarize(values)}
        if path == "ingress" and ("direct", what) in samples:
            direct = summarize(samples[("direct", what)])["ms_median"]
            record["added_ms_median"] = round(record["ms_median"] - direct, 3)
        records.append(record)
    return records


@contextlib.contextmanager
def local_deployment(args: argparse.Namespace) -> Iterator[str]:
    """Ray on this machine and ``livediff serve --ray`` with tiny CPU replicas; yields its URL."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from livediff.cli import build_parser
    from livediff.cmd_serve_ray import build_application

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    ray.init(
        num_cpus=args.replicas,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        argv = ["serve", "--model", "tiny", "--weights", "random", "--device", "cpu"]
        argv += ["--replicas", str(args.replicas), "--token", BENCH_TOKEN]
        argv += ["--deadline-ms", "600000", "--no-degrade"]
        app = build_application(build_parser().parse_args(argv), {})
        serve.run(app, name="livediff", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        ray.shutdown()  # a Ray of its own: Serve goes with it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livediff bench --suite ray", description=__doc__)
    parser.add_argument("--url", help="a running deployment's ingress (default: start one here)")
    parser.add_argument("--token", default=os.environ.get("LIVEDIFF_TOKEN"), help="its token")
    parser.add_argument("--replicas", type=int, default=1, help="local deployment: CPU replicas")
    parser.add_argument("--frames", type=int, default=50, help="websocket round trips per path")
    parser.add_argument("--offers", type=int, default=5, help="sessions opened per path")
    parser.add_argument("--echo-bytes", type=int, default=20_000)
    parser.add_argument("--netns", action="store_true", help="run in a loopback-only namespace")
    parser.add_argument("--out", type=Path, help="also append the records to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.netns and not in_loopback_netns():
        command = [sys.executable, "-m", "livediff.bench.ray_ingress"]
        command += list(argv if argv is not None else sys.argv[1:])
        environ = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(loopback_netns_argv(command), env=environ).returncode
    restriction = HostAddressRestriction(["127.0.0.1"]) if in_loopback_netns() else None
    with record_sinks(args.out) as sinks, restriction or contextlib.nullcontext():
        deployment = contextlib.nullcontext(args.url) if args.url else local_deployment(args)
        with deployment as url:
            token = args.token if args.url else BENCH_TOKEN
            for record in asyncio.run(_measure(args, url, token)):
                emit(record, sinks)
    return 0


async def _measure(args: argparse.Namespace, url: str, token: str | None) -> list[dict[str, Any]]:
    return await measure(
        url, token=token, frames=args.frames, offers=args.offers, echo_bytes=args.echo_bytes
    )


if __name__ == "__main__":
    raise SystemExit(main())
