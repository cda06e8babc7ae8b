"""A Stream with a feature bank or latent feedback, against StreamV2V and plain equations.

The feature bank's oracle is the same Stream on a model whose UNet runs StreamV2V's cached
attention, written out plainly (``helpers/streamv2v_reference.py``: one deque per
self-attention, which for one session is exactly one bank per row); livediff's per-row pools,
leases and host state must give the same frames, with Stream Batch and sequentially, and start
over where they should (a new prompt, a scene cut). Float64: with random weights many bank
features tie to 1e-5 in cosine, and float32's summation order alone could pick another.

Latent feedback's oracle is a model whose encoder blends the last latent it decoded into what
it encodes: ``x0 ← (1 - w) · x0 + w · previous output latent``, the definition.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pytest
import torch

from helpers.canny_reference import scene
from helpers.streamv2v_reference import install_streamv2v
from livediff.engine.config import GenerationMode, GenerationParams, RCFGMode, StreamConfig
from livediff.engine.stream import Stream
from livediff.exceptions import ParameterError
from livediff.models.bank_tokens import BankTokens
from livediff.models.bundle import ModelBundle

SIZE = 64
BASE = GenerationParams(prompt="a red fox", negative_prompt="blurry", strength=0.6, seed=5)
BANK = {"feature_bank": 2, "bank_interval": 1, "feature_fusion": 0.8, "fusion_threshold": 0.9}


def as_float64(bundle: ModelBundle) -> ModelBundle:
    def double(net: Any) -> Any:
        return copy.deepcopy(net).to(torch.float64)

    return replace(
        bundle,
        unet=double(bundle.unet),
        vae=double(bundle.vae),
        text_encoders=tuple(double(t) for t in bundle.text_encoders),
        dtype=torch.float64,
    )


@pytest.fixture(scope="module")
def exact(tiny_bundle: ModelBundle) -> ModelBundle:
    return as_float64(tiny_bundle)


def banked(bundle: ModelBundle, rows: int = 16, frames: int = 4, **reduce: Any) -> ModelBundle:
    fresh = replace(bundle, unet=copy.deepcopy(bundle.unet))
    return fresh.with_feature_bank(frames=frames, rows=rows, **reduce)


def streamv2v(
    bundle: ModelBundle,
    *,
    interval: int,
    frames: int,
    strength: float,
    threshold: float,
    **reduce: Any,
) -> ModelBundle:
    oracle = replace(bundle, unet=copy.deepcopy(bundle.unet))
    install_streamv2v(
        oracle.unet,
        use_feature_injection=strength > 0,
        feature_injection_strength=strength,
        feature_similarity_threshold=threshold,
        interval=interval,
        max_frames=frames,
        **reduce,
    )
    return oracle


def drifting(count: int, start: int = 0) -> list[np.ndarray]:
    """A slowly changing scene: consecutive frames similar, so nothing is a scene cut."""
    base = scene(3, SIZE, SIZE).astype(np.int16)
    rng = np.random.default_rng(7)
    return [
        np.clip(base + rng.integers(-6, 7, base.shape) * (i + start) // 3, 0, 255).astype(np.uint8)
        for i in range(count)
    ]


def outputs(stream: Stream, frames: list[np.ndarray]) -> list[np.ndarray]:
    got = [out.image.numpy() for frame in frames for out in stream.process(frame)]
    return got + [out.image.numpy() for out in stream.flush()]


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) > 0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        np.testing.assert_array_equal(x, y, err_msg=f"frame {i}")


@pytest.mark.parametrize(
    ("config", "bank"),
    [
        (StreamConfig(width=SIZE, height=SIZE, use_denoising_batch=True), BANK),
        (StreamConfig(width=SIZE, height=SIZE, rcfg=RCFGMode.FULL), {**BANK, "bank_interval": 2}),
        (
            StreamConfig(width=SIZE, height=SIZE, use_denoising_batch=False),
            {**BANK, "feature_bank": 1},
        ),
    ],
    ids=["stream-batch", "rcfg-full-interval-2", "sequential"],
)
def test_the_bank_equals_streamv2v(
    exact: ModelBundle, config: StreamConfig, bank: dict[str, Any]
) -> None:
    steps = 1 if not config.use_denoising_batch else 2  # sequential: StreamV2V counts every call
    params = BASE.updated(steps=steps, guidance_scale=1.5)
    frames = drifting(6)
    oracle = streamv2v(
        exact,
        interval=bank["bank_interval"],
        frames=bank["feature_bank"],
        strength=bank["feature_fusion"],
        threshold=bank["fusion_threshold"],
    )
    want = outputs(Stream(oracle, config, params), frames)
    got = outputs(Stream(banked(exact), config, params.updated(**bank)), frames)
    assert_same(got, want)
    # The bank moves random weights' frames little, but the frames are compared exactly: a
    # bank that did nothing would give the plain frames, which differ.
    plain = outputs(Stream(exact, config, params), frames)
    assert any(not np.array_equal(a, b) for a, b in zip(got, plain, strict=True))


@pytest.mark.parametrize("tokens", [BankTokens.POOLED, BankTokens.MERGED])
def test_a_reduced_bank_equals_streamv2v_with_reduced_frames(
    exact: ModelBundle, tokens: BankTokens
) -> None:
    """Reduced from 16 tokens: at 64² every self-attention (8×8 and 4×4 token grids) keeps
    reduced bank frames; the Stream hands the UNet its latent size, which pooling needs."""
    config = StreamConfig(width=SIZE, height=SIZE, use_denoising_batch=True)
    params = BASE.updated(steps=2, guidance_scale=1.5)
    frames = drifting(6)
    oracle = streamv2v(
        exact,
        interval=1,
        frames=2,
        strength=0.8,
        threshold=0.9,
        reduce=tokens.value,
        reduce_from=16,
    )
    want = outputs(Stream(oracle, config, params), frames)
    model = banked(exact, tokens=tokens, reduce_from=16)
    got = outputs(Stream(model, config, params.updated(**BANK)), frames)
    assert_same(got, want)
    full = outputs(
        Stream(banked(exact, tokens=BankTokens.FULL), config, params.updated(**BANK)), frames
    )
    assert any(not np.array_equal(a, b) for a, b in zip(got, full, strict=True))


def test_bank_zero_on_a_bank_model_is_the_plain_stream(exact: ModelBundle) -> None:
    config = StreamConfig(width=SIZE, height=SIZE)
    frames = drifting(4)
    model = banked(exact)
    plain = outputs(Stream(exact, config, BASE), frames)
    assert_same(outputs(Stream(model, config, BASE), frames), plain)
    assert model.feature_bank is not None and model.feature_bank.free_rows() == 16


@dataclass
class CallLog(ModelBundle):
    """Records, for every UNet call, whether it carried feature bank inputs."""

    banked_calls: list[bool] | None = None

    def predict_noise(self, batch: Any) -> torch.Tensor:
        assert self.banked_calls is not None
        self.banked_calls.append(batch.bank_slots is not None)
        return super().predict_noise(batch)


def test_calls_of_a_session_without_a_bank_carry_no_bank_inputs(exact: ModelBundle) -> None:
    """A bank-capable model runs the calls of a session with bank 0 without the bank (plain
    self-attention: the price of the bank is paid only where it is used), live both ways."""
    model = banked(exact)
    logged = CallLog(**{f.name: getattr(model, f.name) for f in fields(model)}, banked_calls=[])
    stream = Stream(logged, StreamConfig(width=SIZE, height=SIZE), BASE.updated(steps=1))
    frames = drifting(6)
    outputs(stream, frames[:2])
    assert logged.banked_calls == [False, False]
    stream.update(**BANK)
    outputs(stream, frames[2:4])
    assert logged.banked_calls[2:] == [True, True]
    stream.update(feature_bank=0)
    outputs(stream, frames[4:])
    assert logged.banked_calls[4:] == [False, False]


def test_a_new_prompt_and_a_scene_cut_start_the_bank_over(exact: ModelBundle) -> None:
    config = StreamConfig(width=SIZE, height=SIZE)
    params = BASE.updated(steps=1, **BANK)
    model = banked(exact)
    first, later = drifting(3), drifting(3, start=3)
    stream = Stream(model, config, params)
    outputs(stream, first)
    stream.update(prompt="a blue whale")
    fresh = Stream(model, config, params.updated(prompt="a blue whale"))
    assert_same(outputs(stream, later), outputs(fresh, later))
    cut = [np.full_like(first[0], 255) - f for f in first]  # the negative: cosine well below 0.5
    stream = Stream(model, config, params)
    outputs(stream, first)
    assert_same(outputs(stream, cut), outputs(Stream(model, config, params), cut))


def test_live_bank_changes_land_on_the_next_frame(exact: ModelBundle) -> None:
    config = StreamConfig(width=SIZE, height=SIZE)
    params = BASE.updated(steps=1)
    model = banked(exact)
    frames = drifting(6)
    stream = Stream(model, config, params)
    before = outputs(stream, frames[:2])
    stream.update(**BANK)
    after = outputs(stream, frames[2:])
    oracle = Stream(
        streamv2v(exact, interval=1, frames=2, strength=0.8, threshold=0.9), config, params
    )
    assert_same(after, outputs(oracle, frames[2:]))
    assert_same(before, outputs(Stream(exact, config, params), frames[:2]))
    stream.update(feature_bank=0)
    assert_same(outputs(stream, frames[:2]), outputs(Stream(exact, config, params), frames[:2]))
    assert model.feature_bank is not None and model.feature_bank.free_rows() == 16


@dataclass
class FedBack(ModelBundle):
    """The definition of latent feedback: encode blends in the last latent decoded."""

    weight: float = 0.0
    last: torch.Tensor | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x0 = super().encode(images)
        return x0 if self.last is None else torch.lerp(x0, self.last, self.weight)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.last = latents.detach().clone()
        return super().decode(latents)


@pytest.mark.parametrize("batched", [True, False], ids=["stream-batch", "sequential"])
def test_latent_feedback_blends_the_previous_output_latent(
    exact: ModelBundle, batched: bool
) -> None:
    config = StreamConfig(width=SIZE, height=SIZE, use_denoising_batch=batched)
    params = BASE.updated(steps=2)
    frames = drifting(5)
    oracle = FedBack(**{f.name: getattr(exact, f.name) for f in fields(ModelBundle)}, weight=0.3)
    want = outputs(Stream(oracle, config, params), frames)
    assert_same(outputs(Stream(exact, config, params.updated(latent_feedback=0.3)), frames), want)


def test_refusals_name_the_setting(exact: ModelBundle) -> None:
    config = StreamConfig(width=SIZE, height=SIZE)
    with pytest.raises(ParameterError, match="runs no feature bank") as plain:
        Stream(exact, config, BASE.updated(feature_bank=2))
    small = banked(exact, rows=1)  # stream batch of 2 steps: 2 rows
    with pytest.raises(ParameterError, match="full: 0 of its 1 rows") as full:
        Stream(small, config, BASE.updated(steps=2, feature_bank=2))
    with pytest.raises(ParameterError, match="at most 2 frames") as deep:
        Stream(banked(exact, frames=2), config, BASE).update(feature_bank=3)
    txt2img = StreamConfig(width=SIZE, height=SIZE, mode=GenerationMode.TXT2IMG)
    with pytest.raises(ParameterError, match="txt2img") as feedback:
        Stream(exact, txt2img, BASE.updated(latent_feedback=0.5))
    assert [e.value.field for e in (plain, full, deep, feedback)] == [
        "feature_bank",
        "feature_bank",
        "feature_bank",
        "latent_feedback",
    ]


def test_a_dropped_stream_gives_its_rows_back(exact: ModelBundle) -> None:
    model = banked(exact, rows=4)
    assert model.feature_bank is not None
    stream = Stream(model, StreamConfig(width=SIZE, height=SIZE), BASE.updated(steps=1, **BANK))
    assert model.feature_bank.free_rows() == 3
    stream.update(steps=2)  # two rows now: a new lease, the old one given back
    assert model.feature_bank.free_rows() == 2
    stream.update(steps=1)  # fewer rows keep some of theirs (no new lease to fail)
    assert model.feature_bank.free_rows() == 2
    del stream
    gc.collect()
    assert model.feature_bank.free_rows() == 4


def test_a_banked_model_is_captured_as_one_step(exact: ModelBundle) -> None:
    """The bank's per-frame choice (held frames, the frame kept) is copied into static inputs
    before each replay, so a compiled banked stream replays its whole step as one graph (the
    GPU test ``test_captured_stream_keeps_its_feature_bank`` checks its frames)."""
    from livediff.engine.backend_fit import whole_step_blockers

    assert whole_step_blockers(exact) == []
    assert whole_step_blockers(banked(exact)) == []


def test_a_session_reports_its_bank_rows_and_memory(exact: ModelBundle) -> None:
    model = banked(exact, rows=4)
    config = StreamConfig(width=SIZE, height=SIZE)
    stream = Stream(model, config, BASE.updated(steps=2, **BANK))
    assert Stream(model, config, BASE).bank_usage() is None
    assert stream.bank_usage() == {"rows": 2, "mb": 0.0}  # no call yet: no pools
    outputs(stream, drifting(2))
    assert model.feature_bank is not None
    per_row = model.feature_bank.row_bytes()
    assert per_row > 0 and stream.bank_usage() == {"rows": 2, "mb": round(2 * per_row / 2**20, 1)}


@dataclass
class MaskLog(ModelBundle):
    """Records, for every UNet call that banks, whether it carried the held-frame mask."""

    masked_calls: list[bool] | None = None

    def predict_noise(self, batch: Any) -> torch.Tensor:
        assert self.masked_calls is not None
        if batch.bank_slots is not None:
            self.masked_calls.append(batch.bank_frames is not None)
        return super().predict_noise(batch)


@pytest.mark.parametrize("use_denoising_batch", [True, False], ids=["stream-batch", "sequential"])
def test_a_full_bank_attends_unmasked_and_still_equals_streamv2v(
    exact: ModelBundle, use_denoising_batch: bool
) -> None:
    """Once a session's rows hold every frame of the pool, its calls leave the held-frame mask
    out (``bank_frames``: the attention runs unmasked, as a flash kernel can); the frames stay
    StreamV2V's exactly, through the fill (masked) and after it (unmasked)."""
    config = StreamConfig(width=SIZE, height=SIZE, use_denoising_batch=use_denoising_batch)
    steps = 2 if use_denoising_batch else 1
    params = BASE.updated(steps=steps, guidance_scale=1.5)
    bank = {**BANK, "feature_bank": 2, "bank_interval": 1}
    frames = drifting(6)
    oracle = streamv2v(
        exact,
        interval=1,
        frames=2,
        strength=bank["feature_fusion"],
        threshold=bank["fusion_threshold"],
    )
    want = outputs(Stream(oracle, config, params), frames)
    model = banked(exact, frames=2)  # the pool's frames: the session's bank fills it
    logged = MaskLog(**{f.name: getattr(model, f.name) for f in fields(model)}, masked_calls=[])
    got = outputs(Stream(logged, config, params.updated(**bank)), frames)
    assert_same(got, want)
    calls = logged.masked_calls
    assert calls is not None and calls[:2] == [True, True] and not any(calls[2:]), calls
