"""An engine replica of ``livediff serve --ray``: one engine (one GPU) and its own server.

A Serve deployment whose constructor builds the engine (``engine_factory``: the model and
runtime that ``livediff serve``'s flags and config file describe), starts it, and serves it
with the ordinary app (:func:`livediff.streams.app.create_app`) on its node's address and a
free port. Clients never connect to that port themselves: the ingress
(:mod:`livediff.streams.ray_ingress`) places sessions here and forwards their ``POST /offer``
and websocket. The WebRTC answer is this server's, so media flows between the browser and
this node directly.

ICE host candidates: the node's own IP as Ray reports it, or the addresses in
``$LIVEDIFF_HOST_ADDRESS`` (comma-separated) of the node's environment, set where its
``ray start`` runs: the per-node ``--host-address`` (a public or LAN address behind NAT, or
``127.0.0.1`` for loopback tests).

Every ``[ray] heartbeat_s`` the replica announces :meth:`LivediffReplica.info` to the ingress.
Serve calls :meth:`LivediffReplica.check_health` (a failed engine worker makes Serve replace
the replica) and :meth:`LivediffReplica.record_autoscaling_stats` (sessions, for
:mod:`livediff.streams.ray_autoscale`). When Serve stops the replica (downscaling, redeploy,
shutdown) it refuses new sessions (the ingress places them elsewhere), waits up to ``[ray]
drain_timeout_s`` for its own to end, then drains like a single server on SIGTERM
(:mod:`livediff.streams.drain`: the frames in flight, then close 1001 "server shutdown").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
from aiohttp import web
from ray import serve

from livediff.exceptions import SessionError
from livediff.streams.app import create_app, drain_app
from livediff.streams.drain import DRAIN, SHUTDOWN_REASON
from livediff.streams.ray_autoscale import CAPACITY_METRIC, SESSIONS_METRIC
from livediff.streams.ray_config import INGRESS_NAME, RayConfig, node_host_addresses
from livediff.streams.server_config import ServerConfig
from livediff.streams.slow_clients import start_runner

if TYPE_CHECKING:
    from livediff.engine.runtime import Engine

log = logging.getLogger(__name__)
DRAIN_POLL_S = 0.25


def _limit_cpu_threads() -> None:
    """A CPU replica uses the cores Ray gave it, not every core of the node."""
    assigned = ray.get_runtime_context().get_assigned_resources()
    if assigned.get("GPU"):
        return
    import torch

    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))


class LivediffReplica:
    """The replica deployment's class (see the module docstring)."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        engine_factory: Callable[[], Engine],
        server_config: ServerConfig,
        ray_config: RayConfig,
    ) -> None:
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.ray_config = ray_config
        self.config = dataclasses.replace(
            server_config,
            host=self.node_ip,
            port=0,
            host_addresses=node_host_addresses(self.node_ip, os.environ),
        )
        _limit_cpu_threads()
        self.engine = engine_factory()
        await self.engine.start()
        self.app = create_app(self.engine, self.config)
        self.runner = await start_runner(self.app, self.config, access_log=None)
        await web.TCPSite(self.runner, self.node_ip, 0).start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self._ingress = serve.get_deployment_handle(INGRESS_NAME, app_name=context.app_name)
        self._stopping = False
        self._heartbeat = asyncio.ensure_future(self._announce_forever())
        log.info(
            "replica %s serving on %s (ICE host addresses %s)",
            self.id,
            self.url,
            ", ".join(self.config.host_addresses),
        )

    def info(self) -> dict[str, Any]:
        """Where this replica listens and what it holds (its heartbeat to the ingress)."""
        health = self.engine.health()
        return {
            "id": self.id,
            "url": self.url,
            "node_ip": self.node_ip,
            "node_id": self.node_id,
            "pid": os.getpid(),
            "host_addresses": list(self.config.host_addresses),
            "sessions": health["sessions"],
            "capacity": health["max_sessions"],
            "degrade_level": health["degrade_level"],
            "healthy": not health["failed"] and not self._stopping,
        }

    async def _announce(self, timeout: float | None = None) -> None:
        timeout = timeout or max(5.0, 5 * self.ray_config.heartbeat_s)
        try:
            await asyncio.wait_for(self._ingress.report.remote(self.info()), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the ingress is (re)starting: the next heartbeat retries
            log.info("replica %s: heartbeat not delivered (%r)", self.id, exc)

    async def _announce_forever(self) -> None:
        while True:
            await self._announce()
            await asyncio.sleep(self.ray_config.heartbeat_s)

    def check_health(self) -> None:
        """Serve's health check: a worker that is down for good makes Serve replace this replica."""
        if self.engine.health()["failed"]:
            raise SessionError(f"replica {self.id}: the engine's worker failed and is down")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (:mod:`livediff.streams.ray_autoscale`)."""
        health = self.engine.health()
        return {
            SESSIONS_METRIC: float(health["sessions"]),
            CAPACITY_METRIC: float(health["max_sessions"]),
        }

    async def __del__(self) -> None:
        """Serve stops this replica: refuse new sessions, let open ones end, then drain."""
        self._stopping = True
        self.app[DRAIN].begin(SHUTDOWN_REASON)  # new /offer: 503, new /ws: 1013 → elsewhere
        await self._announce(self.ray_config.heartbeat_s)  # the ingress may be going too
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ray_config.drain_timeout_s
        while self.engine.sessions and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        self._heartbeat.cancel()
        await drain_app(self.app)
        await self.runner.cleanup()
        await self.engine.stop()
        log.info("replica %s stopped", self.id)
