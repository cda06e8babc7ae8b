"""A file job's N streams batched into one call (:mod:`livediff.engine.interleaved`).

The probe model (``runtime_testing``) makes every output pixel depend on its own input, prompt,
seed and timestep only, so a frame answered by the wrong stream, in the wrong order or with
the wrong step shows; its per-row arithmetic also allows exact comparisons. The tiny networks
check the same on real convolutions, within a grey level (oneDNN picks kernels by batch size).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from runtime_testing import make_frame

from livediff.engine.config import GenerationMode, GenerationParams, RCFGMode, StreamConfig
from livediff.engine.interleaved import (
    AUTO_ROWS,
    InterleavedStreams,
    carried_state,
    choose_batch,
)
from livediff.engine.stream import Stream
from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import ControlUse, Preprocessor

CONFIG = StreamConfig(width=64, height=64)
# A low strength: the probe saturates less, so every frame answers with a distinct image.
PARAMS = GenerationParams(prompt="a red fox", strength=0.1, steps=1, seed=3)


def one_stream(
    bundle: ModelBundle, config: StreamConfig, params: GenerationParams, frames: list[np.ndarray]
) -> list[Any]:
    stream = Stream(bundle, config, params)
    outputs = []
    for i, frame in enumerate(frames):
        outputs += stream.process(frame, tag=f"t{i}")
    return outputs + stream.flush()


def interleaved(
    bundle: ModelBundle,
    streams: int,
    config: StreamConfig,
    params: GenerationParams,
    frames: list[np.ndarray],
) -> tuple[InterleavedStreams, list[Any]]:
    choice = choose_batch(streams, config, params)
    job = InterleavedStreams(
        [Stream(bundle, config, params) for _ in range(streams)], choice.buckets
    )
    outputs = []
    for i, frame in enumerate(frames):
        outputs += job.process(frame, tag=f"t{i}")
    return job, outputs + job.flush()


CASES = [  # streams, frames, steps, rcfg, frame buffer size
    (4, 10, 1, RCFGMode.NONE, 1),
    (8, 8, 1, RCFGMode.NONE, 1),
    (3, 11, 2, RCFGMode.SELF, 1),
    (4, 7, 3, RCFGMode.INITIALIZE, 1),
    (2, 9, 2, RCFGMode.FULL, 2),  # groups of 2 frames: stream 0 holds frames 0 and 2
]


@pytest.mark.parametrize(("streams", "count", "steps", "rcfg", "buffer"), CASES)
def test_batched_streams_answer_as_one_stream_on_the_whole_sequence(
    probe_bundle: ModelBundle, streams: int, count: int, steps: int, rcfg: RCFGMode, buffer: int
) -> None:
    config = replace(CONFIG, rcfg=rcfg, frame_buffer_size=buffer)
    params = PARAMS.updated(steps=steps, guidance_scale=1.2, negative_prompt="blur")
    frames = [make_frame(0, i) for i in range(count)]
    expected = one_stream(probe_bundle, config, params, frames)
    _, outputs = interleaved(probe_bundle, streams, config, params, frames)
    assert [out.index for out in outputs] == list(range(count))
    assert [out.tag for out in outputs] == [f"t{i}" for i in range(count)]
    assert [out.index for out in expected] == list(range(count))
    for out, reference in zip(outputs, expected, strict=True):
        assert torch.equal(out.image, reference.image), out.index
    # every frame answers with its own image, so a mix-up would have shown
    assert len({out.image.numpy().tobytes() for out in outputs}) == count


def test_batched_streams_equal_n_streams_fed_their_subsequences(probe_bundle: ModelBundle) -> None:
    streams, count = 3, 10
    params = PARAMS.updated(steps=2)
    frames = [make_frame(1, i) for i in range(count)]
    _, outputs = interleaved(probe_bundle, streams, CONFIG, params, frames)
    for k in range(streams):
        alone = one_stream(probe_bundle, CONFIG, params, frames[k::streams])
        mine = outputs[k::streams]
        assert len(alone) == len(mine) == len(frames[k::streams])
        for out, reference in zip(mine, alone, strict=True):
            assert torch.equal(out.image, reference.image), (k, out.index)


def test_a_flush_starts_the_next_sequence_anew(probe_bundle: ModelBundle) -> None:
    params = PARAMS.updated(steps=2)
    first = [make_frame(0, i) for i in range(5)]
    second = [make_frame(2, i) for i in range(6)]
    job, _ = interleaved(probe_bundle, 4, CONFIG, params, first)
    again = []
    for i, frame in enumerate(second):
        again += job.process(frame, tag=i)
    again += job.flush()
    assert [out.index for out in again] == list(range(6))
    expected = one_stream(probe_bundle, CONFIG, params, second)
    assert all(torch.equal(a.image, b.image) for a, b in zip(again, expected, strict=True))


@pytest.mark.parametrize("steps", [1, 2])
def test_on_the_tiny_networks_within_a_grey_level(tiny_bundle: ModelBundle, steps: int) -> None:
    params = PARAMS.updated(steps=steps)
    frames = [make_frame(3, i) for i in range(6)]
    expected = one_stream(tiny_bundle, CONFIG, params, frames)
    _, outputs = interleaved(tiny_bundle, 4, CONFIG, params, frames)
    assert [out.index for out in outputs] == list(range(6))
    for out, reference in zip(outputs, expected, strict=True):
        difference = (out.image.to(torch.int16) - reference.image.to(torch.int16)).abs()
        assert difference.max() <= 1, (out.index, difference.max())


# ---------------------------------------------------------------- choosing N
@pytest.mark.parametrize(
    ("config", "steps", "streams", "rows"),
    [
        (CONFIG, 1, 8, 8),
        (CONFIG, 2, 4, 8),
        (CONFIG, 3, 2, 6),
        (replace(CONFIG, rcfg=RCFGMode.FULL), 1, 4, 8),
        (replace(CONFIG, rcfg=RCFGMode.FULL), 4, 1, 8),
        (replace(CONFIG, frame_buffer_size=2), 1, 4, 8),
    ],
)
def test_auto_fills_up_to_eight_unet_rows(
    config: StreamConfig, steps: int, streams: int, rows: int
) -> None:
    choice = choose_batch(None, config, PARAMS.updated(steps=steps))
    assert (choice.streams, choice.rows_per_call) == (streams, rows)
    assert choice.rows_per_call <= AUTO_ROWS and choice.reason.startswith("auto")
    assert choice.frames_per_call == streams * config.frame_buffer_size
    assert choice.buckets == tuple(sorted({choice.frames_per_call, rows}))


TEMPORAL = [
    ("similarity_threshold", CONFIG, {"similarity_threshold": 0.95}),
    ("feature_bank", CONFIG, {"feature_bank": 2}),
    ("latent_feedback", CONFIG, {"latent_feedback": 0.3}),
    (
        "controlnets",
        CONFIG,
        {"controlnets": (ControlUse("temporal", preprocessor=Preprocessor.PREVIOUS_OUTPUT),)},
    ),
    ("mode", replace(CONFIG, mode=GenerationMode.TXT2IMG), {}),
    ("use_denoising_batch", replace(CONFIG, use_denoising_batch=False), {}),
]


@pytest.mark.parametrize(("setting", "config", "changes"), TEMPORAL)
def test_state_carried_between_frames_refuses_a_batch_and_auto_says_why(
    setting: str, config: StreamConfig, changes: dict[str, Any]
) -> None:
    params = PARAMS.updated(**changes)
    with pytest.raises(ParameterError, match=f"--batch 4 with {setting}") as refused:
        choose_batch(4, config, params)
    assert refused.value.field == setting
    auto = choose_batch(None, config, params)
    assert auto.streams == 1 and f"because of {setting}" in auto.reason
    assert choose_batch(1, config, params).streams == 1  # one stream is always fine


def test_carried_state_is_empty_by_default_and_names_each_setting() -> None:
    assert carried_state(CONFIG, PARAMS) == []
    params = PARAMS.updated(similarity_threshold=0.9, latent_feedback=0.2)
    assert [name for name, _ in carried_state(CONFIG, params)] == [
        "similarity_threshold",
        "latent_feedback",
    ]


@pytest.mark.parametrize("asked", [0, 33])
def test_a_batch_out_of_range_is_refused(asked: int) -> None:
    with pytest.raises(ParameterError, match="out of range") as refused:
        choose_batch(asked, CONFIG, PARAMS)
    assert refused.value.field == "batch"
