"""Per-connection limits of the server and the small tools that enforce them.

Every limit is a ``[server]`` setting (:class:`~livediff.streams.server_config.ServerConfig`)
and answers the client with a clear message:

- ``max_frame_pixels`` (3840×2160): websocket: ``{"error": "frame N: JPEG of W×H = P pixels
  is too large: at most M ([server] max_frame_pixels)"}``, read from the JPEG header before
  anything is decoded; the connection stays. WebRTC: the frame is dropped and the data
  channel gets ``{"error": "frame W×H = P pixels is too large: …"}`` at most once a second.
- ``max_jpeg_scans`` (32) and ``max_jpeg_pixel_scans`` (3840×2160×12): a JPEG's decode cost
  grows with its scans (a progressive JPEG may repeat them); more is refused from the header,
  ``{"error": "frame N: JPEG with S scans: …"}``. Frames decode in a pool of
  ``decode_workers`` threads, one frame at a time per connection, so one client cannot take
  every worker.
- ``ws_max_message_bytes`` (4 MiB): websocket close 1009.
- ``control_rate_per_s`` / ``control_burst`` (20 per second, bursts of 40; a token bucket per
  session): ``{"error": "rate limit: at most R control messages per second (bursts of B);
  this one was not applied", "id": …}``, on the websocket and on the data channel alike.
- ``idle_timeout_s`` (60 s; 0: never): no input frame for that long ends the session.
  Websocket: ``{"error": "idle timeout: no frame for N s"}``, then close 1008 with that
  reason. WebRTC: ``{"closing": "idle timeout: no video frame for N s"}``, then the data
  channel and the peer close (this also catches peers that vanish without a word).
- ``connect_timeout_s`` (20 s): a WebRTC peer that is not connected that long after its
  answer is closed and its session released (reason ``connect timeout: …``).

Sessions in all (``[runtime] max_sessions``), per device (``[runtime] max_sessions_per_device``)
and connections (``[server] max_connections``) are refused with 503 (``/offer``, with
``Retry-After``) or close 1013 (websocket).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

# JPEG start-of-frame markers (baseline, extended, progressive, lossless …), not DHT/JPG/DAC.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length
_START_OF_SCAN = b"\xff\xda"


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers promise before a pixel is decoded: its size and how many scans."""

    width: int
    height: int
    progressive: bool
    scans: int  # start-of-scan markers; never fewer than the decoder will read

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header and scan count of a JPEG, or ``None`` if there is none to read.

    Reads markers only (no decoding), so an oversized or many-scan image is refused before any
    pixel is allocated. Bytes between markers are skipped the way Pillow resyncs (it looks for
    the next ``0xFF``), so junk cannot hide a header from this reader that the decoder would
    then find. Several frame headers: the largest counts. Scans are counted as every
    ``FF DA`` from the first scan on (entropy-coded data never holds one), so the count is
    never below what the decoder reads.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    position, end = 2, len(data)
    size: tuple[int, int] | None = None
    progressive = False
    while position + 4 <= end:
        if data[position] != 0xFF:  # junk between segments: resync on the next marker
            position = data.find(b"\xff", position)
            if position < 0:
                return None
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if position + 9 > end:
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            if size is None or width * height > size[0] * size[1]:
                size = (width, height)
            progressive |= marker in _PROGRESSIVE_SOF
        if marker == 0xDA:  # the first scan: every later scan starts with the same marker
            if size is None:
                return None
            return JpegHeader(*size, progressive, data.count(_START_OF_SCAN, position))
        position += 2 + length
    return None if size is None else JpegHeader(*size, progressive, 0)


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, or ``None`` if there is none to read."""
    header = read_jpeg_header(data)
    return None if header is None else (header.width, header.height)


def jpeg_refusal(header: JpegHeader, limits: DecodeLimits) -> str | None:
    """Why a JPEG with ``header`` is refused before decoding, or ``None`` if it may be decoded."""
    refusal = too_many_pixels(header.width, header.height, limits.max_pixels)
    if refusal is not None:
        return f"JPEG of {refusal}"
    if header.scans > limits.max_scans:
        return (
            f"JPEG with {header.scans} scans: at most {limits.max_scans} ([server] max_jpeg_scans); "
            "progressive JPEGs from common encoders have about 10"
        )
    if header.pixels * max(header.scans, 1) > limits.max_pixel_scans:
        return (
            f"JPEG of {header.width}×{header.height} with {header.scans} scans costs "
            f"{header.pixels * header.scans} pixel-scans to decode: at most "
            f"{limits.max_pixel_scans} ([server] max_jpeg_pixel_scans)"
        )
    return None


@dataclass(frozen=True)
class DecodeLimits:
    """What one JPEG may cost to decode (``[server]`` settings)."""

    max_pixels: int
    max_scans: int
    max_pixel_scans: int


def too_many_pixels(width: int, height: int, limit: int) -> str | None:
    """The refusal for a ``width``×``height`` frame, or ``None`` when it is within ``limit``."""
    if width * height <= limit:
        return None
    return (
        f"{width}×{height} = {width * height} pixels is too large: at most {limit} "
        "([server] max_frame_pixels)"
    )


class TokenBucket:
    """``rate`` events per second on average, bursts of up to ``burst``; not thread-safe."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend one token; ``False`` (nothing spent) when the bucket is empty."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def refusal(self) -> str:
        return (
            f"rate limit: at most {self.rate:g} control messages per second (bursts of "
            f"{self.burst}); this one was not applied"
        )


class Throttle:
    """At most one report per ``interval_s`` (for repeated errors: no log or message spam)."""

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def ready(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            self.suppressed += 1
            return False
        self._last = now
        return True


class Inactivity:
    """A timer that :meth:`touch` pushes back; :meth:`expired` returns once it runs out."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()

    def touch(self) -> None:
        self._last = self._loop.time()

    async def expired(self) -> None:
        while True:
            remaining = self._last + self.timeout_s - self._loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(remaining)  # a timer, re-armed by activity in between


class PixelLimitedTrack(MediaStreamTrack):
    """The remote video, less the frames above ``limit`` pixels (``on_refused(w, h)`` for each)."""

    kind = "video"

    def __init__(
        self, source: MediaStreamTrack, limit: int, on_refused: Callable[[int, int], None]
    ) -> None:
        super().__init__()
        self._source = source
        self._limit = limit
        self._on_refused = on_refused

    async def recv(self) -> av.VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            frame = await self._source.recv()
            if not isinstance(frame, av.VideoFrame):
                continue
            if frame.width * frame.height <= self._limit:
                return frame
            self._on_refused(frame.width, frame.height)
