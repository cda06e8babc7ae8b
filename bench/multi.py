"""The ``multi`` suite: N live sessions on one device, batched by livediff vs N independent Streams.

    python -m livediff.bench.multi                      # sd-turbo architecture, random weights, 512², 1 step
    python -m livediff.bench.multi --model tiny --weights random --sessions 1,2 --seconds 2   # CPU smoke

For every session count N, N sources each deliver a ``--frame-size``² uint8 frame every
1/``--fps`` seconds for ``--warmup`` + ``--seconds`` seconds; only the last ``--seconds`` count.

- ``livediff``: one :class:`~livediff.engine.runtime.Engine` (cross-session batching, EDF,
  deadline drops; degrading off unless ``--degrade``). A producer task per session submits on
  schedule, a consumer task per session receives.
- ``livediff-overlap``: the same with ``overlap = "auto"`` (on CUDA: the next batch is
  gathered and launched while the current one runs; the default, ``off``, waits for and
  answers each batch before gathering the next). Measure both in one run to compare.
  Records say which ran in ``overlap`` (``"on"``/``"off"``); files made at commit 5709da6
  name the overlapped system ``livediff`` and the other ``livediff-serial``.
- ``independent``: N :class:`~livediff.engine.stream.Stream` objects, each in its own thread
  (and CUDA stream), each answering the newest frame of its source whenever it is free (latest
  wins) and syncing per frame — N separate StreamDiffusion-style pipelines on one GPU.

Each JSON line (see :mod:`livediff.bench.records`) adds: ``fps`` = outputs per second over all
sessions; ``ms_median``/``ms_p99`` = compute time per generated frame (livediff: device time of
a batch ÷ its frames; independent: wall time of one synced ``Stream.process``, which shares the
device with the other N-1 streams); ``latency_ms_p50``/``latency_ms_p99`` = source arrival →
output on the host; ``drop_rate`` = 1 − answered ÷ delivered frames; ``gpu_mem_peak_mb``;
``session_state_mb`` = device memory allocated by opening the sessions ÷ N (livediff on CUDA:
each session's latents, noise and embeddings; measured after one session was opened and
closed, so the first prompt encoding's one-off workspaces are not counted); ``warmup_s``
(independent) = the slowest thread's warm-up before the clock started (threads warm one at a
time); ``batch_stage_ms_p50``
(livediff) = median device ms per batch in encode (pack + VAE encode), unet (Stream Batch
inputs + UNet) and decode (scheduler step + VAE decode + postprocess + host copy), and
``batch_rows_p50`` the median UNet rows per batch — where a batch's time goes;
``drops_by_reason`` (livediff) = the engine's drops by reason (``inbox``: replaced by a newer
frame before a batch took it, ``deadline``, ``reconfigure``, ``outbox``) and ``late`` = frames
answered after their deadline, both counted from the window's start to the end of the run
(``None`` for independent) — why frames were lost.
``skip_rate`` = similarity-filter skips ÷ answered frames; ``gpu_busy_ms_per_s`` = compute time
of the outputs finished in the window ÷ its seconds (livediff: device time, so 1000 means the
device never idles); ``gpu_ms_per_output`` = the same ÷ outputs.

The similarity filter's saving: ``--scene static`` makes every source a still picture with
camera-like sensor noise (``--noise`` levels), and ``--similarity-threshold off,0.98`` measures
each session count without and with the filter::

    python -m livediff.bench.multi --scene static --similarity-threshold off,0.98 --sessions 1,16

A PNG of throughput and latency against sessions goes to ``--plot`` (needs matplotlib; where
it is missing, e.g. on a bare GPU machine, the script says so and the plot can be drawn
later from the JSON lines: ``python -m livediff.bench.multi --replot results.jsonl --plot out.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livediff.bench.plots import draw_or_explain, replot, save_figure
from livediff.bench.records import (
    emit,
    environment,
    gpu_memory_peak_mb,
    percentile,
    record_sinks,
    reset_memory,
)
from livediff.engine.backend_fit import fit_degrade_to_bundle, make_stream
from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.metrics import DROP_REASONS
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.runtime_config import BatchOverlap, ControlNetRows
from livediff.engine.session import SessionOutput
from livediff.exceptions import SessionClosedError
from livediff.models.backends import Backend, prepare_backend, runtime_bundle
from livediff.models.bank_tokens import BankTokens
from livediff.models.bundle import ModelBundle
from livediff.models.loading import ModelSpec, load_model
from livediff.settings.flags import add_setting_flag


@dataclass
class Tally:
    """What one system did in the measured window."""

    delivered: int = 0
    latency_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    done_in_window: int = 0
    skipped: int = 0  # answered frames (arrived in the window) that the similarity filter skipped
    busy_ms: float = 0.0  # compute time of the outputs finished in the window
    session_state_mb: float | None = None  # device memory one open session holds (CUDA only)
    warmup_s: float = 0.0  # independent: the slowest thread's warm-up, before the clock started
    batch_stage_ms: dict[str, float | None] | None = None  # livediff: median device ms per batch
    batch_rows: float | None = None  # livediff: median UNet rows per batch
    # livediff: the engine's frame counters from the window's start to the end of the run
    drops_by_reason: dict[str, int] | None = None
    late: int | None = None

    def record(
        self,
        t_arrival: float,
        t_done: float,
        compute_ms: float | None,
        window: tuple[float, float],
        skipped: bool = False,
    ) -> None:
        if window[0] <= t_arrival < window[1]:
            self.latency_ms.append((t_done - t_arrival) * 1000.0)
            self.skipped += skipped
            if compute_ms is not None and not skipped:
                self.compute_ms.append(compute_ms)
        if window[0] <= t_done < window[1]:
            self.done_in_window += 1
            if compute_ms is not None and not skipped:
                self.busy_ms += compute_ms


class Scene(str, Enum):
    """What the sources show: ``moving`` changes every frame, ``static`` is a still picture."""

    MOVING = "moving"
    STATIC = "static"


def source_frames(
    size: int, count: int, seed: int, scene: Scene = Scene.MOVING, noise: int = 2
) -> list[np.ndarray]:
    """``count`` frames for one source: random pictures, or one picture plus ±``noise`` levels."""
    rng = np.random.default_rng(seed)
    if scene is Scene.MOVING:
        return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    still = rng.integers(0, 256, (size, size, 3), dtype=np.int16)
    return [
        np.clip(still + rng.integers(-noise, noise + 1, still.shape), 0, 255).astype(np.uint8)
        for _ in range(count)
    ]


def parse_thresholds(text: str) -> list[float | None]:
    """``"off,0.98"`` → ``[None, 0.98]`` (``off`` runs without the similarity filter)."""
    values: list[float | None] = []
    for item in (v.strip() for v in text.split(",")):
        if item.lower() in ("off", "none", ""):
            values.append(None)
            continue
        value = float(item)
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"similarity threshold {value} is not in [0, 1]")
        values.append(value)
    return values


# ---------------------------------------------------------------------- livediff
async def run_livediff(
    bundle: ModelBundle,
    config: StreamConfig,
    params: GenerationParams,
    args: argparse.Namespace,
    sessions: int,
    overlap: BatchOverlap = BatchOverlap.OFF,
    *,
    controlnet_rows: ControlNetRows = ControlNetRows.SHARED,
    open_params: Callable[[int], dict[str, Any]] | None = None,
    on_output: Callable[[int, SessionOutput], None] | None = None,
    during: Callable[[Engine, tuple[float, float]], Awaitable[None]] | None = None,
) -> Tally:
    """``sessions`` sessions streaming at ``args.fps``. ``open_params(k)``: session ``k``'s
    settings (default ``{"seed": k}``); ``on_output(k, out)``: sees every output; ``during``:
    runs alongside the sources (given the engine and the measured window)."""
    runtime = RuntimeConfig(
        overlap=overlap,
        controlnet_rows=controlnet_rows,
        deadline_ms=args.deadline_ms,
        max_sessions=max(sessions, 1),
        batch_buckets=args.buckets,
        degrade=fit_degrade_to_bundle(DegradePolicy(enabled=args.degrade), bundle),
    )
    engine = Engine(bundle, config, runtime, params)
    await engine.start()
    cuda = bundle.device.type == "cuda"
    # One session opened and closed first: the first prompt encoding allocates library
    # workspaces once per process, which are not any session's state.
    await (await engine.open_session({"seed": sessions})).close()
    before = torch.cuda.memory_allocated(bundle.device) if cuda else 0
    settings = open_params or (lambda k: {"seed": k})
    handles = [await engine.open_session(settings(k)) for k in range(sessions)]
    loop = asyncio.get_running_loop()
    period = 1.0 / args.fps
    start = loop.time() + 0.2
    window = (start + args.warmup, start + args.warmup + args.seconds)
    tally = Tally()
    if cuda and sessions:  # Streams are built on the control thread; all are open by now
        grown = torch.cuda.memory_allocated(bundle.device) - before
        tally.session_state_mb = round(grown / sessions / 2**20, 2)

    async def produce(k: int) -> None:
        frames = source_frames(args.frame_size, 8, k, args.scene, args.noise)
        index = 0
        while (t := start + index * period) < window[1]:
            await asyncio.sleep(max(0.0, t - loop.time()))  # pacing the source, not synchronisation
            handles[k].submit(frames[index % len(frames)], pts=index)
            if t >= window[0]:
                tally.delivered += 1
            index += 1

    async def consume(k: int) -> None:
        try:
            while True:
                out = await handles[k].recv()
                if on_output is not None:
                    on_output(k, out)
                tally.record(out.t_arrival, out.t_done, out.compute_ms, window, out.skipped)
        except SessionClosedError:
            pass

    counts_at_start: dict[str, int] = {}

    async def count_from_window() -> None:
        await asyncio.sleep(max(0.0, window[0] - loop.time()))
        counts_at_start.update(engine.metrics()["frames"])

    consumers = [asyncio.create_task(consume(k)) for k in range(sessions)]
    side = [during(engine, window)] if during is not None else []
    await asyncio.gather(*(produce(k) for k in range(sessions)), count_from_window(), *side)
    await engine.wait_idle()
    snapshot = engine.metrics()  # its windows hold the latest batches, i.e. the measured ones
    counts = {k: v - counts_at_start.get(k, 0) for k, v in snapshot["frames"].items()}
    tally.drops_by_reason = {reason: counts[f"dropped_{reason}"] for reason in DROP_REASONS}
    tally.late = counts["late"]
    tally.batch_stage_ms = {
        stage: _rounded(snapshot["latency_ms"][stage]["p50"]) for stage in BATCH_STAGES
    }
    tally.batch_rows = snapshot["batch_rows"]["p50"]
    await engine.stop()
    await asyncio.gather(*consumers)
    return tally


# ---------------------------------------------------------------------- independent
def run_independent(
    bundle: ModelBundle,
    backend: Backend,
    config: StreamConfig,
    params: GenerationParams,
    args: argparse.Namespace,
    sessions: int,
) -> Tally:
    streams = [
        make_stream(bundle, backend, config, params.updated(seed=k)) for k in range(sessions)
    ]
    period = 1.0 / args.fps
    tally = Tally()
    lock = threading.Lock()
    clock = _Clock()

    def start_clock() -> None:  # run by the barrier once every party is ready
        clock.start = time.monotonic() + 0.2
        clock.window = (clock.start + args.warmup, clock.start + args.warmup + args.seconds)
        clock.total = math.ceil((clock.window[1] - clock.start) / period)
        in_window = sum(
            1 for i in range(clock.total) if clock.start + i * period >= clock.window[0]
        )
        tally.delivered = sessions * in_window

    # Every thread warms its own stream (first calls compile, autotune and capture graphs, and a
    # thread's first device work has set-up costs of its own) before the clock starts, as the
    # batched engine is warmed: otherwise the baseline measures its warm-up. One thread at a
    # time: the first compiles, the others reuse its compiled code and only capture their own
    # graphs, instead of all compiling the same code at once.
    ready = threading.Barrier(sessions + 1, action=start_clock)
    warming = threading.Lock()

    def serve(k: int) -> None:
        try:
            measure(k)
        except BaseException:
            ready.abort()  # the main thread stops waiting and the other threads stop
            raise

    def measure(k: int) -> None:
        frames = source_frames(args.frame_size, 8, k, args.scene, args.noise)
        cuda = bundle.device.type == "cuda"
        context = torch.cuda.stream(torch.cuda.Stream(bundle.device)) if cuda else _null()
        last = -1
        with context, torch.inference_mode():
            with warming:
                began = time.monotonic()
                for frame in source_frames(args.frame_size, 3, sessions + k):
                    for out in streams[k].process(frame):
                        out.image.cpu()
                warmed = time.monotonic() - began
            with lock:
                tally.warmup_s = max(tally.warmup_s, warmed)
            try:
                ready.wait()
            except threading.BrokenBarrierError:
                return  # the main thread gave up waiting and reports it
            start, total = clock.start, clock.total
            while True:
                newest = min(total - 1, math.floor((time.monotonic() - start) / period))
                if newest <= last:
                    if last == total - 1:
                        return
                    time.sleep(
                        max(0.0, start + (last + 1) * period - time.monotonic())
                    )  # next arrival
                    continue
                arrival = start + newest * period
                began = time.monotonic()
                outputs = streams[k].process(frames[newest % len(frames)])
                for out in outputs:
                    out.image.cpu()  # the frame on the host: one sync per frame
                done = time.monotonic()
                skipped = any(out.skipped for out in outputs)
                with lock:
                    tally.record(arrival, done, (done - began) * 1000.0, clock.window, skipped)
                last = newest

    threads = [
        threading.Thread(target=serve, args=(k,), name=f"independent-{k}") for k in range(sessions)
    ]
    for thread in threads:
        thread.start()
    try:
        ready.wait(timeout=args.independent_warmup_s)
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join()
        raise SystemExit(
            f"{sessions} independent streams did not get warm within "
            f"{args.independent_warmup_s:.0f} s (--independent-warmup-s) or one of them failed"
        ) from None
    for thread in threads:
        thread.join()
    return tally


BATCH_STAGES = ("encode", "unet", "decode")  # see livediff.engine.batch_step
# The livediff systems and the overlap each runs with (see the module docstring).
LIVEDIFF_SYSTEMS = {"livediff": BatchOverlap.OFF, "livediff-overlap": BatchOverlap.AUTO}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class _Clock:
    """When the independent streams' measurement starts (set once all of them are warm)."""

    start: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)
    total: int = 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---------------------------------------------------------------------- records and plot
