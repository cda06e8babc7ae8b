"""The ``[osc]`` settings: OSC control of live parameters (``livediff serve`` and ``camera``).

Pure data: nothing here imports python-osc. In a TOML file::

    [osc]
    port = 9000           # UDP port to listen on (default: no OSC at all)
    host = "127.0.0.1"    # default: the server's --host (camera: 127.0.0.1)
    reply_port = 9001     # errors (and acknowledgements) go back to the sender on this port

OSC has no authentication: anyone who can send a datagram to the port controls every
session. It is therefore off unless a port is given, and listens on loopback unless told
otherwise (:mod:`livediff.streams.osc_control`).
"""

from __future__ import annotations

from dataclasses import dataclass

from livediff.settings import check_settings, setting


@dataclass(frozen=True)
class OscConfig:
    """Where OSC control listens and where it answers (see :mod:`livediff.streams.osc_config`)."""

    port: int | None = setting(
        None,
        doc="UDP port to listen on for OSC control of the live parameters (no authentication: "
        "keep it on loopback or a trusted network); 0 picks a free one",
        min=0,
        max=65535,
        special={None: "off"},
        flag="--osc-port",
        metavar="PORT",
    )
    host: str | None = setting(
        None,
        doc="address OSC listens on",
        special={None: "the server's --host (camera: 127.0.0.1)"},
        flag="--osc-host",
        metavar="ADDRESS",
    )
    reply_port: int | None = setting(
        None,
        doc="UDP port on the sender's host that gets /livediff/error s s and /livediff/ok s "
        "replies",
        min=1,
        max=65535,
        special={None: "no replies"},
        flag="--osc-reply-port",
        metavar="PORT",
    )

    def __post_init__(self) -> None:
        check_settings(self, prefix="[osc] ")

    @property
    def enabled(self) -> bool:
        return self.port is not None
