"""The Ray Serve ingress of ``livediff serve --ray``: the page, signaling, websockets, access.

One Serve deployment (one replica: it only relays) behind Serve's HTTP proxy. Routes, the
same as a single server's (:mod:`livediff.streams.app`):

- ``GET /``, ``/static/…``, ``/favicon.ico``: the browser page (``clients/web``).
- ``POST /offer``: placed on the engine replica with the most free session slots, as each
  replica's ``/healthz`` reports them just before; the replica's own server answers the offer,
  so the browser's media goes straight to the replica's node (:mod:`.ray_proxy`). The answer
  carries ``X-Livediff-Replica: <id>``.
- ``GET /ws``: placed the same way, then relayed message by message, both ways, with close
  codes passed through (the upgrade answer carries ``X-Livediff-Replica``).
- ``GET /healthz``, ``/stats``, ``/metrics``: over every replica (:mod:`.ray_directory`);
  ``GET /controlnets``: one replica's answer (they all run the same model);
  ``/metrics`` adds ``livediff_ray_replicas`` and ``livediff_ray_sessions_placed_total`` /
  ``livediff_ray_refused_total`` of the ingress itself.

Access is :mod:`livediff.streams.auth`'s, checked here: the token (401 JSON / websocket error
then close 1008) and the origin policy (403). The ingress presents the token to the replicas,
which check it too.

At capacity (no replica has a free slot, or every one refused): ``POST /offer`` gets 503 with
``Retry-After`` and ``{"error": …}``; a websocket gets ``{"error": …}`` then close 1013 — the
single server's answers. With no replica running: the same, saying so.

Replicas announce themselves with :meth:`LivediffIngress.report` (a Serve handle call, every
``[ray] heartbeat_s``). A replica found dead is left out at once; its websocket sessions end
with ``{"error": "session ended: replica <id> failed"}`` and close 1011; WebRTC sessions, which
never pass here, end when their peer connection fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from livediff.streams.app import web_client_dir
from livediff.streams.auth import TOKEN_QUERY, UNAUTHORIZED, AccessPolicy
from livediff.streams.ray_config import RayConfig
from livediff.streams.ray_directory import (
    ReplicaDirectory,
    ReplicaInfo,
    aggregate_health,
    aggregate_stats,
    merge_expositions,
    placement_order,
)
from livediff.streams.ray_proxy import (
    Refusal,
    WsRelay,
    forward_offer,
    gather_by_replica,
    open_upstream,
)
from livediff.streams.security_headers import SECURITY_HEADERS
from livediff.streams.server_config import ServerConfig
from livediff.wire import CLOSE_POLICY, CLOSE_TRY_AGAIN, close_reason, error_reply

log = logging.getLogger(__name__)
REPLICA_HEADER = "X-Livediff-Replica"
RETRY_AFTER_S = "5"
FETCH_TIMEOUT_S = 2.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class _AccessView:
    """What :class:`AccessPolicy` reads of a request (headers, query, host), from Starlette's."""

    def __init__(self, connection: HTTPConnection) -> None:
        self.headers = connection.headers
        self.query = connection.query_params
        self.host = connection.headers.get("host", "")


