"""Read a media file with PyAV: decoded video frames and compressed audio packets, in file order.

>>> with FileSource("clip.mp4") as source:
...     print(source.video.width, source.video.frame_rate, source.audio)
...     for item in source:               # VideoFrame or AudioPacket, as the file interleaves them
...         ...

Video frames come out as uint8 RGB with the file's own timestamps. Audio is not decoded here:
the packets go to a sink, which copies them untouched or re-encodes them. Every problem with
the file (missing, not media, no video stream, corrupt data) is a :class:`MediaError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from livediff.exceptions import MediaError, UsageError
from livediff.streams.closing import ClosesOnExit

from .media import AudioPacket, MediaTime, VideoFrame, yuv_frame_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoInfo:
    """The first video stream of a file. ``frame_count`` is ``None`` when the file does not say."""

    width: int
    height: int
    codec: str
    time_base: Fraction
    frame_rate: Fraction | None
    frame_count: int | None
    duration: float | None

    @property
    def expected_frames(self) -> int | None:
        """``frame_count``, else an estimate from duration and rate (mkv/webm keep no count)."""
        if self.frame_count is not None:
            return self.frame_count
        if self.duration and self.frame_rate:
            return round(self.duration * self.frame_rate)
        return None


@dataclass(frozen=True)
class AudioInfo:
    """The first audio stream of a file."""

    codec: str
    sample_rate: int
    channels: int


class FileSource(ClosesOnExit):
    """A media file to iterate once; see the module docstring.

    ``read_audio=False`` skips the audio packets (``audio`` still describes the stream).
    ``yuv=True`` yields ``yuv420p`` pictures as their planes (:class:`YuvFrame`, page-locked
    with ``pinned``) instead of converting them to RGB on the CPU.
    ``close()`` is idempotent; the source is also a context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_audio: bool = True,
        yuv: bool = False,
        pinned: bool = False,
    ) -> None:
        self.path = Path(path)
        self._yuv, self._pinned = yuv, pinned
        self._container = _open_input(self.path)
        try:
            if not self._container.streams.video:
                raise MediaError(
                    f"{self.path} has no video stream (found: {_describe_streams(self._container)})"
                )
            self._video_stream = self._container.streams.video[0]
            # Frame threads: decoding keeps up with the model at any resolution.
            self._video_stream.thread_type = "AUTO"
            audio_streams = self._container.streams.audio
            self._audio_stream = audio_streams[0] if audio_streams else None
            self.video = _video_info(self._video_stream, self._container)
            self.audio = None if self._audio_stream is None else _audio_info(self._audio_stream)
        except BaseException:
            self._container.close()
            raise
        self._read_audio = read_audio and self._audio_stream is not None
        self._started = False
        self._closed = False

    @property
    def audio_stream(self) -> Any:
        """The PyAV audio stream (a template for stream copy, the decoder for re-encoding), or ``None``."""
        return self._audio_stream

    def __iter__(self) -> Iterator[VideoFrame | AudioPacket]:
        if self._started:
            raise UsageError(
                f"{self.path} is being read or was read already; a FileSource is read once"
            )
        self._started = True
        return self._items()

    def _items(self) -> Iterator[VideoFrame | AudioPacket]:
        streams = [self._video_stream] + ([self._audio_stream] if self._read_audio else [])
        index = 0
        last_pts: int | None = None
        try:
            for packet in self._container.demux(streams):
                if packet.stream.type == "audio":
                    if packet.size:  # empty packets only mark the end of the stream
                        yield AudioPacket(packet)
                    continue
                for frame in packet.decode():
                    pts = _frame_pts(frame.pts, index, self.video, last_pts)
                    last_pts = pts
                    image = yuv_frame_of(frame, pinned=self._pinned) if self._yuv else None
                    if image is None:
                        image = frame.to_ndarray(format="rgb24")
                    yield VideoFrame(image, MediaTime(pts, self.video.time_base), index)
                    index += 1
        except av.FFmpegError as exc:
            raise MediaError(
                f"{self.path}: decoding failed after {index} video frames: {exc}"
            ) from exc
        log.debug("%s: %d video frames read", self.path, index)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()


def _open_input(path: Path) -> Any:
    if not path.exists():
        raise MediaError(f"input file not found: {path}")
    if path.is_dir():
        raise MediaError(f"input {path} is a folder, not a media file")
    try:
        return av.open(str(path), "r")
    except av.FFmpegError as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MediaError(f"cannot read {path}: not a media file PyAV can open ({reason})") from exc
    except OSError as exc:
        raise MediaError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _describe_streams(container: Any) -> str:
    kinds = [f"{stream.type} ({stream.codec_context.name})" for stream in container.streams]
    return ", ".join(kinds) or "no streams"


def _video_info(stream: Any, container: Any) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate
    frame_rate = Fraction(rate) if rate else None
    time_base = (
        Fraction(stream.time_base)
        if stream.time_base
        else (1 / frame_rate if frame_rate else Fraction(1, 90000))
    )
    duration: float | None = None
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    return VideoInfo(
        width=int(stream.codec_context.width),
        height=int(stream.codec_context.height),
        codec=str(stream.codec_context.name),
        time_base=time_base,
        frame_rate=frame_rate,
        frame_count=int(stream.frames) or None,
        duration=duration,
    )


def _audio_info(stream: Any) -> AudioInfo:
    context = stream.codec_context
    return AudioInfo(
        codec=str(context.name),
        sample_rate=int(context.sample_rate),
        channels=int(context.channels),
    )


def _frame_pts(pts: int | None, index: int, video: VideoInfo, last_pts: int | None) -> int:
    """The frame's own pts; a frame without one (rare raw streams) gets its index's slot."""
    if pts is not None:
        return int(pts)
    if video.frame_rate is not None:
        return round(index / video.frame_rate / video.time_base)
    return 0 if last_pts is None else last_pts + 1
