"""How the Ray ingress hands a session to an engine replica and carries its websocket.

The replicas are ordinary ``livediff serve`` apps (:mod:`livediff.streams.app`) on their own
nodes; the ingress talks to them over HTTP with the server's token, so each replica checks it
as well (a replica's port reached directly needs the token as much as the ingress does).

- :func:`forward_offer`: ``POST /offer`` to the replicas in placement order. The first that
  does not refuse for capacity (503) answers the client, and its WebRTC answer names the
  replica's own host candidates: the media then flows between the browser and the replica's
  node; the ingress never sees it. A replica that cannot be reached is reported dead and the
  offer goes on to the next.
- :func:`open_upstream`: the same for ``GET /ws``: the first replica that sends
  ``{"session": …}`` takes the session; one that closes with 1013 (full, shutting down) sends
  it on; another refusal (1008: bad parameters) is the client's answer.
- :class:`WsRelay`: carries text and binary messages both ways, unchanged, and passes close
  codes and reasons through. A replica that vanishes without a close frame (its process or
  node died) ends the client's session with ``{"error": "session ended: replica <id>
  failed"}`` and close 1011, as a session that fails in the engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSMsgType
from starlette.websockets import WebSocket

from livediff.exceptions import ProtocolError
from livediff.streams.ray_directory import ReplicaInfo
from livediff.wire import (
    CLOSE_INTERNAL,
    CLOSE_TRY_AGAIN,
    MessageKind,
    close_reason,
    error_reply,
    kind_of,
    parse_message,
)

log = logging.getLogger(__name__)
OFFER_TIMEOUT_S = 30.0
OPEN_TIMEOUT_S = 60.0  # a session's Stream is built on the replica's control thread first
# Pings to the replica, answered within half of it: a node that vanishes without closing its
# connections is noticed in seconds, and a busy CPU replica is not taken for dead.
UPSTREAM_HEARTBEAT_S = 15.0
CLOSE_NORMAL = 1000
CLOSE_ABNORMAL = 1006  # "no close frame": never sent, only reported

Forget = Callable[[ReplicaInfo], None]


def replica_failed(replica: ReplicaInfo) -> str:
    return f"replica {replica.id} failed"


@dataclass(frozen=True)
class Forwarded:
    """A replica's answer to ``POST /offer``, to pass on to the client (a 503: every one was full)."""

    status: int
    body: bytes
    content_type: str
    retry_after: str | None
    replica: ReplicaInfo


async def forward_offer(
    http: aiohttp.ClientSession,
    candidates: Sequence[ReplicaInfo],
    body: bytes,
    headers: dict[str, str],
    forget: Forget,
) -> Forwarded | None:
    """The first answer that is not a capacity refusal; else the last refusal (or ``None``)."""
    refusal: Forwarded | None = None
    timeout = aiohttp.ClientTimeout(total=OFFER_TIMEOUT_S)
    for replica in candidates:
        try:
            async with http.post(
                f"{replica.url}/offer", data=body, headers=headers, timeout=timeout
            ) as response:
                answer = Forwarded(
                    response.status,
                    await response.read(),
                    response.content_type,
                    response.headers.get("Retry-After"),
                    replica,
                )
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            log.warning("replica %s did not answer an offer (%r): left out", replica.id, exc)
            forget(replica)
            continue
        if answer.status != 503:
            return answer
        refusal = answer
    return refusal


@dataclass(frozen=True)
class Refusal:
    """A replica's refusal of a websocket session: its ``{"error": …}`` and close code."""

    message: str
    code: int


async def open_upstream(
    http: aiohttp.ClientSession,
    candidates: Sequence[ReplicaInfo],
    query: Sequence[tuple[str, str]],
    headers: dict[str, str],
    forget: Forget,
) -> tuple[aiohttp.ClientWebSocketResponse, ReplicaInfo, str] | Refusal | None:
    """The replica that took the session (its websocket, itself and its hello), or the refusal
    to pass on (the last capacity refusal when every replica was full; ``None``: no replica).
    """
    full: Refusal | None = None
    for replica in candidates:
        try:
            upstream = await http.ws_connect(
                f"{replica.url}/ws",
                params=list(query),
                headers=headers,
                max_msg_size=0,  # the replica enforces ws_max_message_bytes (close 1009)
                heartbeat=UPSTREAM_HEARTBEAT_S,
                compress=0,
            )
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.warning("replica %s did not take a websocket (%r): left out", replica.id, exc)
            forget(replica)
            continue
        try:
            first = await asyncio.wait_for(upstream.receive(), OPEN_TIMEOUT_S)
        except asyncio.TimeoutError:  # slow, not dead: the next replica may be quicker
            log.warning("replica %s did not open a session within %g s", replica.id, OPEN_TIMEOUT_S)
            await upstream.close()
            continue
        except BaseException:
            await upstream.close()
            raise
        outcome = await _first_message(upstream, first)
        if isinstance(outcome, str):
            return upstream, replica, outcome
        if outcome is None:
            forget(replica)
            continue
        if outcome.code != CLOSE_TRY_AGAIN:
            return outcome  # the client's own fault (parameters): no other replica would differ
        full = outcome
    return full


