"""Media for the Python clients, with PyAV: frames from a camera or a file, frames into a file.

>>> source = FrameSource("clip.mp4", loop=True)        # or "/dev/video0" (V4L2), paced at its rate
>>> for frame in source.frames():                      # Frame: uint8 RGB, seconds, index
...     ...
>>> with FrameWriter("out.mp4", width=512, height=512, frame_rate=source.frame_rate) as out:
...     out.write(image)

The clients keep this small copy instead of the server's ``FileSource``/``FileSink``: a client
speaks the wire protocol (:mod:`livediff.wire`) and runs without any server module. It reads
video only, and writes video only (H.264 in .mp4/.mov/.mkv, VP8 in .webm, raw in .y4m). A
path under ``/dev/`` opens as a V4L2 camera, ``input_format`` names any other FFmpeg input
device. Files are paced to their own frame rate (``realtime``) so they behave like a camera,
and a looping file keeps its times rising. Every failure is a :class:`MediaError`. Iteration
blocks: drive it from the event loop with :func:`iterate_in_thread`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np

from livediff.exceptions import MediaError

# extension → (container, video codec); every one of them takes yuv420p
OUTPUT_FORMATS = {
    ".mp4": ("mp4", "libx264"),
    ".mov": ("mov", "libx264"),
    ".mkv": ("matroska", "libx264"),
    ".webm": ("webm", "libvpx"),
    ".y4m": ("yuv4mpegpipe", "rawvideo"),
}


@dataclass(frozen=True, eq=False)
class Frame:
    """One picture: ``image`` uint8 RGB ``[H, W, 3]``, ``seconds`` since the first, ``index`` from 0."""

    image: np.ndarray = field(repr=False)
    seconds: float
    index: int


class FrameSource:
    """See the module docstring. ``max_frames`` stops after that many frames (``None``: never)."""

    def __init__(
        self,
        source: str,
        *,
        loop: bool = False,
        realtime: bool | None = None,
        max_frames: int | None = None,
        input_format: str | None = None,
    ) -> None:
        self.source = source
        self.is_device = input_format is not None or source.startswith("/dev/")
        self._input_format = input_format or ("v4l2" if self.is_device else None)
        self.loop = loop and not self.is_device
        self.realtime = (not self.is_device) if realtime is None else realtime
        self.max_frames = max_frames
        self._stopped = False
        self.frame_rate = Fraction(30)
        if not self.is_device:
            with self._open() as container:
                rate = container.streams.video[0].average_rate
            self.frame_rate = Fraction(rate) if rate else Fraction(30)

    def stop(self) -> None:
        """Make :meth:`frames` end after the frame it is reading (thread-safe)."""
        self._stopped = True

    def frames(self) -> Iterator[Frame]:
        start = time.monotonic()
        index, offset = 0, 0.0
        while True:
            last_end = offset
            for seconds, image in self._decode():
                if self._stopped or (self.max_frames is not None and index >= self.max_frames):
                    return
                if self.realtime and not self.is_device:
                    _sleep_until(start + offset + seconds)
                yield Frame(image, offset + seconds, index)
                index += 1
                last_end = offset + seconds + float(1 / self.frame_rate)
            if not self.loop or last_end == offset:
                return
            offset = last_end

    def _open(self) -> Any:
        try:
            container = av.open(self.source, "r", format=self._input_format)
        except (av.FFmpegError, OSError) as exc:
            raise MediaError(f"cannot open {self.source}: {exc}") from exc
        if not container.streams.video:
            container.close()
            raise MediaError(f"{self.source} has no video stream")
        return container

    def _decode(self) -> Iterator[tuple[float, np.ndarray]]:
        """(seconds since the first frame, RGB image) for each frame of one pass."""
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            first: float | None = None
            try:
                for count, frame in enumerate(container.decode(stream)):
                    at = frame.time if frame.time is not None else float(count / self.frame_rate)
                    first = at if first is None else first
                    yield at - first, frame.to_ndarray(format="rgb24")
            except av.FFmpegError as exc:
                raise MediaError(f"{self.source}: decoding failed: {exc}") from exc


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)  # pacing a file to its frame rate, on the reader thread


async def iterate_in_thread(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    """Drive a blocking iterator from the event loop, one item at a time, in the default executor."""
    loop = asyncio.get_running_loop()
    done = object()
    while True:
        item = await loop.run_in_executor(None, next, iterator, done)
        if item is done:
            return
        yield item


class FrameWriter:
    """Write RGB frames to a video file at ``frame_rate``, timed by their order. ``close()`` is
    idempotent and also runs when a ``with`` block fails, so the file stays playable.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, width: int, height: int, frame_rate: Fraction
    ) -> None:
        extension = Path(path).suffix.lower()
        if extension not in OUTPUT_FORMATS:
            raise MediaError(
                f"cannot write {path}: {extension or 'no extension'} is not one of "
                f"{', '.join(OUTPUT_FORMATS)}"
            )
        container_format, codec = OUTPUT_FORMATS[extension]
        try:
            self._container: Any = av.open(os.fspath(path), "w", format=container_format)
            stream: Any = self._container.add_stream(codec, rate=frame_rate)
        except (av.FFmpegError, OSError) as exc:
            raise MediaError(f"cannot write {path}: {exc}") from exc
        self._stream = stream
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.time_base = Fraction(1) / frame_rate
        self.path = path
        self.frames = 0
        self._closed = False

    def write(self, image: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts, frame.time_base = self.frames, self._stream.time_base
        try:
            self._container.mux(self._stream.encode(frame))
        except av.FFmpegError as exc:
            raise MediaError(f"writing {self.path} failed: {exc}") from exc
        self.frames += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._stream.encode(None))
        except av.FFmpegError as exc:
            raise MediaError(f"finishing {self.path} failed: {exc}") from exc
        finally:
            self._container.close()

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
