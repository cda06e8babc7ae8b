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
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from livediff.cli_options import (
    add_lora_library_options,
    add_model_options,
    add_runtime_options,
    add_stream_options,
    add_style_image_option,
    load_toml,
    lora_library_from_args,
    model_spec_from_args,
    settings_from,
    stream_settings_from_args,
)
from livediff.cmd_serve_ray import add_ray_options
from livediff.exceptions import ParameterError
from livediff.process_clock import seconds_since_start
from livediff.settings import build, table_values
from livediff.settings.flags import add_flags, flag_values

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    from livediff.streams.server_config import ServerConfig

    parser = subparsers.add_parser(
        "serve",
        help="serve live sessions over WebRTC and websockets, with a browser client",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("server")
    add_flags(group, ServerConfig)
    add_ray_options(group)
    add_osc_options(parser)
    add_ndi_options(parser)
    add_model_options(parser)
    add_stream_options(parser)
    add_runtime_options(parser)
    add_lora_library_options(parser)
    add_style_image_option(parser)
    parser.set_defaults(handler=run)


def add_ndi_options(parser: argparse.ArgumentParser) -> None:
    """``--ndi-out`` (``[ndi]``): outputs as NDI sources."""
    from livediff.streams.ndi_config import NdiConfig

    add_flags(parser.add_argument_group("NDI"), NdiConfig)


def add_osc_options(parser: argparse.ArgumentParser) -> None:
    """``--osc-port`` and its companions (``[osc]``): OSC control of the live parameters."""
    from livediff.streams.osc_config import OscConfig

    add_flags(
        parser.add_argument_group("OSC control (no authentication: keep it on loopback)"), OscConfig
    )


def osc_config_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from livediff.streams.osc_config import OscConfig

    return settings_from(OscConfig, config, "osc", args)


def server_config_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from livediff.streams.auth import resolve_token
    from livediff.streams.server_config import ServerConfig

    values = table_values(ServerConfig, config.get("server"), "server")
    flags = flag_values(ServerConfig, args)
    token = resolve_token(flags.pop("token", None), os.environ, values.pop("token", None))
    return build(ServerConfig, values, flags, {"token": token})


def engine_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """Load the model and build (not start) the engine these flags and config file describe.

    With several ``--devices`` the model loads onto all of them in parallel threads; compiling
    and capturing then runs one device after another (``torch.compile`` must not run from two
    threads at once), the later ones reusing the first one's kernels from Inductor's cache.
    """
    from livediff.cli_options import load_for_backend, style_image_from_args
    from livediff.engine.backend_fit import fit_degrade_to_bundle
    from livediff.engine.devices import resolve_devices
    from livediff.engine.runtime import Engine
    from livediff.engine.runtime_config import ControlNetRows
    from livediff.models.backends import runtime_bundle
    from livediff.models.loading import resolve_device
    from livediff.models.presets import get_preset

    spec = model_spec_from_args(args, config)
    stream_config, params = stream_settings_from_args(args, config, get_preset(spec.preset))
    runtime_config = runtime_config_from_args(args, config)
    devices = resolve_devices(runtime_config.devices, str(resolve_device(args.device)))

    lora_library = lora_library_from_args(args, config)
    style_image = style_image_from_args(args, spec)

    def load(device: str) -> tuple[Any, Any]:
        device_args = argparse.Namespace(**{**vars(args), "device": device})
        return load_for_backend(spec, device_args, params.controlnets, lora_library)

    up_before_load = seconds_since_start()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(devices), thread_name_prefix="livediff-load") as pool:
        loaded_models = list(pool.map(load, devices))
    loaded = time.perf_counter()
    bundles = []
    for k, (bundle, backend) in enumerate(loaded_models):
        factor = bundle.vae_scale_factor
        height = stream_config.height or bundle.preset.height
        width = stream_config.width or bundle.preset.width
        bundles.append(
            runtime_bundle(
                bundle,
                backend,
                latent_size=(height // factor, width // factor),
                buckets=runtime_config.batch_buckets,
                plain_unet=runtime_config.controlnet_rows is ControlNetRows.APART,
            )
        )
        _say_where_the_start_went(
            up_before_load if k == 0 else None,
            loaded - started if k == 0 else 0.0,
            time.perf_counter() - loaded,
            bundles[-1],
            devices[k],
        )
        loaded = time.perf_counter()
    if style_image is not None:  # every session starts with it; pinned in the image cache
        from livediff.engine.style_images import encode_style_image

        params = params.updated(ip_image=encode_style_image(bundles, style_image, pin=True))
    degrade = fit_degrade_to_bundle(runtime_config.degrade, bundles[0])
    runtime_config = dataclasses.replace(runtime_config, degrade=degrade)
    return Engine(bundles, stream_config, runtime_config, params)


def _say_where_the_start_went(
    up_s: float | None, load_s: float, prepare_s: float, bundle: Any, device: str
) -> None:
    """One line per device: the process's age when loading began (interpreter, imports,
    settings), then loading, then compile + capture with what the compile cache did."""
    report = getattr(bundle, "compile_report", None)
    loaded = f"model loaded in {load_s:.1f} s" if load_s else "model loaded"
    if up_s is not None:
        loaded = f"loading began {up_s:.1f} s after the process started; {loaded}"
    prepared = (
        "" if report is None else f"; compile + capture {prepare_s:.1f} s ({report.describe()})"
    )
    print(f"livediff serve: {device}: {loaded}{prepared}", file=sys.stderr, flush=True)


def runtime_config_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """``RuntimeConfig`` from ``[runtime]`` (with an optional ``[runtime.degrade]``) and the flags."""
    from livediff.engine.runtime_config import RuntimeConfig

    return settings_from(RuntimeConfig, config, "runtime", args)


def run(args: argparse.Namespace) -> int:
    config = load_toml(args.config)
    from livediff.streams.ndi_config import NdiConfig

    osc_config = osc_config_from_args(args, config)
    ndi_config = settings_from(NdiConfig, config, "ndi", args)
    if getattr(args, "ray", None) is not None:
        from livediff.cmd_serve_ray import run as run_ray

        for given, what in (
            (osc_config.enabled, "--osc-port ([osc] port)"),
            (ndi_config.out, "--ndi-out ([ndi] out)"),
        ):
            if given:
                raise ParameterError(
                    f"{what} is for one server: it cannot be used with --ray", field="port"
                )
        if lora_library_from_args(args, config).enabled:
            raise ParameterError(
                "--lora-library ([lora_library]) is for one server: it cannot be used with --ray",
                field="library",
            )
        return run_ray(args, config)
    if getattr(args, "replicas", None) is not None:
        raise ParameterError("--replicas needs --ray (one server on one machine has no replicas)")
    server_config = server_config_from_args(args, config)
    engine = engine_from_args(args, config)
    return run_event_loop(serve(engine, server_config, osc_config, ndi_config))


def run_event_loop(main: Any) -> int:
    """Run ``main`` on uvloop where it exists (Linux, macOS), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using asyncio's event loop")
        return int(asyncio.run(main) or 0)
    return int(uvloop.run(main) or 0)


async def serve(
    engine: Any, server_config: Any, osc_config: Any = None, ndi_config: Any = None
) -> int:
    """Start ``engine`` and the app (and OSC control, if ``osc_config`` enables it; NDI outputs
    if ``ndi_config`` names one); serve until SIGINT/SIGTERM; then close everything.
    """
    from aiohttp import web

    from livediff.streams.app import create_app, drain_app
    from livediff.streams.slow_clients import start_runner

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    engine_began = time.perf_counter()
    await engine.start()
    engine_s = time.perf_counter() - engine_began
    app = create_app(engine, server_config, ndi_out=None if ndi_config is None else ndi_config.out)
    runner: web.AppRunner | None = None
    try:
        runner = await start_runner(app, server_config, handle_signals=False, access_log=None)
        site = web.TCPSite(runner, server_config.host, server_config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"livediff serve: listening on http://{_url_host(host)}:{port}/", flush=True)
        up_s = seconds_since_start()
        since = "" if up_s is None else f"; listening {up_s:.1f} s after the process started"
        print(
            f"livediff serve: engine started in {engine_s:.1f} s{since}",
            file=sys.stderr,
            flush=True,
        )
        async with osc_control(engine, osc_config, server_config.host, server_config, "serve"):
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


@contextlib.asynccontextmanager
async def osc_control(
    engine: Any, osc_config: Any, host: str, server_config: Any, command: str
) -> AsyncIterator[None]:
    """OSC control of ``engine``'s sessions while the block runs, if ``osc_config`` enables it
    (rate limit: ``server_config``'s control messages')."""
    if osc_config is None or not osc_config.enabled:
        yield
        return
    from livediff.streams.osc_control import OscControl

    async with OscControl(
        engine,
        osc_config,
        host=host,
        rate_per_s=server_config.control_rate_per_s,
        burst=server_config.control_burst,
    ) as control:
        assert control.address is not None
        osc_host, osc_port = control.address
        print(
            f"livediff {command}: OSC control on udp {_url_host(osc_host)}:{osc_port} "
            "(no authentication)",
            file=sys.stderr,
            flush=True,
        )
        yield


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