async def _first_message(
    upstream: aiohttp.ClientWebSocketResponse, first: aiohttp.WSMessage
) -> str | Refusal | None:
    """A hello (the text), a refusal, or ``None`` when the replica went away."""
    if first.type is not WSMsgType.TEXT:
        await upstream.close()
        return None
    try:
        kind = kind_of(parse_message(first.data))
    except ProtocolError:
        kind = MessageKind.UNKNOWN
    if kind is MessageKind.HELLO:
        return str(first.data)
    closing = await upstream.receive()
    await upstream.close()
    code = int(closing.data) if closing.type is WSMsgType.CLOSE else CLOSE_ABNORMAL
    if code == CLOSE_ABNORMAL:
        return None
    try:
        message = str(parse_message(first.data).get("error", first.data))
    except ProtocolError:
        message = str(first.data)
    return Refusal(message, code)


class WsRelay:
    """One client websocket carried to its replica's websocket and back (module docstring)."""

    def __init__(
        self,
        client: WebSocket,
        upstream: aiohttp.ClientWebSocketResponse,
        replica: ReplicaInfo,
        on_replica_failed: Forget,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.replica = replica
        self._on_replica_failed = on_replica_failed
        self._client_gone = False  # then the upstream's end is ours, not the replica's failure
        self._lost = False

    async def run(self) -> None:
        """Relay until either side closes; then close the other side to match."""
        inbound = asyncio.ensure_future(self._client_to_replica())
        outbound = asyncio.ensure_future(self._replica_to_client())
        try:
            await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (inbound, outbound):
                task.cancel()
            await asyncio.gather(inbound, outbound, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.upstream.close()

    async def _client_to_replica(self) -> None:
        while True:
            message = await self.client.receive()
            if message["type"] == "websocket.disconnect":
                self._client_gone = True
                code = int(message.get("code") or CLOSE_NORMAL)
                await self.upstream.close(code=code if _sendable(code) else CLOSE_NORMAL)
                return
            try:
                if message.get("bytes") is not None:
                    await self.upstream.send_bytes(message["bytes"])
                elif message.get("text") is not None:
                    await self.upstream.send_str(message["text"])
            except (ConnectionError, aiohttp.ClientError):  # the replica went away under us
                await self._replica_lost()
                return

    async def _replica_to_client(self) -> None:
        while True:
            message = await self.upstream.receive()
            if message.type is WSMsgType.BINARY:
                await self.client.send_bytes(message.data)
            elif message.type is WSMsgType.TEXT:
                await self.client.send_text(message.data)
            elif message.type is WSMsgType.CLOSE:
                code = int(message.data)
                await _close_client(self.client, code, str(message.extra or ""))
                return
            elif message.type in (WSMsgType.CLOSED, WSMsgType.ERROR, WSMsgType.CLOSING):
                if not self._client_gone:
                    await self._replica_lost()
                return

    async def _replica_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        text = replica_failed(self.replica)
        log.warning("websocket to replica %s lost: its session ends", self.replica.id)
        self._on_replica_failed(self.replica)
        with contextlib.suppress(Exception):
            await self.client.send_text(error_reply(f"session ended: {text}"))
        await _close_client(self.client, CLOSE_INTERNAL, text)


def _sendable(code: int) -> bool:
    """Codes an endpoint may put in a close frame (RFC 6455 §7.4)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


async def _close_client(client: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await client.close(
            code=code if _sendable(code) else CLOSE_INTERNAL,
            reason=close_reason(reason).decode(errors="ignore"),
        )


async def gather_by_replica(
    replicas: Sequence[ReplicaInfo], fetch: Callable[[ReplicaInfo], Awaitable[Any]]
) -> dict[str, Any]:
    """``fetch`` for every replica at once; a replica whose fetch fails maps to ``None``."""
    results = await asyncio.gather(*(fetch(r) for r in replicas), return_exceptions=True)
    return {
        replica.id: None if isinstance(result, BaseException) else result
        for replica, result in zip(replicas, results, strict=True)
    }
