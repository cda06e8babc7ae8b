"""The ``[server]`` settings of ``livediff serve``: address, ICE, access, limits.

All fields have bounded defaults; ``__post_init__`` checks them and raises
:class:`~livediff.exceptions.ParameterError` naming the field. In a TOML file::

    [server]
    host = "0.0.0.0"
    port = 8080
    host_addresses = ["192.168.1.20"]        # ICE host candidates (default: every interface)
    ice_servers = [{ urls = ["stun:stun.example.org:3478"] },
                   { urls = ["turn:turn.example.org"], username = "u", credential = "p" }]
    max_connections = 16                      # WebRTC peers + websocket clients
    ws_max_message_bytes = 4194304
    stats_interval_s = 1.0
    # access (streams/auth.py)
    token = "…"                               # or LIVEDIFF_TOKEN / --token; default: no token
    metrics_require_token = false             # true: /metrics needs the token too
    allowed_origins = ["https://studio.example.org"]   # besides same origin and loopback; "*": any
    # limits (streams/limits.py)
    max_frame_pixels = 8294400                # 3840×2160
    control_rate_per_s = 20.0                 # control messages per session, token bucket …
    control_burst = 40                        # … of this depth
    idle_timeout_s = 60.0                     # no input frame for this long: session closed (0: never)
    connect_timeout_s = 20.0                  # WebRTC peer not connected by then: closed
    shutdown_timeout_s = 10.0                 # SIGTERM: time to finish frames in flight
    header_timeout_s = 5.0                    # a request's headers must arrive within this
    body_timeout_s = 10.0                     # ... and its body (POST /offer) within this
    max_jpeg_scans = 32                       # websocket frames: scans per JPEG …
    max_jpeg_pixel_scans = 99532800           # … and pixels × scans (3840×2160×12)
    decode_workers = 4                        # threads decoding websocket JPEGs
    health_full_after_s = 30.0                # /healthz says "degraded" when full this long

No public STUN server is used unless one is configured: with ``ice_servers = []`` (the
default) only host candidates are offered, which is right for a LAN or loopback.

The token is a secret: it is left out of ``repr()`` and out of every error message. Each
field is a setting declared once (:mod:`livediff.settings`); README's settings reference lists
them all with their ranges and defaults.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from livediff.exceptions import ParameterError
from livediff.settings import as_tuple, build, check_settings, refuse, setting, shown, table_values

ICE_URL_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server, as in the browser's ``RTCIceServer``."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        urls = (self.urls,) if isinstance(self.urls, str) else tuple(self.urls)
        if not urls or not all(isinstance(u, str) and u.startswith(ICE_URL_SCHEMES) for u in urls):
            raise ParameterError(
                f"ice server urls={self.urls!r}: expected URLs starting with stun:, stuns:, turn: or turns:"
            )
        object.__setattr__(self, "urls", urls)


def _ip_addresses(value: Any, name: str) -> tuple[str, ...]:
    addresses = as_tuple(value, name)
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except (ValueError, TypeError):
            raise ParameterError(
                f"{name}: {shown(address)} is not an IP address", field=name
            ) from None
    return addresses


def _ice_servers(value: Any, name: str) -> tuple[IceServer, ...]:
    try:
        return tuple(
            s if isinstance(s, IceServer) else _ice_server(s) for s in as_tuple(value, name)
        )
    except ParameterError as exc:
        raise ParameterError(str(exc), field=name) from None


def _token(token: Any, name: str) -> str:
    if not _valid_token(token):
        length = len(token) if isinstance(token, str) else type(token).__name__
        raise ParameterError(  # never echo the value: it is a secret
            f"{name} (length {length}) is not usable: expected at least "
            f"{MIN_TOKEN_LENGTH} printable ASCII characters without spaces, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            field=name,
        )
    return str(token)


def _origins(value: Any, name: str) -> tuple[str, ...]:
    origins = as_tuple(value, name)
    for origin in origins:
        if not (isinstance(origin, str) and (origin == "*" or _is_origin(origin))):
            refuse(name, origin, ORIGINS)
    return tuple(o.lower().rstrip("/") for o in origins)


ORIGINS = '"*" or origins such as "https://example.org" or "http://10.0.0.5:8080"'


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the HTTP / WebRTC / websocket server (see :mod:`livediff.streams.server_config`)."""

    host: str = setting("127.0.0.1", doc="address to listen on", flag="--host")
    port: int = setting(
        8080, doc="port to listen on; 0 picks a free one", min=0, max=65535, flag="--port"
    )
    host_addresses: tuple[str, ...] = setting(
        (),
        doc="offer only these addresses as ICE host candidates (127.0.0.1 for loopback; empty: every interface)",
        check=_ip_addresses,
        expected="a list of IP addresses",
        flag="--host-address",
        metavar="IP",
        repeat=True,
    )
    ice_servers: tuple[IceServer, ...] = setting(
        (),
        doc="STUN/TURN servers (empty: none, host candidates only)",
        check=_ice_servers,
        expected="a list of stun:/turn: URLs or { urls, username, credential } tables",
        flag="--ice-server",
        metavar="URL",
        repeat=True,
    )
    max_connections: int = setting(
        64,
        doc="WebRTC peers + websocket clients at once",
        min=1,
        max=10_000,
        flag="--max-connections",
    )
    max_offer_bytes: int = setting(
        256 * 1024, doc="largest POST /offer body", min=1024, max=16 << 20, unit="bytes"
    )
    ws_max_message_bytes: int = setting(
        4 * 1024 * 1024,
        doc="largest websocket message (over it: close 1009)",
        min=1024,
        max=256 << 20,
        unit="bytes",
    )
    ws_max_control_bytes: int = setting(
        64 * 1024, doc="largest control message", min=256, max=1 << 20, unit="bytes"
    )
    jpeg_quality: int = setting(85, doc="quality of the JPEGs sent back on /ws", min=1, max=100)
    stats_interval_s: float = setting(
        1.0,
        doc="seconds between data-channel stats",
        min=0.05,
        max=60,
        unit="s",
        flag="--stats-interval",
    )
    latency_marker: bool = setting(
        False,
        doc="copy the frame-counter marker from inputs to outputs (glass-to-glass benchmarks)",
        flag="--latency-marker",
    )
    static_dir: str | None = setting(
        None,
        doc="folder served as the page instead of the packaged client",
        special={None: "the packaged page"},
    )
    token: str | None = setting(
        None,
        doc="access token clients must present (flag, then $LIVEDIFF_TOKEN, then this key); "
        "a flag shows in ps: prefer the environment variable",
        special={None: "no token: an open server"},
        check=_token,
        expected=f"at least {MIN_TOKEN_LENGTH} printable ASCII characters without spaces",
        secret=True,
        flag="--token",
    )
    metrics_require_token: bool = setting(False, doc="/metrics needs the token too")
    allowed_origins: tuple[str, ...] = setting(
        (),
        doc='browser origins allowed besides the server\'s own and loopback ("*": any)',
        check=_origins,
        expected=f"a list of {ORIGINS}",
    )
    max_frame_pixels: int = setting(
        3840 * 2160, doc="largest input frame, in pixels", min=64, max=1 << 28
    )
    control_rate_per_s: float = setting(
        20.0, doc="control messages per second per session (token bucket rate)", min=0.1, max=10_000
    )
    control_burst: int = setting(
        40, doc="control messages in a burst (token bucket depth)", min=1, max=100_000
    )
    idle_timeout_s: float = setting(
        60.0,
        doc="a session without input frames for this long is closed",
        min=0.05,
        max=86_400,
        unit="s",
        special={0: "never"},
    )
    connect_timeout_s: float = setting(
        20.0, doc="a WebRTC peer not connected by then is closed", min=0.05, max=3600, unit="s"
    )
    shutdown_timeout_s: float = setting(
        10.0, doc="on SIGTERM, time to finish the frames in flight", min=0.05, max=3600, unit="s"
    )
    header_timeout_s: float = setting(
        5.0,
        doc="a request's headers must arrive within this (else 408)",
        min=0.05,
        max=3600,
        unit="s",
    )
    body_timeout_s: float = setting(
        10.0,
        doc="a request's body (POST /offer) must arrive within this",
        min=0.05,
        max=3600,
        unit="s",
    )
    max_jpeg_scans: int = setting(
        32, doc="scans per websocket JPEG at most (refused from its header)", min=1, max=1000
    )
    max_jpeg_pixel_scans: int = setting(
        3840 * 2160 * 12, doc="pixels × scans per websocket JPEG at most", min=64, max=1 << 40
    )
    decode_workers: int = setting(4, doc="threads decoding websocket JPEGs", min=1, max=256)
    health_full_after_s: float = setting(
        30.0,
        doc='/healthz says "degraded" once every session slot is taken this long',
        min=0.05,
        max=3600,
        unit="s",
    )

    def __post_init__(self) -> None:
        check_settings(self, prefix="[server] ")

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, **overrides: Any) -> ServerConfig:
        """Build from a TOML ``[server]`` table; ``overrides`` that are not ``None`` win."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return build(cls, table_values(cls, table, "server"), changes)


def _valid_token(token: Any) -> bool:
    return (
        isinstance(token, str)
        and len(token) >= MIN_TOKEN_LENGTH
        and all(33 <= ord(c) <= 126 for c in token)
    )


def _is_origin(text: str) -> bool:
    """``scheme://host[:port]`` and nothing else (the form of a browser's ``Origin`` header)."""
    scheme, sep, rest = text.partition("://")
    return bool(sep) and scheme in ("http", "https") and bool(rest) and "/" not in rest.rstrip("/")


def _ice_server(item: Any) -> IceServer:
    if isinstance(item, str):
        return IceServer(urls=(item,))
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"urls", "username", "credential"})
        if unknown:
            raise ParameterError(
                f"ice_servers: unknown key(s) {', '.join(unknown)}", field="ice_servers"
            )
        if "urls" not in item:
            raise ParameterError("ice_servers: each server needs urls", field="ice_servers")
        return IceServer(
            urls=item["urls"], username=item.get("username"), credential=item.get("credential")
        )
    raise ParameterError(
        f"ice_servers: {shown(item)} is neither a URL nor a table", field="ice_servers"
    )
