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

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any

from livediff.exceptions import ParameterError

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


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ParameterError(
            f"[ray] {name}={value!r} is out of range: expected {expected}", field=name
        )


def _number(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    )


def _count(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class AutoscalingSettings:
    """``[ray.autoscaling]``: Serve scales the replicas by sessions per replica."""

    min_replicas: int = 1
    max_replicas: int = 8
    target_sessions_per_replica: float = 6.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0
    look_back_period_s: float = 30.0

    def __post_init__(self) -> None:
        # No scaling to zero: sessions reach replicas by their own HTTP servers, not through
        # Serve's request path, so nothing would wake a deployment of zero replicas.
        _check(_count(self.min_replicas, 1, 4096), "min_replicas", self.min_replicas, "1..4096")
        _check(
            _count(self.max_replicas, self.min_replicas, 4096),
            "max_replicas",
            self.max_replicas,
            f"an integer in [{self.min_replicas}, 4096] (at least min_replicas)",
        )
        _check(
            _number(self.target_sessions_per_replica, 0.1, 10_000),
            "target_sessions_per_replica",
            self.target_sessions_per_replica,
            "a number in [0.1, 10000]",
        )
        for name in ("upscale_delay_s", "downscale_delay_s"):
            _check(_number(getattr(self, name), 0, 86_400), name, getattr(self, name), "0..86400 s")
        _check(  # Serve wants it longer than its metrics interval (10 s)
            _number(self.look_back_period_s, 10.5, 3600),
            "look_back_period_s",
            self.look_back_period_s,
            "10.5..3600 s (longer than Serve's 10 s metrics interval)",
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
    """``[ray]`` (see the module docstring); checked in ``__post_init__``."""

    replicas: int | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0
    max_replicas_per_node: int | None = None
    proxy_location: ProxyLocation = ProxyLocation.HEAD_ONLY
    app_name: str = "livediff"
    heartbeat_s: float = 1.0
    replica_timeout_s: float = 5.0
    drain_timeout_s: float = 30.0
    autoscaling: AutoscalingSettings | None = None

    def __post_init__(self) -> None:
        if self.replicas is not None:
            _check(_count(self.replicas, 1, 4096), "replicas", self.replicas, "1..4096")
        if self.num_gpus is not None:
            _check(_number(self.num_gpus, 0, 64), "num_gpus", self.num_gpus, "0..64")
        _check(_number(self.num_cpus, 0, 1024), "num_cpus", self.num_cpus, "0..1024")
        if self.max_replicas_per_node is not None:
            _check(
                _count(self.max_replicas_per_node, 1, 4096),
                "max_replicas_per_node",
                self.max_replicas_per_node,
                "1..4096",
            )
        try:
            object.__setattr__(self, "proxy_location", ProxyLocation(self.proxy_location))
        except ValueError:
            _check(False, "proxy_location", self.proxy_location, '"HeadOnly" or "EveryNode"')
        _check(
            isinstance(self.app_name, str) and 0 < len(self.app_name) <= 64,
            "app_name",
            self.app_name,
            "a name of 1 to 64 characters",
        )
        _check(_number(self.heartbeat_s, 0.05, 60), "heartbeat_s", self.heartbeat_s, "0.05..60 s")
        _check(
            _number(self.replica_timeout_s, 2 * self.heartbeat_s, 3600),
            "replica_timeout_s",
            self.replica_timeout_s,
            f"{2 * self.heartbeat_s:g}..3600 s (at least two heartbeats)",
        )
        _check(
            _number(self.drain_timeout_s, 0, 86_400),
            "drain_timeout_s",
            self.drain_timeout_s,
            "0..86400 s",
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
        values = dict(table or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParameterError(
                f"unknown key(s) in [ray]: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        scaling = values.pop("autoscaling", None)
        if scaling is not None:
            if not isinstance(scaling, Mapping):
                raise ParameterError("[ray.autoscaling] must be a table", field="autoscaling")
            scaling_known = {f.name for f in fields(AutoscalingSettings)}
            wrong = sorted(set(scaling) - scaling_known)
            if wrong:
                raise ParameterError(
                    f"unknown key(s) in [ray.autoscaling]: {', '.join(wrong)}; known: "
                    f"{', '.join(sorted(scaling_known))}"
                )
            values["autoscaling"] = AutoscalingSettings(**scaling)
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "replicas" in changes:  # --replicas on the command line wins over [ray.autoscaling]
            values.pop("autoscaling", None)
        return replace(cls(**values), **changes) if changes else cls(**values)

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
