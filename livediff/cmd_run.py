"""``livediff run INPUT OUTPUT``: transform a video file frame by frame with a diffusion model.

The file goes through the same :class:`~livediff.engine.stream.Stream` a live session uses.
Each input frame carries its timestamp as the stream's tag, so each output frame gets the
timestamp of the input it answers, and the Stream Batch delay (``steps - 1`` frames) is
compensated: the output has as many frames as the input, at the same times.

Decoding, the model and encoding overlap (:func:`transform`): a thread decodes ahead, the
main thread runs the model, a thread encodes behind. Frames stay YUV on the host: the decoder's
``yuv420p`` planes go to the device as they are, and on CUDA the outputs come back as I420
(converted on the device) for the encoder, so the CPU converts no colour.

A file has no deadline, so ``--batch N`` (default ``auto``) runs N streams over it, frame ``i``
in stream ``i mod N``, as one batched model call per N frames
(:mod:`livediff.engine.interleaved` says what that gives and what it refuses).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from livediff.cli_options import (
    add_lora_library_options,
    add_model_options,
    add_stream_options,
    add_style_image_option,
    load_toml,
    model_spec_from_args,
    stream_settings_from_args,
)
from livediff.exceptions import MediaError

if TYPE_CHECKING:
    from livediff.engine.frames import StreamOutput
    from livediff.engine.interleaved import InterleavedStreams
    from livediff.engine.stream import Stream
    from livediff.streams.file_sink import FileSink
    from livediff.streams.file_source import FileSource

log = logging.getLogger(__name__)

# The values of livediff.streams.file_sink.AudioMode, spelled out so --help needs no PyAV.
AUDIO_MODES = ("auto", "copy", "drop")

DESCRIPTION = """\
Transform a video file with a few-step diffusion model, frame by frame, as a live stream would.

The output is at the model resolution: the preset's native size (512x512 for sd-turbo), or
--width/--height. Each input frame is fitted to it by --fit (crop: the centred region with
the output's aspect ratio; resize: the whole frame, stretched). The output keeps the input's
frame rate and timestamps; its codec follows the extension:

  .mp4 .mov .mkv   H.264 (libx264, yuv420p)      audio: AAC
  .webm            VP8 (libvpx, yuv420p)          audio: Opus
  .y4m             raw yuv420p                    no audio

Audio (--audio): auto copies the input's audio packets untouched when the output container
accepts that codec and re-encodes to the container's usual codec otherwise; copy insists on a
copy (an error if impossible); drop writes no audio.

Batching (--batch): a file has no deadline, so N streams share it, frame i in stream i mod N,
and their frames run as one batched model call. The output is one stream's, frame for frame
(up to float rounding), at any --steps. auto batches up to 8 UNet rows per call (8 streams at
one step) unless a setting carries state from frame to frame (--similarity-threshold,
--feature-bank, --latent-feedback, a previous_output ControlNet, --mode txt2img) or
--no-denoising-batch is given: then it runs one stream and logs why (-v). An explicit
--batch N above 1 with one of those is refused.
"""

EPILOG = """\
examples:
  livediff sample clip.mp4 && livediff run clip.mp4 out.mp4 --prompt "a watercolor painting"
  livediff run in.mov out.webm --prompt "oil painting" --strength 0.6 --steps 2 --seed 7
  livediff run in.mp4 out.mp4 --model tiny --weights random --prompt test   # offline smoke test
  livediff run in.mp4 out.mp4 --prompt "ink drawing" --batch 1   # one stream, no batching
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="transform a video file (INPUT → OUTPUT at the model resolution)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input", metavar="INPUT", help="video file to read (any format FFmpeg decodes)"
    )
    parser.add_argument(
        "output",
        metavar="OUTPUT",
        help="file to write: .mp4, .mov, .mkv, .webm or .y4m (overwritten)",
    )
    parser.add_argument(
        "--audio",
        choices=AUDIO_MODES,
        default="auto",
        help="what to do with the input's audio (default: auto)",
    )
    parser.add_argument(
        "--batch",
        type=_batch_value,
        default=None,
        metavar="N|auto",
        help="streams run over the file as one batched call per N frames (default: auto; "
        "see Batching above)",
    )
    add_model_options(parser)
    add_stream_options(parser)
    add_lora_library_options(parser)
    add_style_image_option(parser)
    parser.set_defaults(handler=run_command)


