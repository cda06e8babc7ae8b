"""Several streams over one frame sequence, run as one batched call: a file job at full speed.

A live session answers each frame before the next one arrives; a file has no deadline. So
``livediff run --batch N`` deals the frames to N streams in turn, frame ``i`` to stream
``i mod N`` (with a frame buffer of F frames, whole groups: frame ``i`` to stream
``(i // F) mod N``, so each frame keeps the row in its group, and that row's fixed noise, that
it has in one stream), and runs the N streams' frame groups as one batched encode → UNet →
decode, with the code the multi-session worker runs
(:meth:`~livediff.engine.batch_packing.BatchPacker.run_streams`).
Outputs come back in input order, each with its input's tag (the file's timestamp).

What the result is
    The N streams are copies of one: same config, same parameters, same seed, hence the same
    fixed noise. Each frame's denoising reads only its own UNet rows (its latents, its stock
    noise, its control images travel with it from block to block) and the noise fixed per
    step, so a frame's output does not depend on which frames share its calls: the output is
    the one stream's, frame for frame, up to float rounding where a kernel's arithmetic
    depends on the batch size. That holds at any step count. What ``steps > 1`` changes is the
    schedule, not the maths: each stream's Stream Batch holds every N-th frame in flight (frames
    ``i, i+N, …`` at steps ``0, 1, …`` instead of ``i, i+1, …``), and the end of the file costs
    ``steps - 1`` draining calls (batched as well).

What is refused
    State carried from one frame to the next would make the N streams differ from one stream
    (each would see every N-th frame), so :func:`choose_batch` refuses ``N > 1`` with any of:
    the similarity filter, a feature bank, latent feedback, a ``previous_output`` ControlNet
    (TemporalNet) and txt2img (each frame's noise is the next draw of one seeded generator).
    ``auto`` picks 1 then, and says why. Sequential denoising (``use_denoising_batch`` off)
    runs each frame's steps as separate calls, which only one stream at a time can do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from livediff.engine.batch_packing import BatchPacker
from livediff.engine.config import GenerationMode, GenerationParams, StreamConfig
from livediff.engine.control_plan import ControlPlan, resolve_control
from livediff.engine.frames import OutputFormat, StreamOutput
from livediff.engine.stream import FrameGroup, Stream
from livediff.engine.stream_batch import StreamBatch
from livediff.exceptions import ParameterError, UsageError
from livediff.models.control_uses import Preprocessor

log = logging.getLogger(__name__)

MAX_BATCH = 32  # streams in one file job at most
AUTO_ROWS = 8  # auto: UNet rows per call at most (the batch buckets 1, 2, 4, 8)


@dataclass(frozen=True)
class BatchChoice:
    """How many streams a file job runs, and why (the log line)."""

    streams: int
    reason: str
    frames_per_call: int  # VAE encode/decode rows of a full call
    rows_per_call: int  # UNet rows of a full call

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes the job's calls use (a compiled model captures these)."""
        return tuple(sorted({self.frames_per_call, self.rows_per_call}))


def carried_state(
    config: StreamConfig, params: GenerationParams, control: ControlPlan | None = None
) -> list[tuple[str, str]]:
    """The settings under which an output depends on earlier frames: ``(setting, why)`` each.

    ``control`` is the resolved plan (:func:`resolve_control`), which knows the preprocessor a
    use left to its net's default; without it only explicit ``previous_output`` uses count.
    """
    found = []
    if config.mode is GenerationMode.TXT2IMG:
        found.append(("mode", "txt2img draws each frame's noise from one seeded generator"))
    if params.similarity_threshold is not None:
        why = "the similarity filter compares each frame with the last one processed"
        found.append(("similarity_threshold", why))
    if params.feature_bank:
        found.append(("feature_bank", "the feature bank attends to earlier frames"))
    if params.latent_feedback:
        why = "latent feedback blends the previous output into each input"
        found.append(("latent_feedback", why))
    kinds = (
        [use.preprocessor for use in control.uses]
        if control is not None
        else [use.preprocessor for use in params.controlnets]
    )
    if Preprocessor.PREVIOUS_OUTPUT in kinds:
        why = "the previous_output preprocessor feeds each output into the next frame's ControlNet"
        found.append(("controlnets", why))
    return found


