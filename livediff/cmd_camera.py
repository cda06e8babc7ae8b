"""``livediff camera``: a camera or a file, through the model, into a virtual camera (or a file).

    livediff camera --input /dev/video0 --vcam --prompt "a watercolor painting"
    livediff camera --input clip.mp4 --loop --vcam --vcam-device /dev/video10
    livediff camera --input clip.mp4 --output styled.mp4
    livediff camera --input clip.mp4 --vcam --vcam-backend y4m --vcam-device out.y4m   # test backend
    livediff camera --input ndi:"STUDIO (Camera 1)" --ndi-out livediff --osc-port 9000  # NDI + OSC

The virtual camera is v4l2loopback on Linux and OBS's camera on Windows and macOS; other
applications (OBS, video calls, browsers) pick it up like any webcam. ``--ndi-out NAME``
publishes the output as an NDI source instead (TouchDesigner, Resolume, OBS with DistroAV), and
``--input ndi:NAME`` takes an NDI source as the camera. Without ``--output`` or ``--ndi-out``
the virtual camera is the output; with several, frames go to each.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from livediff.cli_options import (
    add_lora_library_options,
    add_model_options,
    add_runtime_options,
    add_stream_options,
    add_style_image_option,
    load_toml,
)
from livediff.exceptions import ParameterError

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    from livediff.cmd_serve import add_osc_options

    parser = subparsers.add_parser(
        "camera",
        help="run a camera or file through the model into a virtual camera",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("input")
    source.add_argument(
        "--input",
        required=True,
        metavar="DEVICE|FILE|ndi:NAME",
        help="/dev/videoN, an FFmpeg device name, a media file, or ndi:NAME (an NDI source: "
        "its full 'HOST (NAME)' or just NAME)",
    )
    source.add_argument(
        "--input-format",
        help="FFmpeg input device format (v4l2, avfoundation, dshow); default: v4l2 for /dev/*",
    )
    source.add_argument(
        "--input-size", metavar="WxH", help="size to ask the camera for, e.g. 640x480"
    )
    source.add_argument("--input-fps", type=float, help="frame rate to ask the camera for")
    source.add_argument("--loop", action="store_true", help="loop a file input")
    source.add_argument(
        "--no-realtime",
        action="store_true",
        help="read a file as fast as possible instead of at its frame rate",
    )
    source.add_argument("--max-frames", type=int, help="stop after this many input frames")
    sink = parser.add_argument_group("output")
    sink.add_argument(
        "--vcam",
        action="store_true",
        help="send the output to a virtual camera (the default without --output)",
    )
    sink.add_argument(
        "--vcam-backend",
        help="pyvirtualcam backend: v4l2loopback, obs, unitycapture, or y4m (writes --vcam-device as a file)",
    )
    sink.add_argument(
        "--vcam-device",
        help="virtual camera device, e.g. /dev/video10 (default: the first free one)",
    )
    sink.add_argument(
        "--vcam-fps",
        type=float,
        default=30.0,
        help="frame rate the virtual camera announces (default 30)",
    )
    sink.add_argument(
        "--output", help="also (or only) write the output to this file (.mp4, .mkv, .webm, .y4m …)"
    )
    from livediff.settings.flags import add_flags
    from livediff.streams.ndi_config import NdiConfig

    add_flags(sink, NdiConfig)
    add_osc_options(parser)
    add_model_options(parser)
    add_stream_options(parser)
    add_runtime_options(parser)
    add_lora_library_options(parser)
    add_style_image_option(parser)
    parser.set_defaults(handler=run)


def _size(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ParameterError(f"--input-size {text!r} must look like 640x480") from None
    return width, height


def run(args: argparse.Namespace) -> int:
    from livediff.cli_options import settings_from
    from livediff.cmd_serve import engine_from_args, osc_config_from_args, run_event_loop
    from livediff.streams.ndi_config import NdiConfig
    from livediff.streams.server_config import ServerConfig

    if args.max_frames is not None and args.max_frames < 1:
        raise ParameterError("--max-frames must be at least 1")
    width, height = _size(args.input_size)
    config = load_toml(args.config)
    osc_config = osc_config_from_args(args, config)
    ndi_config = settings_from(NdiConfig, config, "ndi", args)
    limits = ServerConfig.from_table(config.get("server"))  # the control-message rate limit
    source = open_source(args, width, height)
    try:
        sinks = open_sinks(
            args, model_resolution(args, config), source.frame_rate, ndi_config.out
        )  # before the slow model load
        try:
            engine = engine_from_args(args, config)
            return run_event_loop(_camera(engine, source, sinks, osc_config, limits))
        finally:
            for sink in sinks:
                sink.close()
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


NDI_PREFIX = "ndi:"


def open_source(args: argparse.Namespace, width: int | None, height: int | None) -> Any:
    """The camera, file or (``ndi:NAME``) NDI source ``--input`` names."""
    from livediff.streams.camera_source import CameraSource

    if args.input.startswith(NDI_PREFIX):
        from livediff.streams.ndi_io import NdiSource

        camera_only = [
            flag
            for flag, given in (
                ("--input-format", args.input_format),
                ("--input-size", args.input_size),
                ("--input-fps", args.input_fps),
                ("--loop", args.loop),
                ("--no-realtime", args.no_realtime),
            )
            if given
        ]
        if camera_only:
            raise ParameterError(
                f"{', '.join(camera_only)}: for cameras and files, not an NDI input "
                "(it sends at its own size and rate)"
            )
        name = args.input[len(NDI_PREFIX) :]
        if not name:
            raise ParameterError("--input ndi:NAME needs the NDI source's name")
        source = NdiSource(name, max_frames=args.max_frames)
        print(
            f"livediff camera: NDI input {source.source!r} at {source.frame_rate} fps", flush=True
        )
        return source
    return CameraSource(
        args.input,
        width=width,
        height=height,
        fps=args.input_fps,
        input_format=args.input_format,
        loop=args.loop,
        realtime=False if args.no_realtime else None,
        max_frames=args.max_frames,
    )


def open_sinks(
    args: argparse.Namespace, size: tuple[int, int], frame_rate: Any, ndi_out: str | None = None
) -> list[Any]:
    """The virtual camera (``--vcam``, or neither ``--output`` nor ``--ndi-out``), the
    ``--output`` file and the ``--ndi-out`` NDI source."""
    from livediff.streams.file_sink import FileSink
    from livediff.streams.vcam import VirtualCamera

    width, height = size
    sinks: list[Any] = []
    try:
        if args.vcam or not (args.output or ndi_out):
            camera = VirtualCamera(
                width, height, fps=args.vcam_fps, backend=args.vcam_backend, device=args.vcam_device
            )
            sinks.append(camera)
            print(
                f"livediff camera: virtual camera {camera.device} ({camera.backend}) {width}x{height}",
                flush=True,
            )
        if args.output:
            time_base = 1 / frame_rate
            file_sink = FileSink(
                args.output, width=width, height=height, frame_rate=frame_rate, time_base=time_base
            )
            sinks.append(_FileOutput(file_sink, time_base))
        if ndi_out:
            from livediff.streams.ndi_io import NdiSender

            sender = NdiSender(ndi_out, width, height, frame_rate=frame_rate)
            sinks.append(sender)
            print(f"livediff camera: NDI source {sender.name!r} {width}x{height}", flush=True)
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


async def _camera(
    engine: Any, source: Any, sinks: list[Any], osc_config: Any = None, limits: Any = None
) -> int:
    from livediff.cmd_serve import osc_control
    from livediff.streams.local_pipeline import describe, run_local_pipeline

    started = time.monotonic()
    await engine.start()
    try:
        async with osc_control(engine, osc_config, "127.0.0.1", limits, "camera"):
            result = await run_local_pipeline(engine, source, sinks)
    finally:
        await engine.stop()
    print(f"livediff camera: {describe(result, started)}", flush=True)
    return 0


def model_resolution(args: argparse.Namespace, config: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of the outputs: ``--width/--height`` or ``[stream]``, else the preset's.
    Settings a camera session cannot run are refused here, before the model loads."""
    from livediff.cli_options import (
        model_spec_from_args,
        refuse_client_images,
        stream_settings_from_args,
    )
    from livediff.models.presets import get_preset

    preset = get_preset(model_spec_from_args(args, config).preset)
    stream_config, params = stream_settings_from_args(args, config, preset)
    refuse_client_images(params, "livediff camera")
    return int(stream_config.width or preset.width), int(stream_config.height or preset.height)


class _FileOutput:
    """A :class:`~livediff.streams.file_sink.FileSink` as a frame sink, frames numbered at its rate."""

    def __init__(self, sink: Any, time_base: Any) -> None:
        self._sink = sink
        self._time_base = time_base
        self._index = 0

    def send(self, image: Any, time: Any = None) -> None:  # numbered at its rate, not by time
        from livediff.streams.media import MediaTime, VideoFrame

        self._sink.write(VideoFrame(image, MediaTime(self._index, self._time_base), self._index))
        self._index += 1

    def close(self) -> None:
        self._sink.close()
