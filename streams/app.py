"""The aiohttp application of ``livediff serve``.

>>> engine = Engine(bundle, stream_config, RuntimeConfig(), params)
>>> await engine.start()
>>> runner = await start_runner(create_app(engine, config), config)
>>> await web.TCPSite(runner, "127.0.0.1", 8080).start()
...
>>> await runner.cleanup(); await engine.stop()      # the app never starts or stops the engine

Routes:

- ``GET /`` — the browser client (``clients/web``), its files under ``/static/``.
- ``POST /offer`` — WebRTC signaling (:mod:`livediff.streams.signaling`).
- ``GET /ws`` — the websocket protocol (:mod:`livediff.streams.ws_protocol`).
- ``GET /metrics`` — Prometheus exposition of the engine's registry plus the transport metrics.
- ``GET /healthz`` — ``{"status": "ok" | "degraded" | "failed", "sessions", "max_sessions",
  "full_for_s", "degrade_level", "peers", "websockets"}``: ``degraded`` while the engine sheds
  load or every session slot has been taken for ``[server] health_full_after_s``; ``failed``
  (with status 503) once the worker is down for good.
- ``GET /favicon.ico`` — the page's icon.
- ``GET /controlnets`` — the ControlNets sessions may use.
- ``GET /loras``, ``POST /loras``, ``DELETE /loras/{name}`` — the per-session LoRA library
  (:mod:`livediff.streams.lora_routes`).
- ``GET /stats`` — every WebRTC peer's counters and ``engine.metrics()``, as JSON
  (``?samples=1`` adds each peer's recent server-added latencies, for benchmarks).

Access: with a token configured, ``/offer``, ``/ws``, ``/stats``, ``/controlnets``, ``/loras``
(and ``/metrics`` if asked) need it, and browsers from other origins are refused
(:mod:`livediff.streams.auth`). Every answer carries the security headers of
:mod:`livediff.streams.security_headers`.

All state lives on the app (:mod:`livediff.streams.app_keys`, plus the access policy and the
drain state), and so do the pool that decodes websocket frames and the filter that keeps
tokens out of aiohttp's logs (:mod:`livediff.streams.log_redaction`). Serve it with
:func:`~livediff.streams.slow_clients.start_runner`, which cuts clients whose request headers
do not arrive within ``[server] header_timeout_s``. At shutdown the connections are drained (:mod:`livediff.streams.drain`): frames
in flight are finished, every client gets its closing message, their sessions end; whatever
is left after ``shutdown_timeout_s`` is closed at once (code 1001). The ICE host-address
restriction, if configured, is active exactly while the app runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from livediff.ice import HostAddressRestriction
from livediff.streams import app_keys, ws_protocol
from livediff.streams.auth import ACCESS, AccessPolicy, access_control
from livediff.streams.drain import DRAIN, Drain, drain_connections
from livediff.streams.engine_protocol import EngineLike
from livediff.streams.http_errors import json_errors
from livediff.streams.log_redaction import tokens_redacted
from livediff.streams.lora_routes import add_lora_routes
from livediff.streams.peer_registry import PeerRegistry
from livediff.streams.security_headers import add_security_headers
from livediff.streams.server_config import ServerConfig
from livediff.streams.signaling import handle_offer
from livediff.streams.transport_metrics import TransportMetrics
from livediff.streams.ws_handler import handle_ws

log = logging.getLogger(__name__)
LEFTOVER_WAIT_S = 2.0  # after a drain ran out of time, for handlers to see their close


def web_client_dir() -> Path:
    """The folder of the browser client's files (``clients/web`` in the source tree)."""
    return Path(str(importlib.resources.files("livediff.clients").joinpath("web")))


def create_app(
    engine: EngineLike, config: ServerConfig | None = None, *, ndi_out: str | None = None
) -> web.Application:
    """An app serving ``engine`` (already started by the caller) with ``config``; with
    ``ndi_out``, each session (websocket or WebRTC) is also published as the NDI source ``"<ndi_out> <id>"``
    (the NDI binding is loaded here, so a missing one stops the start)."""
    config = config or ServerConfig()
    static = Path(config.static_dir) if config.static_dir else web_client_dir()
    if not (static / "index.html").is_file():
        raise FileNotFoundError(f"the browser client is missing: no index.html in {static}")
    app = web.Application(
        client_max_size=config.max_offer_bytes, middlewares=[json_errors, access_control]
    )
    app[app_keys.ENGINE] = engine
    app[app_keys.CONFIG] = config
    if ndi_out:
        from livediff.streams.ndi_io import load_ndi

        load_ndi()
        app[app_keys.NDI_OUT] = ndi_out
    app[app_keys.PEERS] = PeerRegistry()
    app[app_keys.WEBSOCKETS] = set()
    app[ACCESS] = AccessPolicy(config)
    app[DRAIN] = Drain()
    app.on_response_prepare.append(add_security_headers)
    app.cleanup_ctx.append(_token_redaction)
    app.cleanup_ctx.append(_transport_metrics)
    app.cleanup_ctx.append(_decode_pool)
    if config.host_addresses:
        app.cleanup_ctx.append(_host_address_restriction)
    app.on_shutdown.append(_close_connections)

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    async def favicon(request: web.Request) -> web.FileResponse:
        return web.FileResponse(
            static / "favicon.svg",
            headers={"Content-Type": "image/svg+xml", "Cache-Control": "max-age=86400"},
        )

    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static("/static/", static)
    app.router.add_post("/offer", handle_offer)
    app.router.add_get("/ws", handle_ws)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/controlnets", _controlnets)
    add_lora_routes(app)
    return app


