"""Glass-to-glass latency of ``livediff serve``: a client sends frames, the model answers, the client sees them.

    python -m livediff.bench.e2e --model sd-turbo --sessions 1,4 --clients aiortc,chromium --seconds 20
    python -m livediff.bench.e2e --model tiny --weights random --sessions 1,2 --seconds 4 \\
        --no-degrade --deadline-ms 60000 --netns                                  # CPU smoke check

The server is a real ``livediff serve`` subprocess with ``--latency-marker``: the client paints
a frame counter into every frame (:mod:`livediff.streams.frame_marker`), the server copies it
from each input onto the output that answers it, and the client reads it back, so the
round trip is measured on the client's own clock even though the model repaints the picture.

Two clients: ``aiortc`` (Python peers in this process) and ``chromium`` (headless, through
Playwright, Debian's ``/usr/bin/chromium``; one tab per session running ``/?src=marker``).
Each (client, sessions) pair prints one JSON line, suite ``e2e``:

- ``latency_ms_p50`` / ``latency_ms_p99``: client round trip (encode, network, decode, the
  server's queueing and model time, the client's decode) over every session's frames;
- ``ms_median`` / ``ms_p99``: server-added latency, decoded input frame → processed frame handed
  to the encoder (RTP in → RTP out), from the server's own clock (``GET /stats?samples=1``);
- ``fps``: processed frames per second each session receives (mean over sessions).

The first ``--warmup`` seconds are not measured. ``--netns`` re-runs the benchmark inside a
loopback-only network namespace (root or user namespaces; see :mod:`livediff.bench.netns`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import numpy as np

from livediff.bench.netns import in_loopback_netns, loopback_netns_argv
from livediff.bench.records import emit, environment, percentile
from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
from livediff.exceptions import SessionClosedError
from livediff.ice import HostAddressRestriction
from livediff.streams.frame_marker import MARKER_MODULUS, read_marker, stamp_marker

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns", "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
]  # fmt: skip
SERVE_FLAGS = ("model", "weights", "source", "width", "height", "steps", "device", "dtype", "rcfg", "mode",
               "deadline_ms", "max_sessions", "backend", "config")  # fmt: skip


class Server:
    """``livediff serve`` in a subprocess, on a free loopback port."""

    def __init__(self, args: argparse.Namespace) -> None:
        argv = [
            sys.executable,
            "-m",
            "livediff",
            "serve",
            "--port",
            "0",
            "--host-address",
            "127.0.0.1",
        ]
        argv += ["--latency-marker", "--prompt", args.prompt]
        for name in SERVE_FLAGS:
            value = getattr(args, name)
            if value is not None:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        if args.no_degrade:
            argv.append("--no-degrade")
        self.log = open(args.server_log, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise SystemExit(f"livediff serve did not start (see {args.server_log}): {line!r}")
        self.url = line.rsplit(" ", 1)[1].strip().rstrip("/")

    async def latency_samples(self) -> list[float]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/stats?samples=1") as response,
        ):
            stats = await response.json()
        return [v for peer in stats["peers"] for v in peer["server_latency_samples_ms"]]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


class MarkerFrames:
    """Test-pattern frames with a counter painted in; remembers when each counter value went out."""

    def __init__(self, width: int = 640, height: int = 480, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.base = np.empty((height, width, 3), np.uint8)
        self.base[:] = rng.integers(40, 216, 3)
        self.sent = np.full(MARKER_MODULUS, np.nan)

    def __call__(self, index: int) -> np.ndarray:
        image = self.base.copy()
        stamp_marker(image, index)
        self.sent[index % MARKER_MODULUS] = time.perf_counter()
        return image


async def run_aiortc(server: Server, sessions: int, args: argparse.Namespace) -> dict[str, Any]:
    clients, sources = [], []
    for index in range(sessions):
        source = MarkerFrames(seed=index)
        client = WebRTCClient(server.url, codec=args.codec)
        await client.connect(ImageTrack(source, fps=args.fps))
        clients.append(client)
        sources.append(source)
    latencies: list[float] = []
    received = [0] * sessions
    measuring = False

    async def consume(index: int) -> None:
        client, source = clients[index], sources[index]
        while True:
            try:
                frame = await client.recv_video_frame()
            except SessionClosedError:
                return
            now = time.perf_counter()
            marker = read_marker(frame.to_ndarray(format="rgb24"))
            if measuring:
                received[index] += 1
                if marker is not None and not np.isnan(source.sent[marker]):
                    latencies.append((now - source.sent[marker]) * 1000.0)

    tasks = [asyncio.ensure_future(consume(i)) for i in range(sessions)]
    await asyncio.sleep(args.warmup)  # the benchmark's warm-up period
    measuring = True
    await asyncio.sleep(args.seconds)  # the measurement window
    measuring = False
    server_ms = await server.latency_samples()
    for client in clients:
        await client.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "latencies": latencies,
        "server_ms": server_ms,
        "fps": float(np.mean(received)) / args.seconds,
    }


async def run_chromium(server: Server, sessions: int, args: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS
        )
        url = f"{server.url}/?autostart=1&src=marker" + (
            f"&codec={args.codec}" if args.codec else ""
        )
        pages = [await browser.new_page() for _ in range(sessions)]
        for page in pages:
            await page.goto(url)
        for page in pages:
            await page.wait_for_function(
                "window.livediff.framesDecoded > 0 || window.livediff.state === 'error'",
                polling=100,
                timeout=300_000,
            )
            state = await page.evaluate("[window.livediff.state, window.livediff.errors]")
            if state[0] != "connected":
                raise SystemExit(f"the page did not connect: {state}")
        await asyncio.sleep(args.warmup)  # the benchmark's warm-up period
        decoded = [
            await page.evaluate("window.livediff.latencies = []; window.livediff.framesDecoded")
            for page in pages
        ]
        await asyncio.sleep(args.seconds)  # the measurement window
        latencies: list[float] = []
        frames = []
        for page, before in zip(pages, decoded, strict=True):
            latencies += await page.evaluate("window.livediff.latencies")
            frames.append(await page.evaluate("window.livediff.framesDecoded") - before)
        server_ms = await server.latency_samples()
        await browser.close()
    return {
        "latencies": latencies,
        "server_ms": server_ms,
        "fps": float(np.mean(frames)) / args.seconds,
    }


async def wait_for_no_peers(server: Server) -> None:
    """Sessions from the previous run must be gone before the next one starts."""
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            async with http.get(f"{server.url}/healthz") as response:
                if (await response.json())["peers"] == 0:
                    return
            await asyncio.sleep(0.1)  # polling the server's own count
    raise SystemExit("sessions of the previous run did not close")


async def benchmark(args: argparse.Namespace, outputs: Sequence[TextIO]) -> None:
    server = Server(args)
    try:
        with HostAddressRestriction(["127.0.0.1"]):
            for client in args.clients:
                for sessions in args.sessions:
                    runner = run_aiortc if client == "aiortc" else run_chromium
                    result = await runner(server, sessions, args)
                    await wait_for_no_peers(server)
                    emit(record(args, client, sessions, result), outputs)
    finally:
        server.stop()


def record(
    args: argparse.Namespace, client: str, sessions: int, result: dict[str, Any]
) -> dict[str, Any]:
    from livediff.models.presets import get_preset

    latencies, server_ms = result["latencies"], result["server_ms"]
    preset = get_preset(args.model)
    return {
        "system": "livediff",
        "suite": "e2e",
        "client": client,
        "codec": args.codec or "default",
        "model": args.model,
        "weights": args.weights or "pretrained",
        "width": args.width or preset.width,
        "height": args.height or preset.height,
        "steps": args.steps or preset.default_steps,
        "mode": args.mode or "img2img",
        "rcfg": args.rcfg or "none",
        "backend": args.backend or "auto",
        "sessions": sessions,
        "fps": round(result["fps"], 2),
        "ms_median": round(percentile(server_ms, 50), 2),
        "ms_p99": round(percentile(server_ms, 99), 2),
        "latency_ms_p50": round(percentile(latencies, 50), 2),
        "latency_ms_p99": round(percentile(latencies, 99), 2),
        "frames": len(latencies),
        "seconds": args.seconds,
        **environment(_device(args)),
    }


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m livediff.bench.e2e", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default=None, help="'random' for an offline run")
    parser.add_argument("--source")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rcfg")
    parser.add_argument("--mode")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument(
        "--backend", choices=("auto", "eager", "compile", "tensorrt"), help="the server's backend"
    )
    parser.add_argument(
        "--config", help="the server's TOML file (e.g. [runtime] batch_buckets = [1, 2, 4])"
    )
    parser.add_argument("--prompt", default="a watercolor painting")
    parser.add_argument("--deadline-ms", type=float)
    parser.add_argument("--max-sessions", type=int)
    parser.add_argument("--no-degrade", action="store_true")
    parser.add_argument("--clients", type=lambda s: s.split(","), default=["aiortc", "chromium"])
    parser.add_argument(
        "--sessions", type=_csv_ints, default=[1, 4], help="comma-separated session counts"
    )
    parser.add_argument("--codec", choices=("vp8", "h264"))
    parser.add_argument("--fps", type=int, default=30, help="frames per second each client sends")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--server-log", default="e2e-server.log")
    parser.add_argument("--out", type=Path, help="append JSON lines to this file as well as stdout")
    parser.add_argument(
        "--netns", action="store_true", help="run inside a loopback-only network namespace"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.netns and not in_loopback_netns():
        command = [
            sys.executable,
            "-m",
            "livediff.bench.e2e",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        return subprocess.run(
            loopback_netns_argv(command), env={**os.environ, "PYTHONUNBUFFERED": "1"}
        ).returncode
    unknown = sorted(set(args.clients) - {"aiortc", "chromium"})
    if unknown:
        raise SystemExit(f"unknown client(s): {', '.join(unknown)}; choose aiortc, chromium")
    if "chromium" in args.clients and not Path(args.chromium).exists():
        print(f"e2e: {args.chromium} not found; skipping the chromium client", file=sys.stderr)
        args.clients = [c for c in args.clients if c != "chromium"]
    outputs: list[TextIO] = [sys.stdout]
    out_file = open(args.out, "a") if args.out else None  # noqa: SIM115
    if out_file is not None:
        outputs.append(out_file)
    try:
        asyncio.run(benchmark(args, outputs))
    finally:
        if out_file is not None:
            out_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
