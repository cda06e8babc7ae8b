"""One batch on the device, for the worker thread: admit frames, run the model, make the outputs.

:meth:`BatchStep.admit` puts a session's frame into its Stream (a similarity-filter skip is
answered at once). :meth:`BatchStep.model` runs the admitted groups as one batched encode →
UNet → decode (or a non-Stream-Batch session alone) and raises whatever the model raises: the
worker decides what a failure means (:mod:`livediff.engine.faults`). :meth:`BatchStep.outputs`
waits for the device once, records every answer in its session's counters, and returns the
deliveries for the worker to post to the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from livediff.engine.batch_packing import BatchPacker, resize_rgb
from livediff.engine.batch_planning import GroupKey, bucket_for
from livediff.engine.frames import OutputFormat, YuvFrame
from livediff.engine.metrics import EngineMetrics, StageTimer
from livediff.engine.runtime_config import ControlNetRows
from livediff.engine.session import QueuedFrame, Session, SessionOutput
from livediff.engine.stream import FrameGroup, Stream
from livediff.kernels.yuv import rgb_to_i420

if TYPE_CHECKING:
    from livediff.engine.runtime_config import RuntimeConfig
    from livediff.models.bundle import ModelBundle

Post = Callable[[Callable[[], None]], None]


@dataclass
class Entry:
    """One session's frame group in a batch."""

    session: Session
    stream: Stream
    group: FrameGroup
    pixels: torch.Tensor | None


@dataclass
class Computed:
    """The model's answer to a batch, not yet waited for (CUDA) or recorded."""

    answers: list[list[Any]]
    hosts: list[torch.Tensor]
    rows: int
    padded: int
    timer: StageTimer
    t_start: float
    done: Any = None  # the CUDA event after the host copies

    def compute_seconds(self) -> float:
        """Time the batch itself took: on CUDA device time from its first mark to ``done``
        (read once ``done`` has fired), on CPU the clock between its first and last mark."""
        if self.done is not None:
            return float(self.timer.marks[0][1].elapsed_time(self.done)) / 1000.0
        return float(sum(self.timer.durations().values()))


@dataclass
class Done:
    """What the worker needs after a batch: its counts, its wall time and the deliveries."""

    generated: int = 0
    late: int = 0
    seconds: float = 0.0
    deliveries: list[Callable[[], None]] = field(default_factory=list)


