"""Write a media file with PyAV: encoded video, and audio copied from a source or encoded.

>>> fmt = output_format_for("out.mp4")                       # codec by extension
>>> plan = plan_audio(fmt, source.audio_stream, AudioMode.AUTO)
>>> with FileSink("out.mp4", width=512, height=512, frame_rate=source.video.frame_rate,
...               time_base=source.video.time_base, audio=plan) as sink:
...     sink.write(video_frame)                               # VideoFrame, AudioPacket or AudioSamples
>>> print("audio:", plan.summary)

Video frames keep the timestamps they carry (y4m stores only a frame rate). Audio follows an
:class:`AudioPlan`: packets are muxed untouched when the container accepts their codec, else
decoded and re-encoded to the container's usual codec. Containers without negative timestamps
(mkv, webm) shift every stream by the same amount when copied audio starts before zero (AAC's
priming packet, ~21 ms), which keeps audio and video in sync.

``close()`` flushes the encoders and writes the trailer. It is idempotent, and it also runs
when the ``with`` block fails, so an interrupted run leaves a playable file. Every problem
writing is a :class:`MediaError`.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, replace
from enum import Enum
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import av
import numpy as np

from livediff.exceptions import MediaError
from livediff.streams.closing import ClosesOnExit

from .media import AudioPacket, AudioSamples, MediaItem, VideoFrame

log = logging.getLogger(__name__)


class AudioMode(str, Enum):
    """What ``livediff run`` does with the input's audio.

    - ``auto``: copy the packets if the output container accepts the codec, else re-encode.
    - ``copy``: copy the packets; an error if the container cannot hold the codec.
    - ``drop``: write no audio.
    """

    AUTO = "auto"
    COPY = "copy"
    DROP = "drop"


class AudioAction(str, Enum):
    """What a sink does with each audio item: nothing, mux it untouched, or encode it."""

    NONE = "none"
    COPY = "copy"
    ENCODE = "encode"


@dataclass(frozen=True)
class OutputFormat:
    """A container and the codecs livediff writes into it. ``audio_codec=None``: no audio."""

    extension: str
    container: str
    video_codec: str
    pix_fmt: str
    audio_codec: str | None
    video_options: tuple[tuple[str, str], ...] = ()
    video_bit_rate: int | None = None
    audio_bit_rate: int | None = None
    has_timestamps: bool = True  # y4m stores a frame rate, not per-frame times


def _h264_format(extension: str, container: str) -> OutputFormat:
    return OutputFormat(
        extension, container, "libx264", "yuv420p", "aac", (("crf", "18"),), audio_bit_rate=160_000
    )


OUTPUT_FORMATS: MappingProxyType[str, OutputFormat] = MappingProxyType(
    {
        ".mp4": _h264_format(".mp4", "mp4"),
        ".mov": _h264_format(".mov", "mov"),
        ".mkv": _h264_format(".mkv", "matroska"),
        # VP8 encodes several times faster than VP9 on CPU; libvpx wants a bit rate cap with crf.
        ".webm": OutputFormat(
            ".webm",
            "webm",
            "libvpx",
            "yuv420p",
            "libopus",
            (("crf", "10"),),
            video_bit_rate=8_000_000,
            audio_bit_rate=128_000,
        ),
        ".y4m": OutputFormat(
            ".y4m", "yuv4mpegpipe", "rawvideo", "yuv420p", None, has_timestamps=False
        ),
    }
)


def output_format_for(path: str | os.PathLike[str]) -> OutputFormat:
    """The :class:`OutputFormat` for ``path``'s extension; an unknown one is a :class:`MediaError`."""
    extension = Path(path).suffix.lower()
    try:
        return OUTPUT_FORMATS[extension]
    except KeyError:
        known = ", ".join(OUTPUT_FORMATS)
        shown = f"extension {extension!r}" if extension else "no extension"
        raise MediaError(
            f"cannot write {path}: {shown} is not a known output format; use one of {known}"
        ) from None


@dataclass(frozen=True)
class AudioPlan:
    """How a sink writes audio, decided before it opens, and the line that tells the user.

    ``source`` is the input's PyAV audio stream (codec parameters to copy, or the decoder for
    re-encoding); it is ``None`` for generated :class:`AudioSamples`.
    """

    action: AudioAction
    summary: str
    source: Any = None
    codec: str | None = None
    sample_rate: int | None = None
    layout: str | None = None
    bit_rate: int | None = None


NO_AUDIO = AudioPlan(AudioAction.NONE, "none")