def choose_batch(
    requested: int | None,
    config: StreamConfig,
    params: GenerationParams,
    control: ControlPlan | None = None,
) -> BatchChoice:
    """The streams of a file job; ``requested`` ``None`` is ``auto`` (module docstring).

    An explicit ``N > 1`` that the settings make wrong is a :class:`ParameterError` naming the
    setting, never a quiet fallback to one stream.
    """
    if requested is not None and not 1 <= requested <= MAX_BATCH:
        raise ParameterError(
            f"--batch {requested} is out of range: expected auto or 1 to {MAX_BATCH}",
            field="batch",
            limit=MAX_BATCH,
        )
    rows = StreamBatch.rows_for(
        params.steps, config.frame_buffer_size, config.rcfg, config.use_denoising_batch
    )
    blockers = carried_state(config, params, control)
    if not config.use_denoising_batch:
        blockers.append(
            ("use_denoising_batch", "sequential denoising runs each frame's steps one call each")
        )
    if requested is not None and requested > 1 and blockers:
        setting, why = blockers[0]
        raise ParameterError(
            f"--batch {requested} with {setting}: {why}, and each of {requested} streams would "
            f"see only one frame in {requested}, so the output would not be one stream's. Use "
            f"--batch 1 (or auto), or turn {setting} off",
            field=setting,
        )
    if requested is not None:
        streams, reason = requested, "asked for (--batch)"
    elif blockers:
        setting, why = blockers[0]
        streams, reason = 1, f"auto: not batched, because of {setting}: {why}"
    else:
        streams = max(b for b in (1, 2, 4, 8) if b * rows <= AUTO_ROWS or b == 1)
        reason = f"auto: {streams} streams of {rows} UNet rows, {AUTO_ROWS} rows a call at most"
    frames = streams * config.frame_buffer_size
    return BatchChoice(streams, reason, frames, streams * rows)


