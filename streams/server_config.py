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

The token is a secret: it is left out of ``repr()`` and out of every error message.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from livediff.exceptions import ParameterError

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


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ParameterError(f"[server] {name}={value!r} is out of range: expected {expected}")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the HTTP / WebRTC / websocket server (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 8080
    host_addresses: tuple[str, ...] = ()
    ice_servers: tuple[IceServer, ...] = ()
    max_connections: int = 64
    max_offer_bytes: int = 256 * 1024
    ws_max_message_bytes: int = 4 * 1024 * 1024
    ws_max_control_bytes: int = 64 * 1024
    jpeg_quality: int = 85
    stats_interval_s: float = 1.0
    latency_marker: bool = False
    static_dir: str | None = field(default=None)
    token: str | None = field(default=None, repr=False)
    metrics_require_token: bool = False
    allowed_origins: tuple[str, ...] = ()
    max_frame_pixels: int = 3840 * 2160
    control_rate_per_s: float = 20.0
    control_burst: int = 40
    idle_timeout_s: float = 60.0
    connect_timeout_s: float = 20.0
    shutdown_timeout_s: float = 10.0
    header_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    max_jpeg_scans: int = 32
    max_jpeg_pixel_scans: int = 3840 * 2160 * 12
    decode_workers: int = 4
    health_full_after_s: float = 30.0

    def __post_init__(self) -> None:
        _check(
            isinstance(self.port, int) and 0 <= self.port < 65536,
            "port",
            self.port,
            "an integer in [0, 65535]",
        )
        addresses = tuple(self.host_addresses)
        for address in addresses:
            try:
                ipaddress.ip_address(address)
            except (ValueError, TypeError):
                raise ParameterError(
                    f"[server] host_addresses: {address!r} is not an IP address"
                ) from None
        object.__setattr__(self, "host_addresses", addresses)
        servers = tuple(s if isinstance(s, IceServer) else _ice_server(s) for s in self.ice_servers)
        object.__setattr__(self, "ice_servers", servers)
        _check(
            _int_in(self.max_connections, 1, 10_000),
            "max_connections",
            self.max_connections,
            "an integer in [1, 10000]",
        )
        _check(
            _int_in(self.max_offer_bytes, 1024, 16 << 20),
            "max_offer_bytes",
            self.max_offer_bytes,
            "1 KiB to 16 MiB",
        )
        _check(
            _int_in(self.ws_max_message_bytes, 1024, 256 << 20),
            "ws_max_message_bytes",
            self.ws_max_message_bytes,
            "1 KiB to 256 MiB",
        )
        _check(
            _int_in(self.ws_max_control_bytes, 256, 1 << 20),
            "ws_max_control_bytes",
            self.ws_max_control_bytes,
            "256 B to 1 MiB",
        )
        _check(
            _int_in(self.jpeg_quality, 1, 100),
            "jpeg_quality",
            self.jpeg_quality,
            "an integer in [1, 100]",
        )
        interval = self.stats_interval_s
        _check(
            isinstance(interval, (int, float))
            and math.isfinite(interval)
            and 0.05 <= interval <= 60,
            "stats_interval_s",
            interval,
            "a number of seconds in [0.05, 60]",
        )
        _check(
            isinstance(self.latency_marker, bool),
            "latency_marker",
            self.latency_marker,
            "true or false",
        )
        self._check_access()
        self._check_limits()

    def _check_access(self) -> None:
        token = self.token
        if token is not None and not _valid_token(token):
            length = len(token) if isinstance(token, str) else type(token).__name__
            raise ParameterError(  # never echo the value: it is a secret
                f"[server] token (length {length}) is not usable: expected at least "
                f"{MIN_TOKEN_LENGTH} printable ASCII characters without spaces, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        _check(
            isinstance(self.metrics_require_token, bool),
            "metrics_require_token",
            self.metrics_require_token,
            "true or false",
        )
        origins = (
            (self.allowed_origins,)
            if isinstance(self.allowed_origins, str)
            else tuple(self.allowed_origins)
        )
        for origin in origins:
            _check(
                isinstance(origin, str) and (origin == "*" or _is_origin(origin)),
                "allowed_origins",
                origin,
                '"*" or origins such as "https://example.org" or "http://10.0.0.5:8080"',
            )
        object.__setattr__(self, "allowed_origins", tuple(o.lower().rstrip("/") for o in origins))

    def _check_limits(self) -> None:
        _check(
            _int_in(self.max_frame_pixels, 64, 1 << 28),
            "max_frame_pixels",
            self.max_frame_pixels,
            "an integer in [64, 268435456]",
        )
        _check(
            _number_in(self.control_rate_per_s, 0.1, 10_000),
            "control_rate_per_s",
            self.control_rate_per_s,
            "a number in [0.1, 10000]",
        )
        _check(
            _int_in(self.control_burst, 1, 100_000),
            "control_burst",
            self.control_burst,
            "an integer in [1, 100000]",
        )
        _check(
            self.idle_timeout_s == 0 or _number_in(self.idle_timeout_s, 0.05, 86_400),
            "idle_timeout_s",
            self.idle_timeout_s,
            "0 (never) or seconds in [0.05, 86400]",
        )
        for name in (
            "connect_timeout_s",
            "shutdown_timeout_s",
            "header_timeout_s",
            "body_timeout_s",
            "health_full_after_s",
        ):
            _check(
                _number_in(getattr(self, name), 0.05, 3600),
                name,
                getattr(self, name),
                "seconds in [0.05, 3600]",
            )
        _check(
            _int_in(self.max_jpeg_scans, 1, 1000),
            "max_jpeg_scans",
            self.max_jpeg_scans,
            "an integer in [1, 1000]",
        )
        _check(
            _int_in(self.max_jpeg_pixel_scans, 64, 1 << 40),
            "max_jpeg_pixel_scans",
            self.max_jpeg_pixel_scans,
            "an integer in [64, 2**40]",
        )
        _check(
            _int_in(self.decode_workers, 1, 256),
            "decode_workers",
            self.decode_workers,
            "an integer in [1, 256]",
        )

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, **overrides: Any) -> ServerConfig:
        """Build from a TOML ``[server]`` table; ``overrides`` that are not ``None`` win."""
        values = dict(table or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParameterError(
                f"unknown key(s) in [server]: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        for key in ("host_addresses", "ice_servers", "allowed_origins"):
            if key in values and not isinstance(values[key], (list, tuple)):
                raise ParameterError(f"[server] {key} must be a list")
        config = cls(**values)
        changes = {k: v for k, v in overrides.items() if v is not None}
        return replace(config, **changes) if changes else config


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number_in(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    )


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
            raise ParameterError(f"[server] ice_servers: unknown key(s) {', '.join(unknown)}")
        if "urls" not in item:
            raise ParameterError("[server] ice_servers: each server needs urls")
        return IceServer(
            urls=item["urls"], username=item.get("username"), credential=item.get("credential")
        )
    raise ParameterError(f"[server] ice_servers: {item!r} is neither a URL nor a table")
