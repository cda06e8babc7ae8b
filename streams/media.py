"""Typed items that cross the media edges: decoded video frames, audio packets and samples.

Every item carries its presentation time as a :class:`MediaTime` (an integer ``pts`` in a
rational ``time_base``), exactly as the container stored it, so timestamps survive a round trip
through the engine without float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from livediff.engine.frames import YuvFrame

if TYPE_CHECKING:
    import av


@dataclass(frozen=True)
class MediaTime:
    """A presentation timestamp: ``pts`` ticks of ``time_base`` seconds."""

    pts: int
    time_base: Fraction

    @property
    def seconds(self) -> float:
        return float(self.pts * self.time_base)


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """One picture: ``image`` is uint8 RGB ``[H, W, 3]``, or (from sources asked for YUV) a
    :class:`~livediff.engine.frames.YuvFrame`, or (to sinks) a packed I420 frame ``[L]``;
    ``index`` counts frames from 0."""

    image: np.ndarray | YuvFrame = field(repr=False)
    time: MediaTime
    index: int = 0

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def yuv_frame_of(frame: av.VideoFrame, *, pinned: bool = False) -> YuvFrame | None:
    """A decoded ``yuv420p`` frame as its three planes, copied once into tight uint8 tensors
    (page-locked with ``pinned``, for asynchronous uploads); ``None`` for other pixel formats."""
    if frame.format.name != "yuv420p":
        return None
    height, width = frame.height, frame.width
    ch, cw = (height + 1) // 2, (width + 1) // 2
    y, u, v = frame.planes
    return YuvFrame(
        _plane(y, height, width, pinned), _plane(u, ch, cw, pinned), _plane(v, ch, cw, pinned)
    )


def _plane(plane: Any, height: int, width: int, pinned: bool) -> torch.Tensor:
    """One decoder plane (rows padded to ``line_size``) copied into a tight uint8 tensor."""
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)[:height, :width]
    tensor = torch.empty((height, width), dtype=torch.uint8, pin_memory=pinned)
    tensor.numpy()[:] = rows
    return tensor


@dataclass(frozen=True, eq=False)
class AudioPacket:
    """One compressed audio packet, still in its source's codec and time base.

    A sink either muxes it untouched (stream copy) or decodes and re-encodes it.
    """

    packet: av.Packet = field(repr=False)

    @property
    def time(self) -> MediaTime | None:
        pts = self.packet.pts
        return None if pts is None else MediaTime(int(pts), Fraction(self.packet.time_base))


@dataclass(frozen=True, eq=False)
class AudioSamples:
    """Raw audio: float32 ``[channels, samples]`` in [-1, 1]; ``start`` counts samples from 0."""

    samples: np.ndarray = field(repr=False)
    sample_rate: int
    start: int = 0

    @property
    def time(self) -> MediaTime:
        return MediaTime(self.start, Fraction(1, self.sample_rate))


MediaItem = VideoFrame | AudioPacket | AudioSamples
