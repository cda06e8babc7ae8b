"""One client's stream inside the engine: frames in, generated frames out, live parameters.

A :class:`Session` is made by :meth:`Engine.open_session <livediff.engine.runtime.Engine.open_session>`
and owns its own :class:`~livediff.engine.stream.Stream` (prompt embeddings, seed, schedule,
RCFG, similarity filter, the Stream Batch latent buffer and stock noise) over the engine's one
shared :class:`~livediff.models.bundle.ModelBundle`. Frames never cross sessions: each frame is
tagged with its session's own index and only ever enters that session's Stream.

Flow control
    ``submit`` puts a frame in a bounded inbox (``RuntimeConfig.inbox_size``, default 1). When
    it is full the oldest waiting frame is discarded (``dropped_inbox``): the latest frame wins.
    Outputs wait in a bounded outbox (``outbox_size``); when the consumer falls behind the oldest
    output is discarded (``dropped_outbox``). Neither side ever blocks the other.

Threads
    ``submit``, ``recv``, ``update``, ``stats`` and ``close`` are called on the event loop.
    :class:`SessionCore` holds what the GPU worker shares with them, behind one lock that is
    only ever held for a few list operations.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.frames import InputImage, OutputFormat, YuvFrame, as_input_frame
from livediff.engine.metrics import SessionMetrics, SessionSeries
from livediff.engine.session_plans import ControlItem, Plan
from livediff.engine.stream import Stream
from livediff.exceptions import SessionClosedError

if TYPE_CHECKING:
    from livediff.engine.runtime_config import RuntimeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOutput:
    """One output, and the input frame it answers.

    ``image`` is uint8 ``H × W × 3`` RGB in host memory at the session's resolution, read-only
    (a skipped frame shares the previous output's array); for a session opened with
    ``output=OutputFormat.I420`` it is the packed I420 frame ``[H*W + 2*ceil(H/2)*ceil(W/2)]``
    instead (:func:`livediff.kernels.yuv.split_i420`). ``index`` counts the session's
    submitted frames from 0. ``skipped`` marks a similarity-filter skip (the previous output
    again). ``render_size`` is the (width, height) actually generated: smaller than the image
    while the engine is degraded to a lower resolution. ``compute_ms`` is the device time of
    the batch that generated it divided by the frames in that batch (``None`` when skipped).
    """

    image: np.ndarray
    pts: int | None
    time_base: Fraction | None
    index: int
    skipped: bool
    t_arrival: float
    t_done: float
    render_size: tuple[int, int] | None = None
    compute_ms: float | None = None

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_arrival) * 1000.0


class DropReason(str, Enum):
    """Why a submitted frame gets no output."""

    REPLACED = "replaced"  # a newer frame took its place in the inbox (latest wins)
    DEADLINE = "deadline"  # it could not be answered within its deadline
    RECONFIGURE = "reconfigure"  # the session's Stream was rebuilt (steps, size, a fault)
    OUTBOX = "outbox"  # its output was generated but the reader fell behind


@dataclass(frozen=True)
class DroppedFrame:
    """A submitted frame that will get no output, and why (see :meth:`Session.report_drops`)."""

    index: int
    reason: DropReason


@dataclass(frozen=True)
class QueuedFrame:
    """A submitted frame on its way through the engine."""

    image: InputImage  # uint8 [H, W, 3] or I420 planes, host memory, owned by the engine
    index: int
    pts: int | None
    time_base: Fraction | None
    t_arrival: float
    deadline: float


class SessionCore:
    """The state the worker shares with the event loop (lock) or owns alone (worker-only fields)."""

    def __init__(
        self,
        session_id: str,
        plan: Plan,
        inbox_size: int,
        window: int,
        series: SessionSeries | None = None,
    ) -> None:
        self.id = session_id
        self.lock = threading.Lock()
        self.inbox_size = inbox_size
        self.closed = False
        self.close_reason: str | None = None  # set with ``closed`` by whoever closed it
        # Under ``lock``:
        self.metrics = SessionMetrics(window, series)  # every frame event, counted once
        self._inbox: deque[QueuedFrame] = deque()
        self._waiting_since: float | None = None
        self._control: deque[ControlItem] = deque()
        self._tracked: dict[int, QueuedFrame] = {}  # taken from the inbox, not yet answered
        self._pending: list[int] = []  # admitted to a frame group that is not full yet
        self._next_index = 0
        self._drops: list[DroppedFrame] = []  # not yet handed to the Session
        self.on_drops: Callable[[], None] | None = None  # thread-safe: posts to the event loop
        # Worker thread only:
        self.stream: Stream = plan.stream
        self.consecutive_drops = 0
        self.served = 0  # batches this session was planned into (the scheduler's tie-break)
        self.suspended = False  # its Stream was lost to a fault; a new one is on its way
        self.oom_strikes = 0  # out-of-memory batches in a row
        self.last_image: np.ndarray | None = None
        # Control thread only:
        self.plan = plan

    # ------------------------------------------------------------------ event loop side
    def push(
        self,
        image: InputImage,
        pts: int | None,
        time_base: Fraction | None,
        now: float,
        budget: float,
    ) -> tuple[int, int]:
        """Queue a frame; returns (frames dropped from the inbox, inbox depth)."""
        with self.lock:
            if self.closed:
                raise SessionClosedError(f"session {self.id} is closed")
            frame = QueuedFrame(image, self._next_index, pts, time_base, now, now + budget)
            self._next_index += 1
            self.metrics.submitted(now)
            dropped = 0
            while len(self._inbox) >= self.inbox_size:
                self._drops.append(DroppedFrame(self._inbox.popleft().index, DropReason.REPLACED))
                dropped += 1
            self.metrics.dropped("inbox", dropped)
            self._inbox.append(frame)
            self.metrics.inbox_depth(len(self._inbox))
            if self._waiting_since is None:
                self._waiting_since = frame.deadline
            return dropped, len(self._inbox)

    def close(self, reason: str) -> None:
        """Any thread: take no more frames; ``reason`` is what the session will end with."""
        with self.lock:
            self.closed = True
            if self.close_reason is None:
                self.close_reason = reason

    def take_drops(self) -> list[DroppedFrame]:
        with self.lock:
            drops, self._drops = self._drops, []
            return drops

    def _notify_drops(self) -> None:
        """After the lock is released: tell the event loop there are drop notices to take."""
        if self.on_drops is not None:
            self.on_drops()

    def queue_control(self, item: ControlItem) -> None:
        with self.lock:
            self._control.append(item)

    def inbox_depth(self) -> int:
        with self.lock:
            return len(self._inbox)

    def summary(self, now: float) -> dict[str, Any]:
        with self.lock:
            return {
                **self.metrics.summary(now),
                "inbox_depth": len(self._inbox),
                "in_flight": len(self._inbox) + len(self._tracked),
            }

    # ------------------------------------------------------------------ worker side
    def has_control(self) -> bool:
        with self.lock:
            return bool(self._control)

    def take_control(self) -> list[ControlItem]:
        with self.lock:
            items = list(self._control)
            self._control.clear()
            return items

    def priority(self) -> float | None:
        """The scheduling key (see :mod:`livediff.engine.batch_planning`), ``None`` with nothing waiting."""
        with self.lock:
            return None if self.closed or not self._inbox else self._waiting_since

    def take(self) -> tuple[QueuedFrame | None, list[ControlItem]]:
        """The next frame together with every control item queued before it (one atomic step)."""
        with self.lock:
            items = list(self._control)
            self._control.clear()
            if self.closed or not self._inbox:
                return None, items
            frame = self._inbox.popleft()
            self._waiting_since = self._inbox[0].deadline if self._inbox else None
            self._tracked[frame.index] = frame
            self.metrics.inbox_depth(len(self._inbox))
            return frame, items

    def put_back(self, frame: QueuedFrame) -> None:
        """Return a taken frame to the front of the inbox (dropped if newer frames filled it)."""
        with self.lock:
            self._tracked.pop(frame.index, None)
            if len(self._inbox) >= self.inbox_size:
                self.metrics.dropped("inbox")
                self._drops.append(DroppedFrame(frame.index, DropReason.REPLACED))
                dropped = True
            else:
                dropped = False
                self._inbox.appendleft(frame)
                self._waiting_since = (
                    frame.deadline
                    if self._waiting_since is None
                    else min(self._waiting_since, frame.deadline)
                )
        if dropped:
            self._notify_drops()

    def dropped_for_deadline(self, frame: QueuedFrame) -> None:
        with self.lock:
            self._tracked.pop(frame.index, None)
            self.metrics.dropped("deadline")
            self._drops.append(DroppedFrame(frame.index, DropReason.DEADLINE))
        self._notify_drops()

    def admitted(self, frame: QueuedFrame, group_complete: bool) -> None:
        with self.lock:
            if group_complete:
                self._pending.clear()
            else:
                self._pending.append(frame.index)

    def lost(self, including_pending: bool) -> int:
        """Frames the Stream forgot (a new latent buffer or a new Stream); returns how many."""
        with self.lock:
            keep = set() if including_pending else set(self._pending)
            lost = [index for index in self._tracked if index not in keep]
            for index in lost:
                del self._tracked[index]
            if including_pending:
                self._pending.clear()
            self.metrics.dropped("reconfigure", len(lost))
            self._drops.extend(DroppedFrame(i, DropReason.RECONFIGURE) for i in sorted(lost))
        if lost:
            self._notify_drops()
        return len(lost)

    def waited(self, seconds: float) -> None:
        """A frame was taken by the worker after ``seconds`` in the inbox."""
        with self.lock:
            self.metrics.waited(seconds)

    def answered(
        self,
        frames: list[QueuedFrame],
        skipped: bool,
        t_done: float,
        stages: dict[str, float],
        gpu_s: float,
    ) -> int:
        """Record outputs for ``frames`` (``stages``: seconds per compute stage); returns how many were late."""
        late = 0
        with self.lock:
            metrics = self.metrics
            for frame in frames:
                self._tracked.pop(frame.index, None)
                is_late = t_done > frame.deadline
                if not skipped:
                    late += is_late
                    metrics.gpu_ms_per_frame.add(gpu_s * 1000.0)
                for stage, seconds in stages.items():
                    metrics.stages.add(stage, seconds * 1000.0)
                metrics.answered(skipped=skipped, late=is_late, latency_s=t_done - frame.t_arrival)
            metrics.output_rate.tick(t_done, len(frames))
        return late


class Session:
    """A live stream; see the module docstring. Made by ``Engine.open_session``, not directly.

    Concurrency: every method must be called from the engine's event loop. ``submit`` and
    ``stats`` never block. Several concurrent ``recv()`` calls each get a different output.
    Concurrent ``update()`` calls apply in the order they were called.
    """

    def __init__(
        self,
        core: SessionCore,
        config: StreamConfig,
        *,
        runtime: RuntimeConfig,
        clock: Callable[[], float],
        wake: Callable[[], None],
        request: Callable[[SessionCore, GenerationParams], Future[None]],
        on_close: Callable[[Session], None],
        post: Callable[[Callable[[], None]], None] | None = None,
        degrade_state: Callable[[], dict[str, Any]] | None = None,
        output_format: OutputFormat = OutputFormat.RGB,
        device: str = "",
    ) -> None:
        self.id = core.id
        self.device = device or str(core.stream.bundle.device)  # where it runs, for the stats
        self.output_format = output_format  # what SessionOutput.image holds
        # Producers that decode frames themselves may put them in page-locked memory (CUDA).
        self.pin_inputs = core.stream.bundle.device.type == "cuda"
        self._degrade_state = degrade_state
        self.config = config
        self.core = core
        self._runtime = runtime
        self._clock = clock
        self._wake = wake
        self._request = request
        self._on_close = on_close
        self._requested = core.plan.requested
        self._outbox: deque[SessionOutput] = deque()
        self._drops: deque[DroppedFrame] | None = None  # kept only once report_drops() is called
        self._readable = asyncio.Event()
        self._close_reason: str | None = None
        if post is not None:
            core.on_drops = partial(post, self._collect_drops)

    @property
    def closed(self) -> bool:
        return self._close_reason is not None

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def params(self) -> GenerationParams:
        """The parameters asked for (the engine may run fewer steps while degraded; see ``stats()``)."""
        return self._requested

    def _closed_error(self) -> SessionClosedError:
        reason = self._close_reason or self.core.close_reason or "it has ended"
        return SessionClosedError(f"session {self.id} is closed: {reason}")

    # ------------------------------------------------------------------ frames
    def submit(
        self,
        image: np.ndarray | torch.Tensor | YuvFrame,
        *,
        pts: int | None = None,
        time_base: Fraction | None = None,
        owned: bool = False,
    ) -> None:
        """Queue one RGB frame (uint8 ``H × W × 3``, any size; float in [0, 1] is accepted too),
        or one :class:`~livediff.engine.frames.YuvFrame` (I420 planes, converted on the device).

        Never blocks. The frame is checked here (an ``InvalidFrameError`` subclass says what is
        wrong) and copied, so the caller may reuse its buffer — unless ``owned``: the caller
        hands the array over and never touches it again (a frame it just decoded), which saves
        a copy on the event loop. If the inbox is full the oldest waiting frame is discarded
        (latest wins; counted as ``dropped_inbox``). Raises ``SessionClosedError`` once the
        session has ended.
        """
        if self.closed:
            raise self._closed_error()
        frame = as_input_frame(image)
        if not owned:  # the caller may reuse its buffer: keep a copy
            if isinstance(frame, YuvFrame):
                frame = frame.map(torch.clone)
            elif isinstance(image, np.ndarray) and frame.dtype == torch.uint8:
                frame = frame.clone()  # from_numpy shares the caller's memory
        now = self._clock()
        try:
            dropped, _ = self.core.push(
                frame, pts, time_base, now, self._runtime.deadline_ms / 1000.0
            )
        except SessionClosedError:
            raise self._closed_error() from None
        if dropped:
            self._collect_drops()
        self._wake()

    def report_drops(self, limit: int = 4096) -> None:
        """From now on keep a :class:`DroppedFrame` for every submitted frame that gets no output
        (replaced in the inbox, dropped for its deadline or a reconfiguration, or its output
        discarded because the reader fell behind), for :meth:`next_event`. At most ``limit``
        wait; older ones are forgotten.
        """
        if self._drops is None:
            self._drops = deque(maxlen=limit)

    def _collect_drops(self) -> None:
        """Event loop: take the drop notices the core recorded (discarded unless reported)."""
        drops = self.core.take_drops()
        if drops and self._drops is not None and not self.closed:
            self._drops.extend(drops)
            self._readable.set()

    async def next_event(self) -> SessionOutput | DroppedFrame:
        """The next output or drop notice (after :meth:`report_drops`); drop notices come first.

        Raises ``SessionClosedError`` once the session has ended and its outputs are taken.
        """
        while True:
            if self._drops:
                return self._drops.popleft()
            if self._outbox:
                return await self.recv()
            if self.closed:
                raise self._closed_error()
            self._readable.clear()
            await self._readable.wait()

    async def recv(self) -> SessionOutput:
        """The next output, in order. Outputs already queued are returned after the session ends;
        then ``SessionClosedError`` is raised. Cancelling a waiting ``recv()`` loses no output.
        """
        while not self._outbox:
            if self.closed:
                raise self._closed_error()
            self._readable.clear()
            await self._readable.wait()
        output = self._outbox.popleft()
        with self.core.lock:
            self.core.metrics.received()
            self.core.metrics.outbox_depth(len(self._outbox))
        return output

    def deliver(self, outputs: list[SessionOutput]) -> None:
        """Called on the event loop by the engine with this session's new outputs."""
        if self.closed:  # nobody will read them: counted like outputs a slow reader lost
            with self.core.lock:
                self.core.metrics.dropped("outbox", len(outputs))
            return
        dropped = 0
        for output in outputs:
            if len(self._outbox) >= self._runtime.outbox_size:
                lost = self._outbox.popleft()
                dropped += 1
                if self._drops is not None:
                    self._drops.append(DroppedFrame(lost.index, DropReason.OUTBOX))
            self._outbox.append(output)
        with self.core.lock:
            self.core.metrics.dropped("outbox", dropped)
            self.core.metrics.outbox_depth(len(self._outbox))
        if dropped:
            log.debug("[%s] consumer is behind: %d outputs discarded", self.id, dropped)
        self._readable.set()

    # ------------------------------------------------------------------ control
    async def update(self, **changes: Any) -> None:
        """Change live parameters (``GenerationParams`` fields: prompt, seed, strength, steps …).

        Unknown keys or bad values raise ``ParameterError`` before anything changes. Prompts are
        encoded on the engine's control thread; the change applies at the next frame boundary:
        every frame submitted after ``update()`` returns is generated with it (frames already in
        the Stream Batch pipeline finish with the old values). Concurrent calls apply in call
        order. Cancelling the call does not withdraw the change once it has been checked.
        """
        if self.closed:
            raise self._closed_error()
        requested = self._requested.updated(**changes)
        self._requested = requested
        future = self._request(self.core, requested)
        try:
            await asyncio.shield(asyncio.wrap_future(future))
        except Exception:
            self._requested = self.core.plan.requested  # the control thread kept the last good set
            raise

    def stats(self) -> dict[str, Any]:
        """A snapshot: frame counts, fps in/out, queue depths, latency percentiles per stage (ms) …"""
        stream = self.core.stream
        return {
            "id": self.id,
            "closed": self.closed,
            "close_reason": self._close_reason,
            **self.core.summary(self._clock()),
            "outbox_depth": len(self._outbox),
            "steps": stream.batch.steps,
            "requested_steps": self._requested.steps,
            "render_size": (stream.width, stream.height),
            "size": (self.config.width, self.config.height),
            "delay_frames": stream.delay,
            "device": self.device,
            "degrade": self._degrade_state() if self._degrade_state else None,
            "feature_bank": stream.bank_usage(),
        }

    async def close(self) -> None:
        """End the session: waiting and later ``recv()`` calls raise ``SessionClosedError``. Idempotent."""
        self.end("closed by the client")

    def end(self, reason: str) -> None:
        """Close with ``reason`` (engine side: stop, failures). Idempotent; event loop only."""
        if self.closed:
            return
        self._close_reason = reason
        self.core.close(reason)
        log.info("[%s] session closed: %s", self.id, reason)
        self._readable.set()
        self._on_close(self)
