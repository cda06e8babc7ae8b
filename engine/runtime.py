"""The live streaming runtime: many sessions, one model, a GPU worker per device, batched.

>>> engine = Engine(bundle, runtime=RuntimeConfig(deadline_ms=100))
>>> await engine.start()
>>> session = await engine.open_session({"prompt": "a watercolor painting", "strength": 0.5})
>>> session.submit(frame, pts=pts, time_base=time_base)      # never blocks; latest frame wins
>>> out = await session.recv()                                # SessionOutput, uint8 H×W×3 on the host
>>> await session.update(prompt="an oil painting")            # applies at the next frame
>>> await engine.stop()

Threads: the event loop (every public call), and per device (:mod:`livediff.engine.devices`)
a control thread (prompt encoding, building Streams: :mod:`livediff.engine.session_plans`) and
a worker (all model compute: :mod:`livediff.engine.worker`). ``Engine([bundle_on_cuda0,
bundle_on_cuda1], …)`` serves on both GPUs: a new session goes to the least-loaded device under
its cap that is neither down nor refusing sessions (:mod:`livediff.engine.placement`), and
stays there. The event loop never waits on another thread; results come back through
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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any

import prometheus_client

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradeLevel, DegradePolicy
from livediff.engine.devices import Device, device_labels
from livediff.engine.faults import FaultMetrics
from livediff.engine.frames import OutputFormat
from livediff.engine.lora_admin import LoraAdmin
from livediff.engine.metrics import EngineMetrics, FrameCounts
from livediff.engine.placement import Placement
from livediff.engine.runtime_config import RuntimeConfig
from livediff.engine.session import Session, SessionCore, SessionOutput
from livediff.engine.session_plans import (
    Plan,
    SwapStream,
    build_plan,
    carry_control_images,
    replan,
)
from livediff.engine.worker import Worker, WorkerSnapshot
from livediff.exceptions import (
    CapacityError,
    ParameterError,
    SessionClosedError,
    SessionError,
    UsageError,
)
from livediff.models.bundle import ModelBundle

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
__all__ = ["DegradeLevel", "DegradePolicy", "Engine", "RuntimeConfig", "Session", "SessionOutput"]


class EngineState(str, Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Engine:
    """Sessions over one model, on one :class:`ModelBundle` per device; see the module docstring.

    ``stream_config`` is every session's default structure (resolution, RCFG, frame buffer …);
    ``default_params`` the default live parameters (the preset's strength and steps if ``None``).
    ``clock`` exists for tests that must drive time deterministically (default ``time.monotonic``).
    """

    def __init__(
        self,
        bundle: ModelBundle | Sequence[ModelBundle],
        stream_config: StreamConfig | None = None,
        runtime: RuntimeConfig | None = None,
        default_params: GenerationParams | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        bundles = (bundle,) if isinstance(bundle, ModelBundle) else tuple(bundle)
        if not bundles:
            raise ParameterError("an engine needs a model on at least one device", field="devices")
        self.bundles = bundles
        self.bundle = bundles[0]  # the model's preset and configs are the same on every device
        self.stream_config = _with_resolution(stream_config or StreamConfig(), self.bundle)
        self.runtime = runtime or RuntimeConfig()
        self.default_params = default_params or GenerationParams.for_preset(self.bundle.preset)
        self.state = EngineState.NEW
        self._clock = clock
        self._metrics = EngineMetrics(self.runtime.latency_window)
        self.registry: prometheus_client.CollectorRegistry = self._metrics.registry
        self._sessions: dict[str, Session] = {}
        self._device_of: dict[str, Device] = {}
        self._opening = 0
        self._opening_params: dict[str, GenerationParams] = {}  # sessions building their Stream
        self._full_since: float | None = None  # clock time every session slot became taken
        self._loop: asyncio.AbstractEventLoop | None = None
        faults = FaultMetrics(self.registry)
        labels = device_labels(bundles)
        self._devices = [
            Device(
                k,
                label,
                device_bundle,
                Worker(
                    device_bundle,
                    self.runtime,
                    self._metrics,
                    clock,
                    self._post,
                    partial(self._on_level, k),
                    self._rebuild,
                    faults=faults.for_device(label),
                    label=label,
                ),
                ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"livediff-control-{label}"),
            )
            for k, (label, device_bundle) in enumerate(zip(labels, bundles, strict=True))
        ]
        self._placement = Placement(labels, self.runtime.max_sessions_per_device)
        devices = self._devices
        self._loras = LoraAdmin(
            [getattr(d.bundle, "loras", None) for d in devices],
            [d.worker.between_batches for d in devices],
            self._lora_uses,
        )
        self._metrics.degrade_pressure.set_function(
            lambda: max(d.worker.degrade.pressure for d in devices)
        )
        per_device = prometheus_client.Gauge(
            "livediff_device_sessions",
            "Open sessions per device",
            ["device"],
            registry=self.registry,
        )
        levels = prometheus_client.Gauge(
            "livediff_device_degrade_level",
            "Degrade level per device (0 normal ... 3 refusing sessions)",
            ["device"],
            registry=self.registry,
        )
        placement = self._placement
        for device in devices:
            per_device.labels(device.label).set_function(
                partial(lambda label: placement.loads()[label], device.label)
            )
            levels.labels(device.label).set_function(
                partial(lambda worker: int(worker.degrade.level), device.worker)
            )

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
            for device in self._devices:
                device.worker.start()
            devices = ", ".join(d.label for d in self._devices)
            log.info(
                "[engine] started on %s: %s, %s", devices, self.bundle.describe(), self.runtime
            )

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
        threads = [device.worker.stop() for device in self._devices]

        def join() -> None:
            for thread in threads:
                if thread is not None:
                    thread.join()
            for device in self._devices:
                device.control.shutdown(wait=True, cancel_futures=True)

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
        futures: list[asyncio.Future[None]] = []
        for device in self._devices:
            future: asyncio.Future[None] = self._loop.create_future()

            def resolve(done: asyncio.Future[None] = future) -> None:
                if not done.done():
                    done.set_result(None)

            device.worker.when_idle(resolve)
            futures.append(future)
        await asyncio.gather(*futures)

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

    def update_defaults(self, **changes: Any) -> GenerationParams:
        """Change the live parameters later sessions start from (open ones keep theirs).

        Checked as :meth:`Session.update` checks them: ``ParameterError`` and nothing changed.
        """
        self.default_params = self.default_params.updated(**changes)
        return self.default_params

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
        device = self._place(sid)
        self._opening += 1
        self._opening_params[sid] = requested
        try:
            plan = await asyncio.wrap_future(
                device.job(self._build, device, stream_config, requested, sid)
            )
            if self.state is EngineState.STOPPED:
                raise SessionClosedError("the engine stopped while the session was being opened")
        except BaseException:
            self._placement.release(sid)
            raise
        finally:
            self._opening -= 1
            self._opening_params.pop(sid, None)
        core = SessionCore(
            sid,
            plan,
            self.runtime.inbox_size,
            self.runtime.latency_window,
            self._metrics.session_series(sid),
        )
        session = Session(
            core,
            stream_config,
            runtime=self.runtime,
            clock=self._clock,
            wake=device.worker.wake,
            request=self._request,
            on_close=self._closed,
            post=self._post,
            degrade_state=partial(self._degrade_state, device),
            output_format=OutputFormat(output),
            device=device.label,
        )
        self._sessions[sid] = session
        self._device_of[sid] = device
        self._track_fullness()
        self._metrics.session_opened(sid, len(self._sessions))
        device.worker.add(session)
        # The level may have moved while the Stream was being built.
        if plan.level is not device.worker.degrade.level:
            device.job(self._replan, core, plan.requested)
        log.info(
            "[%s] session opened on %s: %dx%d, %d step(s), rcfg %s",
            sid,
            device.label,
            plan.stream.width,
            plan.stream.height,
            plan.stream.batch.steps,
            stream_config.rcfg.value,
        )
        return session

    def _place(self, sid: str) -> Device:
        """The device a new session goes to, or ``CapacityError`` saying why there is none."""
        snapshots = [device.snapshot() for device in self._devices]
        up = [k for k, s in enumerate(snapshots) if not s.failed]
        if not up:
            self._metrics.refused("capacity")
            raise CapacityError(
                "the engine's worker failed repeatedly and is down; the server must be restarted"
            )
        taking = [k for k in up if snapshots[k].level < DegradeLevel.REFUSE_SESSIONS]
        if not taking:
            self._metrics.refused("degraded")
            worst = snapshots[up[0]]
            raise CapacityError(
                f"the engine is overloaded (degrade level {worst.level.label}; "
                f"{worst.reason}): new sessions are refused until load falls; "
                "open sessions continue",
                retry_after=self.runtime.degrade.window_s * self.runtime.degrade.recover_after,
            )
        index = self._placement.acquire(sid, allowed=taking)
        if index is None:
            self._metrics.refused("capacity")
            raise CapacityError(self._placement.full_message())
        return self._devices[index]

    def _closed(self, session: Session) -> None:
        sid = session.id
        device = self._device_of.get(sid)
        if self._sessions.get(sid) is session:
            del self._sessions[sid]
            del self._device_of[sid]
            self._placement.release(sid)
            self._track_fullness()
        if device is not None:
            device.worker.remove(session)
        with session.core.lock:
            counts = FrameCounts(**asdict(session.core.metrics.counts))
        self._metrics.session_closed(sid, len(self._sessions), counts)

    # ------------------------------------------------------------------ control threads
    def _build(
        self, device: Device, config: StreamConfig, requested: GenerationParams, sid: str
    ) -> Plan:
        level = device.worker.degrade.level
        return build_plan(device.bundle, config, requested, level, self.runtime.degrade, sid)

    def _replan(self, core: SessionCore, requested: GenerationParams) -> None:
        device = self._device_of.get(core.id)
        if core.closed or device is None:
            return
        level = device.worker.degrade.level
        item = replan(core.plan, requested, level, self.runtime.degrade, device.bundle, core.id)
        if item is not None:
            core.queue_control(item)
            device.worker.wake()

    def _rebuild(self, session: Session) -> None:
        """Worker thread: ``session`` lost its Stream to a fault; build a new one off the hot path."""
        device = self._device_of.get(session.id)
        if device is None:
            return

        def build() -> None:
            core = session.core
            if core.closed:
                return
            try:
                plan = self._build(device, core.plan.config, core.plan.requested, core.id)
            except Exception as exc:
                log.error("[%s] could not rebuild the stream", core.id, exc_info=exc)
                self._post(partial(session.end, f"failed: {type(exc).__name__}: {exc}"))
                return
            carry_control_images(core.plan, plan)
            core.plan = plan
            core.queue_control(SwapStream(plan.stream))
            device.worker.wake()

        with contextlib.suppress(RuntimeError):  # the control thread is shutting down
            device.job(build)

    def _request(self, core: SessionCore, requested: GenerationParams) -> Future[None]:
        device = self._device_of.get(core.id)
        if device is None:  # closed while the update was on its way
            raise SessionClosedError(f"session {core.id} is closed")
        return device.job(self._replan, core, requested)

    def _on_level(self, index: int, level: DegradeLevel) -> None:
        """Worker thread: a device's degrade level changed; re-plan its sessions off the hot path."""
        device = self._devices[index]
        worst = max(d.worker.degrade.level for d in self._devices)
        self._metrics.level_changed(int(worst), worst.label)

        def relevel() -> None:
            for sid, owner in list(self._device_of.items()):
                session = self._sessions.get(sid)
                if owner is device and session is not None:
                    self._replan(session.core, session.core.plan.requested)

        with contextlib.suppress(RuntimeError):  # the control thread is shutting down
            device.job(relevel)

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

    def _worst(self) -> WorkerSnapshot:
        """The device furthest degraded (its level and reason stand for the engine's)."""
        return max((d.snapshot() for d in self._devices), key=lambda w: (w.level, w.pressure))

    def _degrade_state(self, device: Device) -> dict[str, Any]:
        worker = device.snapshot()
        return {"level": worker.level.label, "reason": worker.reason}

    def encode_style_image(self, image_file: bytes) -> str:
        """An uploaded style image → the key ``ip_image`` names it by (blocking: run it in a
        thread; see :mod:`livediff.engine.style_images`)."""
        from livediff.engine.style_images import encode_style_image

        return encode_style_image(self.bundles, image_file)

    async def set_control_image(
        self, session_id: str, controlnet: str, image: bytes | np.ndarray
    ) -> list[str]:
        """Make ``image`` (an image file's bytes, or uint8 RGB ``[H, W, 3]``) the control input
        of ``controlnet`` for session ``session_id`` from its next frame on, until the next
        one (see :mod:`livediff.engine.client_control`); returns the session's ControlNets
        still waiting for their first image. Refusals (``ParameterError``,
        ``InvalidFrameError``) carry ``field="control_image"`` and change nothing; decoding
        runs on the control thread, in order with the session's updates.
        """
        from livediff.engine.client_control import place_control_image

        device = self._device_of.get(session_id)
        session = self._sessions.get(session_id)
        if device is None or session is None:
            raise SessionClosedError(f"session {session_id} is closed")
        core = session.core

        def place() -> list[str]:
            item, waiting = place_control_image(core.plan, device.bundle, controlnet, image)
            core.queue_control(item)
            device.worker.wake()
            return waiting

        return await asyncio.wrap_future(device.job(place))

    async def control_previews(self, session_id: str) -> dict[str, np.ndarray]:
        """The control image each ControlNet of session ``session_id`` took for its newest
        frame, as uint8 RGB ``[H, W, 3]`` by net name, read on the worker thread between two
        batches from the session's UNet inputs (:mod:`livediff.engine.control_previews`)."""
        from livediff.engine.control_previews import read_previews

        device = self._device_of.get(session_id)
        session = self._sessions.get(session_id)
        if device is None or session is None:
            raise SessionClosedError(f"session {session_id} is closed")
        core, bundle = session.core, device.bundle
        return await asyncio.wrap_future(
            device.worker.between_batches(lambda: read_previews(core.stream, bundle))
        )

    def awaiting_control_images(self, session_id: str) -> list[str]:
        """The session's ControlNets fed ``client`` that have no image yet (scale 0 until then)."""
        from livediff.engine.client_control import awaiting

        session = self._sessions.get(session_id)
        if session is None:
            return []
        plan = session.core.plan
        return awaiting(plan.requested, self.bundle, plan.control_images)

    def control_options(self) -> list[dict[str, Any]]:
        """The loaded ControlNets, for clients (``GET /controlnets``): each one's name, the
        preprocessors it takes here and the one it gets by default."""
        from livediff.engine.control_plan import control_options

        return control_options(self.bundles[0])

    # ------------------------------------------------------------------ per-session LoRAs
    def loras(self) -> dict[str, Any]:
        """The loaded per-session LoRAs (``GET /loras``): each one's slot, rank, bytes and how
        many sessions use it, and the store's capacity (``None`` without a library)."""
        return self._loras.describe()

    async def load_lora(
        self, name: str, source: str, *, weight_name: str | None = None
    ) -> dict[str, Any]:
        """Load a LoRA as ``name`` from a file, folder or HF id while sessions stream: the file
        is read in a thread, the device buffers are written on each worker between batches.
        Refusals: :mod:`livediff.engine.lora_admin`."""
        self._bind_loop()
        return (await self._loras.load(name, source, weight_name)).describe()

    async def unload_lora(self, name: str) -> dict[str, Any]:
        """Unload ``name``; ``ConflictError`` while a session uses it, ``NotFoundError`` if unknown."""
        self._bind_loop()
        return (await self._loras.unload(name)).describe()

    def _lora_uses(self) -> dict[str, set[str]]:
        uses = {
            sid: {use.name for use in (*s.params.loras, *s.core.plan.requested.loras)}
            for sid, s in self._sessions.items()
        }
        for sid, params in self._opening_params.items():  # building their Stream right now
            uses.setdefault(sid, set()).update(use.name for use in params.loras)
        return uses

    def feature_bank_frames(self) -> int:
        """The most past frames a session's feature bank may keep here (``feature_bank`` up
        to it), 0 when the server runs no bank (``--feature-bank-frames``)."""
        bank = self.bundles[0].feature_bank
        return bank.frames if bank is not None else 0

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` reports: sessions against the cap, how long every slot has been
        taken (``None`` when one is free), the degrade level (the worst device's) and its
        reason, and whether the engine is down (every device's worker failed for good).
        """
        worst = self._worst()
        full_since = self._full_since
        down = all(d.snapshot().failed for d in self._devices)
        return {
            "sessions": len(self._sessions),
            "max_sessions": self._capacity(),
            "full_for_s": None if full_since is None else self._clock() - full_since,
            "degrade_level": worst.level.label,
            "degrade_reason": worst.reason,
            "failed": down or self.state is EngineState.STOPPED,
            "devices": {d.label: self._device_health(d) for d in self._devices},
        }

    def _device_health(self, device: Device) -> dict[str, Any]:
        worker = device.snapshot()
        return {
            "sessions": self._placement.loads()[device.label],
            "degrade_level": worker.level.label,
            "failed": worker.failed,
        }

    def metrics(self) -> dict[str, Any]:
        """A snapshot: totals, rates, latency percentiles per stage (ms), batch sizes, degrade
        state (the worst device's, and each device's under ``per_device``), faults (summed over
        devices), and every open session's ``stats()``. Event loop only.
        """
        per_session = {sid: s.stats() for sid, s in self._sessions.items()}
        totals = FrameCounts(**asdict(self._metrics.closed_counts))
        for session in self._sessions.values():
            with session.core.lock:
                totals.add(session.core.metrics.counts)
        snapshots = {d.label: d.snapshot() for d in self._devices}
        worst = self._worst()
        loads = self._placement.loads()
        return {
            "state": self.state.value,
            "device": ",".join(snapshots),
            "model": self.bundle.preset.name,
            "sessions": len(self._sessions),
            "max_sessions": self.runtime.max_sessions,
            "frames": {**asdict(totals), "dropped": totals.dropped},
            "fps_in": sum(float(s["fps_in"]) for s in per_session.values()),
            "fps_out": sum(float(s["fps_out"]) for s in per_session.values()),
            "degrade": {
                "level": worst.level.label,
                "level_index": int(worst.level),
                "pressure": worst.pressure,
                "reason": worst.reason,
                "history": [(t.at, t.level.label, round(t.pressure, 3)) for t in worst.history],
            },
            "batch_ms_estimate": _merged(
                {label: w.batch_ms_estimate for label, w in snapshots.items()}
            ),
            "devices": loads,
            "per_device": {
                label: {
                    "sessions": loads[label],
                    "degrade_level": w.level.label,
                    "pressure": w.pressure,
                    "failed": w.failed,
                    "worker_restarts": w.restarts,
                    "oom_batches": w.oom_batches,
                    "batch_row_cap": w.row_cap,
                }
                for label, w in snapshots.items()
            },
            "faults": {
                "worker_restarts": sum(w.restarts for w in snapshots.values()),
                "worker_failed": all(w.failed for w in snapshots.values()),
                "oom_batches": sum(w.oom_batches for w in snapshots.values()),
                "oom_frames": sum(w.oom_frames for w in snapshots.values()),
                "batch_row_cap": min(w.row_cap for w in snapshots.values()),
            },
            **self._metrics.snapshot(),
            "per_session": per_session,
        }


def _merged(per_device: dict[str, dict[str, float]]) -> dict[str, float]:
    """One device: its estimates as they are; several: each key prefixed with its device."""
    if len(per_device) == 1:
        return next(iter(per_device.values()))
    return {
        f"{label}/{key}": value
        for label, values in per_device.items()
        for key, value in values.items()
    }


def _with_resolution(config: StreamConfig, bundle: ModelBundle) -> StreamConfig:
    preset = bundle.preset
    return config.with_resolution(config.width or preset.width, config.height or preset.height)
