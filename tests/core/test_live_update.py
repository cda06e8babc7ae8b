"""Live updates take effect at the next frame, equal a fresh stream's output, and reuse buffers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from livediff.engine.config import RCFGMode, StreamConfig
from livediff.engine.stream import Stream
from livediff.models.bundle import ModelBundle

FRAME = np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8)


def _buffers(stream: Stream) -> dict[str, int]:
    batch = stream.batch
    tensors = {
        "latents": batch._unet_latents,
        "embeds": batch._embeds,
        "timesteps": batch._timesteps,
        "noise": batch.noise,
        "coefficients": batch._row_coeffs,
        "guidance": batch.guidance_scale,
    }
    if batch.stock_noise is not None:
        tensors["stock"] = batch.stock_noise
    return {name: tensor.data_ptr() for name, tensor in tensors.items()}


def _first_output(stream: Stream) -> torch.Tensor:
    outputs = stream.process(FRAME)
    assert len(outputs) == 1
    return outputs[0].image


BASE: dict[str, Any] = {
    "prompt": "a castle",
    "negative_prompt": "fog",
    "strength": 0.6,
    "seed": 3,
    "guidance_scale": 1.5,
    "delta": 1.0,
}


@pytest.mark.parametrize(
    ("rcfg", "change"),
    [
        (RCFGMode.NONE, {"prompt": "a lighthouse at dusk"}),
        (RCFGMode.FULL, {"negative_prompt": "bright sunlight"}),
        (RCFGMode.NONE, {"prompt": [("a castle", 0.3), ("a forest", 0.7)]}),
        (RCFGMode.NONE, {"prompt": [("a castle", 0.3), ("a forest", 0.7)], "blend": "slerp"}),
        (RCFGMode.NONE, {"seed": 99}),
        (RCFGMode.NONE, {"strength": 0.9}),
        (RCFGMode.NONE, {"t_index_list": (40,)}),
        (RCFGMode.SELF, {"guidance_scale": 2.5}),
        (RCFGMode.SELF, {"delta": 0.5}),
    ],
)
def test_update_lands_on_next_frame_without_reallocating(
    tiny_bundle: ModelBundle, rcfg: RCFGMode, change: dict[str, Any]
) -> None:
    config = StreamConfig(rcfg=rcfg)
    stream = Stream(tiny_bundle, config, **BASE)
    before = _first_output(stream)
    buffers = _buffers(stream)
    stream.update(**change)
    after = _first_output(stream)
    assert _buffers(stream) == buffers, "a live update must write into the existing buffers"
    expected = _first_output(Stream(tiny_bundle, config, **{**BASE, **change}))
    assert torch.equal(after, expected), "the next frame must use the new parameters"
    assert not torch.equal(after, before), "the update must change the output"


def test_update_with_stream_batch_applies_at_next_call(tiny_bundle: ModelBundle) -> None:
    frames = [
        np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(4)
    ]
    plain = Stream(tiny_bundle, StreamConfig(), steps=2, **BASE)
    changed = Stream(tiny_bundle, StreamConfig(), steps=2, **BASE)
    out_plain = [plain.process(f) for f in frames]
    out_changed = [changed.process(f) for f in frames[:2]]
    changed.update(prompt="a submarine")
    out_changed += [changed.process(f) for f in frames[2:]]
    for a, b in zip(out_plain[:2], out_changed[:2], strict=True):  # before the update: identical
        assert [o.index for o in a] == [o.index for o in b]
        assert all(torch.equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    for a, b in zip(out_plain[2:], out_changed[2:], strict=True):  # from the next call on: changed
        assert all(not torch.equal(x.image, y.image) for x, y in zip(a, b, strict=True))


def test_changing_the_step_count_reallocates_and_restarts_the_pipeline(
    tiny_bundle: ModelBundle,
) -> None:
    stream = Stream(tiny_bundle, StreamConfig(), steps=1, **BASE)
    _first_output(stream)
    stream.update(steps=3)
    assert stream.batch.steps == 3 and stream.delay == 2
    assert stream.process(FRAME) == [] and stream.process(FRAME) == []
    assert [o.index for o in stream.process(FRAME)] == [1]


def test_failed_update_changes_nothing(tiny_bundle: ModelBundle) -> None:
    stream = Stream(tiny_bundle, StreamConfig(), **BASE)
    before = stream.params
    with pytest.raises(ValueError):
        stream.update(strength=7)
    with pytest.raises(ValueError, match="unknown parameter"):
        stream.update(promt="typo")
    assert stream.params == before
