"""OSC control: live parameters from TouchDesigner, Resolume, a controller or a timeline.

>>> async with OscControl(engine, OscConfig(port=9000), host="127.0.0.1", rate_per_s=20, burst=40):
...     ...   # /livediff/strength 0.6, /livediff/<session>/prompt "a fox" now reach the sessions

One UDP socket (python-osc parses the packets; bundles are taken message by message, at once,
in order, their time tags not waited for). The addresses and their arguments are
:mod:`livediff.streams.osc_addresses`: the live settings, for every open session and the
default of later ones (``/livediff/<key>``) or for one session (``/livediff/<session>/<key>``).
A server-wide value is checked once first (a refused one changes nothing); each open session
then takes it, and the default changes only if every session took it (one that refuses is
reported with its id, and is not acknowledged).
A change goes through the engine's own checks (``Session.update``), exactly like a websocket
control message, and applies from the next frame. Messages are limited per session, and for
the server-wide addresses together, by the same token bucket as control messages
(``[server] control_rate_per_s`` / ``control_burst``); over it a message is refused, not
queued. Changes apply one after another in the order they arrived.

Every refusal is logged with the session id (``-`` for the server-wide addresses) and, with a
``reply_port``, sent back to the sender's host on that port as ``/livediff/error s s``
(field, message; field ``""`` when no setting is to blame); a change that took effect is
acknowledged there as ``/livediff/ok s`` (its address). OSC has no authentication: it is off
unless a port is given, and the caller binds it to loopback unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from livediff.engine.config import GenerationParams
from livediff.exceptions import LivediffError, ParameterError, SessionClosedError
from livediff.streams import osc_addresses
from livediff.streams.engine_protocol import SessionLike
from livediff.streams.limits import TokenBucket
from livediff.streams.osc_config import OscConfig

log = logging.getLogger(__name__)
ALL_SESSIONS = "-"  # the bucket and log name of the server-wide addresses
QUEUE_SIZE = 1024  # changes waiting to be applied, at most (each already passed its bucket)


class OscEngine(Protocol):
    """What OSC needs of the engine (``livediff.engine.runtime.Engine`` has it)."""

    @property
    def sessions(self) -> Mapping[str, SessionLike]: ...

    @property
    def default_params(self) -> GenerationParams: ...

    def update_defaults(self, **changes: Any) -> Any: ...


@dataclass(frozen=True)
class _Change:
    """One accepted message, waiting its turn."""

    sender: str
    address: str
    target: osc_addresses.OscTarget
    args: list[Any]
    tags: str


class OscControl:
    """The OSC listener of one engine; see the module docstring. :meth:`close` is idempotent."""

    def __init__(
        self,
        engine: OscEngine,
        config: OscConfig,
        *,
        host: str,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.port is None:
            raise ParameterError("OSC control needs a port ([osc] port, --osc-port)", field="port")
        self._engine = engine
        self._config = config
        self._host = config.host or host
        self._rate, self._burst, self._clock = rate_per_s, burst, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._queue: asyncio.Queue[_Change] = asyncio.Queue(QUEUE_SIZE)
        self._transport: asyncio.DatagramTransport | None = None
        self._applier: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None  # where it listens, once started

    async def __aenter__(self) -> OscControl:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            import pythonosc  # noqa: F401  (parsing happens per datagram: fail here, not there)
        except ImportError:
            raise LivediffError(
                "OSC control (--osc-port) needs python-osc: pip install 'livediff[creative]'"
            ) from None
        loop = asyncio.get_running_loop()
        port = self._config.port
        assert port is not None  # checked in __init__
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self), local_addr=(self._host, port)
            )
        except OSError as exc:
            raise ParameterError(
                f"OSC control cannot listen on udp {self._host}:{self._config.port}: {exc}",
                field="port",
            ) from exc
        self._transport = transport
        self.address = transport.get_extra_info("sockname")[:2]
        self._applier = asyncio.ensure_future(self._apply_in_order())
        log.info(
            "OSC control on udp %s:%d (no authentication)%s",
            *self.address,
            f"; replies to the sender's port {self._config.reply_port}"
            if self._config.reply_port
            else "",
        )

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._applier is not None:
            self._applier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._applier
            self._applier = None

    # ------------------------------------------------------------------ receiving
    def received(self, data: bytes, sender: str) -> None:
        """One datagram from ``sender``'s host: each of its messages is refused or queued."""
        from pythonosc.osc_packet import OscPacket, ParseError

        try:
            messages = [timed.message for timed in OscPacket(data).messages]
        except ParseError as exc:
            self._refuse(sender, ALL_SESSIONS, "", None, f"not an OSC packet ({exc})")
            return
        for message in messages:
            self._take(sender, message.address, list(message.params), _type_tags(message.dgram))

    def _take(self, sender: str, address: str, args: list[Any], tags: str) -> None:
        try:
            target = osc_addresses.parse_address(address)
        except ParameterError as exc:
            key = osc_addresses.session_part(address) or ALL_SESSIONS
            self._refuse(sender, key, address, exc.field, str(exc))
            return
        key = target.session or ALL_SESSIONS
        if target.session is not None and target.session not in self._engine.sessions:
            self._refuse(sender, key, address, target.name, _no_session(target.session))
            return
        if not self._bucket(key).take():
            self._refuse(sender, key, address, target.name, self._bucket(key).refusal())
            return
        try:
            self._queue.put_nowait(_Change(sender, address, target, args, tags))
        except asyncio.QueueFull:
            self._refuse(sender, key, address, target.name, "too many OSC changes waiting")

    def _bucket(self, key: str) -> TokenBucket:
        if key not in self._buckets:
            open_now = self._engine.sessions
            for gone in [k for k in self._buckets if k != ALL_SESSIONS and k not in open_now]:
                del self._buckets[gone]
            self._buckets[key] = TokenBucket(self._rate, self._burst, clock=self._clock)
        return self._buckets[key]

    # ------------------------------------------------------------------ applying
    async def _apply_in_order(self) -> None:
        while True:
            change = await self._queue.get()
            key = change.target.session or ALL_SESSIONS
            try:
                await self._apply(change)
            except ParameterError as exc:
                self._refuse(change.sender, key, change.address, exc.field, str(exc))
            except SessionClosedError as exc:
                self._refuse(change.sender, key, change.address, change.target.name, str(exc))
            except Exception as exc:  # a bug, not the sender's fault: say so, keep listening
                log.error("[%s] OSC %s failed", key, change.address, exc_info=exc)
                self._refuse(
                    change.sender,
                    key,
                    change.address,
                    change.target.name,
                    f"the server could not apply this message ({type(exc).__name__}; see the "
                    "server log); nothing changed",
                )

    async def _apply(self, change: _Change) -> None:
        target = change.target
        values = osc_addresses.changes(target, change.args, change.tags)
        if target.session is not None:
            session = self._engine.sessions.get(target.session)
            if session is None:
                raise ParameterError(_no_session(target.session), field=target.name)
            await session.update(**values)
            log.info("[%s] OSC %s: updated %s", target.session, change.address, target.name)
        else:
            self._engine.default_params.updated(**values)  # checked once, before any session
            refused = 0
            for sid, session in self._engine.sessions.items():
                try:
                    await session.update(**values)
                except (ParameterError, SessionClosedError) as exc:
                    refused += 1
                    field = getattr(exc, "field", None) or target.name
                    self._refuse(change.sender, sid, change.address, field, f"session {sid}: {exc}")
            if refused:  # the default stays, so that later sessions do not start refused
                return
            self._engine.update_defaults(**values)
            log.info(
                "[%s] OSC %s: updated %s everywhere", ALL_SESSIONS, change.address, target.name
            )
        self._reply(change.sender, osc_addresses.OK_ADDRESS, [change.address])

    # ------------------------------------------------------------------ answering
    def _refuse(self, sender: str, key: str, address: str, field: str | None, message: str) -> None:
        log.info("[%s] OSC %s from %s refused: %s", key, address or "packet", sender, message)
        self._reply(sender, osc_addresses.ERROR_ADDRESS, [field or "", message])

    def _reply(self, sender: str, address: str, args: list[Any]) -> None:
        if self._config.reply_port is None or self._transport is None:
            return
        from pythonosc.osc_message_builder import OscMessageBuilder

        builder = OscMessageBuilder(address)
        for arg in args:
            builder.add_arg(arg, OscMessageBuilder.ARG_TYPE_STRING)
        self._transport.sendto(builder.build().dgram, (sender, self._config.reply_port))


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, control: OscControl) -> None:
        self._control = control

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._control.received(data, addr[0])

    def error_received(self, exc: Exception) -> None:  # e.g. the reply port is not open
        log.debug("OSC socket: %s", exc)


def _type_tags(dgram: bytes) -> str:
    """A message's OSC type tags without the comma (``""`` when it has no arguments)."""
    from pythonosc.parsing import osc_types

    _, index = osc_types.get_string(dgram, 0)
    if not dgram[index:]:
        return ""
    tags, _ = osc_types.get_string(dgram, index)
    return tags[1:]


def _no_session(session: str) -> str:
    return f"no open session {session!r} here"
