"""A camera (or file) through one local engine session into sinks: the body of ``livediff camera``.

>>> result = await run_local_pipeline(engine, CameraSource("/dev/video0"), [VirtualCamera(512, 512)])

The source is read on a thread and submitted as fast as it delivers (latest frame wins in the
engine). Each output goes to every sink (``send(image, time)``, called in the executor; ``time``
is the :class:`~livediff.streams.media.MediaTime` of the input it answers). When the
source ends the pipeline waits for the engine to go idle (every frame answered or dropped),
closes the session and writes the outputs still queued; the last ``steps − 1`` frames inside
the Stream Batch pipeline are not answered. The engine should serve this session alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from livediff.exceptions import InvalidFrameError, SessionClosedError
from livediff.streams.camera_source import iterate_in_thread
from livediff.streams.engine_protocol import EngineLike
from livediff.streams.media import MediaTime, VideoFrame

log = logging.getLogger(__name__)


class FrameSink(Protocol):
    def send(self, image: Any, time: MediaTime | None = None) -> None: ...


class FrameSource(Protocol):
    """A camera, a file or an NDI source (:class:`CameraSource`, ``ndi_io.NdiSource``)."""

    def frames(self) -> Iterator[VideoFrame]: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class PipelineResult:
    session: str
    frames_in: int
    frames_out: int
    refused: int


async def run_local_pipeline(
    engine: EngineLike,
    source: FrameSource,
    sinks: Sequence[FrameSink],
    *,
    params: dict[str, Any] | None = None,
) -> PipelineResult:
    session = await engine.open_session(params or {})
    counts = {"in": 0, "out": 0, "refused": 0}
    loop = asyncio.get_running_loop()

    async def read() -> None:
        frames = source.frames()
        async for frame in iterate_in_thread(frames):
            try:
                session.submit(frame.image, pts=frame.time.pts, time_base=frame.time.time_base)
            except InvalidFrameError as exc:
                counts["refused"] += 1
                log.warning("[%s] frame %d refused: %s", session.id, frame.index, exc)
                continue
            counts["in"] += 1

    async def write() -> None:
        while True:
            try:
                out = await session.recv()
            except SessionClosedError:
                if closing:
                    return  # every queued output was written
                raise
            time = None if out.pts is None else MediaTime(out.pts, out.time_base or Fraction(1))
            for sink in sinks:
                await loop.run_in_executor(None, sink.send, out.image, time)
            counts["out"] += 1

    closing = False
    reader, writer = asyncio.ensure_future(read()), asyncio.ensure_future(write())
    try:
        await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if writer.done():
            writer.result()  # a sink error, or the session ending under us
        reader.result()  # a source error
        log.info("[%s] source ended after %d frames; draining", session.id, counts["in"])
        await engine.wait_idle()
        closing = True
        await session.close()
        await writer
    finally:
        source.stop()
        for task in (reader, writer):
            task.cancel()
        await asyncio.gather(reader, writer, return_exceptions=True)
        await session.close()
    return PipelineResult(session.id, counts["in"], counts["out"], counts["refused"])


def describe(result: PipelineResult, started: float) -> str:
    seconds = max(time.monotonic() - started, 1e-6)
    return (
        f"session {result.session}: {result.frames_in} frames in, {result.frames_out} out "
        f"({result.frames_out / seconds:.1f} fps), {result.refused} refused"
    )
