"""The compute thread: one per device, it alone runs the model and touches the sessions' Streams.

Each round it applies queued control items (prepared updates, new Streams), picks the next
batch (:mod:`livediff.engine.batch_planning`), takes one frame from each chosen session, drops
frames that cannot make their deadline (unless they fit in the batch's padded rows), asks the similarity filter (a host-side signal, no
device sync; a skipped frame is answered at once with the previous output and leaves the
batch), then runs the rest as one batched encode → UNet → decode (:mod:`livediff.engine.batch_packing`).

On CUDA the thread runs on its own CUDA stream, inputs are staged in pinned memory, outputs are
copied back with ``non_blocking`` copies into pinned memory, and the one host wait per batch is
on a CUDA event recorded after those copies. Stage times come from CUDA events read after that
wait. On CPU every op is synchronous and stage times are read from the clock.

Results reach the event loop only through ``post`` (``loop.call_soon_threadsafe``): the loop
never waits for this thread. The thread never sleeps: with nothing to do it waits on a
condition that ``submit`` / ``update`` / ``close`` notify (with a timeout only while degraded,
so an idle engine still recovers).

Overlap (``RuntimeConfig.overlap``, off by default): a launched batch is not waited
for at once. The thread waits until shortly before the batch is expected to end (its smoothed
batch time, less the smoothed host time of gathering and launching a batch), gathers and
launches the next batch behind it on the same CUDA stream, and only then waits for the first
and answers it. The device goes from one batch to the next without waiting for the host; the
frames of the next batch are gathered as late as they would have been without overlap. A
skip of a session that has a batch in flight is answered after that batch, in order.

Faults (out of device memory in a batch, the thread itself failing) are handled as
:mod:`livediff.engine.faults` describes: the batch's sessions degrade, or the worker's sessions
end and a new thread takes over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from livediff.engine.batch_planning import (
    BatchTimeEstimator,
    Candidate,
    GroupKey,
    bucket_for,
    group_key,
    late_riders,
    plan_batch,
    should_drop,
)
from livediff.engine.batch_step import BatchStep, Entry
from livediff.engine.degrade import DegradeController, DegradeLevel, Transition
from livediff.engine.faults import DeviceFaultMetrics, FaultHandler, is_out_of_memory
from livediff.engine.metrics import EngineMetrics
from livediff.engine.overlap import InFlight, OverlapClock
from livediff.engine.runtime_config import BatchOverlap, ControlNetRows
from livediff.engine.session import QueuedFrame, Session
from livediff.engine.session_plans import SetControlImage, SwapStream
from livediff.exceptions import SessionError

if TYPE_CHECKING:
    from livediff.engine.runtime_config import RuntimeConfig
    from livediff.engine.session_plans import ControlItem
    from livediff.engine.stream import Stream
    from livediff.models.bundle import ModelBundle

log = logging.getLogger(__name__)
Post = Callable[[Callable[[], None]], None]


@dataclass(frozen=True)
class WorkerSnapshot:
    """A worker's state for metrics and health: degrade level, batch estimates, faults."""

    level: DegradeLevel
    pressure: float
    reason: str | None
    history: tuple[Transition, ...]
    batch_ms_estimate: dict[str, float]
    restarts: int
    failed: bool
    oom_batches: int
    oom_frames: int
    row_cap: int


