"""Frames from a live camera or a media file, read with PyAV, as a blocking iterator.

>>> source = CameraSource("/dev/video0", width=640, height=480, fps=30)   # V4L2 on Linux
>>> source = CameraSource("clip.mp4", loop=True)                           # paced at the file's rate
>>> for frame in source.frames():                                          # VideoFrame (uint8 RGB)
...     ...

A path under ``/dev/`` opens as a V4L2 device; ``input_format`` names any other FFmpeg input
device (``avfoundation`` with ``"0"`` on macOS, ``dshow`` with ``"video=…"`` on Windows).
Anything else is a media file, decoded through :class:`~livediff.streams.file_source.FileSource`.
Files are paced to their own frame rate (``realtime``) so they behave like a camera; a
looping file keeps counting timestamps upward. Every failure is a :class:`MediaError`.
Iteration blocks: run it in a thread (:func:`iterate_in_thread`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction
from typing import Any

import av

from livediff.exceptions import MediaError
from livediff.streams.file_source import FileSource
from livediff.streams.media import MediaTime, VideoFrame

log = logging.getLogger(__name__)


class CameraSource:
    """See the module docstring. ``max_frames`` stops after that many frames (``None``: never)."""

    def __init__(
        self,
        source: str,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        input_format: str | None = None,
        loop: bool = False,
        realtime: bool | None = None,
        max_frames: int | None = None,
    ) -> None:
        self.source = source
        self.is_device = input_format is not None or source.startswith("/dev/")
        self._options = {
            k: v
            for k, v in (
                ("video_size", f"{width}x{height}" if width and height else None),
                ("framerate", str(fps) if fps else None),
            )
            if v
        }
        self._input_format = input_format or ("v4l2" if self.is_device else None)
        self.loop = loop and not self.is_device
        self.realtime = (not self.is_device) if realtime is None else realtime
        self.max_frames = max_frames
        self._stopped = False
        if not self.is_device:
            with FileSource(source, read_audio=False) as probe:
                rate = probe.video.frame_rate
            self.frame_rate = Fraction(rate) if rate else Fraction(30)
        else:
            self.frame_rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(30)

    def stop(self) -> None:
        """Make :meth:`frames` end after the frame it is reading (thread-safe)."""
        self._stopped = True

    def frames(self) -> Iterator[VideoFrame]:
        frames = self._device_frames() if self.is_device else self._file_frames()
        for count, frame in enumerate(frames):
            if self._stopped or (self.max_frames is not None and count >= self.max_frames):
                return
            yield frame

    def _device_frames(self) -> Iterator[VideoFrame]:
        try:
            container = av.open(self.source, "r", format=self._input_format, options=self._options)
        except (av.FFmpegError, OSError) as exc:
            raise MediaError(
                f"cannot open camera {self.source} ({self._input_format}): {exc}"
            ) from exc
        try:
            stream = container.streams.video[0]
            time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 1_000_000)
            for index, frame in enumerate(container.decode(stream)):
                pts = (
                    frame.pts
                    if frame.pts is not None
                    else round(index / self.frame_rate / time_base)
                )
                yield VideoFrame(
                    frame.to_ndarray(format="rgb24"), MediaTime(int(pts), time_base), index
                )
        except av.FFmpegError as exc:
            raise MediaError(f"camera {self.source} stopped: {exc}") from exc
        finally:
            container.close()

    def _file_frames(self) -> Iterator[VideoFrame]:
        index, offset = 0, 0
        start = time.monotonic()
        while True:
            last_end = offset
            with FileSource(self.source, read_audio=False) as source:
                time_base = source.video.time_base
                step = round(1 / (self.frame_rate * time_base)) or 1
                for item in source:
                    assert isinstance(item, VideoFrame)
                    pts = item.time.pts + offset
                    if self.realtime:
                        _sleep_until(start + float(pts * time_base))
                    yield VideoFrame(item.image, MediaTime(pts, time_base), index)
                    index += 1
                    last_end = pts + step
            if not self.loop or last_end == offset:
                return
            offset = last_end


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