def file_job(
    bundle: Any,
    backend: Any,
    config: StreamConfig,
    params: GenerationParams,
    requested: int | None,
    *,
    session_id: str = "-",
    show_progress: bool = True,
) -> tuple[Stream | InterleavedStreams, BatchChoice]:
    """The model side of a file job on a prepared ``bundle`` (``load_for_backend``): one
    stream (``make_stream``: a compiled one replays its whole step as one graph), or
    :class:`InterleavedStreams` on a bundle with graphs per bucket (``runtime_bundle``)."""
    from livediff.engine.backend_fit import make_stream
    from livediff.models.backends import runtime_bundle

    has_frames = config.mode is not GenerationMode.TXT2IMG
    control = resolve_control(params.controlnets, bundle, has_input_frames=has_frames)
    choice = choose_batch(requested, config, params, control)
    log.info("[%s] batch %d: %s", session_id, choice.streams, choice.reason)
    if choice.streams == 1:
        return make_stream(bundle, backend, config, params, session_id=session_id), choice
    preset, factor = bundle.preset, bundle.vae_scale_factor
    latent = ((config.height or preset.height) // factor, (config.width or preset.width) // factor)
    batched = runtime_bundle(
        bundle, backend, latent_size=latent, buckets=choice.buckets, show_progress=show_progress
    )
    streams = [
        Stream(batched, config, params, session_id=f"{session_id}#{k}")
        for k in range(choice.streams)
    ]
    return InterleavedStreams(streams, choice.buckets), choice


@dataclass(frozen=True)
class _Rows:
    stream: Stream
    group: FrameGroup
    pixels: torch.Tensor | None


class InterleavedStreams:
    """N Stream Batch streams answering one frame sequence (see the module docstring).

    The interface is a :class:`Stream`'s for a file job: :meth:`process` a frame with its tag,
    :meth:`flush` at the end; outputs in input order, ``index`` counting the frames given.
    On CUDA the outputs are packed I420 on the device (converted in the batched decode), else
    uint8 RGB. One thread only.
    """

    def __init__(self, streams: Sequence[Stream], buckets: Sequence[int]) -> None:
        if len(streams) < 2:
            raise UsageError("InterleavedStreams needs two streams or more; run one on its own")
        if len({s.config for s in streams}) > 1:
            raise UsageError("InterleavedStreams runs copies of one stream: one StreamConfig")
        if not streams[0].config.use_denoising_batch:
            raise UsageError("InterleavedStreams batches Stream Batch streams only")
        self.streams = tuple(streams)
        first = self.streams[0]
        self.bundle, self.width, self.height = first.bundle, first.width, first.height
        self.packer = BatchPacker(self.bundle, buckets)
        self._group_size = first.config.frame_buffer_size
        cuda = self.bundle.device.type == "cuda"
        self.output_format = OutputFormat.I420 if cuda else OutputFormat.RGB
        self._ready: list[FrameGroup | None] = [None] * len(self.streams)
        self._admitted = 0  # frames given since the start (or the last flush)
        self._emitted = 0  # outputs handed back, in order
        self._done: dict[int, StreamOutput] = {}  # answered out of order, waiting

    def process(self, frame: Any, *, tag: Any = None) -> list[StreamOutput]:
        """Give the next frame to its stream (frame ``i`` to ``(i // F) mod N``, F the frame
        buffer size); once every stream has a full group, run them all."""
        slot = self._admitted // self._group_size % len(self.streams)
        group = self.streams[slot].admit(frame, tag=(self._admitted, tag))
        self._admitted += 1
        if group is not None:
            self._ready[slot] = group
        ready = [(s, g) for s, g in zip(self.streams, self._ready, strict=True) if g is not None]
        if len(ready) < len(self.streams):
            return []
        self._take_ready()
        return self._run(ready)

    def flush(self) -> list[StreamOutput]:
        """Run the partial groups and drain every stream (batched); the next frame starts anew."""
        todo = [
            (stream, group if group is not None else stream.pending_group())
            for stream, group in zip(self.streams, self._take_ready(), strict=True)
        ]
        outputs = self._run([(s, g) for s, g in todo if g is not None])
        while fillers := [(s, g) for s in self.streams if (g := s.filler_group()) is not None]:
            outputs += self._run(fillers)
        assert not self._done, f"frames {sorted(self._done)} were never handed back"
        self._admitted = self._emitted = 0
        return outputs

    def _take_ready(self) -> list[FrameGroup | None]:
        ready, self._ready = self._ready, [None] * len(self.streams)
        return ready

    def _run(self, todo: list[tuple[Stream, FrameGroup]]) -> list[StreamOutput]:
        answered: list[StreamOutput] = []
        with torch.inference_mode():
            rows = []
            for stream, group in todo:
                skipped = stream.skip_outputs(group)
                if skipped is not None:
                    answered += skipped
                else:
                    rows.append(_Rows(stream, group, stream.model_input(group)))
            if rows:
                sizes = [(r.stream.height, r.stream.width) for r in rows]
                formats = [self.output_format] * len(rows)
                result = self.packer.run_streams(rows, sizes, formats, to_host=False)
                for answer in result.answers:
                    answered += answer
        return self._in_order(answered)

    def _in_order(self, answered: list[StreamOutput]) -> list[StreamOutput]:
        for out in answered:
            index, tag = out.tag
            self._done[index] = StreamOutput(out.image, index, out.skipped, tag)
        ready = []
        while self._emitted in self._done:
            ready.append(self._done.pop(self._emitted))
            self._emitted += 1
        return ready
