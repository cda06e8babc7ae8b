"""The Stream: frames of any size in, model-resolution uint8 frames out, in order, after the delay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livediff.engine.config import FitMode, GenerationMode, StreamConfig
from livediff.engine.frames import fit_crop
from livediff.engine.stream import Stream
from livediff.kernels.preprocess import rgb_to_model_input
from livediff.models.bundle import ModelBundle


def _frames(count: int, shape: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize(
    ("source", "target", "mode", "expected"),
    [
        ((720, 1280), (512, 512), FitMode.CROP, (0, 280, 720, 720)),
        ((1280, 720), (512, 512), FitMode.CROP, (280, 0, 720, 720)),
        ((480, 640), (512, 768), FitMode.CROP, (26, 0, 427, 640)),
        ((720, 1280), (512, 512), FitMode.RESIZE, (0, 0, 720, 1280)),
    ],
)
def test_fit_crop(
    source: tuple[int, int],
    target: tuple[int, int],
    mode: FitMode,
    expected: tuple[int, int, int, int],
) -> None:
    assert fit_crop(*source, *target, mode) == expected


def test_preprocess_range_and_layout() -> None:
    frame = torch.zeros(1, 4, 6, 3, dtype=torch.uint8)
    frame[..., 0] = 255  # pure red
    out = rgb_to_model_input(frame, 4, 6, (0, 0, 4, 6))
    assert out.shape == (1, 3, 4, 6)
    assert torch.equal(out[0, 0], torch.ones(4, 6)) and torch.equal(out[0, 1], -torch.ones(4, 6))


@pytest.mark.parametrize("frame_buffer_size", [1, 2])
@pytest.mark.parametrize("steps", [1, 3])
def test_outputs_answer_inputs_in_order(
    tiny_bundle: ModelBundle, steps: int, frame_buffer_size: int
) -> None:
    frames = _frames(7, (72, 96))
    results = {}
    for batched in (True, False):
        config = StreamConfig(frame_buffer_size=frame_buffer_size, use_denoising_batch=batched)
        stream = Stream(tiny_bundle, config, prompt="a harbour", steps=steps, seed=4)
        outputs = [
            o for i, f in enumerate(frames) for o in stream.process(f, tag=f"t{i}")
        ] + stream.flush()
        assert [o.index for o in outputs] == list(range(7))
        assert [o.tag for o in outputs] == [f"t{i}" for i in range(7)]
        assert all(o.image.shape == (128, 128, 3) and o.image.dtype == torch.uint8 for o in outputs)
        results[batched] = outputs
    for a, b in zip(results[True], results[False], strict=True):
        # float32 rounding between batch sizes can move a pixel by one level after uint8 rounding
        assert (a.image.int() - b.image.int()).abs().max() <= 1


def test_delay_is_steps_minus_one(tiny_bundle: ModelBundle) -> None:
    stream = Stream(tiny_bundle, StreamConfig(), prompt="x", steps=4)
    counts = [len(stream.process(f)) for f in _frames(6, (64, 64))]
    assert stream.delay == 3 and counts == [0, 0, 0, 1, 1, 1]


def test_output_depends_on_input_and_prompt(tiny_bundle: ModelBundle) -> None:
    a, b = _frames(2, (64, 64))
    one = Stream(tiny_bundle, StreamConfig(), prompt="x", seed=1)
    two = Stream(tiny_bundle, StreamConfig(), prompt="y", seed=1)
    out_a, out_b = one.process(a)[0].image, one.process(b)[0].image
    assert not torch.equal(out_a, out_b)
    assert not torch.equal(two.process(a)[0].image, out_a)


def test_same_seed_same_output(tiny_bundle: ModelBundle) -> None:
    frame = _frames(1, (64, 64))[0]
    outs = [
        Stream(tiny_bundle, StreamConfig(), prompt="x", seed=8).process(frame)[0].image
        for _ in range(2)
    ]
    assert torch.equal(*outs)


def test_txt2img_stream(tiny_bundle: ModelBundle) -> None:
    stream = Stream(
        tiny_bundle, StreamConfig(mode=GenerationMode.TXT2IMG), prompt="stars", steps=2, seed=5
    )
    assert stream.batch.coefficients.timesteps[0] == 999  # txt2img starts from pure noise
    outputs = [o for _ in range(4) for o in stream.process()] + stream.flush()
    assert [o.index for o in outputs] == [0, 1, 2, 3]
    assert not torch.equal(outputs[0].image, outputs[1].image)  # fresh noise per frame
    again = Stream(
        tiny_bundle, StreamConfig(mode=GenerationMode.TXT2IMG), prompt="stars", steps=2, seed=5
    )
    replay = [o for _ in range(4) for o in again.process()] + again.flush()
    assert all(torch.equal(x.image, y.image) for x, y in zip(outputs, replay, strict=True))
