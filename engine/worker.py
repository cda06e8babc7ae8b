"""The compute thread: one per device, it alone runs the model and touches the sessions' Streams.

Each round it applies queued control items (prepared updates, new Streams), picks the next
batch (:mod:`livediff.engine.scheduler`), takes one frame from each chosen session, drops
frames that cannot make their deadline, asks the similarity filter (a host-side signal, no
device sync; a skipped frame is answered at once with the previous output and leaves the
batch), then runs the rest as one batched encode → UNet → decode (:mod:`livediff.engine.batcher`).

On CUDA the thread runs on its own CUDA stream, inputs are staged in pinned memory, outputs are
copied back with ``non_blocking`` copies into pinned memory, and the one host wait per batch is
on a CUDA event recorded after those copies. Stage times come from CUDA events read after that
wait. On CPU every op is synchronous and stage times are read from the clock.

Results reach the event loop only through ``post`` (``loop.call_soon_threadsafe``): the loop
never waits for this thread. The thread never sleeps: with nothing to do it waits on a
condition that ``submit`` / ``update`` / ``close`` notify (with a timeout only while degraded,
so an idle engine still recovers).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from livediff.engine.batcher import Batcher, resize_rgb
from livediff.engine.control import SwapStream
from livediff.engine.degrade import DegradeController, DegradeLevel
from livediff.engine.metrics import EngineMetrics, StageTimer
from livediff.engine.scheduler import (
    BatchTimeEstimator,
    Candidate,
    GroupKey,
    bucket_for,
    group_key,
    plan_batch,
    should_drop,
)
from livediff.engine.session import InputFrame, OutputFrame, Session
from livediff.engine.stream import FrameGroup, Stream

if TYPE_CHECKING:
    from livediff.engine.control import ControlItem
    from livediff.engine.runtime import RuntimeConfig
    from livediff.models.bundle import ModelBundle

log = logging.getLogger(__name__)
Post = Callable[[Callable[[], None]], None]


@dataclass
class _Entry:
    session: Session
    stream: Stream
    group: FrameGroup
    pixels: torch.Tensor | None


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
    ) -> None:
        self.bundle = bundle
        self.runtime = runtime
        self.metrics = metrics
        self.clock = clock
        self.post = post
        self.on_level = on_level
        self.cuda = bundle.device.type == "cuda"
        self.batcher = Batcher(bundle, runtime.batch_buckets)
        self.estimator = BatchTimeEstimator(runtime.batch_time_smoothing)
        self.degrade = DegradeController(runtime.degrade, clock())
        self.max_rows = max(runtime.batch_buckets)
        self._cond = threading.Condition()
        self._signalled = False
        self._stopping = False
        self._sessions: dict[str, tuple[int, Session]] = {}
        self._opened = 0
        self._idle_waiters: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ event loop side
    def start(self) -> None:
        if self._thread is None:
            name = f"livediff-worker-{self.bundle.device}"
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

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

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        log.info("[engine] worker started on %s", self.bundle.device)
        try:
            with torch.inference_mode(), self._device_context():
                while self._wait():
                    while self._round():
                        self._tick()
                    with self._cond:
                        waiters, self._idle_waiters = self._idle_waiters, []
                    for callback in waiters:
                        self.post(callback)
        except BaseException:
            log.exception("[engine] worker failed; closing every session")
            with self._cond:
                sessions = [s for _, s in self._sessions.values()]
            for session in sessions:
                self.post(partial(session.end, "engine worker failed (see the server log)"))
            raise
        log.info("[engine] worker stopped")

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
        with self._cond:
            if self._stopping:
                return False
            sessions = sorted(self._sessions.values(), key=lambda item: item[0])
        worked = False
        candidates: list[Candidate[Session]] = []
        for order, session in sessions:
            core = session.core
            if core.has_control():
                worked |= self._apply(session, core.take_control())
            priority = core.priority()
            if priority is not None:
                stream = core.stream
                key = group_key(stream.latent_size, stream.config.use_denoising_batch, session.id)
                rows = stream.batch.unet_rows
                candidates.append(Candidate(session, key, priority, rows, core.served, order))
        if not candidates:
            return worked
        plan = plan_batch(candidates, self.max_rows)
        for candidate in plan:
            candidate.item.core.served += 1
        self._run_batch(plan)
        return True

    def _apply(self, session: Session, items: list[ControlItem]) -> bool:
        core = session.core
        for item in items:
            try:
                if isinstance(item, SwapStream):
                    lost = core.lost(including_pending=True)
                    core.stream = item.stream
                    size = (item.stream.width, item.stream.height)
                    log.info("[%s] now rendering at %dx%d", session.id, *size)
                else:
                    before = item.stream.batch
                    item.stream.apply_update(item.update)
                    lost = (
                        core.lost(including_pending=False) if item.stream.batch is not before else 0
                    )
            except Exception as exc:
                self._fail(session, exc)
                return True
            if lost:
                self.metrics.dropped(session.id, "reconfigure", lost)
        return True

    def _fail(self, session: Session, exc: BaseException) -> None:
        log.error("[%s] session failed: %s", session.id, exc, exc_info=exc)
        with session.core.lock:
            session.core.closed = True
        self.post(partial(session.end, f"failed: {type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ one batch
    def _run_batch(self, plan: list[Candidate[Session]]) -> None:
        head = plan[0]
        bucket = bucket_for(sum(c.rows for c in plan), self.runtime.batch_buckets)
        estimate = self.estimator.estimate(head.key, bucket)
        limit = self.runtime.max_consecutive_deadline_drops
        now = self.clock()
        entries: list[_Entry] = []
        deadline_drops = 0
        for candidate in plan:
            session, core = candidate.item, candidate.item.core
            frame, items = core.take()
            if items:
                self._apply(session, items)
                if core.closed:  # the update failed the session
                    continue
                stream = core.stream
                key = group_key(stream.latent_size, stream.config.use_denoising_batch, session.id)
                if frame is not None and (
                    key != candidate.key or stream.batch.unet_rows != candidate.rows
                ):
                    core.put_back(frame)
                    continue
            if frame is None:
                continue
            self.metrics.inbox_depth(session.id, core.inbox_depth())
            if should_drop(
                now, frame.t_arrival, frame.deadline, estimate, core.consecutive_drops, limit
            ):
                core.consecutive_drops += 1
                core.dropped_for_deadline(frame)
                self.metrics.dropped(session.id, "deadline")
                deadline_drops += 1
                continue
            core.consecutive_drops = 0
            core.waited(now - frame.t_arrival)
            self.metrics.stage("queue", now - frame.t_arrival)
            try:
                entry = self._admit(session, frame)
            except Exception as exc:
                self._fail(session, exc)
                continue
            if entry is not None:
                entries.append(entry)
        self.degrade.observe(deadline_drops, deadline_drops)
        if entries:
            self._compute(head.key, entries)

    def _admit(self, session: Session, frame: InputFrame) -> _Entry | None:
        """Admit the frame to its Stream; a full group that the filter skips is answered here."""
        core = session.core
        stream = core.stream
        image = frame.image.pin_memory() if self.cuda else frame.image
        group = stream.admit(image, tag=frame)
        core.admitted(frame, group is not None)
        if group is None:
            return None
        if not stream.config.use_denoising_batch:
            return _Entry(session, stream, group, None)  # Stream.run asks the filter itself
        if stream.skip_outputs(group) is not None:
            self._emit_skipped(session, list(group.tags))
            return None
        return _Entry(session, stream, group, stream.model_input(group))

    def _emit_skipped(self, session: Session, frames: list[InputFrame]) -> None:
        core = session.core
        image = core.last_image
        assert image is not None  # the filter only skips once the Stream has emitted an output
        t_done = self.clock()
        core.answered(frames, True, t_done, {}, 0.0)
        render = (core.stream.width, core.stream.height)
        outputs = [self._output(session, f, image, t_done, render, None) for f in frames]
        self.post(partial(session.deliver, outputs))

    def _output(
        self,
        session: Session,
        frame: InputFrame,
        image: Any,
        t_done: float,
        render: tuple[int, int],
        compute_s: float | None,
    ) -> OutputFrame:
        latency = t_done - frame.t_arrival
        skipped = compute_s is None
        late = t_done > frame.deadline
        self.metrics.output(session.id, skipped=skipped, late=late, latency_s=latency)
        compute_ms = None if compute_s is None else compute_s * 1000.0
        return OutputFrame(
            image,
            frame.pts,
            frame.time_base,
            frame.index,
            skipped,
            frame.t_arrival,
            t_done,
            render,
            compute_ms,
        )

    def _compute(self, key: GroupKey, entries: list[_Entry]) -> None:
        timer = StageTimer(self.cuda, self.clock)
        t_start = self.clock()
        timer.mark("start")
        sizes = [
            (int(e.session.config.height or 0), int(e.session.config.width or 0)) for e in entries
        ]
        try:
            if key[2]:
                answers, hosts, rows, padded = self._batched(entries, sizes, timer)
            else:
                answers, hosts, rows, padded = self._sequential(entries[0], sizes[0], timer)
            done = None
            if self.cuda:
                done = torch.cuda.Event()
                done.record()
        except Exception as exc:
            log.error("[engine] batch of %d sessions failed", len(entries), exc_info=exc)
            for entry in entries:
                self._fail(entry.session, exc)
            return
        if done is not None:
            done.synchronize()  # the one host wait per batch
        t_done = self.clock()
        stages = timer.durations()
        gpu_s = sum(stages.values())
        per_frame = gpu_s / max(1, sum(len(e.group.images) for e in entries))
        generated = late = 0
        deliveries: list[Callable[[], None]] = []
        for entry, answer, host in zip(entries, answers, hosts, strict=True):
            core = entry.session.core
            render = (entry.stream.width, entry.stream.height)
            outputs: list[OutputFrame] = []
            frames: list[InputFrame] = []
            skipped: list[InputFrame] = []
            # Host rows follow the generated outputs; skipped ones reuse the last image.
            for out in answer:
                if out.skipped:
                    image = core.last_image
                    skipped.append(out.tag)
                else:
                    image = host[len(frames)].numpy()
                    image.flags.writeable = False
                    frames.append(out.tag)
                share = None if out.skipped else per_frame
                outputs.append(self._output(entry.session, out.tag, image, t_done, render, share))
            if skipped:
                core.answered(skipped, True, t_done, {}, 0.0)
            if frames:
                core.last_image = outputs[-1].image
                late += core.answered(frames, False, t_done, stages, per_frame)
                generated += len(frames)
            if outputs:
                deliveries.append(partial(entry.session.deliver, outputs))
        for stage, seconds in stages.items():
            self.metrics.stage(stage, seconds, generated)
        self.metrics.batch(rows, padded, len(entries), per_frame)
        self.estimator.record(key, padded, t_done - t_start)
        self.degrade.observe(generated, late)
        for delivery in deliveries:  # after the bookkeeping, so a receiver sees it done
            self.post(delivery)

    def _batched(
        self, entries: list[_Entry], sizes: list[tuple[int, int]], timer: StageTimer
    ) -> tuple[list[list[Any]], list[torch.Tensor], int, int]:
        latents = iter(self.batcher.encode([e.pixels for e in entries if e.pixels is not None]))
        timer.mark("encode")
        unet_inputs = [
            e.stream.begin(e.group, None if e.pixels is None else next(latents)) for e in entries
        ]
        eps, call = self.batcher.predict(unet_inputs)
        timer.mark("unet")
        finished = [e.stream.finish(part) for e, part in zip(entries, eps, strict=True)]
        rgbs, hosts = self.batcher.decode_rgb(finished, sizes)
        timer.mark("decode")
        answers = [e.stream.complete(e.group, rgb) for e, rgb in zip(entries, rgbs, strict=True)]
        return answers, hosts, call.rows, call.padded_rows

    def _sequential(
        self, entry: _Entry, size: tuple[int, int], timer: StageTimer
    ) -> tuple[list[list[Any]], list[torch.Tensor], int, int]:
        answer = entry.stream.run(entry.group)  # steps as separate UNet calls; counted as "unet"
        timer.mark("unet")
        generated = [out.image for out in answer if not out.skipped]
        host = torch.empty(0, dtype=torch.uint8)
        if generated:
            host = self.batcher.to_host([resize_rgb(torch.stack(generated), size)])[0]
        rows = entry.stream.batch.unet_rows
        return [answer], [host], rows, bucket_for(rows, self.runtime.batch_buckets)
