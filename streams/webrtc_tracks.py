"""aiortc media for one session: the processed track sent back, and the pump that feeds the session.

Incoming video is pulled from the remote track by :func:`forward_video` and submitted to the
session (latest frame wins inside the engine, so a slow model drops frames instead of queueing
them). :class:`SessionVideoTrack` is what the peer sends back: each ``recv()`` awaits the
session's next output and keeps the ``pts``/``time_base`` of the input it answers, so RTP
timestamps on the way out match the ones that came in.

Video stays YUV on the host: decoded ``yuv420p`` frames go into the session as their three
planes (one copy, into page-locked memory when the engine runs on CUDA) and the engine
converts them on the device; the session answers packed I420 frames (converted on the device
too) that become ``yuv420p`` video frames for the encoder without a colour conversion on the
CPU. Frames in any other pixel format are converted to RGB as before. Plane copies run in the
default executor; the event loop only moves references.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from livediff.engine.frames import YuvFrame
from livediff.exceptions import InvalidFrameError, MediaError, SessionClosedError
from livediff.streams.engine_protocol import SessionLike
from livediff.streams.flow_stats import FlowStats
from livediff.streams.frame_marker import read_marker, stamp_marker
from livediff.streams.media import MediaTime, yuv_frame_of
from livediff.streams.ndi_io import SessionNdiOut

log = logging.getLogger(__name__)
MarkerMap = OrderedDict  # pts -> latency-marker value, bounded by the writer
_MARKER_LIMIT = 256
OutputCallback = Callable[[float | None], None]


class SessionVideoTrack(MediaStreamTrack):
    """The processed video of one session, as an aiortc track. ``stop()`` is idempotent."""

    kind = "video"

    def __init__(
        self,
        session: SessionLike,
        flow: FlowStats,
        *,
        markers: MarkerMap | None = None,
        on_output: OutputCallback | None = None,
        ndi: SessionNdiOut | None = None,
    ) -> None:
        super().__init__()
        self._ndi = ndi  # the session's NDI source too, if the server publishes them
        self._session = session
        self._flow = flow
        self._markers = markers
        self._on_output = on_output

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            out = await self._session.recv()
        except SessionClosedError:
            self.stop()
            raise MediaStreamError from None
        marker = None if self._markers is None else self._markers.pop(out.pts, None)
        loop = asyncio.get_running_loop()
        config = self._session.config  # the engine sets both sides when it opens a session
        size = (int(config.width or 0), int(config.height or 0))
        frame = await loop.run_in_executor(None, _to_video_frame, out.image, marker, size)
        frame.pts, frame.time_base = out.pts, out.time_base
        if self._ndi is not None:
            await self._publish(out, size)
        latency = self._flow.frame_out(out.pts)
        if self._on_output is not None:
            self._on_output(latency)
        return frame

    async def _publish(self, out: Any, size: tuple[int, int]) -> None:
        """The output to the session's NDI source too; a failure ends the NDI output only."""
        assert self._ndi is not None
        time = None if out.pts is None else MediaTime(out.pts, out.time_base or Fraction(1))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._ndi.send, out.image, time, size)
        except MediaError as exc:
            log.error("[%s] NDI output %r stopped: %s", self._session.id, self._ndi.name, exc)
            self._ndi.close()
            self._ndi = None

    def stop(self) -> None:
        super().stop()
        if self._ndi is not None:
            self._ndi.close()


def _to_video_frame(image: np.ndarray, marker: int | None, size: tuple[int, int]) -> av.VideoFrame:
    """An output (uint8 RGB ``[H, W, 3]``, or packed I420 of ``size`` = (width, height)) as a
    video frame for the encoder; the latency marker goes into a copy (skips share buffers)."""
    if image.ndim == 1:  # packed I420 from the device
        width, height = size
        if marker is not None:
            image = image.copy()
            stamp_marker(image[: width * height].reshape(height, width), marker)
        return av.VideoFrame.from_ndarray(image.reshape(height * 3 // 2, width), format="yuv420p")
    if marker is not None:
        image = image.copy()
        stamp_marker(image, marker)
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")


def _to_input(
    frame: av.VideoFrame, want_marker: bool, pinned: bool
) -> tuple[YuvFrame | np.ndarray, int | None]:
    """A decoded frame as the engine takes it: its I420 planes when it is ``yuv420p`` (the
    usual case: VP8 and H.264 decoders), else RGB; and the latency marker it carries."""
    yuv = yuv_frame_of(frame, pinned=pinned)
    if yuv is None:
        image = frame.to_ndarray(format="rgb24")
        return image, read_marker(image) if want_marker else None
    return yuv, read_marker(yuv.y.numpy()) if want_marker else None


async def forward_video(
    track: MediaStreamTrack,
    session: SessionLike,
    flow: FlowStats,
    log: logging.LoggerAdapter[logging.Logger],
    *,
    markers: MarkerMap | None = None,
    on_input: Callable[[], None] | None = None,
) -> None:
    """Submit every frame of ``track`` to ``session`` until either ends. Bad frames are logged and skipped."""
    loop = asyncio.get_running_loop()
    pinned = bool(getattr(session, "pin_inputs", False))
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            log.info("remote video track ended")
            return
        arrived = time.perf_counter()
        if not isinstance(frame, av.VideoFrame):
            continue
        image, marker = await loop.run_in_executor(
            None, _to_input, frame, markers is not None, pinned
        )
        flow.frame_in(frame.pts, arrived)
        if on_input is not None:
            on_input()
        if markers is not None and marker is not None:
            markers[frame.pts] = marker
            if len(markers) > _MARKER_LIMIT:
                markers.popitem(last=False)
        try:
            session.submit(image, pts=frame.pts, time_base=frame.time_base, owned=True)
        except SessionClosedError:
            log.info("session closed; stop reading the remote track")
            return
        except InvalidFrameError as exc:
            flow.errors += 1
            log.warning("frame %s refused: %s", frame.pts, exc)


async def drain(track: MediaStreamTrack) -> None:
    """Consume a track nobody needs (audio), so aiortc's receive queue does not grow."""
    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return