def _batch_value(text: str) -> int | None:
    """``--batch``: ``auto`` (``None``) or a stream count (range checked by ``choose_batch``)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number, got {text!r}") from None


def run_command(args: argparse.Namespace) -> int:
    from livediff.cli_options import (
        load_for_backend,
        lora_library_from_args,
        refuse_client_images,
        style_image_from_args,
    )
    from livediff.engine.interleaved import choose_batch, file_job
    from livediff.models.presets import get_preset
    from livediff.streams.file_sink import AudioMode, FileSink, output_format_for, plan_audio
    from livediff.streams.file_source import FileSource

    # Everything a user can get wrong is checked before the model loads.
    config = load_toml(args.config)
    spec = model_spec_from_args(args, config)
    stream_config, params = stream_settings_from_args(args, config, get_preset(spec.preset))
    refuse_client_images(params, "livediff run")
    choose_batch(args.batch, stream_config, params)  # an impossible --batch is refused here
    lora_library = lora_library_from_args(args, config)
    lora_library.entries()  # a missing or empty library is refused before the model loads
    style_image = style_image_from_args(args, spec)
    output_format = output_format_for(args.output)
    _check_paths(Path(args.input), Path(args.output))
    mode = AudioMode(args.audio)

    import torch

    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    with FileSource(
        args.input, read_audio=mode is not AudioMode.DROP, yuv=True, pinned=cuda
    ) as source:
        audio = plan_audio(output_format, source.audio_stream, mode)
        if args.prompt is None and "prompt" not in config.get("params", {}):
            log.warning("no --prompt given: generating with an empty prompt")
        bundle, backend = load_for_backend(spec, args, params.controlnets, lora_library)
        if style_image is not None:
            from livediff.engine.style_images import encode_style_image

            params = params.updated(ip_image=encode_style_image([bundle], style_image, pin=True))
        stream, choice = file_job(
            bundle, backend, stream_config, params, args.batch, session_id=source.path.name
        )
        frame_rate = source.video.frame_rate
        if frame_rate is None:
            frame_rate = Fraction(30)
            log.warning("%s does not state a frame rate; the output assumes 30 fps", source.path)
        sink = FileSink(
            args.output,
            width=stream.width,
            height=stream.height,
            frame_rate=frame_rate,
            time_base=source.video.time_base,
            audio=audio,
            output_format=output_format,
        )
        with sink:
            stats = transform(source, stream, sink, depth=queue_depth(choice.streams))
    print(
        f"wrote {args.output}: {sink.frames_written} frames, {stream.width}x{stream.height} "
        f"{output_format.video_codec}, {float(frame_rate):g} fps"
    )
    print(f"audio: {audio.summary}")
    print(
        f"speed: {stats.fps:.1f} frames/s end to end ({stats.seconds:.1f} s), "
        f"batch {choice.streams} ({choice.reason})"
    )
    return 0


QUEUE_DEPTH = 8  # frames decoded ahead of the model and waiting for the encoder


def queue_depth(batch: int) -> int:
    """Queue lengths for a job of ``batch`` streams: two batched calls' worth, at least 8."""
    return max(QUEUE_DEPTH, 2 * batch)


