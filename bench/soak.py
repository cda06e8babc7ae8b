"""The ``soak`` suite: N live sessions for M minutes; crashes, lost sessions, memory, latency over time.

    python -m livediff.bench.soak                      # sd-turbo architecture, random weights, 16 sessions, 10 min
    livediff bench --suite soak --model tiny --weights random --sessions 2 --minutes 0.2   # CPU smoke

Sessions (``--transport``):

- ``engine`` (default): :class:`~livediff.engine.runtime.Engine` sessions in this process, one
  producer per session submitting a ``--frame-size``² frame every 1/``--fps`` s (latest wins)
  and one consumer receiving. It soaks the engine, its worker and its memory.
- ``ws``: the server app on ``127.0.0.1`` and one websocket client per session (JPEG both
  ways, one frame in flight per client, paced at ``--fps``). It soaks the server edge too,
  but client and server JPEG work share this process's CPU.

Every ``--interval`` seconds one JSON line (:mod:`livediff.bench.records`, suite ``soak``,
``phase`` ``interval``): ``t_s``, ``sessions_alive``, ``crashes`` (worker restarts plus
sessions that failed), ``lost_sessions`` (sessions that ended without being asked), ``rss_mb``,
``gpu_mem_mb`` / ``gpu_mem_reserved_mb`` (CUDA), ``fps`` (outputs per second, all sessions),
``ms_median`` / ``ms_p99`` (device time per generated frame), ``latency_ms_p50/p95/p99``
(frame arrival → output; ``ws``: send → answer received) and ``frames``. Then one
``summary`` line over the whole run, with ``rss_growth_mb`` (last interval − first) and
``ok``: no crash, no lost session, RSS growth within ``--rss-bound-mb``. The exit status is 1
when not ``ok``. A PNG of latency percentiles, fps and memory over time goes to ``--plot``
(needs matplotlib; without it, draw it later: ``--replot soak.jsonl --plot soak.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livediff.bench.records import emit, environment, percentile, read_records
from livediff.engine.backend_fit import fit_degrade_to_bundle
from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.exceptions import SessionClosedError
from livediff.models.backends import Backend, prepare_backend, runtime_bundle
from livediff.models.loading import ModelSpec, load_model
from livediff.settings.flags import add_setting_flag

FAILURE_MARKERS = ("failed", "engine worker failed")


@dataclass
class Window:
    """What happened since the last sample."""

    latency_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)

    def take(self) -> Window:
        taken = Window(self.latency_ms, self.compute_ms)
        self.latency_ms, self.compute_ms = [], []
        return taken


@dataclass
class Soak:
    """The run's running totals."""

    sessions: int
    window: Window = field(default_factory=Window)
    ended: list[str] = field(default_factory=list)  # reasons of sessions that ended by themselves
    errors: list[str] = field(default_factory=list)  # exceptions in the load generators
    latency_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    stopping: bool = False

    def output(self, latency_ms: float, compute_ms: float | None) -> None:
        self.window.latency_ms.append(latency_ms)
        if compute_ms is not None:
            self.window.compute_ms.append(compute_ms)

    def lost(self, reason: str) -> None:
        if not self.stopping:
            self.ended.append(reason)

    @property
    def failed_sessions(self) -> int:
        return sum(1 for r in self.ended if any(m in r for m in FAILURE_MARKERS))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def source_frame(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------- load
async def engine_load(engine: Engine, soak: Soak, args: argparse.Namespace, k: int) -> None:
    """One session: a paced producer and a consumer, until the soak stops or the session ends."""
    session = await engine.open_session({"seed": k})
    frames = [source_frame(args.frame_size, 8 * k + i) for i in range(8)]
    loop = asyncio.get_running_loop()

    async def produce() -> None:
        start, index = loop.time(), 0
        while not soak.stopping and not session.closed:
            try:
                session.submit(frames[index % len(frames)], pts=index)
            except SessionClosedError:
                return  # the consumer reports it
            index += 1
            await asyncio.sleep(max(0.0, start + index / args.fps - loop.time()))  # pacing

    async def consume() -> None:
        try:
            while True:
                out = await session.recv()
                soak.output(out.latency_ms, out.compute_ms)
        except SessionClosedError:
            soak.lost(session.close_reason or "closed")

    await asyncio.gather(produce(), consume())


async def ws_load(url: str, soak: Soak, args: argparse.Namespace, k: int) -> None:
    """One websocket client: one frame in flight, paced at ``--fps``."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from livediff.wire import encode_jpeg

    loop = asyncio.get_running_loop()
    jpeg = await loop.run_in_executor(None, encode_jpeg, source_frame(args.frame_size, k))
    async with connect(f"{url}?seed={k}", max_size=None, compression=None) as client:
        await client.recv()  # {"session": ...}
        start, index = loop.time(), 0
        try:
            while not soak.stopping:
                sent = time.perf_counter()
                await client.send(jpeg)
                answer = await client.recv()
                if isinstance(answer, str):
                    soak.errors.append(answer[:200])
                    continue
                soak.output((time.perf_counter() - sent) * 1000.0, None)
                index += 1
                await asyncio.sleep(max(0.0, start + index / args.fps - loop.time()))  # pacing
        except ConnectionClosed as exc:
            soak.lost(f"connection closed: {exc}")


# ---------------------------------------------------------------------- measuring
def sample(
    soak: Soak, engine: Engine, started: float, seconds: float, base: dict[str, Any]
) -> dict[str, Any]:
    window = soak.window.take()
    soak.latency_ms += window.latency_ms
    soak.compute_ms += window.compute_ms
    faults = engine.metrics()["faults"]
    device = engine.bundle.device
    cuda = device.type == "cuda"
    return {
        **base,
        "phase": "interval",
        "t_s": round(time.monotonic() - started, 1),
        "sessions_alive": len(engine.sessions),
        "crashes": faults["worker_restarts"] + soak.failed_sessions + len(soak.errors),
        "lost_sessions": len(soak.ended),
        "rss_mb": round(rss_mb(), 1),
        "gpu_mem_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1) if cuda else None,
        "gpu_mem_reserved_mb": round(torch.cuda.memory_reserved(device) / 2**20, 1)
        if cuda
        else None,
        "fps": round(len(window.latency_ms) / seconds, 2),
        "ms_median": round(percentile(window.compute_ms, 50), 3),
        "ms_p99": round(percentile(window.compute_ms, 99), 3),
        "latency_ms_p50": round(percentile(window.latency_ms, 50), 3),
        "latency_ms_p95": round(percentile(window.latency_ms, 95), 3),
        "latency_ms_p99": round(percentile(window.latency_ms, 99), 3),
        "frames": len(window.latency_ms),
        "oom_batches": faults["oom_batches"],
    }


def summary(records: list[dict[str, Any]], soak: Soak, args: argparse.Namespace) -> dict[str, Any]:
    last, first = records[-1], records[0]
    growth = last["rss_mb"] - first["rss_mb"]
    gpu = [r["gpu_mem_mb"] for r in records if r["gpu_mem_mb"] is not None]
    total_s = last["t_s"]
    ok = last["crashes"] == 0 and last["lost_sessions"] == 0 and growth <= args.rss_bound_mb
    return {
        **{k: v for k, v in last.items() if k not in ("t_s", "frames")},
        "phase": "summary",
        "seconds": total_s,
        "fps": round(len(soak.latency_ms) / max(total_s, 1e-9), 2),
        "ms_median": round(percentile(soak.compute_ms, 50), 3),
        "ms_p99": round(percentile(soak.compute_ms, 99), 3),
        "latency_ms_p50": round(percentile(soak.latency_ms, 50), 3),
        "latency_ms_p95": round(percentile(soak.latency_ms, 95), 3),
        "latency_ms_p99": round(percentile(soak.latency_ms, 99), 3),
        "frames": len(soak.latency_ms),
        "rss_growth_mb": round(growth, 1),
        "gpu_mem_growth_mb": round(gpu[-1] - gpu[0], 1) if gpu else None,
        "ended": soak.ended[:20],
        "errors": soak.errors[:20],
        "ok": ok,
    }


async def soak_run(
    engine: Engine, args: argparse.Namespace, base: dict[str, Any]
) -> list[dict[str, Any]]:
    soak = Soak(args.sessions)
    await engine.start()
    runner = None
    if args.transport == "ws":
        from aiohttp import web

        from livediff.streams.app import create_app
        from livediff.streams.server_config import ServerConfig
        from livediff.streams.slow_clients import start_runner

        config = ServerConfig(ws_max_message_bytes=64 << 20, idle_timeout_s=0)
        runner = await start_runner(create_app(engine, config), config)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        url = f"ws://{host}:{port}/ws"
        loads = [ws_load(url, soak, args, k) for k in range(args.sessions)]
    else:
        loads = [engine_load(engine, soak, args, k) for k in range(args.sessions)]
    tasks = [asyncio.ensure_future(load) for load in loads]
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    end = started + args.minutes * 60.0
    try:
        while (now := time.monotonic()) < end:
            interval = min(args.interval, end - now)
            await asyncio.sleep(interval)  # the sampling period
            records.append(sample(soak, engine, started, interval, base))
            emit(records[-1], args.outputs)
    finally:
        soak.stopping = True
        if runner is not None:
            await runner.cleanup()
        await engine.stop()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                soak.errors.append(f"{type(result).__name__}: {result}")
    records.append(summary(records, soak, args))
    emit(records[-1], args.outputs)
    return records


# ---------------------------------------------------------------------- plot
def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("phase") == "interval"]
    t = [r["t_s"] / 60.0 for r in rows]
    figure, ((latency, fps), (rss, gpu)) = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    for key, style in (("latency_ms_p50", "-"), ("latency_ms_p95", "--"), ("latency_ms_p99", ":")):
        latency.plot(t, [r[key] for r in rows], style, label=key.removeprefix("latency_ms_"))
    latency.set(ylabel="arrival → output (ms)", title="latency percentiles per interval")
    fps.plot(t, [r["fps"] for r in rows], label="outputs/s")
    fps.plot(t, [r["sessions_alive"] for r in rows], label="sessions alive")
    fps.set(title="throughput and sessions")
    rss.plot(t, [r["rss_mb"] for r in rows])
    rss.set(xlabel="minutes", ylabel="MiB", title="process RSS")
    if any(r["gpu_mem_mb"] is not None for r in rows):
        gpu.plot(t, [r["gpu_mem_mb"] for r in rows], label="allocated")
        gpu.plot(t, [r["gpu_mem_reserved_mb"] for r in rows], label="reserved")
        gpu.legend()
    else:
        gpu.text(0.5, 0.5, "no CUDA device", ha="center", va="center", transform=gpu.transAxes)
    gpu.set(xlabel="minutes", ylabel="MiB", title="GPU memory")
    for axes in (latency, fps):
        axes.legend()
    for axes in (latency, fps, rss, gpu):
        axes.grid(True, alpha=0.3)
    first = rows[0] if rows else records[0]
    figure.suptitle(
        f"soak: {first['model']} {first['width']}×{first['height']}, {first['sessions']} sessions, "
        f"{first['device']}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m livediff.bench.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--fps", type=float, default=30.0, help="frames per second per session")
    parser.add_argument("--frame-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    add_setting_flag(parser, RuntimeConfig, "batch_buckets", flag="--buckets")
    parser.add_argument("--degrade", action="store_true", help="let the engine shed load")
    parser.add_argument("--transport", choices=("engine", "ws"), default="engine")
    parser.add_argument("--backend", choices=[b.value for b in Backend], default="eager")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--rss-bound-mb", type=float, default=64.0, help="allowed RSS growth")
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file as well")
    parser.add_argument(
        "--plot",
        type=lambda text: Path(text) if text else None,
        default=Path("bench/results/soak.png"),
        help="the PNG to draw ('' for none)",
    )
    parser.add_argument("--replot", type=Path, help="only draw --plot from these JSON lines")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.minutes <= 0 or args.interval <= 0 or args.fps <= 0:
        parser.error("--sessions, --minutes, --interval and --fps must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        if args.plot is None:
            raise SystemExit("--replot needs --plot")
        plot(read_records(args.replot), args.plot)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    bundle = load_model(
        ModelSpec(preset=args.model, weights=args.weights), device=device, dtype=dtype
    )
    backend = Backend(args.backend)
    bundle = prepare_backend(bundle, backend)
    config = StreamConfig(width=bundle.preset.width, height=bundle.preset.height)
    assert config.width is not None and config.height is not None
    factor = bundle.vae_scale_factor
    buckets = args.buckets
    batched = runtime_bundle(
        bundle,
        backend,
        latent_size=(config.height // factor, config.width // factor),
        buckets=buckets,
    )
    runtime = RuntimeConfig(
        deadline_ms=args.deadline_ms,
        max_sessions=max(args.sessions, 1),
        batch_buckets=buckets,
        degrade=fit_degrade_to_bundle(DegradePolicy(enabled=args.degrade), batched),
    )
    params = GenerationParams.for_preset(bundle.preset, steps=args.steps)
    engine = Engine(batched, config, runtime, params)
    base = {
        "system": "livediff",
        "suite": "soak",
        "model": bundle.preset.name,
        "weights": bundle.weights.value,
        "width": config.width,
        "height": config.height,
        "steps": args.steps,
        "mode": config.mode.value,
        "rcfg": config.rcfg.value,
        "sessions": args.sessions,
        "transport": args.transport,
        "input_fps": args.fps,
        "frame_size": args.frame_size,
        "backend": args.backend,
        "batch_buckets": list(buckets),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        **environment(device),
    }
    args.outputs = [sys.stdout]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.outputs.append(open(args.out, "a"))  # noqa: SIM115 - closed below
    try:
        records = asyncio.run(soak_run(engine, args, base))
    finally:
        for handle in args.outputs[1:]:
            handle.close()
    if args.plot:
        try:
            plot(records, args.plot)
        except ImportError as exc:
            print(f"no plot: {exc}; draw it later with --replot", file=sys.stderr)
    return 0 if records[-1]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
