"""NDI in and out (ndi-python, whose wheels carry the NDI runtime, ``libndi``).

>>> with NdiSender("livediff", 512, 512, frame_rate=Fraction(30)) as out:   # an NDI source
...     out.send(rgb_uint8_hwc, MediaTime(pts, time_base))
>>> source = NdiSource("STUDIO (Camera 1)")   # or just "Camera 1"; waits for its first frame
>>> for frame in source.frames():              # VideoFrame (uint8 RGB), like CameraSource
...     ...

Sources are found by NDI's own discovery (mDNS on the local network) and, always, on this
machine (``127.0.0.1``), so a source on the same host is found without mDNS. A source name is
NDI's full ``HOST (NAME)`` or just the ``NAME`` part. Timestamps are kept: an input frame's
NDI timestamp (else its timecode) becomes its pts in 100 ns ticks, counted from the first
frame, and each output carries its input's time as its NDI timecode, with the input's frame
rate. Frames travel as RGBX; NDI compresses them (SpeedHQ), so a pixel may come back a few
grey levels off.

Without ndi-python (``pip install 'livediff[creative]'``; wheels for x86_64 Linux and Windows)
opening either says what to install. The NDI runtime is NDI's, under its own license, not
livediff's (see README, "Creative tools: OSC and NDI"). Every failure is a :class:`MediaError`.
Capturing and sending block: run them off the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np

from livediff.exceptions import MediaError
from livediff.streams.closing import ClosesOnExit
from livediff.streams.media import MediaTime, VideoFrame

log = logging.getLogger(__name__)
NDI_TIME_BASE = Fraction(1, 10_000_000)  # NDI's timestamps and timecodes: 100 ns ticks
LOCAL_HOST = "127.0.0.1"  # always searched, so a source on this machine needs no mDNS
FIND_TIMEOUT_S = 10.0
FIRST_FRAME_TIMEOUT_S = 10.0
CAPTURE_WAIT_MS = 200
INSTALL_HELP = (
    "NDI needs ndi-python, whose wheels carry the NDI runtime: pip install 'livediff[creative]' "
    "(wheels exist for x86_64 Linux and Windows; elsewhere install the NDI SDK and build "
    "ndi-python from source)"
)


def load_ndi() -> Any:
    """The ``NDIlib`` module, initialised; a MediaError that says what to install without it."""
    try:
        import NDIlib
    except ImportError as exc:
        raise MediaError(f"{INSTALL_HELP} ({exc})") from None
    if not NDIlib.initialize():
        raise MediaError(
            "the NDI runtime did not start (NDIlib.initialize() failed; is this CPU supported?)"
        )
    return NDIlib


class NdiSender(ClosesOnExit):
    """One NDI source publishing RGB frames of one size; ``close()`` is idempotent."""

    def __init__(self, name: str, width: int, height: int, *, frame_rate: Fraction) -> None:
        ndi = load_ndi()
        settings = ndi.SendCreate()
        settings.ndi_name = name
        settings.clock_video = False  # paced by its input, not by NDI
        instance = ndi.send_create(settings)
        if instance is None:
            raise MediaError(f"NDI could not create the source {name!r}")
        self._ndi, self._instance = ndi, instance
        self.width, self.height = width, height
        self.frame_rate = Fraction(frame_rate).limit_denominator(1001)
        self._rgbx = np.full((height, width, 4), 255, np.uint8)
        self.frames_sent = 0
        self._closed = False
        self.name = name
        log.info("NDI source %r %dx%d @ %s fps", name, width, height, self.frame_rate)

    def send(self, image: np.ndarray, time: MediaTime | None = None) -> None:
        """Publish one uint8 ``[H, W, 3]`` RGB frame (or a packed I420 one of this size);
        ``time`` (its input's) is its timecode."""
        if self._closed:
            raise MediaError(f"NDI source {self.name!r} is closed")
        i420 = (self.width * self.height + 2 * ((self.width + 1) // 2) * ((self.height + 1) // 2),)
        if image.shape != (self.height, self.width, 3) and image.shape != i420:
            raise MediaError(
                f"NDI source {self.name!r} is {self.width}x{self.height}; got a frame of shape "
                f"{image.shape}"
            )
        ndi = self._ndi
        frame = ndi.VideoFrameV2()
        if image.ndim == 1:  # packed I420 (WebRTC sessions' outputs): NDI takes it as it is
            frame.data = image.reshape(self.height * 3 // 2, self.width)
            frame.FourCC = ndi.FOURCC_VIDEO_TYPE_I420
            frame.xres, frame.yres, frame.line_stride_in_bytes = self.width, self.height, self.width
        else:
            self._rgbx[..., :3] = image
            frame.data = self._rgbx
            frame.FourCC = ndi.FOURCC_VIDEO_TYPE_RGBX
        frame.frame_rate_N = self.frame_rate.numerator
        frame.frame_rate_D = self.frame_rate.denominator
        frame.timecode = (
            ndi.SEND_TIMECODE_SYNTHESIZE
            if time is None
            else round(time.pts * time.time_base / NDI_TIME_BASE)
        )
        ndi.send_send_video_v2(self._instance, frame)  # synchronous: the buffer is free after
        self.frames_sent += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ndi.send_destroy(self._instance)


class NdiSource(ClosesOnExit):
    """Frames from one NDI source, as :class:`~livediff.streams.camera_source.CameraSource`
    gives them; connecting waits for the source and its first frame (its rate and size)."""

    def __init__(
        self,
        name: str,
        *,
        max_frames: int | None = None,
        find_timeout_s: float = FIND_TIMEOUT_S,
        first_frame_timeout_s: float = FIRST_FRAME_TIMEOUT_S,
    ) -> None:
        ndi = load_ndi()
        self._ndi = ndi
        self.max_frames = max_frames
        self._stopped = False
        self._closed = False
        self._origin: int | None = None
        self._count = 0
        self._lock = threading.Lock()
        self.frame_rate = Fraction(30)  # the source's own, from its first frame
        self._finder = _finder(ndi)
        self._receiver: Any = None
        try:
            source = self._find(name, find_timeout_s)
            self.source = source.ndi_name
            settings = ndi.RecvCreateV3()
            settings.color_format = ndi.RECV_COLOR_FORMAT_RGBX_RGBA
            settings.bandwidth = ndi.RECV_BANDWIDTH_HIGHEST
            self._receiver = ndi.recv_create_v3(settings)
            if self._receiver is None:
                raise MediaError(f"NDI could not create a receiver for {self.source!r}")
            ndi.recv_connect(self._receiver, source)
            self._first = self._capture_until(time.monotonic() + first_frame_timeout_s)
            if self._first is None:
                raise MediaError(
                    f"NDI source {self.source!r} sent no video within {first_frame_timeout_s:g} s"
                )
        except BaseException:
            self.close()
            raise
        log.info(
            "NDI input %r: %dx%d @ %s fps",
            self.source,
            self._first.image.shape[1],
            self._first.image.shape[0],
            self.frame_rate,
        )

    def _find(self, name: str, timeout_s: float) -> Any:
        ndi, deadline = self._ndi, time.monotonic() + timeout_s
        seen: list[str] = []
        while True:
            sources = list(ndi.find_get_current_sources(self._finder))
            seen = [s.ndi_name for s in sources]
            for source in sources:
                if source.ndi_name == name or _stream_part(source.ndi_name) == name:
                    return source
            left = deadline - time.monotonic()
            if left <= 0:
                found = ", ".join(repr(s) for s in seen) or "none"
                raise MediaError(
                    f"no NDI source {name!r} within {timeout_s:g} s (sources seen: {found})"
                )
            ndi.find_wait_for_sources(self._finder, int(min(left, 0.5) * 1000) + 1)

    def _capture_until(self, deadline: float) -> VideoFrame | None:
        while not self._stopped and time.monotonic() < deadline:
            frame = self._capture()
            if frame is not None:
                return frame
        return None

    def _capture(self) -> VideoFrame | None:
        with self._lock:  # close() from another thread waits for the capture under way
            if self._closed:
                return None
            return self._capture_locked()

    def _capture_locked(self) -> VideoFrame | None:
        ndi = self._ndi
        kind, video, audio, metadata = ndi.recv_capture_v2(self._receiver, CAPTURE_WAIT_MS)
        if kind == ndi.FRAME_TYPE_AUDIO:
            ndi.recv_free_audio_v2(self._receiver, audio)
        elif kind == ndi.FRAME_TYPE_METADATA:
            ndi.recv_free_metadata(self._receiver, metadata)
        if kind != ndi.FRAME_TYPE_VIDEO:
            return None
        try:
            image = np.ascontiguousarray(video.data[: video.yres, : video.xres, :3])
            stamp = video.timestamp
            if stamp in (ndi.RECV_TIMESTAMP_UNDEFINED, 0):
                stamp = video.timecode
            if self._origin is None:
                self._origin = stamp
                if video.frame_rate_N > 0 and video.frame_rate_D > 0:
                    self.frame_rate = Fraction(video.frame_rate_N, video.frame_rate_D)
            index = self._count
            self._count += 1
            return VideoFrame(image, MediaTime(int(stamp - self._origin), NDI_TIME_BASE), index)
        finally:
            ndi.recv_free_video_v2(self._receiver, video)

    def stop(self) -> None:
        """Make :meth:`frames` end after the frame it is waiting for (thread-safe)."""
        self._stopped = True

    def frames(self) -> Iterator[VideoFrame]:
        """Every frame the source sends, the first one included, until :meth:`stop`; then the
        receiver closes (on the thread that captures, so never under a capture)."""
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            count = 1
            while not self._stopped and (self.max_frames is None or count < self.max_frames):
                frame = self._capture()
                if frame is not None:
                    yield frame
                    count += 1
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._receiver is not None:
                self._ndi.recv_destroy(self._receiver)
            self._ndi.find_destroy(self._finder)


def _finder(ndi: Any) -> Any:
    settings = ndi.FindCreate()
    settings.show_local_sources = True
    settings.extra_ips = LOCAL_HOST
    finder = ndi.find_create_v2(settings)
    if finder is None:
        raise MediaError("NDI could not start looking for sources (find_create_v2 failed)")
    return finder


def _stream_part(full_name: str) -> str:
    """``NAME`` of NDI's ``HOST (NAME)``."""
    _, sep, rest = full_name.partition(" (")
    return rest[:-1] if sep and rest.endswith(")") else full_name


class SessionNdiOut(ClosesOnExit):
    """One session's outputs as the NDI source ``name``, opened at the first output (its size).

    A websocket has no frame rate: the source announces ``frame_rate`` (30) and carries each
    output's input timestamp as its timecode. ``send`` blocks: call it off the event loop.
    """

    def __init__(self, name: str, *, frame_rate: Fraction = Fraction(30)) -> None:
        self.name = name
        self._frame_rate = frame_rate
        self._sender: NdiSender | None = None

    def send(
        self,
        image: np.ndarray,
        time: MediaTime | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        """One output: RGB ``[H, W, 3]``, or packed I420 of ``size`` = (width, height)."""
        width, height = size if image.ndim == 1 and size else (image.shape[1], image.shape[0])
        if self._sender is None:
            self._sender = NdiSender(self.name, width, height, frame_rate=self._frame_rate)
        self._sender.send(image, time)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