class BatchStep:
    """See the module docstring. Worker thread only."""

    def __init__(
        self,
        bundle: ModelBundle,
        runtime: RuntimeConfig,
        metrics: EngineMetrics,
        clock: Callable[[], float],
        post: Post,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.clock = clock
        self.post = post
        self.cuda = bundle.device.type == "cuda"
        self.packer = BatchPacker(bundle, runtime.batch_buckets)
        self._held: list[tuple[Session, list[QueuedFrame]]] = []

    def admit(self, session: Session, frame: QueuedFrame, hold_skips: bool = False) -> Entry | None:
        """Admit the frame to its Stream; a full group that the filter skips is answered here.

        With ``hold_skips`` a skip is answered only at :meth:`release_held`: the session has a
        batch in flight whose answer must go out first (and becomes the image a skip repeats).
        """
        core = session.core
        stream = core.stream
        image = frame.image
        if self.cuda and not image.is_pinned():  # a producer may hand over pinned frames
            image = (
                image.map(torch.Tensor.pin_memory)
                if isinstance(image, YuvFrame)
                else image.pin_memory()
            )
        group = stream.admit(image, tag=frame)
        core.admitted(frame, group is not None)
        if group is None:
            return None
        if not stream.config.use_denoising_batch:
            return Entry(session, stream, group, None)  # Stream.run asks the filter itself
        if stream.skip_outputs(group) is not None:
            if hold_skips:
                self._held.append((session, list(group.tags)))
            else:
                self._emit_skipped(session, list(group.tags))
            return None
        return Entry(session, stream, group, stream.model_input(group))

    def release_held(self) -> None:
        """Answer the skips that :meth:`admit` held back."""
        held, self._held = self._held, []
        for session, frames in held:
            self._emit_skipped(session, frames)

    def _emit_skipped(self, session: Session, frames: list[QueuedFrame]) -> None:
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
        frame: QueuedFrame,
        image: Any,
        t_done: float,
        render: tuple[int, int],
        compute_s: float | None,
    ) -> SessionOutput:
        skipped = compute_s is None  # counted with core.answered, for all of a group at once
        compute_ms = None if compute_s is None else compute_s * 1000.0
        return SessionOutput(
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

    # ------------------------------------------------------------------ the model
    def model(self, key: GroupKey, entries: list[Entry]) -> Computed:
        """Run the batch; raises what the model raises (nothing has been answered then)."""
        timer = StageTimer(self.cuda, self.clock)
        t_start = self.clock()
        timer.mark("start")
        sizes = [
            (int(e.session.config.height or 0), int(e.session.config.width or 0)) for e in entries
        ]
        formats = [e.session.output_format for e in entries]
        if key[2]:
            nets = not self._without_controlnets(key)
            answers, hosts, rows, padded = self._batched(entries, sizes, formats, timer, nets)
        else:
            answers, hosts, rows, padded = self._sequential(entries[0], sizes[0], formats[0], timer)
        computed = Computed(answers, hosts, rows, padded, timer, t_start)
        if self.cuda:
            computed.done = torch.cuda.Event(enable_timing=True)
            computed.done.record()
        return computed

    def _without_controlnets(self, key: GroupKey) -> bool:
        """A call of sessions whose rows use no net, on a server that keeps them apart
        (``RuntimeConfig.controlnet_rows``): it runs the UNet alone."""
        return (
            self.runtime.controlnet_rows is ControlNetRows.APART
            and bool(self.packer.bundle.controlnets)
            and not key[4]
        )

    def _batched(
        self,
        entries: list[Entry],
        sizes: list[tuple[int, int]],
        formats: list[OutputFormat],
        timer: StageTimer,
        nets: bool = True,
    ) -> tuple[list[list[Any]], list[torch.Tensor], int, int]:
        """``nets`` False: no row of the call uses a net (every scale 0): the call carries no
        control inputs, and each session's Stream Batch keeps its own (zero-scale) ones."""
        answer = self.packer.run_streams(entries, sizes, formats, timer.mark, nets=nets)
        return answer.answers, answer.hosts, answer.call.rows, answer.call.padded_rows

    def _sequential(
        self, entry: Entry, size: tuple[int, int], output: OutputFormat, timer: StageTimer
    ) -> tuple[list[list[Any]], list[torch.Tensor], int, int]:
        answer = entry.stream.run(entry.group)  # steps as separate UNet calls; counted as "unet"
        timer.mark("unet")
        generated = [out.image for out in answer if not out.skipped]
        host = torch.empty(0, dtype=torch.uint8)
        if generated:
            frames = resize_rgb(torch.stack(generated), size)
            if output is OutputFormat.I420:
                frames = rgb_to_i420(frames)
            host = self.packer.to_host([frames])[0]
        rows = entry.stream.batch.unet_rows
        return [answer], [host], rows, bucket_for(rows, self.runtime.batch_buckets)

    # ------------------------------------------------------------------ the answers
    def outputs(self, entries: list[Entry], computed: Computed) -> Done:
        """Wait for the device (once), record every answer, and build the deliveries."""
        if computed.done is not None:
            computed.done.synchronize()  # the one host wait per batch
        t_done = self.clock()
        stages = computed.timer.durations()
        gpu_s = sum(stages.values())
        per_frame = gpu_s / max(1, sum(len(e.group.images) for e in entries))
        result = Done(seconds=t_done - computed.t_start)
        for entry, answer, host in zip(entries, computed.answers, computed.hosts, strict=True):
            core = entry.session.core
            render = (entry.stream.width, entry.stream.height)
            outputs: list[SessionOutput] = []
            frames: list[QueuedFrame] = []
            skipped: list[QueuedFrame] = []
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
                result.late += core.answered(frames, False, t_done, stages, per_frame)
                result.generated += len(frames)
            if outputs:
                result.deliveries.append(partial(entry.session.deliver, outputs))
        for stage, seconds in stages.items():
            self.metrics.stage(stage, seconds, result.generated)
        self.metrics.batch(computed.rows, computed.padded, len(entries), per_frame)
        return result
