"""``livediff run INPUT OUTPUT``: transform a video file frame by frame with a diffusion model.

The file goes through the same :class:`~livediff.engine.stream.Stream` a live session uses.
Each input frame carries its timestamp as the stream's tag, so each output frame gets the
timestamp of the input it answers, and the Stream Batch delay (``steps - 1`` frames) is
compensated: the output has as many frames as the input, at the same times.

Decoding, the model and encoding overlap (:func:`transform`): a thread decodes ahead, the
main thread runs the model, a thread encodes behind. Frames stay YUV on the host: the decoder's
``yuv420p`` planes go to the device as they are, and on CUDA the outputs come back as I420
(converted on the device) for the encoder, so the CPU converts no colour.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction
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
from livediff.exceptions import MediaError, ParameterError

if TYPE_CHECKING:
    from livediff.engine.frames import StreamOutput
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
"""

EPILOG = """\
examples:
  livediff sample clip.mp4 && livediff run clip.mp4 out.mp4 --prompt "a watercolor painting"
  livediff run in.mov out.webm --prompt "oil painting" --strength 0.6 --steps 2 --seed 7
  livediff run in.mp4 out.mp4 --model tiny --weights random --prompt test   # offline smoke test
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
    add_model_options(parser)
    add_stream_options(parser)
    add_lora_library_options(parser)
    add_style_image_option(parser)
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    from livediff.cli_options import load_for_backend, lora_library_from_args, style_image_from_args
    from livediff.engine.backend_fit import make_stream
    from livediff.models.presets import get_preset
    from livediff.streams.file_sink import AudioMode, FileSink, output_format_for, plan_audio
    from livediff.streams.file_source import FileSource

    # Everything a user can get wrong is checked before the model loads.
    config = load_toml(args.config)
    spec = model_spec_from_args(args, config)
    stream_config, params = stream_settings_from_args(args, config, get_preset(spec.preset))
    _refuse_client_images(params)
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
        stream = make_stream(bundle, backend, stream_config, params, session_id=source.path.name)
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
            transform(source, stream, sink)
    print(
        f"wrote {args.output}: {sink.frames_written} frames, {stream.width}x{stream.height} "
        f"{output_format.video_codec}, {float(frame_rate):g} fps"
    )
    print(f"audio: {audio.summary}")
    return 0


QUEUE_DEPTH = 8  # frames decoded ahead of the model and waiting for the encoder


def transform(source: FileSource, stream: Stream, sink: FileSink) -> None:
    """Feed every video frame of ``source`` through ``stream`` into ``sink``; audio goes straight
    through, in order. Decoding and encoding run on their own threads, bounded queues between
    them, so the three overlap; an error in either thread ends the run with that error.
    """
    from livediff.streams.media import VideoFrame

    decoded: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
    encoding: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
    failures: list[BaseException] = []
    stop = threading.Event()
    to_i420 = stream.bundle.device.type == "cuda"  # the CPU path lets FFmpeg convert instead

    def decode() -> None:
        try:
            for item in source:
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
                sink.write(item)
        except BaseException as exc:
            failures.append(exc)
            stop.set()
            while encoding.get() is not _END:  # let the model thread finish putting
                pass

    def write(outputs: list[StreamOutput]) -> None:
        for output in outputs:
            encoding.put(_Pending.of(output, to_i420, VideoFrame))

    reader = threading.Thread(target=decode, name="livediff-decode", daemon=True)
    writer = threading.Thread(target=encode, name="livediff-encode", daemon=True)
    reader.start()
    writer.start()
    # disable=None: a bar on a terminal, nothing in logs and pipes.
    try:
        with tqdm(
            total=source.video.expected_frames, unit="frame", desc=source.path.name, disable=None
        ) as progress:
            while not stop.is_set() and (item := decoded.get()) is not _END:
                if isinstance(item, VideoFrame):
                    write(stream.process(item.image, tag=item.time))
                    progress.update(1)
                else:
                    encoding.put(item)
            if not stop.is_set() and not failures:
                write(stream.flush())
    finally:
        stop.set()
        encoding.put(_END)
        writer.join()
        reader.join(timeout=5)
    if failures:
        raise failures[0]


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
        packed = rgb_to_i420(image.unsqueeze(0))[0]  # on the device
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


def _refuse_client_images(params: Any) -> None:
    """A file run has no client to send control images: a ``client`` use would never run."""
    from livediff.models.control_uses import Preprocessor

    for use in params.controlnets:
        if use.preprocessor is Preprocessor.CLIENT:
            raise ParameterError(
                f"controlnet {use.controlnet!r}: the client preprocessor takes the images a "
                "client sends to livediff serve, and livediff run has none: use canny, depth, "
                "soft_edge, passthrough or previous_output",
                field="controlnets",
            )