class Worker:
    """The compute thread of one device; see the module docstring."""

    def __init__(
        self,
        bundle: ModelBundle,
        runtime: RuntimeConfig,
        metrics: EngineMetrics,
        clock: Callable[[], float],
        post: Post,
        on_level: Callable[[DegradeLevel], None],
        rebuild: Callable[[Session], None],
        *,
        faults: DeviceFaultMetrics,
        label: str | None = None,
    ) -> None:
        self.bundle = bundle
        self.label = label or str(bundle.device)  # the device's name in placement and metrics
        self.runtime = runtime
        self.metrics = metrics
        self.clock = clock
        self.post = post
        self.on_level = on_level
        self.rebuild = rebuild
        self.cuda = bundle.device.type == "cuda"
        self.runner = BatchStep(bundle, runtime, metrics, clock, post)
        self.estimator = BatchTimeEstimator(runtime.batch_time_smoothing)
        self.degrade = DegradeController(runtime.degrade, clock())
        self.faults = FaultHandler(
            runtime.batch_buckets, faults, self.degrade, post, rebuild, cuda=self.cuda
        )
        self.failed = False  # down for good: it failed more often than the restart budget allows
        self._cond = threading.Condition()
        self._signalled = False
        self._stopping = False
        self._sessions: dict[str, tuple[int, Session]] = {}
        self._opened = 0
        self._idle_waiters: list[Callable[[], None]] = []
        self._between_batches: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._thread: threading.Thread | None = None
        overlap = runtime.overlap
        self.overlap = overlap is BatchOverlap.ON or (overlap is BatchOverlap.AUTO and self.cuda)
        self._in_flight: InFlight | None = None
        self.timing = OverlapClock(runtime.batch_time_smoothing, clock)

    # ------------------------------------------------------------------ event loop side
    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._start_thread()

    def _start_thread(self) -> None:
        """Under ``_cond``: a new compute thread (at start, and after a failure)."""
        name = f"livediff-worker-{self.label}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def snapshot(self) -> WorkerSnapshot:
        """What the engine's metrics and health read of this worker (any thread; plain reads)."""
        degrade, faults = self.degrade, self.faults
        return WorkerSnapshot(
            level=degrade.level,
            pressure=degrade.pressure,
            reason=degrade.reason,
            history=tuple(degrade.history),
            batch_ms_estimate=self.estimator.snapshot(),
            restarts=faults.restarts.total,
            failed=self.failed,
            oom_batches=faults.metrics.oom_batch_count,
            oom_frames=faults.metrics.oom_frame_count,
            row_cap=faults.row_cap.value,
        )

    def stop(self) -> threading.Thread | None:
        """Ask the thread to finish its current batch and exit; returns it, to be joined."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            return self._thread

    def wake(self) -> None:
        with self._cond:
            self._signalled = True
            self._cond.notify()

    def add(self, session: Session) -> None:
        with self._cond:
            self._sessions[session.id] = (self._opened, session)
            self._opened += 1
            self._signalled = True
            self._cond.notify()

    def remove(self, session: Session) -> None:
        with self._cond:
            self._sessions.pop(session.id, None)

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Post ``callback`` once the worker next finds nothing to do."""
        with self._cond:
            self._idle_waiters.append(callback)
            self._signalled = True
            self._cond.notify()

    def between_batches(self, job: Callable[[], Any]) -> Future[Any]:
        """Run ``job`` on this thread before the next batch is gathered (device buffer writes,
        e.g. loading a LoRA into its slot), ordered on the worker's CUDA stream after every
        batch launched before it; the future holds its result or its exception. Without a
        running thread (not started yet, or stopped) the job runs in the caller's thread.
        """
        future: Future[Any] = Future()
        with self._cond:
            running = self._thread is not None and not self._stopping and not self.failed
            if running:
                self._between_batches.append((job, future))
                self._signalled = True
                self._cond.notify()
        if not running:
            _run_job(job, future)
        return future

    def _run_between_batches(self) -> bool:
        with self._cond:
            jobs, self._between_batches = self._between_batches, []
        for job, future in jobs:
            _run_job(job, future)
        return bool(jobs)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        log.info("[engine] worker started on %s", self.label)
        try:
            with torch.inference_mode(), self._device_context():
                while self._wait():
                    while self._round():
                        self._tick()
                    with self._cond:
                        waiters, self._idle_waiters = self._idle_waiters, []
                    for callback in waiters:
                        self.post(callback)
        except BaseException as exc:
            self._crashed(exc)
            return
        self._run_between_batches()  # asked for while stopping: answer, don't leave waiting
        log.info("[engine] worker stopped")

    def _crashed(self, exc: BaseException) -> None:
        """The loop failed: end this worker's sessions, then start a new thread (within budget)."""
        log.error("[engine] worker failed; closing its sessions", exc_info=exc)
        self._in_flight = None  # its sessions are ended below with the rest
        with self._cond:
            sessions = [s for _, s in self._sessions.values()]
            self._sessions.clear()
            restart = not self._stopping and self.faults.restarts.allow(self.clock())
            if restart:
                self._start_thread()
            elif not self._stopping:
                self.failed = True
            orphans = [] if restart else self._between_batches
            if not restart:
                self._between_batches = []
        for _, future in orphans:
            if future.set_running_or_notify_cancel():
                future.set_exception(SessionError("the engine worker is down"))
        reason = f"engine worker failed ({type(exc).__name__}; see the server log)"
        for session in sessions:
            session.core.close(reason)
            self.post(partial(session.end, reason))
        if restart:
            self.faults.metrics.worker_restarts.inc()
            log.warning("[engine] worker restarted (%d so far)", self.faults.restarts.total)
        elif self.failed:
            log.critical(
                "[engine] worker failed %d times in %.0f s: not restarting; new sessions are refused",
                self.faults.restarts.max_restarts,
                self.faults.restarts.window_s,
            )

    @contextlib.contextmanager
    def _device_context(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        torch.cuda.set_device(self.bundle.device.index or 0)  # a bare 'cuda' has no index
        with torch.cuda.stream(torch.cuda.Stream(self.bundle.device)):
            yield

    def _wait(self) -> bool:
        with self._cond:
            while not self._signalled and not self._stopping:
                degraded = self.degrade.level is not DegradeLevel.NORMAL
                if not self._cond.wait(self.runtime.degrade.window_s if degraded else None):
                    break
            self._signalled = False
            stopping = self._stopping
        self._tick()
        return not stopping

    def _tick(self) -> None:
        level = self.degrade.tick(self.clock())
        if level is not None:
            self.on_level(level)

    def _round(self) -> bool:
        if self._in_flight is not None:
            self._gather_until(self._in_flight.expected_end - self.timing.lead())
        with self._cond:
            stopping = self._stopping
            sessions = sorted(self._sessions.values(), key=lambda item: item[0])
        if stopping:
            self._land()
            return False
        worked = self._run_between_batches()
        t_gather = self.clock()
        candidates: list[Candidate[Session]] = []
        for order, session in sessions:
            core = session.core
            if core.has_control():
                worked |= self._apply(session, core.take_control())
            if core.suspended:  # waiting for the Stream that replaces one lost to a fault
                continue
            priority = core.priority()
            if priority is not None:
                stream = core.stream
                key = self._group_key(session.id, stream)
                rows = stream.batch.unet_rows
                candidates.append(Candidate(session, key, priority, rows, core.served, order))
        if not candidates:
            return self._land() or worked
        plan = plan_batch(candidates, self.faults.row_cap.value)
        for candidate in plan:
            candidate.item.core.served += 1
        self._run_batch(plan, t_gather)
        return True

    def _group_key(self, session_id: str, stream: Stream) -> GroupKey:
        """Which sessions may share a call with this one (engine.batch_planning)."""
        apart = self.runtime.controlnet_rows is ControlNetRows.APART and stream.batch.control_live
        return group_key(stream.latent_size, stream.config.use_denoising_batch, session_id, apart)

    # ------------------------------------------------------------------ overlap
    def _gather_until(self, target: float) -> None:
        self.timing.wait_until(target, self._cond, lambda: self._stopping)

    def _land(self) -> bool:
        """Wait for the batch in flight and answer it (then the skips held behind it)."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return False
        self._finish(flight)
        self.runner.release_held()
        return True

    def _apply(self, session: Session, items: list[ControlItem]) -> bool:
        core = session.core
        for item in items:
            try:
                if isinstance(item, SwapStream):
                    core.lost(including_pending=True)  # counted as dropped_reconfigure
                    core.stream = item.stream
                    core.suspended = False
                    size = (item.stream.width, item.stream.height)
                    log.info("[%s] now rendering at %dx%d", session.id, *size)
                elif isinstance(item, SetControlImage):
                    item.stream.set_client_image(item.slot, item.image)
                else:
                    before = item.stream.batch
                    item.stream.apply_update(item.update)
                    if item.stream.batch is not before:
                        core.lost(including_pending=False)
            except Exception as exc:
                self.faults.fail(session, exc)
                return True
        return True

    # ------------------------------------------------------------------ one batch
    def _run_batch(self, plan: list[Candidate[Session]], t_gather: float) -> None:
        head = plan[0]
        bucket = bucket_for(sum(c.rows for c in plan), self.runtime.batch_buckets)
        estimate = self.estimator.estimate(head.key, bucket)
        # With overlap the estimate is compute time; an answer also waits for the host to land
        # the batch (outputs, metrics, posting), which the deadline rule must count as well.
        answered_in = estimate + (self.timing.land_s if self.overlap else 0.0)
        limit = self.runtime.max_consecutive_deadline_drops
        now = self.clock()
        flight = self._in_flight
        held: frozenset[str] = frozenset() if flight is None else flight.session_ids
        # Behind a batch in flight, this one starts on the device when that one ends.
        start = now if flight is None else max(now, flight.expected_end)
        taken: list[tuple[Session, QueuedFrame, bool]] = []  # (session, frame, late)
        for candidate in plan:
            session, core = candidate.item, candidate.item.core
            frame, items = core.take()
            if items:
                self._apply(session, items)
                if core.closed:  # the update failed the session
                    continue
                stream = core.stream
                key = self._group_key(session.id, stream)
                if frame is not None and (
                    key != candidate.key or stream.batch.unet_rows != candidate.rows
                ):
                    core.put_back(frame)
                    continue
            if frame is None:
                continue
            late = should_drop(
                start, frame.t_arrival, frame.deadline, answered_in, core.consecutive_drops, limit
            )
            taken.append((session, frame, late))
        entries, deadline_drops = self._admit(taken, now, bucket, held)
        self.degrade.observe(deadline_drops, deadline_drops)
        if entries:
            self._launch(head.key, entries, estimate, t_gather)
        else:
            self._land()

    def _admit(
        self,
        taken: list[tuple[Session, QueuedFrame, bool]],
        now: float,
        bucket: int,
        held: frozenset[str],
    ) -> tuple[list[Entry], int]:
        """Admit the taken frames to the batch; a late one only in free rows (batch_planning's
        free-rows rule), else it is dropped for its deadline. Returns the entries and drops."""
        rows = [session.core.stream.batch.unet_rows for session, _, _ in taken]
        on_time = sum(r for r, (_, _, late) in zip(rows, taken, strict=True) if not late)
        late_rows = [r for r, (_, _, late) in zip(rows, taken, strict=True) if late]
        riders = iter(late_riders(on_time, late_rows, self.runtime.batch_buckets))
        entries: list[Entry] = []
        deadline_drops = 0
        for session, frame, late in taken:
            core = session.core
            if late and not next(riders):
                core.consecutive_drops += 1
                core.dropped_for_deadline(frame)
                deadline_drops += 1
                continue
            core.consecutive_drops = 0
            core.waited(now - frame.t_arrival)
            try:
                entry = self.runner.admit(session, frame, hold_skips=session.id in held)
            except Exception as exc:
                if is_out_of_memory(exc):
                    self.faults.out_of_memory([session], bucket, exc)
                else:
                    self.faults.fail(session, exc)
                continue
            if entry is not None:
                entries.append(entry)
        return entries, deadline_drops

    def _launch(
        self, key: GroupKey, entries: list[Entry], estimate: float, t_gather: float
    ) -> None:
        """Run the batch; with overlap leave it in flight, else wait for it and answer it."""
        try:
            computed = self.runner.model(key, entries)
        except Exception as exc:
            self._land()
            if is_out_of_memory(exc):
                rows = sum(e.stream.batch.unet_rows for e in entries)
                padded = bucket_for(rows, self.runtime.batch_buckets)
                self.faults.out_of_memory([e.session for e in entries], padded, exc)
                return
            log.error("[engine] batch of %d sessions failed", len(entries), exc_info=exc)
            for entry in entries:
                self.faults.fail(entry.session, exc)
            return
        launched = self.clock()
        self.timing.launched(t_gather, launched)
        self._land()  # the batch before this one; this one starts on the device when it ends
        ids = frozenset(e.session.id for e in entries)
        start = max(launched, self.timing.last_done)
        flight = InFlight(key, entries, computed, ids, start + estimate)
        if self.overlap:
            self._in_flight = flight
        else:
            self._finish(flight)

    def _finish(self, flight: InFlight) -> None:
        """Wait for one launched batch and answer its sessions."""
        entries, computed = flight.entries, flight.computed
        done = self.runner.outputs(entries, computed)
        self.faults.succeeded([entry.session for entry in entries])
        done_at = computed.t_start + done.seconds
        # Without overlap the estimate is a batch's wall time, host work included. With it the
        # host sees a batch end only when it next looks (after launching the next one), so its
        # wall time would grow with every wait and feed back into later waits: there the
        # estimate is the batch's own compute time.
        seconds = computed.compute_seconds() if self.overlap else done.seconds
        self.estimator.record(flight.key, computed.padded, seconds)
        self.degrade.observe(done.generated, done.late)
        for delivery in done.deliveries:  # after the bookkeeping, so a receiver sees it done
            self.post(delivery)
        self.timing.landed(done_at)


def _run_job(job: Callable[[], Any], future: Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(job())
    except BaseException as exc:  # handed to the caller, who answers its client
        future.set_exception(exc)
