"""Who may use the server: an optional bearer token, and an origin policy for browsers.

Token
    Set with ``--token``, the environment variable ``LIVEDIFF_TOKEN`` or ``[server] token``;
    the flag wins over the environment, which wins over the file (:func:`resolve_token`).
    Prefer the environment or the file: a flag is visible to every local user in ``ps``.
    Without a token the server is open (bind it to loopback or a trusted network).

    With a token, these need it: ``POST /offer``, ``GET /ws``, ``GET /stats``,
    ``GET /controlnets``, ``GET``/``POST /loras``, ``DELETE /loras/{name}``, and
    ``GET /metrics`` when ``[server] metrics_require_token = true``. The page (``/``,
    ``/static/``) and ``/healthz`` stay open: the page carries no secret and asks for nothing
    by itself. The WebRTC data channel needs nothing more: it exists only on a peer that an
    authorised ``/offer`` created.

    A client presents the token as ``Authorization: Bearer <token>`` or, where it cannot set
    headers (a browser's ``WebSocket``, a page opened from a link), as the query parameter
    ``?token=<token>``. The page (``clients/web/app.js``) reads ``?token=`` from its own URL
    and sends it to ``/offer`` in the header. Tokens are compared in constant time
    (``hmac.compare_digest`` over SHA-256 digests, so not even the length leaks). The server
    never logs a token, presented or configured, and sends ``Referrer-Policy: no-referrer``
    so a token in the page's URL does not travel on.

    Refusals: HTTP ``401`` with ``{"error": "unauthorized: …"}`` and
    ``WWW-Authenticate: Bearer``; a websocket is accepted, sent ``{"error": "unauthorized: …"}``
    and closed with code 1008 (policy violation).

Origin policy
    Browsers send ``Origin`` with cross-site requests. ``/offer``, ``/ws`` and the calls that
    change LoRAs (``POST /loras``, ``DELETE /loras/{name}``) accept a request
    without ``Origin`` (not a browser), from the server's own origin (``Origin``'s host and port
    equal ``Host``), from a loopback origin (``localhost``, ``127.0.0.0/8``, ``[::1]``), or from
    an origin listed in ``[server] allowed_origins`` (``"*"`` allows any). Others get HTTP
    ``403`` with ``{"error": "origin … is not allowed …"}``, before any websocket upgrade.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from aiohttp import web

from livediff.streams import app_keys
from livediff.streams.server_config import ServerConfig

log = logging.getLogger(__name__)

TOKEN_ENV = "LIVEDIFF_TOKEN"
TOKEN_QUERY = "token"
UNAUTHORIZED = "unauthorized: this server needs its access token (Authorization: Bearer <token>, or ?token=<token>)"


def resolve_token(
    flag: str | None, environ: Mapping[str, str], configured: str | None
) -> str | None:
    """The token in force: ``--token``, else ``$LIVEDIFF_TOKEN``, else ``[server] token`` (empty = unset)."""
    for value in (flag, environ.get(TOKEN_ENV), configured):
        if value:
            return value
    return None


def presented_token(request: web.BaseRequest) -> str | None:
    """The token a request carries: the ``Authorization: Bearer`` header, else ``?token=``."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return request.query.get(TOKEN_QUERY)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class AccessPolicy:
    """The token and origin rules of one server (see the module docstring)."""

    def __init__(self, config: ServerConfig) -> None:
        self._digest = None if config.token is None else _digest(config.token)
        self.metrics_require_token = config.metrics_require_token
        self.allowed_origins = frozenset(config.allowed_origins)

    def __repr__(self) -> str:
        return f"AccessPolicy(token={'set' if self._digest else 'none'}, origins={sorted(self.allowed_origins)})"

    @property
    def token_required(self) -> bool:
        return self._digest is not None

    def authorized(self, request: web.BaseRequest) -> bool:
        """True without a configured token, else when the request carries the right one."""
        if self._digest is None:
            return True
        presented = presented_token(request)
        # Digests have one length: the comparison takes the same time whatever was presented.
        return presented is not None and hmac.compare_digest(self._digest, _digest(presented))

    def guards(self, path: str) -> bool:
        """Whether ``path`` needs the token (``/ws`` answers for itself, after the upgrade)."""
        if path in ("/offer", "/stats", "/controlnets", "/loras") or path.startswith("/loras/"):
            return True
        return path == "/metrics" and self.metrics_require_token

    def origin_allowed(self, request: web.BaseRequest) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not sent by a browser
        origin = origin.strip().lower().rstrip("/")
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        try:
            parts = urlsplit(origin)
            host = parts.hostname
        except ValueError:
            return False
        if host is None:
            return False  # "null" (sandboxed pages, file://) and garbage
        if parts.netloc == (request.host or "").lower():
            return True  # same origin (the scheme may differ behind a TLS proxy)
        return _is_loopback(host)


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ACCESS = web.AppKey("access", AccessPolicy)


def unauthorized_response() -> web.Response:
    return web.json_response(
        {"error": UNAUTHORIZED}, status=401, headers={"WWW-Authenticate": "Bearer"}
    )


def forbidden_origin_response(request: web.BaseRequest) -> web.Response:
    origin = request.headers.get("Origin", "")[:200]
    return web.json_response(
        {
            "error": f"origin {origin!r} is not allowed to use this server "
            "(same origin, loopback and [server] allowed_origins are)"
        },
        status=403,
    )


@web.middleware
async def access_control(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Origin policy for ``/offer``, ``/ws`` and LoRA changes; the token for the guarded HTTP routes."""
    policy = request.app[ACCESS]
    path = request.path
    changes_loras = path.startswith("/loras") and request.method != "GET"
    if (path in ("/offer", "/ws") or changes_loras) and not policy.origin_allowed(request):
        _refused(request, "origin")
        return forbidden_origin_response(request)
    if policy.guards(path) and not policy.authorized(request):
        _refused(request, "auth")
        return unauthorized_response()
    return await handler(request)


def _refused(request: web.Request, reason: str) -> None:
    """Count and log a refusal; never the URL or headers (they may carry a token)."""
    transport = {"/offer": "webrtc", "/ws": "websocket"}.get(request.path, "http")
    request.app[app_keys.METRICS].rejected.labels(transport, reason).inc()
    log.info("%s from %s refused: %s", request.path, request.remote, reason)
