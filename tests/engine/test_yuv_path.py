"""Frames as YUV planes in, packed I420 out: the colour conversion happens on the device.

Decoders hand out ``yuv420p``; a session takes the planes as they are (:class:`YuvFrame`) and
the preprocess kernel converts them, so the host never converts colour. A session opened with
``output=OutputFormat.I420`` answers packed I420 for encoders, converted on the device. The
probe model (every output pixel depends on its own input) tells the paths apart.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_testing import ProbeBundle, make_frame

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.frames import OutputFormat, YuvFrame
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.stream import Stream
from livediff.exceptions import FrameDtypeError, FrameShapeError
from livediff.kernels.yuv import i420_to_rgb_float, rgb_to_i420, split_i420

SIZE = 64
BASE = GenerationParams(strength=0.5, steps=1)


def as_yuv(rgb: np.ndarray) -> YuvFrame:
    y, u, v = split_i420(rgb_to_i420(torch.from_numpy(rgb)[None]), *rgb.shape[:2])
    return YuvFrame(y[0].clone(), u[0].clone(), v[0].clone())


def rgb_of(yuv: YuvFrame) -> np.ndarray:
    """What a player shows for ``yuv``, rounded: the RGB twin of the YUV input."""
    rgb = i420_to_rgb_float(yuv.y[None], yuv.u[None], yuv.v[None])[0]
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def test_a_stream_takes_yuv_planes_like_their_rgb_twin(probe_bundle: ProbeBundle) -> None:
    frames = [make_frame(0, i, size=96) for i in range(3)]  # cropped and resized to 64²
    yuvs = [as_yuv(frame) for frame in frames]
    config = StreamConfig(width=SIZE, height=SIZE)
    from_yuv = Stream(probe_bundle, config, BASE.updated(steps=1, seed=3))
    from_rgb = Stream(probe_bundle, config, BASE.updated(steps=1, seed=3))
    other = Stream(probe_bundle, config, BASE.updated(steps=1, seed=3))
    twins, others = [], []
    for index, yuv in enumerate(yuvs):
        (a,) = from_yuv.process(yuv)
        (b,) = from_rgb.process(rgb_of(yuv))
        (c,) = other.process(make_frame(5, index, size=96))
        twins.append(float((a.image.float() - b.image.float()).abs().mean()))
        others.append(float((a.image.float() - c.image.float()).abs().mean()))
    # The YUV path keeps the unrounded RGB its twin was rounded from: nearly the same output,
    # and far nearer than another input's.
    assert max(twins) < 0.1 * min(others), (twins, others)


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        (
            YuvFrame(
                torch.zeros(8, 8, dtype=torch.uint8),
                torch.zeros(3, 4, dtype=torch.uint8),
                torch.zeros(4, 4, dtype=torch.uint8),
            ),
            FrameShapeError,
            "needs u planes of 4×4",
        ),
        (
            YuvFrame(torch.zeros(8, 8), torch.zeros(4, 4), torch.zeros(4, 4)),
            FrameDtypeError,
            "uint8",
        ),
        (
            YuvFrame(
                torch.zeros(0, 8, dtype=torch.uint8),
                torch.zeros(0, 4, dtype=torch.uint8),
                torch.zeros(0, 4, dtype=torch.uint8),
            ),
            FrameShapeError,
            "y plane",
        ),
    ],
)
def test_bad_yuv_frames_are_refused_with_their_reason(
    probe_bundle: ProbeBundle, frame: YuvFrame, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Stream(probe_bundle, StreamConfig(width=SIZE, height=SIZE), BASE).process(frame)


async def test_sessions_take_yuv_and_answer_i420_on_request(probe_bundle: ProbeBundle) -> None:
    runtime = RuntimeConfig(deadline_ms=600_000)
    engine = Engine(probe_bundle, StreamConfig(width=SIZE, height=SIZE), runtime, BASE)
    await engine.start()
    try:
        params = {"seed": 5, "steps": 1}
        rgb_out = await engine.open_session(params)
        i420_out = await engine.open_session(params, output=OutputFormat.I420)
        assert i420_out.output_format is OutputFormat.I420
        for index in range(3):
            yuv = as_yuv(make_frame(1, index, size=SIZE))
            rgb_out.submit(yuv)
            i420_out.submit(yuv)
            a, b = await rgb_out.recv(), await i420_out.recv()
            assert a.image.shape == (SIZE, SIZE, 3) and b.image.shape == (SIZE * SIZE * 3 // 2,)
            expected = rgb_to_i420(torch.from_numpy(np.array(a.image))[None])[0].numpy()
            assert np.array_equal(b.image, expected)  # the same frame, converted on the device
    finally:
        await engine.stop()