def _view(connection: HTTPConnection) -> web.BaseRequest:
    return cast(web.BaseRequest, _AccessView(connection))  # duck-typed: the attributes it reads


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class LivediffIngress:
    """The ingress deployment's class (Serve wraps it: :func:`ray.serve.ingress`)."""

    def __init__(self, replicas: Any, server_config: ServerConfig, ray_config: RayConfig) -> None:
        self._replicas_handle = replicas  # held so the application deploys the replicas
        self.config = server_config
        self.ray_config = ray_config
        self.access = AccessPolicy(server_config)
        self.directory = ReplicaDirectory(ray_config.replica_timeout_s)
        self._http: aiohttp.ClientSession | None = None
        self._auth = (
            {"Authorization": f"Bearer {server_config.token}"} if server_config.token else {}
        )
        self.registry = CollectorRegistry(auto_describe=True)
        Gauge(
            "livediff_ray_replicas", "Engine replicas heard from lately", registry=self.registry
        ).set_function(lambda: len(self.directory.live()))
        self.placed = Counter(
            "livediff_ray_sessions_placed",
            "Sessions the ingress placed on a replica",
            ["transport"],
            registry=self.registry,
        )
        self.refused = Counter(
            "livediff_ray_refused",
            "Requests the ingress refused",
            ["transport", "reason"],
            registry=self.registry,
        )

    # ------------------------------------------------------------------ Serve handle calls
    def report(self, info: dict[str, Any]) -> None:
        """A replica's heartbeat (:meth:`LivediffReplica.info`)."""
        replica = ReplicaInfo.from_report(info)
        if self.directory.report(replica):
            log.info("replica %s on %s joined: %s", replica.id, replica.node_ip, replica.url)

    # ------------------------------------------------------------------ the ASGI app
    def __serve_build_asgi_app__(self) -> Starlette:
        static = Path(self.config.static_dir) if self.config.static_dir else web_client_dir()
        if not (static / "index.html").is_file():
            raise FileNotFoundError(f"the browser client is missing: no index.html in {static}")

        async def index(request: Request) -> Response:
            return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

        async def favicon(request: Request) -> Response:
            return FileResponse(
                static / "favicon.svg",
                media_type="image/svg+xml",
                headers={"Cache-Control": "max-age=86400"},
            )

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            try:
                yield
            finally:
                await self._close_http()

        return Starlette(
            routes=[
                Route("/", index),
                Route("/favicon.ico", favicon),
                Mount("/static", StaticFiles(directory=static)),
                Route("/offer", self.offer, methods=["POST"]),
                WebSocketRoute("/ws", self.websocket),
                Route("/healthz", self.healthz),
                Route("/stats", self.stats),
                Route("/controlnets", self.controlnets),
                Route("/metrics", self.metrics),
            ],
            middleware=[Middleware(_SecurityHeaders)],
            lifespan=lifespan,
        )

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:  # made on the serving loop; no cap: each websocket holds one
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._http

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.close()

    def _forget(self, replica: ReplicaInfo) -> None:
        if self.directory.forget(replica.id) is not None:
            log.warning("replica %s on %s left out: it failed", replica.id, replica.node_ip)

    async def _fetch_json(self, replica: ReplicaInfo, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        async with self._client().get(replica.url + path, headers=self._auth, timeout=timeout) as r:
            return await r.json()

    async def _fetch_text(self, replica: ReplicaInfo, path: str) -> str:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        async with self._client().get(replica.url + path, headers=self._auth, timeout=timeout) as r:
            r.raise_for_status()
            return await r.text()

    async def _candidates(self) -> tuple[list[ReplicaInfo], list[ReplicaInfo]]:
        """(every live replica, those with a free slot in placement order)."""
        live = self.directory.live()
        open_ = [r for r in live if r.healthy]  # not one that is stopping or whose engine failed
        health = await gather_by_replica(open_, lambda r: self._fetch_json(r, "/healthz"))
        return live, placement_order(open_, health)

    def _guard(self, connection: HTTPConnection, transport: str) -> str | None:
        """``"origin"`` or ``"auth"`` when the request is refused, else ``None``."""
        view = _view(connection)
        if not self.access.origin_allowed(view):
            reason = "origin"
        elif not self.access.authorized(view):
            reason = "auth"
        else:
            return None
        self.refused.labels(transport, reason).inc()
        log.info("%s from %s refused: %s", connection.url.path, connection.client, reason)
        return reason

    # ------------------------------------------------------------------ routes
    async def offer(self, request: Request) -> Response:
        refusal = self._guard(request, "webrtc")
        if refusal == "origin":
            origin = request.headers.get("origin", "")[:200]
            return _error(
                403,
                f"origin {origin!r} is not allowed to use this server (same origin, loopback and "
                "[server] allowed_origins are)",
            )
        if refusal == "auth":
            return JSONResponse({"error": UNAUTHORIZED}, 401, {"WWW-Authenticate": "Bearer"})
        try:
            body = await asyncio.wait_for(self._read_body(request), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            return _error(
                408, f"the request body did not arrive within {self.config.body_timeout_s:g} s"
            )
        if body is None:
            return _error(413, f"the body is larger than {self.config.max_offer_bytes} bytes")
        live, candidates = await self._candidates()
        headers = {"Content-Type": request.headers.get("content-type", ""), **self._auth}
        answer = await forward_offer(self._client(), candidates, body, headers, self._forget)
        if answer is None or answer.status == 503:
            self.refused.labels("webrtc", "capacity").inc()
            retry = (
                answer.retry_after if answer is not None and answer.retry_after else RETRY_AFTER_S
            )
            return _error(503, _full_message(live), **{"Retry-After": retry})
        if answer.status == 200:
            self.placed.labels("webrtc").inc()
        extra = {REPLICA_HEADER: answer.replica.id}
        if answer.retry_after:
            extra["Retry-After"] = answer.retry_after
        return Response(answer.body, answer.status, extra, media_type=answer.content_type)

    async def _read_body(self, request: Request) -> bytes | None:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.config.max_offer_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def websocket(self, websocket: WebSocket) -> None:
        refusal = self._guard(websocket, "websocket")
        if refusal == "origin":
            await websocket.close(code=CLOSE_POLICY)  # before the upgrade: HTTP 403
            return
        if refusal == "auth":
            await _refuse(websocket, UNAUTHORIZED, CLOSE_POLICY)
            return
        query = [(k, v) for k, v in websocket.query_params.multi_items() if k != TOKEN_QUERY]
        live, candidates = await self._candidates()
        placed = await open_upstream(self._client(), candidates, query, self._auth, self._forget)
        if placed is None or isinstance(placed, Refusal):
            if placed is None or placed.code == CLOSE_TRY_AGAIN:
                self.refused.labels("websocket", "capacity").inc()
                await _refuse(websocket, _full_message(live), CLOSE_TRY_AGAIN)
            else:
                await _refuse(websocket, placed.message, placed.code)
            return
        upstream, replica, hello = placed
        self.placed.labels("websocket").inc()
        try:
            await websocket.accept(headers=[(REPLICA_HEADER.lower().encode(), replica.id.encode())])
            await websocket.send_text(hello)
        except BaseException:  # the client left while its session was being placed
            await upstream.close()  # ends the session on the replica now, not at its idle timeout
            raise
        await WsRelay(websocket, upstream, replica, self._forget).run()

    async def healthz(self, request: Request) -> Response:
        live = self.directory.live()
        health = await gather_by_replica(live, lambda r: self._fetch_json(r, "/healthz"))
        body, status = aggregate_health(live, health)
        return JSONResponse(body, status)

    async def stats(self, request: Request) -> Response:
        refusal = self._guard(request, "http")
        if refusal is not None:
            return JSONResponse({"error": UNAUTHORIZED}, 401, {"WWW-Authenticate": "Bearer"})
        live = self.directory.live()
        suffix = "?samples=1" if request.query_params.get("samples") == "1" else ""
        stats = await gather_by_replica(live, lambda r: self._fetch_json(r, "/stats" + suffix))
        return JSONResponse(aggregate_stats(live, stats))

    async def controlnets(self, request: Request) -> Response:
        """The ControlNets sessions may pick: every replica runs the same model, so one answers."""
        refusal = self._guard(request, "http")
        if refusal is not None:
            return JSONResponse({"error": UNAUTHORIZED}, 401, {"WWW-Authenticate": "Bearer"})
        live = [r for r in self.directory.live() if r.healthy]
        if not live:
            return JSONResponse({"error": _full_message([])}, 503, {"Retry-After": "5"})
        return JSONResponse(await self._fetch_json(live[0], "/controlnets"))

    async def metrics(self, request: Request) -> Response:
        if self.config.metrics_require_token and not self.access.authorized(_view(request)):
            self.refused.labels("http", "auth").inc()
            return JSONResponse({"error": UNAUTHORIZED}, 401, {"WWW-Authenticate": "Bearer"})
        live = self.directory.live()
        texts = await gather_by_replica(live, lambda r: self._fetch_text(r, "/metrics"))
        merged = merge_expositions({rid: text for rid, text in texts.items() if text})
        return Response(generate_latest(self.registry) + merged, media_type=PROMETHEUS_TEXT)

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await self._close_http()


def _full_message(live: list[ReplicaInfo]) -> str:
    if not live:
        return "no engine replica is running yet (or every one has failed); try again shortly"
    return (
        f"every engine replica is at capacity ({len(live)} replicas); try again when a session "
        "closes"
    )


async def _refuse(websocket: WebSocket, message: str, code: int) -> None:
    """The single server's websocket refusal: accept, ``{"error": …}``, close with ``code``."""
    await websocket.accept()
    await websocket.send_text(error_reply(message))
    await websocket.close(code=code, reason=close_reason(message).decode(errors="ignore"))


class _SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP answer (not on websockets)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
