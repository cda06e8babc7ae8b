"""Style images per session: sessions with different images and scales share one UNet call and
each get what a single Stream gives; live changes land on the next frame; off is exactly off.

The model-level oracle (a row with its image equals diffusers' IP-Adapter UNet call; scale 0
is exactly the plain UNet) is ``tests/models/test_ip_adapter.py``; here the engine must route
each session's tokens and scale to its own rows and nowhere else.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_testing import make_frame, receive, reference_outputs

from livediff.engine.config import GenerationParams, RCFGMode, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.stream import Stream
from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.ip_adapter_loading import load_ip_adapter
from livediff.models.ip_adapter_spec import IPAdapterSpec

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=2)
CALM = RuntimeConfig(
    deadline_ms=3_600_000, inbox_size=8, outbox_size=16, degrade=DegradePolicy(enabled=False)
)
TOLERANCE = 1  # uint8 levels: a call over padded rows may sum in another order


def png(seed: int, size: tuple[int, int] = (40, 56)) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def styled(tiny_bundle: ModelBundle) -> ModelBundle:
    """The tiny model with a random plus adapter, on its own UNet copy (the shared one stays plain)."""
    bundle = dataclasses.replace(tiny_bundle, unet=copy.deepcopy(tiny_bundle.unet))
    adapter = load_ip_adapter(IPAdapterSpec("random", variant="plus", seed=3), bundle)
    return bundle.with_ip_adapter(adapter)


@pytest.fixture(scope="module")
def keys(styled: ModelBundle) -> tuple[str, str]:
    assert styled.image_prompts is not None
    return tuple(styled.image_prompts.encode_bytes(png(seed)).key for seed in (1, 2))  # type: ignore[return-value]


def gap(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


async def test_sessions_with_different_images_share_calls_and_equal_alone(
    styled: ModelBundle, keys: tuple[str, str]
) -> None:
    setups = [
        {"prompt": "a red fox", "seed": 1, "ip_image": keys[0], "ip_scale": 0.6},
        {"prompt": "a blue whale", "seed": 2, "ip_image": keys[1], "ip_scale": 1.0},
        {"prompt": "a tree", "seed": 3},
    ]
    frames = 4
    engine = Engine(styled, CONFIG, CALM, BASE)
    sessions = [await engine.open_session(params) for params in setups]
    for k, session in enumerate(sessions):
        for i in range(frames):
            session.submit(make_frame(k, i))
    await engine.start()  # every frame waits already: the three sessions share each call
    try:
        for k, params in enumerate(setups):
            inputs = [make_frame(k, i) for i in range(frames)]
            expected = reference_outputs(styled, CONFIG, BASE.updated(**params), inputs)
            outputs = await receive(sessions[k], len(expected))
            assert [out.index for out in outputs] == sorted(expected)
            for out in outputs:
                assert gap(out.image, expected[out.index]) <= TOLERANCE, (k, out.index)
            if "ip_image" in params:  # the image matters beyond the tolerance: this can fail
                plain = {**params, "ip_image": None}
                unstyled = reference_outputs(styled, CONFIG, BASE.updated(**plain), inputs)
                assert max(gap(unstyled[i], expected[i]) for i in unstyled) > TOLERANCE
        assert engine.metrics()["batch_sessions"]["max"] == 3
    finally:
        await engine.stop()


def _run(stream: Stream, frames: list[np.ndarray]) -> list[torch.Tensor]:
    return [out.image for frame in frames for out in stream.process(frame)]


def test_live_changes_land_on_the_next_frame_and_off_is_exactly_plain(
    styled: ModelBundle, tiny_bundle: ModelBundle, keys: tuple[str, str]
) -> None:
    params = GenerationParams(prompt="a fox", strength=0.5, steps=1)
    frames = [make_frame(0, i) for i in range(6)]
    live = Stream(styled, CONFIG, params)
    outputs = _run(live, frames[:2])
    live.update(ip_image=keys[0], ip_scale=0.6)
    outputs += _run(live, frames[2:4])
    live.update(ip_scale=0.0)
    outputs += _run(live, frames[4:5])
    live.update(ip_scale=1.5, ip_image=None)
    outputs += _run(live, frames[5:])

    plain = _run(Stream(tiny_bundle, CONFIG, params), frames)  # no adapter installed at all
    style = _run(Stream(styled, CONFIG, params.updated(ip_image=keys[0], ip_scale=0.6)), frames)
    for i in (0, 1, 4, 5):
        assert torch.equal(outputs[i], plain[i]), i
    for i in (2, 3):
        assert torch.equal(outputs[i], style[i]), i
        assert gap(style[i].numpy(), plain[i].numpy()) > TOLERANCE, i


def test_rcfg_negative_rows_get_the_unconditional_tokens(
    styled: ModelBundle, keys: tuple[str, str]
) -> None:
    config = dataclasses.replace(CONFIG, rcfg=RCFGMode.FULL)
    stream = Stream(styled, config, BASE.updated(ip_image=keys[1], ip_scale=0.7))
    batch = stream.batch._batch()
    assert styled.image_prompts is not None
    prompt = styled.image_prompts.lookup(keys[1])
    assert prompt is not None and batch.ip_tokens is not None and batch.ip_scales is not None
    negative = stream.batch.uncond_rows
    assert negative == stream.batch.unet_rows // 2 > 0
    assert torch.equal(batch.ip_tokens[:negative], prompt.uncond_tokens.expand(negative, -1, -1))
    assert torch.equal(batch.ip_tokens[negative:], prompt.tokens.expand(negative, -1, -1))
    assert not torch.equal(prompt.tokens, prompt.uncond_tokens)
    assert torch.equal(batch.ip_scales, torch.full_like(batch.ip_scales, 0.7))


def test_unknown_keys_and_models_without_adapter_are_refused(
    styled: ModelBundle, tiny_bundle: ModelBundle, keys: tuple[str, str]
) -> None:
    stream = Stream(styled, CONFIG, BASE)
    with pytest.raises(ParameterError, match="upload it first") as caught:
        stream.update(ip_image="0" * 64)
    assert caught.value.field == "ip_image"
    assert stream.params.ip_image is None  # refused: nothing changed
    with pytest.raises(ParameterError, match="--ip-adapter") as caught:
        Stream(tiny_bundle, CONFIG, BASE).update(ip_image=keys[0])
    assert caught.value.field == "ip_image"
    with pytest.raises(ParameterError, match="64 hex digits") as caught:
        stream.update(ip_image="not-a-key")
    assert caught.value.field == "ip_image"