def plan_audio(output: OutputFormat, source: Any, mode: AudioMode) -> AudioPlan:
    """Decide copy / re-encode / drop for the input audio stream ``source`` (``None``: no audio)."""
    mode = AudioMode(mode)
    if source is None:
        return AudioPlan(AudioAction.NONE, "none in input")
    codec = str(source.codec_context.name)
    if mode is AudioMode.DROP:
        return AudioPlan(AudioAction.NONE, f"dropped ({codec} in input, --audio drop)")
    if output.audio_codec is None:
        if mode is AudioMode.COPY:
            raise MediaError(
                f"--audio copy: {output.extension} files hold no audio; use --audio drop"
            )
        log.warning(
            "the input has %s audio, but %s files hold no audio: it is dropped",
            codec,
            output.extension,
        )
        return AudioPlan(AudioAction.NONE, f"dropped ({output.extension} files hold no audio)")
    if _muxer_accepts(output.container, source):
        return AudioPlan(AudioAction.COPY, f"copied ({codec})", source=source, codec=codec)
    if mode is AudioMode.COPY:
        raise MediaError(
            f"--audio copy: {output.extension} files cannot hold {codec} audio; "
            f"use --audio auto to re-encode it to {output.audio_codec}, or --audio drop"
        )
    context = source.codec_context
    plan = encode_plan(output, int(context.sample_rate), str(context.layout.name))
    summary = f"re-encoded to {plan.codec} ({output.extension} files cannot hold {codec})"
    return replace(plan, summary=summary, source=source)


def encode_plan(output: OutputFormat, sample_rate: int, layout: str) -> AudioPlan:
    """Encode audio to ``output``'s usual codec, at a sample rate that encoder takes."""
    if output.audio_codec is None:
        return AudioPlan(AudioAction.NONE, f"none ({output.extension} files hold no audio)")
    rates = list(av.Codec(output.audio_codec, "w").audio_rates or ())
    if rates and sample_rate not in rates:  # Opus has no 44.1 kHz, for one
        sample_rate = 48000 if 48000 in rates else max(rates)
    summary = f"encoded to {output.audio_codec}"
    return AudioPlan(
        AudioAction.ENCODE,
        summary,
        None,
        output.audio_codec,
        sample_rate,
        layout,
        output.audio_bit_rate,
    )


def _muxer_accepts(container: str, source: Any) -> bool:
    """Whether ``container`` takes ``source``'s packets as they are.

    Writing a header into memory is the only reliable test: FFmpeg's codec tables say yes to
    some pairs (Opus or FLAC in .mov) that the muxer then refuses.
    """
    probe = av.open(io.BytesIO(), "w", format=container)
    try:
        probe.add_stream_from_template(source)
        probe.start_encoding()
    except (ValueError, av.FFmpegError):
        return False
    else:
        return True
    finally:
        try:
            probe.close()
        except (ValueError, av.FFmpegError):  # a header-only probe may have no valid trailer
            log.debug("closing the %s probe failed", container)


