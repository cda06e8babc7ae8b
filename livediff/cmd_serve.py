"""``livediff serve``: WebRTC, websocket and browser clients for live sessions, plus /metrics.

    livediff serve --model sd-turbo --prompt "a watercolor painting"
    livediff serve --host 0.0.0.0 --port 8080 --host-address 192.168.1.20 --config livediff.toml
    livediff serve --model tiny --weights random --port 0          # offline smoke test; prints the URL
    livediff serve --ray auto --host 0.0.0.0                       # over a Ray cluster (cmd_serve_ray)

The first line on stdout is ``livediff serve: listening on http://HOST:PORT/`` (with the real
port when ``--port 0``). SIGINT / SIGTERM drain the server (:mod:`livediff.streams.drain`):
new clients are refused, frames in flight are finished, every client gets a closing message
(websocket close 1001 "server shutdown"; data channel ``{"closing": "server shutdown"}``),
then the process exits 0.

Access token (:mod:`livediff.streams.auth`): ``--token`` wins over ``$LIVEDIFF_TOKEN``, which
wins over ``[server] token``. Prefer the environment or the file: a flag shows in ``ps``.

The config file may add ``[server]`` (see :mod:`livediff.streams.server_config`) and
``[runtime]`` (the engine runtime's settings) to the shared ``[model]``, ``[stream]`` and
``[params]`` tables.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from typing import Any

from livediff.cli_options import (
    add_model_options,
    add_stream_options,
    load_toml,
    model_spec_from_args,
    stream_settings_from_args,
)
from livediff.cmd_serve_ray import add_ray_options
from livediff.exceptions import ParameterError

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve live sessions over WebRTC and websockets, with a browser client",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("server")
    group.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    group.add_argument(
        "--port", type=int, help="port to listen on; 0 picks a free one (default 8080)"
    )
    group.add_argument(
        "--host-address",
        action="append",
        metavar="IP",
        dest="host_addresses",
        help="offer only this address as ICE host candidate (repeatable; 127.0.0.1 for loopback)",
    )
    group.add_argument(
        "--ice-server",
        action="append",
        metavar="URL",
        dest="ice_servers",
        help="STUN/TURN server URL (repeatable; default: none, host candidates only)",
    )
    group.add_argument(
        "--max-connections", type=int, help="WebRTC peers + websocket clients at once (default 64)"
    )
    group.add_argument(
        "--token",
        help="access token clients must present (default: $LIVEDIFF_TOKEN, then [server] token; "
        "none: open server). Visible in ps: prefer the environment variable",
    )
    group.add_argument(
        "--stats-interval",
        type=float,
        dest="stats_interval_s",
        help="seconds between data-channel stats",
    )
    group.add_argument(
        "--latency-marker",
        action="store_true",
        default=None,
        help="copy the frame-counter marker from inputs to outputs (glass-to-glass benchmarks)",
    )
    add_ray_options(group)
    add_model_options(parser)
    add_stream_options(parser)
    add_runtime_options(parser)
    parser.set_defaults(handler=run)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--max-sessions", type=int, help="sessions the engine serves at once")
    group.add_argument(
        "--max-sessions-per-device", type=int, help="sessions each device serves at once"
    )
    group.add_argument(
        "--deadline-ms", type=float, help="per-frame latency budget, arrival to output"
    )
    group.add_argument(
        "--no-degrade",
        action="store_true",
        help="never shed load (fewer steps, lower resolution, refusals)",
    )


def server_config_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from livediff.streams.auth import resolve_token
    from livediff.streams.server_config import ServerConfig

    table = config.get("server", {})
    if not isinstance(table, dict):
        raise ParameterError("[server] in the config file must be a table")
    table = dict(table)
    token = resolve_token(getattr(args, "token", None), os.environ, table.pop("token", None))
    return ServerConfig.from_table(
        table,
        token=token,
        host=args.host,
        port=args.port,
        host_addresses=tuple(args.host_addresses) if args.host_addresses else None,
        ice_servers=tuple(args.ice_servers) if args.ice_servers else None,
        max_connections=args.max_connections,
        stats_interval_s=args.stats_interval_s,
        latency_marker=args.latency_marker,
    )


def engine_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """Load the model and build (not start) the engine these flags and config file describe."""
    from livediff.cli_options import load_for_backend
    from livediff.engine.backend_fit import fit_degrade_to_bundle
    from livediff.engine.runtime import Engine
    from livediff.models.backends import runtime_bundle
    from livediff.models.presets import get_preset

    spec = model_spec_from_args(args, config)
    stream_config, params = stream_settings_from_args(args, config, get_preset(spec.preset))
    runtime_config = runtime_config_from_args(args, config)
    bundle, backend = load_for_backend(spec, args)
    factor = bundle.vae_scale_factor
    height = stream_config.height or bundle.preset.height
    width = stream_config.width or bundle.preset.width
    bundle = runtime_bundle(
        bundle,
        backend,
        latent_size=(height // factor, width // factor),
        buckets=runtime_config.batch_buckets,
    )
    degrade = fit_degrade_to_bundle(runtime_config.degrade, bundle)
    runtime_config = dataclasses.replace(runtime_config, degrade=degrade)
    return Engine(bundle, stream_config, runtime_config, params)


def runtime_config_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """``RuntimeConfig`` from ``[runtime]`` (with an optional ``[runtime.degrade]``) and the flags."""
    from livediff.engine.degrade import DegradePolicy
    from livediff.engine.runtime import RuntimeConfig

    values = dict(config.get("runtime", {}))
    degrade = dict(values.pop("degrade", {}))
    if getattr(args, "no_degrade", False):
        degrade["enabled"] = False
    for name in ("max_sessions", "max_sessions_per_device", "deadline_ms"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if isinstance(values.get("batch_buckets"), list):
        values["batch_buckets"] = tuple(values["batch_buckets"])
    try:
        return RuntimeConfig(**values, degrade=DegradePolicy(**degrade))
    except TypeError as exc:
        raise ParameterError(f"[runtime] in the config file: {exc}") from None


def run(args: argparse.Namespace) -> int:
    config = load_toml(args.config)
    if getattr(args, "ray", None) is not None:
        from livediff.cmd_serve_ray import run as run_ray

        return run_ray(args, config)
    if getattr(args, "replicas", None) is not None:
        raise ParameterError("--replicas needs --ray (one server on one machine has no replicas)")
    server_config = server_config_from_args(args, config)
    engine = engine_from_args(args, config)
    return run_event_loop(serve(engine, server_config))


def run_event_loop(main: Any) -> int:
    """Run ``main`` on uvloop where it exists (Linux, macOS), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using asyncio's event loop")
        return int(asyncio.run(main) or 0)
    return int(uvloop.run(main) or 0)


async def serve(engine: Any, server_config: Any) -> int:
    """Start ``engine`` and the app; serve until SIGINT/SIGTERM; then close everything."""
    from aiohttp import web

    from livediff.streams.app import create_app, drain_app
    from livediff.streams.slow_clients import start_runner

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await engine.start()
    app = create_app(engine, server_config)
    runner: web.AppRunner | None = None
    try:
        runner = await start_runner(app, server_config, handle_signals=False, access_log=None)
        site = web.TCPSite(runner, server_config.host, server_config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"livediff serve: listening on http://{_url_host(host)}:{port}/", flush=True)
        await stop.wait()
        print(
            f"livediff serve: shutting down (up to {server_config.shutdown_timeout_s:g} s to "
            "finish the frames in flight)",
            file=sys.stderr,
            flush=True,
        )
        # Still listening while it drains: new clients get 503 / close 1013, not a refused connection.
        await drain_app(app)
    finally:
        if runner is not None:
            await runner.cleanup()
        await engine.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
