"""Run a command in a network namespace that has only loopback, so no packet can leave the host.

WebRTC tests and the CPU smoke run of the ``e2e`` benchmark use it: ICE then has nothing but
``127.0.0.1`` to try, and a mistake (a STUN server left on, a candidate on a real interface)
fails instead of sending traffic out. It lives with the benchmarks, which the product never
imports, because the server has no use for it. It needs ``unshare`` (util-linux), ``ip``
(iproute2) and root (or an unprivileged user namespace)::

    argv = loopback_netns_argv([sys.executable, "-m", "pytest", "tests/streams/test_webrtc.py"])
    subprocess.run(argv, check=True)

Inside, :func:`in_loopback_netns` is true.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence

_SETUP = 'ip link set lo up && exec "$@"'


def network_interfaces() -> list[str]:
    """Names of the interfaces of this process's network namespace."""
    return sorted(name for _, name in socket.if_nameindex())


def in_loopback_netns() -> bool:
    """True when the only network interface is ``lo`` (and it is up enough to bind)."""
    if network_interfaces() != ["lo"]:
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
    except OSError:
        return False
    return True


def netns_tools_missing() -> list[str]:
    """The commands :func:`loopback_netns_argv` needs that are not on ``PATH``."""
    return [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]


def loopback_netns_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run in a fresh network namespace with only ``lo``, brought up."""
    return ["unshare", "--net", "sh", "-c", _SETUP, "sh", *argv]
