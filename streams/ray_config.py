"""The ``[ray]`` settings of ``livediff serve --ray``: replicas, their resources, autoscaling.

Pure data: nothing here imports Ray, so the settings are checked before a cluster is touched.
In a TOML file::

    [ray]
    replicas = 4                  # fixed number of engine replicas (default: one per GPU of the
                                  # cluster; on a cluster without GPUs, --replicas N is required)
    num_gpus = 1                  # per replica (default: 1 on a cluster with GPUs, else 0)
    num_cpus = 1                  # per replica
    max_replicas_per_node = 8     # default: no cap
    proxy_location = "HeadOnly"   # Serve's HTTP proxy on the head node only, or "EveryNode"
    app_name = "livediff"
    heartbeat_s = 1.0             # each replica announces itself to the ingress this often …
    replica_timeout_s = 5.0       # … and is left out of placement after this long without one
    drain_timeout_s = 30.0        # a replica that Serve stops (downscaling, redeploy) refuses new
                                  # sessions and waits this long for its own to end, then closes
                                  # the rest with 1001 "server shutdown"

    [ray.autoscaling]             # instead of a fixed number: Serve's autoscaler
    min_replicas = 1
    max_replicas = 8
    target_sessions_per_replica = 6   # scale so each replica holds about this many sessions
    upscale_delay_s = 10.0
    downscale_delay_s = 300.0
    look_back_period_s = 30.0     # Serve averages the replicas' session counts over this window

Serve's own autoscaler counts ongoing *requests*, which says nothing here: a session is one
long websocket (at the ingress) or no request at all (WebRTC goes straight to the replica).
So each replica reports its open sessions as a custom autoscaling metric and the policy
(:mod:`livediff.streams.ray_autoscale`) sizes the deployment by sessions per replica; Serve
applies ``min_replicas``/``max_replicas`` and the delays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from livediff.exceptions import ParameterError
from livediff.settings import build, check_settings, setting, table_values

POLICY_PATH = "livediff.streams.ray_autoscale:SessionsPerReplica"
INGRESS_NAME = "LivediffIngress"
REPLICA_NAME = "LivediffReplica"
# Every websocket is one ongoing request of the ingress for its whole life; Serve's default
# (5) would queue the sixth client.
INGRESS_MAX_ONGOING = 10_000
HOST_ADDRESS_ENV = "LIVEDIFF_HOST_ADDRESS"


def node_host_addresses(node_ip: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    """A replica's ICE host addresses: ``$LIVEDIFF_HOST_ADDRESS`` of its node (comma-separated,
    set where that node's ``ray start`` runs), else the node's IP as Ray reports it.
    """
    listed = tuple(a.strip() for a in environ.get(HOST_ADDRESS_ENV, "").split(",") if a.strip())
    return listed or (node_ip,)


class ProxyLocation(str, Enum):
    HEAD_ONLY = "HeadOnly"
    EVERY_NODE = "EveryNode"


@dataclass(frozen=True)
class AutoscalingSettings:
    """``[ray.autoscaling]``: Serve scales the replicas by sessions per replica."""

    # No scaling to zero: sessions reach replicas by their own HTTP servers, not through
    # Serve's request path, so nothing would wake a deployment of zero replicas.
    min_replicas: int = setting(
        1, doc="engine replicas at least (no scaling to zero)", min=1, max=4096
    )
    max_replicas: int = setting(8, doc="engine replicas at most", min=1, max=4096)
    target_sessions_per_replica: float = setting(
        6.0, doc="scale so each replica holds about this many sessions", min=0.1, max=10_000
    )
    upscale_delay_s: float = setting(
        10.0,
        doc="sessions above target this long before a replica is added",
        min=0,
        max=86_400,
        unit="s",
    )
    downscale_delay_s: float = setting(
        300.0,
        doc="sessions below target this long before a replica is removed",
        min=0,
        max=86_400,
        unit="s",
    )
    look_back_period_s: float = setting(  # Serve wants it longer than its metrics interval (10 s)
        30.0,
        doc="Serve averages the replicas' session counts over this window (above its 10 s metrics interval)",
        min=10.5,
        max=3600,
        unit="s",
        expected="seconds in [10.5, 3600] (longer than Serve's 10 s metrics interval)",
    )

    def __post_init__(self) -> None:
        check_settings(self, prefix="autoscaling.")
        if self.max_replicas < self.min_replicas:
            raise ParameterError(
                f"[ray.autoscaling] max_replicas={self.max_replicas} is under "
                f"min_replicas={self.min_replicas}: expected max_replicas >= min_replicas",
                field="max_replicas",
            )

    def serve_config(self) -> dict[str, Any]:
        """Serve's ``autoscaling_config`` for the replica deployment."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.min_replicas,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "policy": {
                "policy_function": POLICY_PATH,
                "policy_kwargs": {"target_sessions_per_replica": self.target_sessions_per_replica},
            },
        }


