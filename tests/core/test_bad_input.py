"""Each kind of bad input gets its own exception with a clear message, and the stream goes on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.stream import Stream
from livediff.exceptions import (
    EmptyFrameError,
    FrameDtypeError,
    FrameShapeError,
    InvalidFrameError,
    NonFiniteFrameError,
    ParameterError,
)
from livediff.models.bundle import ModelBundle

GOOD = np.full((64, 80, 3), 120, dtype=np.uint8)


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        (np.zeros((64, 64, 3), dtype=np.int64), FrameDtypeError, "int64"),
        (np.array([["a"]], dtype=object), FrameDtypeError, "dtype"),
        ("not a frame", FrameDtypeError, "numpy array or a torch tensor"),
        (np.zeros((64, 64, 4), dtype=np.uint8), FrameShapeError, "4 channels"),
        (np.zeros((64, 64), dtype=np.uint8), FrameShapeError, "3 dimensions"),
        (np.zeros((3, 64, 64), dtype=np.uint8), FrameShapeError, "64 channels"),
        (np.zeros((0, 64, 3), dtype=np.uint8), EmptyFrameError, "no pixels"),
        (np.zeros((9000, 8, 3), dtype=np.uint8), FrameShapeError, "too large"),
        (np.full((16, 16, 3), np.nan, dtype=np.float32), NonFiniteFrameError, "NaN"),
        (torch.full((16, 16, 3), float("inf")), NonFiniteFrameError, "NaN or infinite"),
    ],
)
def test_bad_frames(
    tiny_bundle: ModelBundle, frame: Any, error: type[InvalidFrameError], message: str
) -> None:
    stream = Stream(tiny_bundle, StreamConfig(), prompt="x")
    with pytest.raises(error, match=message):
        stream.process(frame)
    # the stream is untouched and keeps working
    assert stream.frames_in == 0
    assert [o.index for o in stream.process(GOOD)] == [0]


def test_float_frames_in_unit_range_are_accepted(tiny_bundle: ModelBundle) -> None:
    stream = Stream(tiny_bundle, StreamConfig(), prompt="x")
    as_uint8 = stream.process(GOOD)[0].image
    stream = Stream(tiny_bundle, StreamConfig(), prompt="x")
    as_float = stream.process(GOOD.astype(np.float32) / 255.0)[0].image
    assert torch.equal(as_uint8, as_float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("strength", 0.0),
        ("strength", 1.5),
        ("strength", float("nan")),
        ("steps", 0),
        ("steps", 2.5),
        ("seed", -1),
        ("guidance_scale", -0.1),
        ("guidance_scale", 100.0),
        ("delta", float("inf")),
        ("similarity_threshold", 1.2),
        ("max_skip_frames", -3),
        ("t_index_list", (10, 5)),
        ("t_index_list", ()),
        ("prompt", 42),
        ("prompt", [("a", -1.0)]),
        ("prompt", "x" * 5000),
        ("negative_prompt", None),
        ("blend", "cubic"),
    ],
)
def test_bad_parameters(field: str, value: Any) -> None:
    with pytest.raises(ParameterError, match=field.split("_")[0]):
        GenerationParams(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 100),
        ("height", 32),
        ("width", 4096),
        ("frame_buffer_size", 0),
        ("num_inference_steps", 0),
        ("rcfg", "sometimes"),
        ("mode", "video2video"),
        ("fit", "zoom"),
    ],
)
def test_bad_stream_config(field: str, value: Any) -> None:
    with pytest.raises(ParameterError, match=field):
        StreamConfig(**{field: value})


def test_t_index_beyond_schedule(tiny_bundle: ModelBundle) -> None:
    with pytest.raises(ParameterError, match="t_index_list"):
        Stream(tiny_bundle, StreamConfig(num_inference_steps=20), prompt="x", t_index_list=(5, 25))


def test_img2img_without_a_frame(tiny_bundle: ModelBundle) -> None:
    with pytest.raises(ParameterError, match="input frame"):
        Stream(tiny_bundle, StreamConfig(), prompt="x").process(None)