def record(
    system: str,
    tally: Tally,
    bundle: ModelBundle,
    config: StreamConfig,
    params: GenerationParams,
    args: argparse.Namespace,
    sessions: int,
) -> dict[str, Any]:
    answered = len(tally.latency_ms)
    threshold = params.similarity_threshold
    return {
        "system": system,
        "suite": "multi",
        "model": bundle.preset.name,
        "weights": bundle.weights.value,
        "width": config.width,
        "height": config.height,
        "steps": args.steps,
        "mode": config.mode.value,
        "rcfg": config.rcfg.value,
        "sessions": sessions,
        "fps": round(tally.done_in_window / args.seconds, 2),
        "ms_median": round(percentile(tally.compute_ms, 50), 3),
        "ms_p99": round(percentile(tally.compute_ms, 99), 3),
        "latency_ms_p50": round(percentile(tally.latency_ms, 50), 3),
        "latency_ms_p99": round(percentile(tally.latency_ms, 99), 3),
        "drop_rate": round(1.0 - answered / tally.delivered, 4) if tally.delivered else None,
        "scene": args.scene.value,
        "similarity_threshold": threshold,
        "overlap": effective_overlap(system, bundle.device),
        "skip_rate": round(tally.skipped / answered, 4) if answered else None,
        "gpu_busy_ms_per_s": round(tally.busy_ms / args.seconds, 2),
        "gpu_ms_per_output": (
            round(tally.busy_ms / tally.done_in_window, 3) if tally.done_in_window else None
        ),
        "gpu_mem_peak_mb": gpu_memory_peak_mb(bundle.device),
        "session_state_mb": tally.session_state_mb,
        "warmup_s": round(tally.warmup_s, 2) if system == "independent" else None,
        "batch_stage_ms_p50": tally.batch_stage_ms,
        "batch_rows_p50": tally.batch_rows,
        "drops_by_reason": tally.drops_by_reason,
        "late": tally.late,
        "input_fps": args.fps,
        "frame_size": args.frame_size,
        "feature_bank": params.feature_bank,
        "feature_fusion": params.feature_fusion if params.feature_bank else None,
        "feature_bank_tokens": BankTokens(args.feature_bank_tokens).value
        if params.feature_bank
        else None,
        "feature_bank_reduce_from": args.feature_bank_reduce_from if params.feature_bank else None,
        "latent_feedback": params.latent_feedback,
        "seconds": args.seconds,
        "backend": args.backend,
        "dtype": str(bundle.dtype).removeprefix("torch."),
        **environment(bundle.device),
    }