@dataclass(frozen=True)
class RayConfig:
    """``[ray]`` (see the module docstring); each field a declared setting."""

    replicas: int | None = setting(
        None,
        doc="fixed number of engine replicas (instead of [ray.autoscaling])",
        min=1,
        max=4096,
        special={None: "one per GPU of the cluster (required on a cluster without GPUs)"},
        flag="--replicas",
    )
    num_gpus: float | None = setting(
        None,
        doc="GPUs per replica",
        min=0,
        max=64,
        special={None: "1 on a cluster with GPUs, else 0"},
    )
    num_cpus: float = setting(1.0, doc="CPUs per replica", min=0, max=1024)
    max_replicas_per_node: int | None = setting(
        None, doc="replicas per node at most", min=1, max=4096, special={None: "no cap"}
    )
    proxy_location: ProxyLocation = setting(
        ProxyLocation.HEAD_ONLY, doc="where Serve runs its HTTP proxy"
    )
    app_name: str = setting("livediff", doc="the Serve application's name", max_length=64)
    heartbeat_s: float = setting(
        1.0,
        doc="each replica announces itself to the ingress this often",
        min=0.05,
        max=60,
        unit="s",
    )
    replica_timeout_s: float = setting(
        5.0,
        doc="a replica without a heartbeat this long is left out of placement (two heartbeats at least)",
        min=0.1,
        max=3600,
        unit="s",
    )
    drain_timeout_s: float = setting(
        30.0,
        doc="a replica Serve stops refuses new sessions and waits this long for its own to end",
        min=0,
        max=86_400,
        unit="s",
    )
    autoscaling: AutoscalingSettings | None = setting(
        None,
        doc="Serve's autoscaler, scaling the replicas by sessions per replica",
        special={None: "a fixed number of replicas"},
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.app_name:
            raise ParameterError(
                "[ray] app_name='' is out of range: expected a name of 1 to 64 characters",
                field="app_name",
            )
        if self.replica_timeout_s < 2 * self.heartbeat_s:
            raise ParameterError(
                f"[ray] replica_timeout_s={self.replica_timeout_s:g} is out of range: expected "
                f"{2 * self.heartbeat_s:g}..3600 s (at least two heartbeats)",
                field="replica_timeout_s",
            )
        if self.replicas is not None and self.autoscaling is not None:
            raise ParameterError(
                "[ray] replicas and [ray.autoscaling] exclude each other: a fixed number, or "
                "Serve's autoscaler between min_replicas and max_replicas",
                field="replicas",
            )

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, **overrides: Any) -> RayConfig:
        """From a TOML ``[ray]`` table; ``overrides`` that are not ``None`` win."""
        values = table_values(cls, table, "ray")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "replicas" in changes:  # --replicas on the command line wins over [ray.autoscaling]
            values.pop("autoscaling", None)
        return build(cls, values, changes)

    def replica_options(
        self, *, replicas: int, num_gpus: float, shutdown_timeout_s: float
    ) -> dict[str, Any]:
        """Serve deployment options of the engine replicas (``replicas`` when not autoscaled)."""
        options: dict[str, Any] = {
            "name": REPLICA_NAME,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": num_gpus},
            # Serve stops a replica after this; the drain must fit in it.
            "graceful_shutdown_timeout_s": self.drain_timeout_s + shutdown_timeout_s + 10,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0,
        }
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.serve_config()
        else:
            options["num_replicas"] = replicas
        return options

    def ingress_options(self, *, shutdown_timeout_s: float) -> dict[str, Any]:
        """Serve deployment options of the ingress: one replica, no CPU of its own to reserve."""
        return {
            "name": INGRESS_NAME,
            # Its websockets are ongoing requests: Serve lets them run while the replicas drain
            # (their close 1001 then reaches the clients) before it stops the ingress.
            "graceful_shutdown_timeout_s": self.drain_timeout_s + shutdown_timeout_s + 10,
            "num_replicas": 1,
            "max_ongoing_requests": INGRESS_MAX_ONGOING,
            "ray_actor_options": {"num_cpus": 0},
            # Serve would log every replica heartbeat (a handle call a second per replica).
            "logging_config": {"enable_access_log": False},
        }