class FileSink(ClosesOnExit):
    """An output media file you ``write()`` items to, then ``close()``; see the module docstring.

    ``width`` × ``height`` is the size of every video frame written. ``time_base`` is that of
    the timestamps the frames carry (default ``1 / frame_rate``); ``frame_rate`` is also what
    formats without timestamps (y4m) store.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        frame_rate: Fraction,
        time_base: Fraction | None = None,
        audio: AudioPlan = NO_AUDIO,
        output_format: OutputFormat | None = None,
    ) -> None:
        self.path = Path(path)
        self.format = output_format or output_format_for(self.path)
        self.width, self.height = int(width), int(height)
        self.audio = audio
        if self.format.pix_fmt == "yuv420p" and (self.width % 2 or self.height % 2):
            raise MediaError(
                f"cannot write {self.path}: {self.width}x{self.height} has an odd side; yuv420p needs even sizes"
            )
        if audio.action is not AudioAction.NONE and self.format.audio_codec is None:
            raise MediaError(
                f"cannot write audio to {self.path}: {self.format.extension} files hold no audio"
            )
        self._container = _open_output(self.path, self.format.container)
        try:
            self._video = self._add_video(
                Fraction(frame_rate), Fraction(time_base or 1 / Fraction(frame_rate))
            )
            self._audio_out = self._add_audio(audio)
        except (ValueError, av.FFmpegError) as exc:
            self._container.close()
            raise MediaError(f"cannot write {self.path}: {exc}") from exc
        self._last_pts: int | None = None
        self._closed = False
        self.frames_written = 0
        self.audio_items_written = 0

    def _add_video(self, frame_rate: Fraction, time_base: Fraction) -> Any:
        stream = self._container.add_stream(self.format.video_codec, rate=frame_rate)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, self.format.pix_fmt
        if not self.format.has_timestamps:
            time_base = 1 / frame_rate  # y4m writes 1/time_base as its frame rate
        stream.codec_context.time_base = time_base  # frames keep their source ticks: no rounding
        stream.time_base = time_base
        if self.format.video_bit_rate:
            stream.bit_rate = self.format.video_bit_rate
        stream.options = dict(self.format.video_options)
        return stream

    def _add_audio(self, plan: AudioPlan) -> Any:
        if plan.action is AudioAction.COPY:
            return self._container.add_stream_from_template(plan.source)
        if plan.action is AudioAction.ENCODE:
            stream = self._container.add_stream(plan.codec, rate=plan.sample_rate)
            stream.layout = plan.layout
            if plan.bit_rate:
                stream.bit_rate = plan.bit_rate
            return stream
        return None

    # ------------------------------------------------------------------ writing
    def write(self, item: MediaItem) -> None:
        """Encode and mux one item. Audio items are ignored when the plan writes no audio."""
        if self._closed:
            raise MediaError(f"{self.path} is closed; nothing more can be written")
        try:
            if isinstance(item, VideoFrame):
                self._write_video(item)
            elif self._audio_out is not None:
                self._write_audio(item)
        except av.FFmpegError as exc:
            raise MediaError(f"writing {self.path} failed: {exc}") from exc

    def _write_video(self, item: VideoFrame) -> None:
        image = item.image
        packed = (self.height * self.width * 3 // 2,)  # a packed I420 frame (even sizes)
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or (image.shape != (self.height, self.width, 3) and image.shape != packed)
        ):
            raise MediaError(
                f"{self.path}: a frame of shape {getattr(image, 'shape', '?')} does not fit the "
                f"output: uint8 ({self.height}, {self.width}, 3) RGB or {packed} packed I420"
            )
        pts = item.time.pts
        if self._last_pts is not None and pts <= self._last_pts:
            log.warning(
                "%s: frame %d has pts %d after %d; moved one tick later",
                self.path,
                item.index,
                pts,
                self._last_pts,
            )
            pts = self._last_pts + 1
        self._last_pts = pts
        if image.ndim == 1:  # I420 from the device: no colour conversion on the way out
            frame = av.VideoFrame.from_ndarray(
                image.reshape(self.height * 3 // 2, self.width), format="yuv420p"
            )
        else:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = pts, item.time.time_base
        self._container.mux(self._video.encode(frame))
        self.frames_written += 1

    def _write_audio(self, item: AudioPacket | AudioSamples) -> None:
        if isinstance(item, AudioPacket):
            if self.audio.action is AudioAction.COPY:
                # Muxing rescales the packet's timestamps to the output stream's time base.
                item.packet.stream = self._audio_out
                self._container.mux(item.packet)
            else:
                for frame in item.packet.decode():
                    self._container.mux(self._audio_out.encode(frame))
        else:
            if self.audio.action is not AudioAction.ENCODE:
                raise MediaError(
                    f"{self.path}: raw audio samples need an encode plan, not {self.audio.action.value}"
                )
            self._container.mux(
                self._audio_out.encode(_audio_frame(item, self.audio.layout or "stereo"))
            )
        self.audio_items_written += 1

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Flush the encoders and finish the file; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        failures: list[Exception] = []
        try:
            self._flush_encoders()
        except av.FFmpegError as exc:
            failures.append(exc)
        try:  # always release the file, even when flushing failed
            self._container.close()
        except (av.FFmpegError, OSError) as exc:
            failures.append(exc)
        if failures:
            raise MediaError(f"finishing {self.path} failed: {failures[0]}") from failures[0]

    def _flush_encoders(self) -> None:
        self._container.mux(self._video.encode(None))
        if self.audio.action is AudioAction.ENCODE:
            if self.audio.source is not None:  # frames the decoder still holds
                for frame in self.audio.source.codec_context.decode(None):
                    self._container.mux(self._audio_out.encode(frame))
            self._container.mux(self._audio_out.encode(None))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # finish what was written, but never hide the error that stopped the writing
            self.close()
        except MediaError as close_exc:
            log.debug("%s: could not finish after an error: %s", self.path, close_exc)


def _open_output(path: Path, container: str) -> Any:
    if path.is_dir():
        raise MediaError(f"cannot write {path}: it is a folder")
    try:
        # PyAV opens the file only when the header is written; create it now to fail early.
        path.open("wb").close()
        return av.open(str(path), "w", format=container)
    except av.FFmpegError as exc:
        raise MediaError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    except OSError as exc:
        raise MediaError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _audio_frame(item: AudioSamples, layout: str) -> Any:
    samples = item.samples.astype("float32", copy=False)
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
    frame.sample_rate = item.sample_rate
    frame.pts, frame.time_base = item.start, Fraction(1, item.sample_rate)
    return frame