@dataclass(frozen=True)
class TransformStats:
    """How one :func:`transform` went: frames written, wall time, and each thread's busy time.

    ``decode_s``: decoding (the decoder thread, not counting waits for room in the queue);
    ``model_s``: the model thread's host time in the model's calls (on CUDA mostly launching);
    ``encode_s``: encoding and muxing (not counting waits for the device's outputs);
    ``gpu_s`` (CUDA only, else ``None``): device time from the start to the end of each model
    call's work, summed; it counts gaps inside a call where the device waited for the host.
    """

    frames: int
    seconds: float
    decode_s: float
    model_s: float
    encode_s: float
    gpu_s: float | None = None

    @property
    def fps(self) -> float:
        """Frames written per second, end to end."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def transform(
    source: FileSource,
    stream: Stream | InterleavedStreams,
    sink: FileSink,
    *,
    depth: int = QUEUE_DEPTH,
) -> TransformStats:
    """Feed every video frame of ``source`` through ``stream`` into ``sink``; audio goes straight
    through, in order. Decoding and encoding run on their own threads, bounded queues of
    ``depth`` items between them, so the three overlap; an error in either thread ends the run
    with that error. The progress bar counts frames written (its rate is the end-to-end fps).
    """
    from livediff.streams.media import VideoFrame

    decoded: queue.Queue[Any] = queue.Queue(depth)
    encoding: queue.Queue[Any] = queue.Queue(depth)
    failures: list[BaseException] = []
    stop = threading.Event()
    cuda = stream.bundle.device.type == "cuda"
    to_i420 = cuda  # the CPU path lets FFmpeg convert instead
    busy = {"decode": 0.0, "model": 0.0, "encode": 0.0, "gpu": 0.0}
    written = [0]
    marks: deque[tuple[Any, Any]] = deque()  # CUDA events around each model call not yet read

    def decode() -> None:
        try:
            items = iter(source)
            while True:
                start = time.perf_counter()
                item = next(items, _END)
                busy["decode"] += time.perf_counter() - start
                if item is _END:
                    return
                while not stop.is_set():
                    try:
                        decoded.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:
            failures.append(exc)
        finally:
            with contextlib.suppress(queue.Full):  # nobody reads any more once stopped
                decoded.put(_END, timeout=1.0)

    def encode() -> None:
        try:
            while (item := encoding.get()) is not _END:
                if isinstance(item, _Pending):
                    item = item.ready()
                start = time.perf_counter()
                sink.write(item)
                busy["encode"] += time.perf_counter() - start
                if isinstance(item, VideoFrame):
                    written[0] += 1
                    progress.update(1)
        except BaseException as exc:
            failures.append(exc)
            stop.set()
            while encoding.get() is not _END:  # let the model thread finish putting
                pass

    def model(call: Callable[[], list[StreamOutput]]) -> None:
        start = time.perf_counter()
        first = _timing_event() if cuda else None
        outputs = call()
        if first is not None:
            marks.append((first, _timing_event()))
            while marks and marks[0][1].query():  # the device is past it: count it, drop it
                begun, ended = marks.popleft()
                busy["gpu"] += begun.elapsed_time(ended) / 1000.0
        busy["model"] += time.perf_counter() - start
        for output in outputs:
            encoding.put(_Pending.of(output, to_i420, VideoFrame))

    reader = threading.Thread(target=decode, name="livediff-decode", daemon=True)
    writer = threading.Thread(target=encode, name="livediff-encode", daemon=True)
    # disable=None: a bar on a terminal, nothing in logs and pipes. Its rate is frames written
    # per second: the end-to-end speed.
    progress = tqdm(
        total=source.video.expected_frames, unit="frame", desc=source.path.name, disable=None
    )
    started = time.perf_counter()
    reader.start()
    writer.start()
    try:
        while not stop.is_set() and (item := decoded.get()) is not _END:
            if isinstance(item, VideoFrame):
                model(partial(stream.process, item.image, tag=item.time))
            else:
                encoding.put(item)
        if not stop.is_set() and not failures:
            model(stream.flush)
    finally:
        stop.set()
        encoding.put(_END)
        writer.join()
        reader.join(timeout=5)
        progress.close()  # after the last frame written: the bar's count and rate are final
    if failures:
        raise failures[0]
    seconds = time.perf_counter() - started  # the encoder has written the last frame
    if marks:
        marks[-1][1].synchronize()
    gpu_s = busy["gpu"] + sum(a.elapsed_time(b) for a, b in marks) / 1000.0 if cuda else None
    return TransformStats(written[0], seconds, busy["decode"], busy["model"], busy["encode"], gpu_s)


def _timing_event() -> Any:
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


_END = object()  # end of a queue


@dataclass
class _Pending:
    """An output on its way to the host: an asynchronous copy and the event that ends it."""

    frame: Any  # the VideoFrame type, with a tensor image until ready()
    done: Any

    @classmethod
    def of(cls, output: StreamOutput, to_i420: bool, frame_type: Any) -> _Pending:
        import torch

        from livediff.kernels.yuv import rgb_to_i420

        image = output.image
        if not to_i420:
            return cls(frame_type(image.cpu().numpy(), output.tag, output.index), None)
        # packed I420 already (a batched decode converts on the device), else RGB to convert
        packed = image if image.ndim == 1 else rgb_to_i420(image.unsqueeze(0))[0]
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(frame_type(host, output.tag, output.index), done)

    def ready(self) -> Any:
        """Wait for the copy (encoder thread) and give the frame with a numpy image."""
        if self.done is None:
            return self.frame
        self.done.synchronize()
        frame = self.frame
        return type(frame)(frame.image.numpy(), frame.time, frame.index)


def _check_paths(input_path: Path, output_path: Path) -> None:
    """Refuse an OUTPUT that cannot be written before the model loads (FileSink checks again)."""
    if output_path.is_dir():
        raise MediaError(f"cannot write {output_path}: it is a folder")
    folder = output_path.parent
    if not folder.is_dir():
        raise MediaError(f"cannot write {output_path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise MediaError(f"cannot write {output_path}: no permission to write in {folder}")
    # Writing would truncate the input while it is being read.
    if input_path.exists() and output_path.exists() and os.path.samefile(input_path, output_path):
        raise MediaError(f"OUTPUT {output_path} is the same file as INPUT; choose another name")
