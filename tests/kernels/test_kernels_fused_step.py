"""The fused step's reference does what ``StreamBatch.finish`` + ``_shift`` do, for every mode.

The engine's Stream Batch runs side by side with the fused op on copies of the same state for
several frames; block 0 (written by ``StreamBatch.begin``) is copied over before each step,
everything else evolves separately and must stay equal.
"""

from __future__ import annotations

import pytest
import torch
from kernels_testing import RCFG_MODES, fused_inputs

from livediff.engine.config import RCFGMode
from livediff.engine.lcm_schedule import LCMSchedule
from livediff.engine.stream_batch import StreamBatch
from livediff.kernels.fused_step import fused_step

# SD-Turbo's scheduler (scaled-linear betas); the coefficients are what the engine computes.
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_scaling": 10.0,
}
T_INDEX = {1: (25,), 2: (20, 35), 4: (10, 22, 34, 45)}
LATENT = (8, 6)


def _engine(
    mode: RCFGMode, frames: int, steps: int, add_noise: bool, dtype: torch.dtype
) -> StreamBatch:
    batch = StreamBatch(
        LCMSchedule(SCHEDULER, 50).coefficients(T_INDEX[steps]),
        frame_buffer_size=frames,
        latent_size=LATENT,
        embed_shape=(3, 8),
        pooled_dim=None,
        rcfg=mode,
        use_denoising_batch=True,
        do_add_noise=add_noise,
        device=torch.device("cpu"),
        dtype=dtype,
    )
    batch.set_guidance(1.7, 0.8)
    return batch


@pytest.mark.parametrize("mode", list(RCFGMode))
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("add_noise", [True, False])
def test_reference_matches_stream_batch(
    mode: RCFGMode, frames: int, steps: int, add_noise: bool
) -> None:
    gen = torch.Generator().manual_seed(steps * 10 + frames)
    engine = _engine(mode, frames, steps, add_noise, torch.float32)
    rows = steps * frames
    shape = (rows, 4, *LATENT)
    noise = torch.randn(shape, generator=gen)
    engine.set_noise(noise)
    engine.x_t.copy_(torch.randn(shape, generator=gen))  # a buffer already in flight
    if engine.stock_noise is not None:
        engine.stock_noise.copy_(torch.randn(shape, generator=gen))
    coefficients = engine.coefficients
    per_step = torch.stack(
        [coefficients.alpha_sqrt, coefficients.beta_sqrt, coefficients.c_skip, coefficients.c_out]
    )
    row_coefficients = per_step.repeat_interleave(frames, dim=1).to(torch.float32)
    x_t = engine.x_t.clone()
    stock = None if engine.stock_noise is None else engine.stock_noise.clone()
    out = torch.full((frames, 4, *LATENT), float("nan"))
    for _ in range(3):
        engine.begin(torch.randn(frames, 4, *LATENT, generator=gen))
        x_t[:frames].copy_(engine.x_t[:frames])
        if stock is not None and engine.stock_noise is not None:
            stock[:frames].copy_(engine.stock_noise[:frames])
        eps = torch.randn(engine.unet_rows, 4, *LATENT, generator=gen)
        expected = engine.finish(eps)
        result = fused_step(
            x_t,
            eps,
            stock,
            noise if add_noise else None,
            row_coefficients,
            engine.guidance_scale,
            engine.delta,
            rcfg=mode,
            frame_buffer_size=frames,
            out=out,
        )
        assert result is out
        # Same float32 equations in the same order: equal to rounding.
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_t, engine.x_t, rtol=1e-5, atol=1e-5)
        if stock is not None:
            assert engine.stock_noise is not None
            # stock = (x - a x_ref) / b divides by b >= 0.29 here: a few more ulp.
            torch.testing.assert_close(stock, engine.stock_noise, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", RCFG_MODES)
def test_half_precision_tracks_the_engine(mode: str) -> None:
    """The engine rounds after every fp16 op; the op rounds once: within fp16 noise of each other."""
    engine = _engine(RCFGMode(mode), 2, 2, True, torch.float16)
    gen = torch.Generator().manual_seed(1)
    shape = (4, 4, *LATENT)
    noise = torch.randn(shape, generator=gen).half()
    engine.set_noise(noise)
    engine.x_t.copy_(torch.randn(shape, generator=gen))
    if engine.stock_noise is not None:
        engine.stock_noise.copy_(torch.randn(shape, generator=gen))
    x_t = engine.x_t.clone()
    stock = None if engine.stock_noise is None else engine.stock_noise.clone()
    eps = torch.randn(engine.unet_rows, 4, *LATENT, generator=gen).half()
    coefficients = engine.coefficients
    per_step = torch.stack(
        [coefficients.alpha_sqrt, coefficients.beta_sqrt, coefficients.c_skip, coefficients.c_out]
    )
    result = fused_step(
        x_t, eps, stock, noise, per_step.repeat_interleave(2, dim=1).half(), engine.guidance_scale, engine.delta,
        rcfg=mode, frame_buffer_size=2,
    )  # fmt: skip
    expected = engine.finish(eps)
    assert result.dtype == torch.float16
    torch.testing.assert_close(result, expected, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(x_t, engine.x_t, rtol=1e-2, atol=2e-2)
    if stock is not None:
        torch.testing.assert_close(stock, engine.stock_noise, rtol=2e-2, atol=5e-2)


def test_first_block_of_latents_is_left_alone() -> None:
    state = fused_inputs("self", 2, 3, with_noise=True)
    x_t, stock = state["x_t"], state["stock"]
    assert x_t is not None and stock is not None
    before_x, before_stock = x_t[:2].clone(), stock[:2].clone()
    after_x_before = x_t[2:].clone()
    fused_step(**state, rcfg="self", frame_buffer_size=2)
    assert torch.equal(x_t[:2], before_x) and torch.equal(stock[:2], before_stock)
    assert not torch.equal(x_t[2:], after_x_before)  # the shifted rows were written


def _call(mode: str, **changes: object) -> None:
    state: dict[str, object] = dict(fused_inputs(mode, 2, 2, with_noise=True))  # rows [4, 4, 6, 5]
    state.update(changes)
    fused_step(**state, rcfg=mode, frame_buffer_size=2)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        _call("half")
    with pytest.raises(ValueError, match="eps is"):
        _call("full", eps=torch.zeros(4, 4, 6, 5))  # full needs the 4 negative rows too
    with pytest.raises(ValueError, match="needs the stock"):
        _call("self", stock=None)
    with pytest.raises(ValueError, match="takes no stock"):
        _call("none", stock=torch.zeros(4, 4, 6, 5))
    with pytest.raises(ValueError, match="dtype"):
        _call("none", eps=torch.zeros(4, 4, 6, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="coefficients"):
        _call("none", coefficients=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="whole number of blocks"):
        fused_step(**fused_inputs("none", 1, 3, with_noise=True), rcfg="none", frame_buffer_size=2)