def effective_overlap(system: str, device: torch.device) -> str | None:
    """``"on"``/``"off"`` for a livediff system (``auto`` means on for CUDA), else ``None``."""
    overlap = LIVEDIFF_SYSTEMS.get(system)
    if overlap is None:
        return None
    on = overlap is BatchOverlap.ON or (overlap is BatchOverlap.AUTO and device.type == "cuda")
    return "on" if on else "off"


def line_name(record: dict[str, Any]) -> str:
    """The plot line a record belongs to: ``independent``, ``livediff`` or ``livediff, overlap``."""
    if record["system"] == "independent":
        return "independent"
    return "livediff, overlap" if record.get("overlap") == "on" else "livediff"


def curve(
    records: Sequence[dict[str, Any]], line: str, threshold: float | None
) -> list[dict[str, Any]]:
    """One line of the plot: ``line``'s records at ``threshold`` by session count, ascending.

    A session count measured twice (runs appended to one file) is drawn from its last record.
    """
    latest = {
        r["sessions"]: r
        for r in records
        if line_name(r) == line and r.get("similarity_threshold") == threshold
    }
    return [latest[n] for n in sorted(latest)]


def plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4))
    thresholds = sorted({r.get("similarity_threshold") for r in records}, key=lambda t: t or 0.0)
    for line, marker in (("livediff", "o"), ("livediff, overlap", "^"), ("independent", "s")):
        for threshold in thresholds:
            rows = curve(records, line, threshold)
            if not rows:
                continue
            name = line if threshold is None else f"{line}, similarity {threshold}"
            sessions = [r["sessions"] for r in rows]
            throughput.plot(sessions, [r["fps"] for r in rows], marker=marker, label=name)
            latency.plot(
                sessions, [r["latency_ms_p50"] for r in rows], marker=marker, label=f"{name} p50"
            )
            latency.plot(
                sessions,
                [r["latency_ms_p99"] for r in rows],
                marker=marker,
                linestyle="--",
                label=f"{name} p99",
            )
    first = records[0]
    title = f"{first['model']} {first['width']}² {first['steps']} step, {first['device']}"
    throughput.set(xlabel="sessions", ylabel="output fps (all sessions)", title=title)
    latency.set(yscale="log", xlabel="sessions", ylabel="arrival → output (ms)", title="latency")
    counts = sorted({r["sessions"] for r in records})
    for axes in (throughput, latency):
        axes.set_xscale("log", base=2)
        axes.set_xticks(counts, [str(c) for c in counts])
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    save_figure(plt, figure, path)


