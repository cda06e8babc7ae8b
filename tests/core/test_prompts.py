"""Prompt encoding (CLIP and SDXL's two encoders) and weighted blending."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livediff.engine.config import RCFGMode, StreamConfig
from livediff.engine.stream import Stream
from livediff.models.bundle import ModelBundle
from livediff.models.prompts import BlendMethod, PromptEncoder, blend, slerp


def test_linear_blend_is_weighted_mean() -> None:
    a, b = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    torch.testing.assert_close(blend([(a, 3.0), (b, 1.0)], BlendMethod.LINEAR), 0.75 * a + 0.25 * b)


def test_slerp_keeps_norm_and_endpoints() -> None:
    a = torch.nn.functional.normalize(torch.randn(1, 4, 16), dim=-1) * 3
    b = torch.nn.functional.normalize(torch.randn(1, 4, 16), dim=-1) * 3
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    torch.testing.assert_close(middle.norm(dim=-1), torch.full((1, 4), 3.0))
    assert (blend([(a, 1.0), (b, 1.0)], BlendMethod.LINEAR).norm(dim=-1) < 3.0 - 1e-3).all()
    torch.testing.assert_close(blend([(a, 1.0), (b, 1.0)], BlendMethod.SLERP), middle)


def test_prompt_blend_in_encoder(tiny_bundle: ModelBundle) -> None:
    encoder = PromptEncoder(tiny_bundle, 128, 128)
    cat, dog = encoder.encode_text("a cat").embeds, encoder.encode_text("a dog").embeds
    assert not torch.allclose(cat, dog)
    mixed = encoder.encode((("a cat", 1.0), ("a dog", 3.0))).embeds
    torch.testing.assert_close(mixed, 0.25 * cat + 0.75 * dog)
    only_cat = encoder.encode((("a cat", 1.0), ("a dog", 0.0))).embeds
    torch.testing.assert_close(only_cat, cat)


def test_sdxl_conditioning(tiny_sdxl_bundle: ModelBundle) -> None:
    encoder = PromptEncoder(tiny_sdxl_bundle, 128, 96)
    cond = encoder.encode_text("a red car")
    assert cond.embeds.shape == (1, 77, 64)
    assert cond.pooled is not None and cond.pooled.shape == (1, 32)
    assert cond.time_ids is not None and cond.time_ids.tolist() == [[96, 128, 0, 0, 96, 128]]
    empty = encoder.encode_negative("")
    assert not empty.embeds.any() and empty.pooled is not None and not empty.pooled.any()
    assert encoder.encode_negative("ugly").embeds.any()


@pytest.mark.parametrize("rcfg", [RCFGMode.NONE, RCFGMode.FULL])
def test_sdxl_stream_runs(tiny_sdxl_bundle: ModelBundle, rcfg: RCFGMode) -> None:
    stream = Stream(
        tiny_sdxl_bundle, StreamConfig(rcfg=rcfg), prompt="a red car", steps=2, guidance_scale=2.0
    )
    frame = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    outputs = stream.process(frame) + stream.process(frame) + stream.flush()
    assert [o.index for o in outputs] == [0, 1]
    assert outputs[0].image.shape == (128, 128, 3) and outputs[0].image.dtype == torch.uint8
