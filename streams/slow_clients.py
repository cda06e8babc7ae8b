"""Cut HTTP clients that send their request headers too slowly (slowloris).

aiohttp waits for a request's headers as long as the client keeps the connection open.
:class:`HeaderDeadline` is aiohttp's request handler with a timer: from the moment a
connection opens (or an idle keep-alive connection receives the first byte of its next
request) the request line and headers must be complete within ``header_timeout_s``, or the
server answers ``408 Request Timeout`` and closes the connection. The body has its own bound,
``body_timeout_s``, applied by the handlers that read one (``POST /offer``).

:func:`start_runner` builds the app's :class:`aiohttp.web.AppRunner` with it; ``livediff
serve`` and the tests use it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from livediff.streams.server_config import ServerConfig

log = logging.getLogger(__name__)
LINGERING_S = 1.0


def _timeout_response(seconds: float) -> bytes:
    body = (
        f'{{"error": "the request headers did not arrive within {seconds:g} s '
        '([server] header_timeout_s)"}'
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class HeaderDeadline(RequestHandler):
    """aiohttp's request handler, plus the header deadline of the module docstring."""

    def __init__(self, manager: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = self._waiting_for_request()
        before = self._request_count
        super().data_received(data)
        if self._request_count > before or self._upgraded:
            self._disarm()  # the headers are complete (or the connection is a websocket now)
        elif waiting and data and self._header_timer is None:
            self._arm()  # the first bytes of the next request on a keep-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        """No request is being handled or queued: bytes now start a new request."""
        return self._current_request is None and not self._messages and not self._upgraded

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self._header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        peer = transport.get_extra_info("peername")
        log.info(
            "closed a connection from %s: request headers not complete within %g s",
            peer[0] if peer else "?",
            self._header_timeout_s,
        )
        transport.write(_timeout_response(self._header_timeout_s))
        self.force_close()
        transport.close()


class _DeadlineServer:
    """The runner's ``web.Server``, making :class:`HeaderDeadline` handlers; everything else delegates."""

    def __init__(self, server: web.Server, header_timeout_s: float) -> None:
        self._server = server
        self._header_timeout_s = header_timeout_s

    def __call__(self) -> RequestHandler:
        server = self._server
        return HeaderDeadline(
            server,
            loop=server._loop,
            header_timeout_s=self._header_timeout_s,
            **server._kwargs,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


async def start_runner(app: web.Application, config: ServerConfig, **kwargs: Any) -> web.AppRunner:
    """``web.AppRunner(app, **kwargs)``, set up, whose connections have ``config``'s header deadline.

    aiohttp keeps reading the rest of a refused request's body ("lingering") for up to 10 s by
    default; a client that sends its body slowly would hold the connection that long after its
    ``408``: here it lingers at most :data:`LINGERING_S`.
    """
    runner = web.AppRunner(app, lingering_time=LINGERING_S, **kwargs)
    await runner.setup()
    server = runner.server
    assert server is not None  # set up
    runner._server = _DeadlineServer(server, config.header_timeout_s)  # type: ignore[assignment]
    return runner
