"""ICE for livediff's WebRTC peers, server and client alike: the RTC configuration, and a
restriction of host candidates.

Both sides need these and the restriction must be one class (it refuses to stack, and a second
copy could not see the first), so this module sits at the bottom beside
:mod:`livediff.exceptions` and :mod:`livediff.wire`: it imports only the first of them.

aiortc uses Google's public STUN server when it is given no configuration, so
:func:`rtc_configuration` always passes an explicit (by default empty) server list.

aioice offers a host candidate for every address of every interface and never offers
loopback. :class:`HostAddressRestriction` replaces ``aioice.ice.get_host_addresses`` while
it is active, so only the listed addresses are offered (``127.0.0.1`` makes loopback work,
a LAN address keeps the server off other networks). The replacement is process-wide, because
aioice looks the function up at gather time; the restriction restores the original when it
ends and refuses to stack, so it cannot leak from one server (or test) into the next.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from livediff.exceptions import ParameterError, UsageError

log = logging.getLogger(__name__)

HostAddressFunction = Callable[[bool, bool], list[str]]


class IceServerLike(Protocol):
    """A STUN or TURN server: the server's ``IceServer`` (``[server] ice_servers``) or aiortc's
    ``RTCIceServer`` both fit.
    """

    @property
    def urls(self) -> str | Sequence[str]: ...

    @property
    def username(self) -> str | None: ...

    @property
    def credential(self) -> str | None: ...


def rtc_configuration(ice_servers: Sequence[IceServerLike] = ()) -> RTCConfiguration:
    """An aiortc configuration with exactly ``ice_servers`` (none: host candidates only)."""
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(
                urls=[s.urls] if isinstance(s.urls, str) else list(s.urls),
                username=s.username,
                credential=s.credential,
            )
            for s in ice_servers
        ]
    )


class HostAddressRestriction:
    """Offer only ``addresses`` as ICE host candidates while active (a context manager)."""

    def __init__(self, addresses: Sequence[str]) -> None:
        if not addresses:
            raise ParameterError(
                "a host address restriction needs at least one address", field="host_addresses"
            )
        parsed = [ipaddress.ip_address(a) for a in addresses]
        self.addresses = tuple(str(a) for a in parsed)
        self._ipv4 = [str(a) for a in parsed if a.version == 4]
        self._ipv6 = [str(a) for a in parsed if a.version == 6]
        self._original: HostAddressFunction | None = None

    def _host_addresses(self, use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return (self._ipv4 if use_ipv4 else []) + (self._ipv6 if use_ipv6 else [])

    @property
    def active(self) -> bool:
        return self._original is not None

    def install(self) -> None:
        current = aioice.ice.get_host_addresses
        if getattr(current, "__self__", None).__class__ is HostAddressRestriction:
            raise UsageError("another HostAddressRestriction is active; restrictions do not stack")
        self._original = current
        setattr(aioice.ice, "get_host_addresses", self._host_addresses)  # noqa: B010 (typed as a plain function)
        log.info("ICE host candidates restricted to %s", ", ".join(self.addresses))

    def restore(self) -> None:
        """Put aioice's own function back; idempotent."""
        if self._original is None:
            return
        if aioice.ice.get_host_addresses == self._host_addresses:
            setattr(aioice.ice, "get_host_addresses", self._original)  # noqa: B010
        else:
            log.warning("aioice.ice.get_host_addresses was replaced by someone else; leaving it")
        self._original = None

    def __enter__(self) -> HostAddressRestriction:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()
