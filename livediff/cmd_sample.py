"""``livediff sample OUTPUT``: write a synthetic test clip, so the first run needs no footage.

The clip has moving coloured shapes over a drifting gradient, a frame counter in binary
along the bottom edge (white cell = 1, least significant bit first, readable back with
:func:`read_frame_counter`), and a 440 Hz tone with a short 1 kHz beep at the start of every
second, when the picture also flashes a white border: a marker for audio/video sync.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from livediff.exceptions import ParameterError

COUNTER_BITS = 16
AUDIO_RATE = 48000
AUDIO_CHUNK = 1024  # samples per written chunk


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="write a synthetic test clip (moving shapes, frame counter, tone)",
        description="Write a synthetic test clip: moving shapes, a binary frame counter along the bottom "
        "edge, and a 440 Hz tone with a beep and a white border flash at the start of every second.",
        epilog='example: livediff sample clip.mp4 && livediff run clip.mp4 out.mp4 --prompt "a watercolor painting"',
    )
    parser.add_argument(
        "output",
        metavar="OUTPUT",
        help="file to write: .mp4, .mov, .mkv, .webm or .y4m (overwritten)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length (default: 2)")
    parser.add_argument("--fps", type=int, default=30, help="frames per second (default: 30)")
    parser.add_argument("--width", type=int, default=640, help="even, 16 to 4096 (default: 640)")
    parser.add_argument("--height", type=int, default=360, help="even, 16 to 4096 (default: 360)")
    parser.add_argument("--no-audio", action="store_true", help="write no audio track")
    parser.set_defaults(handler=sample_command)


@dataclass(frozen=True)
class SyntheticClip:
    """The clip's shape; :meth:`frames` and :meth:`audio` generate its content."""

    width: int = 640
    height: int = 360
    fps: int = 30
    seconds: float = 2.0

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 16 <= value <= 4096 and value % 2 == 0):
                raise ParameterError(
                    f"--{name} {value} is out of range: expected an even number in [16, 4096]"
                )
        if not (isinstance(self.fps, int) and 1 <= self.fps <= 240):
            raise ParameterError(
                f"--fps {self.fps} is out of range: expected an integer in [1, 240]"
            )
        if not 0 < self.seconds <= 3600:
            raise ParameterError(f"--seconds {self.seconds} is out of range: expected (0, 3600]")

    @property
    def frame_count(self) -> int:
        return max(1, round(self.seconds * self.fps))

    def frames(self) -> Iterator[np.ndarray]:
        """uint8 RGB ``[height, width, 3]`` frames."""
        rows, cols = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        u, v = cols / self.width, rows / self.height
        side = min(self.width, self.height)
        for index in range(self.frame_count):
            t = index / self.fps
            image = np.empty((self.height, self.width, 3), np.float32)
            image[..., 0] = 60 + 120 * u
            image[..., 1] = 60 + 120 * v
            image[..., 2] = 120 + 80 * np.sin(2 * np.pi * (u + t / 4))
            cx, cy = (0.5 + 0.35 * np.sin(2 * np.pi * t / 3)) * self.width, 0.4 * self.height
            image[(cols - cx) ** 2 + (rows - cy) ** 2 < (0.15 * side) ** 2] = (240, 200, 40)
            sx, sy = 0.25 * self.width, (0.45 + 0.25 * np.cos(2 * np.pi * t / 2)) * self.height
            image[(abs(cols - sx) < 0.1 * side) & (abs(rows - sy) < 0.1 * side)] = (40, 90, 230)
            frame = image.astype(np.uint8)
            if index % self.fps == 0:  # the sync flash, with the beep
                border = max(2, side // 40)
                frame[:border], frame[-border:] = 255, 255
                frame[:, :border], frame[:, -border:] = 255, 255
            _draw_counter(frame, index)
            yield frame

    def audio(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first sample, float32 [2, n])`` chunks covering the clip's length."""
        total = round(self.frame_count / self.fps * AUDIO_RATE)
        for start in range(0, total, AUDIO_CHUNK):
            t = np.arange(start, min(start + AUDIO_CHUNK, total)) / AUDIO_RATE
            beep = (t % 1.0) < 0.1
            tone = np.where(
                beep, 0.3 * np.sin(2 * np.pi * 1000 * t), 0.2 * np.sin(2 * np.pi * 440 * t)
            )
            yield start, np.stack([tone, tone]).astype(np.float32)


def _counter_cell(width: int) -> int:
    return max(2, width // (COUNTER_BITS + 4))


def _draw_counter(frame: np.ndarray, index: int) -> None:
    cell = _counter_cell(frame.shape[1])
    for bit in range(COUNTER_BITS):
        frame[-cell:, bit * cell : (bit + 1) * cell] = 255 if (index >> bit) & 1 else 0


def read_frame_counter(frame: np.ndarray) -> int:
    """The frame number drawn by :class:`SyntheticClip` into ``frame`` (survives lossy codecs)."""
    cell = _counter_cell(frame.shape[1])
    value = 0
    margin = cell // 4  # read the middle of each cell: codecs smear the edges
    rows = slice(frame.shape[0] - cell + margin, frame.shape[0] - margin)
    for bit in range(COUNTER_BITS):
        if frame[rows, bit * cell + margin : (bit + 1) * cell - margin].mean() > 127:
            value |= 1 << bit
    return value


def sample_command(args: argparse.Namespace) -> int:
    from fractions import Fraction

    from livediff.streams.file_sink import NO_AUDIO, FileSink, encode_plan, output_format_for
    from livediff.streams.media import AudioSamples, MediaTime, VideoFrame

    clip = SyntheticClip(width=args.width, height=args.height, fps=args.fps, seconds=args.seconds)
    output_format = output_format_for(args.output)
    audio = NO_AUDIO if args.no_audio else encode_plan(output_format, AUDIO_RATE, "stereo")
    time_base = Fraction(1, clip.fps)
    with FileSink(
        args.output,
        width=clip.width,
        height=clip.height,
        frame_rate=Fraction(clip.fps),
        time_base=time_base,
        audio=audio,
        output_format=output_format,
    ) as sink:
        chunks = clip.audio() if audio.codec else iter(())
        pending = next(chunks, None)
        for index, image in enumerate(clip.frames()):
            sink.write(VideoFrame(image, MediaTime(index, time_base), index))
            # Audio up to this frame's end goes in now, so the file interleaves as it plays.
            while pending is not None and pending[0] * clip.fps < (index + 1) * AUDIO_RATE:
                sink.write(AudioSamples(pending[1], AUDIO_RATE, pending[0]))
                pending = next(chunks, None)
    if audio.codec:
        sound = f"{audio.codec} tone"
    else:
        sound = (
            "no audio" if args.no_audio else f"no audio ({output_format.extension} files hold none)"
        )
    print(
        f"wrote {args.output}: {clip.frame_count} frames, {clip.width}x{clip.height} at {clip.fps} fps, {sound}"
    )
    return 0
