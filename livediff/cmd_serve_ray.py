"""``livediff serve --ray [ADDRESS]``: the same server over a Ray cluster, with Ray Serve.

    livediff serve --ray --replicas 2 --model tiny --weights random      # a local Ray, CPU
    livediff serve --ray auto --host 0.0.0.0 --model sd-turbo            # the running cluster
    serve run livediff.cmd_serve_ray:app_builder argv='["--model","sd-turbo"]'   # Serve's CLI

ADDRESS is Ray's: nothing (start a Ray on this machine), ``auto`` (the cluster this machine
belongs to: ``ray start --head`` / ``ray start --address HEAD:6379`` made it), ``HOST:6379``
or ``ray://HOST:10001``. The application is two Serve deployments:
:mod:`livediff.streams.ray_ingress` (the page, ``/offer``, ``/ws``, ``/stats``,
``/metrics``, ``/healthz``, the token) behind Serve's HTTP proxy on ``--host``/``--port``,
and :mod:`livediff.streams.ray_replica`, one engine per replica, each replica one GPU
(``num_gpus=1``). Replicas: ``--replicas N`` or ``[ray] replicas``; by default one per GPU of
the cluster; ``[ray.autoscaling]`` lets Serve scale them by sessions
(:mod:`livediff.streams.ray_config`). Every other flag and ``--config`` table means what it
means for ``livediff serve``: the model, stream and runtime settings are each replica's, and
so are the ``[server]`` limits, except that each node offers its own ICE host addresses
(``LIVEDIFF_HOST_ADDRESS`` in the environment of its ``ray start``; default the node's IP).

Every node needs livediff installed (the same version) and the model reachable (the HF cache
or the ``--source`` folder at the same path). Ray's usage statistics are off unless
``RAY_USAGE_STATS_ENABLED`` says otherwise. SIGINT / SIGTERM delete the application: each
replica drains (``[ray] drain_timeout_s``, then ``[server] shutdown_timeout_s``); a Ray
started here stops with it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

from livediff.exceptions import LivediffError, ParameterError

log = logging.getLogger(__name__)
LOCAL = ""  # --ray without an address: start a Ray on this machine


def add_ray_options(group: Any) -> None:
    """``--ray [ADDRESS]`` and ``--replicas`` in ``livediff serve``'s server group."""
    group.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help="serve over a Ray cluster with Ray Serve: no ADDRESS starts Ray here; 'auto', "
        "HOST:6379 or ray://HOST:10001 joins one (see the README's 'Scaling out')",
    )
    from livediff.settings.flags import add_flags
    from livediff.streams.ray_config import RayConfig

    add_flags(group, RayConfig)  # --replicas


def replica_plan(ray_config: Any, cluster: Mapping[str, float]) -> tuple[int, float]:
    """(replicas to start, GPUs per replica) for ``ray_config`` on a cluster with ``cluster``'s resources."""
    gpus = float(cluster.get("GPU", 0))
    num_gpus = ray_config.num_gpus if ray_config.num_gpus is not None else (1.0 if gpus else 0.0)
    if ray_config.autoscaling is not None:
        return ray_config.autoscaling.min_replicas, num_gpus
    if ray_config.replicas is not None:
        return ray_config.replicas, num_gpus
    if num_gpus > 0 and gpus >= num_gpus:
        return int(gpus // num_gpus), num_gpus
    raise ParameterError(
        "the Ray cluster has no GPU: --replicas N (or [ray] replicas) runs N CPU replicas",
        field="replicas",
    )


def settings(args: argparse.Namespace, config: dict[str, Any]) -> tuple[Any, Any]:
    """The ``ServerConfig`` and ``RayConfig`` of these flags and config file."""
    from livediff.cmd_serve import server_config_from_args
    from livediff.settings.flags import flag_values
    from livediff.streams.ray_config import RayConfig

    server_config = server_config_from_args(args, config)
    if server_config.host_addresses:
        raise ParameterError(
            "--host-address / [server] host_addresses name one machine's addresses; with --ray "
            "each node offers its own: set LIVEDIFF_HOST_ADDRESS in the environment of that "
            "node's `ray start` (default: the node's IP)",
            field="host_addresses",
        )
    table = config.get("ray")
    return server_config, RayConfig.from_table(table, **flag_values(RayConfig, args))


def build_application(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """The Serve application (ingress bound to the replicas) for these flags and config file.

    Needs Ray initialised: the number of replicas may come from the cluster's GPUs.
    """
    import ray
    from ray import serve

    from livediff.cmd_serve import engine_from_args
    from livediff.streams.ray_ingress import LivediffIngress
    from livediff.streams.ray_replica import LivediffReplica

    server_config, ray_config = settings(args, config)
    replicas, num_gpus = replica_plan(ray_config, ray.cluster_resources())
    options = ray_config.replica_options(
        replicas=replicas, num_gpus=num_gpus, shutdown_timeout_s=server_config.shutdown_timeout_s
    )
    # Built in each replica, from the same flags: the model loads where its GPU is.
    engine_factory = functools.partial(engine_from_args, args, config)
    replica = serve.deployment(**options)(LivediffReplica)
    ingress_options = ray_config.ingress_options(
        shutdown_timeout_s=server_config.shutdown_timeout_s
    )
    ingress = serve.deployment(**ingress_options)(serve.ingress()(LivediffIngress))
    engines = replica.bind(engine_factory, server_config, ray_config)
    return ingress.bind(engines, server_config, ray_config)


def app_builder(builder_args: dict[str, Any]) -> Any:
    """Serve's application builder (``serve run``, ``serve deploy``, KubeRay's RayService):
    ``{"argv": [... livediff serve flags ...]}``. Serve's own config sets the HTTP address.
    """
    from livediff.cli import build_parser
    from livediff.cli_options import load_toml

    argv = builder_args.get("argv", [])
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ParameterError('the application args must be {"argv": ["--flag", "value", ...]}')
    args = build_parser().parse_args(["serve", *argv])
    return build_application(args, load_toml(args.config))


def run(args: argparse.Namespace, config: dict[str, Any]) -> int:
    """Start (or join) Ray, deploy the application, serve until SIGINT/SIGTERM."""
    server_config, ray_config = settings(args, config)  # refuse bad flags before Ray starts
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise LivediffError(f"--ray needs Ray Serve ({exc}): pip install 'livediff[ray]'") from None

    local = args.ray == LOCAL
    if local:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=args.ray, logging_level=logging.WARNING)
    try:
        host = server_config.host
        port = server_config.port or _free_port(host)
        serve.start(
            proxy_location=ray_config.proxy_location.value,
            http_options={"host": host, "port": port},
        )
        app = build_application(args, config)
        serve.run(app, name=ray_config.app_name, route_prefix="/")
        where = f"[{host}]" if ":" in host else host
        print(f"livediff serve: listening on http://{where}:{port}/ (Ray Serve)", flush=True)
        _wait_for_signal()
        print(
            f"livediff serve: shutting down (replicas drain: up to "
            f"{ray_config.drain_timeout_s + server_config.shutdown_timeout_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
        serve.delete(ray_config.app_name)  # the replicas drain; a local Ray then stops whole
    finally:
        if local:
            ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _free_port(host: str) -> int:
    """A port free on ``host`` now (``--port 0``: Serve's proxy needs a number up front)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