# ---------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m livediff.bench.multi", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default="random")
    parser.add_argument(
        "--sessions", default="1,2,4,8,16,32", help="comma-separated session counts"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured seconds first (default 3 on CUDA, 1 on CPU)",
    )
    parser.add_argument(
        "--fps", type=float, default=30.0, help="frames per second from each source"
    )
    parser.add_argument("--frame-size", type=int, default=512, help="source frames are N×N")
    parser.add_argument(
        "--scene", type=Scene, choices=list(Scene), default=Scene.MOVING, help="what sources show"
    )
    parser.add_argument(
        "--noise", type=int, default=2, help="static scene: sensor noise in ±levels (default 2)"
    )
    parser.add_argument(
        "--similarity-threshold",
        type=parse_thresholds,
        default=[None],
        help="comma-separated thresholds to measure, 'off' for none (default: off)",
    )
    parser.add_argument("--max-skip-frames", type=int, default=10)
    parser.add_argument(
        "--feature-bank", type=int, default=0, help="every session's feature bank frames (0: none)"
    )
    for setting in ("feature_bank_tokens", "feature_bank_reduce_from"):  # as serve's flags
        add_setting_flag(parser, ModelSpec, setting, flag="--" + setting.replace("_", "-"))
    parser.add_argument("--feature-fusion", type=float, default=0.8)
    parser.add_argument("--latent-feedback", type=float, default=0.0)
    parser.add_argument(
        "--width", type=int, default=None, help="model resolution (default: the preset's)"
    )
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    add_setting_flag(parser, RuntimeConfig, "batch_buckets", flag="--buckets")
    parser.add_argument("--degrade", action="store_true", help="let the engine degrade under load")
    parser.add_argument("--backend", choices=[b.value for b in Backend], default="eager")
    parser.add_argument("--systems", default="livediff,independent")
    parser.add_argument(
        "--independent-warmup-s",
        type=float,
        default=600.0,
        help="give up when the independent streams are not warm after this long",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file as well")
    parser.add_argument("--plot", type=Path, default=Path("bench/results/multi.png"))
    parser.add_argument("--replot", type=Path, help="only draw --plot from these JSON lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot, plot)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if args.warmup is None:
        args.warmup = 3.0 if device.type == "cuda" else 1.0
    bundle = load_model(
        ModelSpec(preset=args.model, weights=args.weights), device=device, dtype=dtype
    )
    if args.feature_bank:  # rows for the largest session count: steps rows per session
        most = max(int(v) for v in args.sessions.split(","))
        rows = most * args.steps * (2 if "independent" in args.systems else 1)
        bundle = bundle.with_feature_bank(
            frames=args.feature_bank,
            rows=rows,
            tokens=BankTokens(args.feature_bank_tokens),
            reduce_from=args.feature_bank_reduce_from,
        )
    backend = Backend(args.backend)
    bundle = prepare_backend(bundle, backend)
    config = StreamConfig(
        width=args.width or bundle.preset.width, height=args.height or bundle.preset.height
    )
    factor = bundle.vae_scale_factor
    assert config.width is not None and config.height is not None
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    batched = bundle  # compiled graphs per bucket only when a livediff system runs
    if any(system in LIVEDIFF_SYSTEMS for system in systems):
        batched = runtime_bundle(
            bundle,
            backend,
            latent_size=(config.height // factor, config.width // factor),
            buckets=args.buckets,
        )
    base = GenerationParams.for_preset(
        bundle.preset,
        steps=args.steps,
        max_skip_frames=args.max_skip_frames,
        feature_bank=args.feature_bank,
        bank_interval=1,
        feature_fusion=args.feature_fusion,
        latent_feedback=args.latent_feedback,
    )
    records: list[dict[str, Any]] = []
    with record_sinks(args.out) as outputs:
        for sessions in (int(v) for v in args.sessions.split(",")):
            for threshold in args.similarity_threshold:
                params = base.updated(similarity_threshold=threshold)
                for system in systems:
                    reset_memory(device)
                    if system in LIVEDIFF_SYSTEMS:
                        overlap = LIVEDIFF_SYSTEMS[system]
                        tally = asyncio.run(
                            run_livediff(batched, config, params, args, sessions, overlap)
                        )
                    elif system == "independent":
                        tally = run_independent(bundle, backend, config, params, args, sessions)
                    else:
                        raise SystemExit(
                            f"unknown system {system!r}: expected livediff, livediff-overlap "
                            "or independent"
                        )
                    records.append(record(system, tally, bundle, config, params, args, sessions))
                    emit(records[-1], outputs)
    draw_or_explain(records, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
