"""The live streaming runtime: many sessions, one model, one GPU worker, batched across sessions.

>>> engine = Engine(bundle, runtime=RuntimeConfig(deadline_ms=100))
>>> await engine.start()
>>> session = await engine.open_session({"prompt": "a watercolor painting", "strength": 0.5})
>>> session.submit(frame, pts=pts, time_base=time_base)      # never blocks; latest frame wins
>>> out = await session.recv()                                # SessionOutput, uint8 H×W×3 on the host
>>> await session.update(prompt="an oil painting")            # applies at the next frame
>>> await engine.stop()

Threads: the event loop (every public call), one control thread (prompt encoding, building
Streams: :mod:`livediff.engine.session_plans`) and one worker per device (all model compute:
:mod:`livediff.engine.worker`). The event loop never waits on either; results come back through
``loop.call_soon_threadsafe``. How sessions share a UNet call is the scheduler's grouping rule
(:mod:`livediff.engine.batch_planning`); how the engine sheds load is :mod:`livediff.engine.degrade`.

Every public coroutine must be awaited on the loop the engine was first used on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from enum import Enum
from functools import partial
from typing import Any

import prometheus_client
import torch

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradeLevel, DegradePolicy
from livediff.engine.frames import OutputFormat
from livediff.engine.metrics import EngineMetrics, FrameCounts
from livediff.engine.placement import Placement
from livediff.engine.runtime_config import RuntimeConfig
from livediff.engine.session import Session, SessionCore, SessionOutput
from livediff.engine.session_plans import Plan, SwapStream, build_plan, replan
from livediff.engine.worker import Worker
from livediff.exceptions import (
    CapacityError,
    ParameterError,
    SessionClosedError,
    SessionError,
    UsageError,
)
from livediff.models.bundle import ModelBundle

log = logging.getLogger(__name__)
__all__ = ["DegradeLevel", "DegradePolicy", "Engine", "RuntimeConfig", "Session", "SessionOutput"]


class EngineState(str, Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Engine:
    """Sessions over one :class:`ModelBundle`; see the module docstring.

    ``stream_config`` is every session's default structure (resolution, RCFG, frame buffer …);
    ``default_params`` the default live parameters (the preset's strength and steps if ``None``).
    ``clock`` exists for tests that must drive time deterministically (default ``time.monotonic``).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        stream_config: StreamConfig | None = None,
        runtime: RuntimeConfig | None = None,
        default_params: GenerationParams | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bundle = bundle
        self.stream_config = _with_resolution(stream_config or StreamConfig(), bundle)
        self.runtime = runtime or RuntimeConfig()
        self.default_params = default_params or GenerationParams.for_preset(bundle.preset)
        self.state = EngineState.NEW
        self._clock = clock
        self._metrics = EngineMetrics(self.runtime.latency_window)
        self.registry: prometheus_client.CollectorRegistry = self._metrics.registry
        self._sessions: dict[str, Session] = {}
        self._opening = 0
        self._full_since: float | None = None  # clock time every session slot became taken
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livediff-control")
        self._worker = Worker(
            bundle, self.runtime, self._metrics, clock, self._post, self._on_level, self._rebuild
        )
        self._placement = Placement([str(bundle.device)], self.runtime.max_sessions_per_device)
        degrade = self._worker.degrade
        self._metrics.degrade_pressure.set_function(lambda: degrade.pressure)

    # ------------------------------------------------------------------ lifecycle
    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise UsageError("an Engine belongs to the event loop it was first used on")

    async def start(self) -> None:
        """Start the worker thread. Idempotent. Sessions may be opened (and fed) before it."""
        self._bind_loop()
        if self.state is EngineState.STOPPED:
            raise SessionError("this engine was stopped; create a new one")
        if self.state is EngineState.NEW:
            self.state = EngineState.RUNNING
            self._worker.start()
            log.info("[engine] started: %s, %s", self.bundle.describe(), self.runtime)

    async def stop(self) -> None:
        """Close every session (their ``recv()`` raises ``SessionClosedError``: "engine stopped"),
        let the worker finish its batch, and join it. Idempotent; safe to cancel (the shutdown
        still completes in the background).
        """
        if self.state is EngineState.STOPPED:
            return
        self.state = EngineState.STOPPED
        for session in list(self._sessions.values()):
            session.end("engine stopped")
        thread = self._worker.stop()

        def join() -> None:
            if thread is not None:
                thread.join()
            self._control.shutdown(wait=True, cancel_futures=True)

        await asyncio.shield(asyncio.to_thread(join))
        log.info("[engine] stopped")

    async def wait_idle(self) -> None:
        """Return once the worker has nothing left to do: every frame submitted and every update
        made before the call has been answered, skipped or dropped (frames inside a Stream Batch
        pipeline stay there until later frames push them out). Safe to cancel.
        """
        self._bind_loop()
        if self.state is not EngineState.RUNNING:
            raise SessionError(f"the engine is {self.state.value}, not running")
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()

        def resolve() -> None:
            if not future.done():
                future.set_result(None)

        self._worker.when_idle(resolve)
        await future

    def _post(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the event loop (from any thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            log.debug("[engine] event loop closed; dropped a callback")

    # ------------------------------------------------------------------ sessions
    @property
    def sessions(self) -> Mapping[str, Session]:
        return dict(self._sessions)

    async def open_session(
        self,
        params: Mapping[str, Any] | None = None,
        *,
        session_id: str | None = None,
        config: StreamConfig | None = None,
        output: OutputFormat = OutputFormat.RGB,
    ) -> Session:
        """A new session with ``params`` over the engine's defaults (and optionally its own ``config``).

        ``output`` chooses what its outputs hold: RGB arrays, or packed I420 frames converted
        on the device for callers that feed a video encoder.

        Raises ``ParameterError`` for unknown or bad parameters or a duplicate ``session_id``, and
        ``CapacityError`` at ``max_sessions`` or while degraded to refusing sessions. The Stream is
        built on the control thread. Cancelling the call abandons the half-built session cleanly.
        """
        self._bind_loop()
        if self.state is EngineState.STOPPED:
            raise SessionClosedError("the engine is stopped")
        requested = self.default_params.updated(**dict(params or {}))
        stream_config = _with_resolution(config or self.stream_config, self.bundle)
        sid = session_id if session_id is not None else uuid.uuid4().hex[:12]
        if not isinstance(sid, str) or not sid or len(sid) > 128:
            raise ParameterError(
                f"session_id={sid!r}: expected a non-empty string of at most 128 characters"
            )
        if sid in self._sessions:
            raise ParameterError(f"session_id={sid!r} is already open")
        open_now = len(self._sessions) + self._opening
        if open_now >= self.runtime.max_sessions:
            self._metrics.refused("capacity")
            raise CapacityError(
                f"the engine is at capacity: {open_now} of {self.runtime.max_sessions} sessions "
                "(RuntimeConfig.max_sessions); try again when one closes",
                limit=self.runtime.max_sessions,
            )
        if self._worker.snapshot().failed:
            self._metrics.refused("capacity")
            raise CapacityError(
                "the engine's worker failed repeatedly and is down; the server must be restarted"
            )
        worker = self._worker.snapshot()
        if worker.level >= DegradeLevel.REFUSE_SESSIONS:
            self._metrics.refused("degraded")
            raise CapacityError(
                f"the engine is overloaded (degrade level {worker.level.label}; "
                f"{worker.reason}): new sessions are refused until load falls; "
                "open sessions continue",
                retry_after=self.runtime.degrade.window_s * self.runtime.degrade.recover_after,
            )
        if self._placement.acquire(sid) is None:
            self._metrics.refused("capacity")
            raise CapacityError(self._placement.full_message())
        self._opening += 1
        try:
            plan = await asyncio.wrap_future(
                self._control_job(self._build, stream_config, requested, sid)
            )
            if self.state is EngineState.STOPPED:
                raise SessionClosedError("the engine stopped while the session was being opened")
        except BaseException:
            self._placement.release(sid)
            raise
        finally:
            self._opening -= 1
        core = SessionCore(sid, plan, self.runtime.inbox_size, self.runtime.latency_window)
        session = Session(
            core,
            stream_config,
            runtime=self.runtime,
            clock=self._clock,
            metrics=self._metrics,
            wake=self._worker.wake,
            request=self._request,
            on_close=self._closed,
            post=self._post,
            degrade_state=self._degrade_state,
            output_format=OutputFormat(output),
        )
        self._sessions[sid] = session
        self._track_fullness()
        self._metrics.session_opened(sid, len(self._sessions))
        self._worker.add(session)
        # The level may have moved while the Stream was being built.
        if plan.level is not self._worker.degrade.level:
            self._control_job(self._replan, core, plan.requested)
        log.info(
            "[%s] session opened: %dx%d, %d step(s), rcfg %s",
            sid,
            plan.stream.width,
            plan.stream.height,
            plan.stream.batch.steps,
            stream_config.rcfg.value,
        )
        return session

    def _closed(self, session: Session) -> None:
        sid = session.id
        if self._sessions.get(sid) is session:
            del self._sessions[sid]
            self._placement.release(sid)
            self._track_fullness()
        self._worker.remove(session)
        with session.core.lock:
            counts = FrameCounts(**asdict(session.core.metrics.counts))
        self._metrics.session_closed(sid, len(self._sessions), counts)

    # ------------------------------------------------------------------ control thread
    def _control_job(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        def run() -> Any:
            result = fn(*args)
            # The worker's CUDA stream must find this thread's work finished.
            if self.bundle.device.type == "cuda":
                torch.cuda.current_stream(self.bundle.device).synchronize()
            return result

        return self._control.submit(run)

    def _build(self, config: StreamConfig, requested: GenerationParams, sid: str) -> Plan:
        level = self._worker.degrade.level
        return build_plan(self.bundle, config, requested, level, self.runtime.degrade, sid)

    def _replan(self, core: SessionCore, requested: GenerationParams) -> None:
        if core.closed:
            return
        level = self._worker.degrade.level
        item = replan(core.plan, requested, level, self.runtime.degrade, self.bundle, core.id)
        if item is not None:
            core.queue_control(item)
            self._worker.wake()

    def _rebuild(self, session: Session) -> None:
        """Worker thread: ``session`` lost its Stream to a fault; build a new one off the hot path."""

        def build() -> None:
            core = session.core
            if core.closed:
                return
            try:
                plan = self._build(core.plan.config, core.plan.requested, core.id)
            except Exception as exc:
                log.error("[%s] could not rebuild the stream", core.id, exc_info=exc)
                self._post(partial(session.end, f"failed: {type(exc).__name__}: {exc}"))
                return
            core.plan = plan
            core.queue_control(SwapStream(plan.stream))
            self._worker.wake()

        with contextlib.suppress(RuntimeError):  # the control thread is shutting down
            self._control_job(build)

    def _request(self, core: SessionCore, requested: GenerationParams) -> Future[None]:
        return self._control_job(self._replan, core, requested)

    def _on_level(self, level: DegradeLevel) -> None:
        """Worker thread: the degrade level changed; re-plan every session on the control thread."""
        self._metrics.level_changed(int(level), level.label)

        def relevel() -> None:
            for session in list(self._sessions.values()):
                self._replan(session.core, session.core.plan.requested)

        with contextlib.suppress(RuntimeError):  # the control thread is shutting down
            self._control_job(relevel)

    # ------------------------------------------------------------------ metrics
    def _capacity(self) -> int:
        """Sessions this engine can hold at once: ``max_sessions``, or less by the device caps."""
        cap = self._placement.cap
        per_device = (
            self.runtime.max_sessions if cap is None else cap * len(self._placement.devices)
        )
        return min(self.runtime.max_sessions, per_device)

    def _track_fullness(self) -> None:
        full = len(self._sessions) >= self._capacity()
        if not full:
            self._full_since = None
        elif self._full_since is None:
            self._full_since = self._clock()

    def _degrade_state(self) -> dict[str, Any]:
        worker = self._worker.snapshot()
        return {"level": worker.level.label, "reason": worker.reason}

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` reports: sessions against the cap, how long every slot has been
        taken (``None`` when one is free), the degrade level and its reason, a failed worker.
        """
        worker = self._worker.snapshot()
        full_since = self._full_since
        return {
            "sessions": len(self._sessions),
            "max_sessions": self._capacity(),
            "full_for_s": None if full_since is None else self._clock() - full_since,
            "degrade_level": worker.level.label,
            "degrade_reason": worker.reason,
            "failed": worker.failed or self.state is EngineState.STOPPED,
        }

    def metrics(self) -> dict[str, Any]:
        """A snapshot: totals, rates, latency percentiles per stage (ms), batch sizes, degrade
        state, and every open session's ``stats()``. Event loop only.
        """
        per_session = {sid: s.stats() for sid, s in self._sessions.items()}
        totals = FrameCounts(**asdict(self._metrics.closed_counts))
        for session in self._sessions.values():
            with session.core.lock:
                totals.add(session.core.metrics.counts)
        worker = self._worker.snapshot()
        return {
            "state": self.state.value,
            "device": str(self.bundle.device),
            "model": self.bundle.preset.name,
            "sessions": len(self._sessions),
            "max_sessions": self.runtime.max_sessions,
            "frames": {**asdict(totals), "dropped": totals.dropped},
            "fps_in": sum(float(s["fps_in"]) for s in per_session.values()),
            "fps_out": sum(float(s["fps_out"]) for s in per_session.values()),
            "degrade": {
                "level": worker.level.label,
                "level_index": int(worker.level),
                "pressure": worker.pressure,
                "reason": worker.reason,
                "history": [(t.at, t.level.label, round(t.pressure, 3)) for t in worker.history],
            },
            "batch_ms_estimate": worker.batch_ms_estimate,
            "devices": self._placement.loads(),
            "faults": {
                "worker_restarts": worker.restarts,
                "worker_failed": worker.failed,
                "oom_batches": worker.oom_batches,
                "oom_frames": worker.oom_frames,
                "batch_row_cap": worker.row_cap,
            },
            **self._metrics.snapshot(),
            "per_session": per_session,
        }


def _with_resolution(config: StreamConfig, bundle: ModelBundle) -> StreamConfig:
    preset = bundle.preset
    return config.with_resolution(config.width or preset.width, config.height or preset.height)