async def _transport_metrics(app: web.Application) -> AsyncIterator[None]:
    metrics = TransportMetrics(app[app_keys.ENGINE].registry)
    peers, sockets = app[app_keys.PEERS], app[app_keys.WEBSOCKETS]
    metrics.connections.labels("webrtc").set_function(lambda: len(peers))
    metrics.connections.labels("websocket").set_function(lambda: len(sockets))
    app[app_keys.METRICS] = metrics
    try:
        yield
    finally:
        metrics.close()


async def _token_redaction(app: web.Application) -> AsyncIterator[None]:
    with tokens_redacted(app[app_keys.CONFIG].token):
        yield


async def _decode_pool(app: web.Application) -> AsyncIterator[None]:
    workers = app[app_keys.CONFIG].decode_workers
    pool = ThreadPoolExecutor(workers, thread_name_prefix="livediff-decode")
    app[app_keys.DECODE_POOL] = pool
    try:
        yield
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


async def _host_address_restriction(app: web.Application) -> AsyncIterator[None]:
    with HostAddressRestriction(app[app_keys.CONFIG].host_addresses):
        yield


async def drain_app(app: web.Application) -> None:
    """The graceful shutdown (:mod:`livediff.streams.drain`), while the server still listens, so
    new clients get 503 / close 1013 rather than a refused connection. Idempotent: the app's
    shutdown runs it again for whatever is left.
    """
    await _close_connections(app)


async def _close_connections(app: web.Application) -> None:
    config = app[app_keys.CONFIG]
    registry: PeerRegistry = app[app_keys.PEERS]
    open_sockets: set[Any] = app[app_keys.WEBSOCKETS]
    await drain_connections(
        app[DRAIN], list(registry), app[app_keys.ENGINE], config.shutdown_timeout_s
    )
    sockets, peers = list(open_sockets), len(registry)
    for ws in sockets:
        with contextlib.suppress(ConnectionError):
            await ws.close(code=ws_protocol.CLOSE_GOING_AWAY, message=b"server shutdown")
    await app[app_keys.PEERS].close_all()
    if sockets or peers:
        log.info("shutdown: closed %d peers and %d websockets at once", peers, len(sockets))
    left = [connection.wait_closed() for connection in app[DRAIN].websockets]
    if left:  # their handlers end their sessions as soon as they see the close
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*left), LEFTOVER_WAIT_S)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[app_keys.ENGINE].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    app = request.app
    health = app[app_keys.ENGINE].health()
    full_for = health["full_for_s"]
    if health["failed"]:
        status = "failed"
    elif health["degrade_level"] != "normal" or (
        full_for is not None and full_for >= app[app_keys.CONFIG].health_full_after_s
    ):
        status = "degraded"
    else:
        status = "ok"
    return web.json_response(
        {
            "status": status,
            "sessions": health["sessions"],
            "max_sessions": health["max_sessions"],
            "full_for_s": None if full_for is None else round(full_for, 1),
            "degrade_level": health["degrade_level"],
            "degrade_reason": health["degrade_reason"],
            "devices": health.get("devices", {}),
            "peers": len(app[app_keys.PEERS]),
            "websockets": len(app[app_keys.WEBSOCKETS]),
        },
        status=503 if status == "failed" else 200,
    )


async def _controlnets(request: web.Request) -> web.Response:
    """The ControlNets sessions may use here, with the preprocessors each takes, and the
    feature bank's capacity (``feature_bank`` up to it; 0: none), which the page reads too."""
    engine = request.app[app_keys.ENGINE]
    return web.json_response(
        {
            "controlnets": engine.control_options(),
            "feature_bank_frames": engine.feature_bank_frames(),
        }
    )


async def _stats(request: web.Request) -> web.Response:
    app = request.app
    samples = request.query.get("samples") == "1"
    return web.json_response(
        {
            "peers": [_peer_stats(peer, samples) for peer in app[app_keys.PEERS]],
            "websockets": len(app[app_keys.WEBSOCKETS]),
            "engine": app[app_keys.ENGINE].metrics(),
        },
        dumps=lambda value: json.dumps(value, default=str),
    )


def _peer_stats(peer: Any, samples: bool) -> dict[str, Any]:
    stats: dict[str, Any] = peer.stats()
    if samples:  # raw server-added latencies (ms), for benchmarks' own percentiles
        stats["server_latency_samples_ms"] = [round(v, 3) for v in peer.flow.latencies_ms()]
    return stats
