"""Stream Batch gives the same frames as sequential denoising, and RCFG follows the paper.

Every test runs the real tiny UNet (float32, CPU). Batched and sequential paths call the UNet
with different batch sizes, so results agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from livediff.engine.config import RCFGMode
from livediff.engine.lcm_schedule import LCMSchedule, StepCoefficients
from livediff.engine.stream_batch import StreamBatch
from livediff.models.bundle import ModelBundle
from livediff.models.prompts import PromptEncoder
from livediff.models.unet_batch import Conditioning

TOLERANCE = {"atol": 2e-4, "rtol": 2e-4}
GUIDANCE, DELTA = 1.7, 0.8
T_INDEX = {1: (25,), 2: (20, 35), 3: (10, 25, 40), 4: (10, 22, 34, 45)}


def _coefficients(bundle: ModelBundle, steps: int) -> StepCoefficients:
    return LCMSchedule(bundle.scheduler_config, 50).coefficients(T_INDEX[steps])


def _conditioning(bundle: ModelBundle) -> tuple[Conditioning, Conditioning]:
    encoder = PromptEncoder(bundle, 128, 128)
    return encoder.encode((("a red fox in snow", 1.0),)), encoder.encode_negative("blurry")


def _stream_batch(
    bundle: ModelBundle,
    steps: int,
    frames: int,
    rcfg: RCFGMode,
    batched: bool,
    add_noise: bool = True,
) -> StreamBatch:
    batch = StreamBatch(
        _coefficients(bundle, steps),
        frame_buffer_size=frames,
        latent_size=(16, 16),
        embed_shape=bundle.embed_shape,
        pooled_dim=None,
        rcfg=rcfg,
        use_denoising_batch=batched,
        do_add_noise=add_noise,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    cond, uncond = _conditioning(bundle)
    batch.set_embeddings(cond, uncond)
    batch.set_noise(
        torch.randn(steps * frames, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    )
    batch.set_guidance(GUIDANCE, DELTA)
    return batch


def _inputs(count: int, frames: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(frames, 4, 16, 16, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("rcfg", list(RCFGMode))
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_stream_batch_equals_sequential_after_delay(
    tiny_bundle: ModelBundle, steps: int, frames: int, rcfg: RCFGMode
) -> None:
    inputs = _inputs(5, frames)
    batched = _stream_batch(tiny_bundle, steps, frames, rcfg, batched=True)
    sequential = _stream_batch(tiny_bundle, steps, frames, rcfg, batched=False)
    fillers = [torch.zeros_like(inputs[0])] * (steps - 1)
    batched_out = [batched.step(x0, tiny_bundle.predict_noise) for x0 in inputs + fillers]
    sequential_out = [sequential.step(x0, tiny_bundle.predict_noise) for x0 in inputs]
    # The answer to input i comes out of call i + steps - 1.
    for i, expected in enumerate(sequential_out):
        torch.testing.assert_close(batched_out[i + steps - 1], expected, **TOLERANCE)
    # …and the first steps - 1 calls answered nothing real (they differ from every real answer).
    for early in batched_out[: steps - 1]:
        assert not torch.allclose(early, sequential_out[0], atol=1e-3)


@pytest.mark.parametrize("steps", [2, 4])
def test_stream_batch_without_add_noise(tiny_bundle: ModelBundle, steps: int) -> None:
    inputs = _inputs(4, 1)
    batched = _stream_batch(tiny_bundle, steps, 1, RCFGMode.SELF, batched=True, add_noise=False)
    sequential = _stream_batch(tiny_bundle, steps, 1, RCFGMode.SELF, batched=False, add_noise=False)
    noisy = _stream_batch(tiny_bundle, steps, 1, RCFGMode.SELF, batched=False, add_noise=True)
    fillers = [torch.zeros_like(inputs[0])] * (steps - 1)
    batched_out = [batched.step(x0, tiny_bundle.predict_noise) for x0 in inputs + fillers]
    for i, x0 in enumerate(inputs):
        expected = sequential.step(x0, tiny_bundle.predict_noise)
        torch.testing.assert_close(batched_out[i + steps - 1], expected, **TOLERANCE)
        assert not torch.allclose(expected, noisy.step(x0, tiny_bundle.predict_noise), atol=1e-3)


def _unet(bundle: ModelBundle, x: torch.Tensor, t: int, embeds: torch.Tensor) -> torch.Tensor:
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long)
    with torch.inference_mode():
        return bundle.unet(
            x, timesteps, encoder_hidden_states=embeds.expand(x.shape[0], -1, -1)
        ).sample


def paper_reference(
    bundle: ModelBundle, x0: torch.Tensor, noise: torch.Tensor, c: StepCoefficients, mode: RCFGMode
) -> torch.Tensor:
    """StreamDiffusion §3.3 transcribed step by step for one frame (eq. numbers of arXiv 2312.12491)."""
    cond, uncond = _conditioning(bundle)
    a = [float(v) for v in c.alpha_sqrt]
    b = [float(v) for v in c.beta_sqrt]
    x_t = a[0] * x0 + b[0] * noise[0:1]  # forward diffusion of the input latent to tau_0
    x0_negative = None
    for i, t in enumerate(c.timesteps.tolist()):
        eps_c = _unet(bundle, x_t, t, cond.embeds)
        if mode is RCFGMode.NONE:
            eps = eps_c
        elif (
            mode is RCFGMode.FULL
        ):  # eq. 5: classic CFG with a negative-prompt prediction every step
            eps_u = _unet(bundle, x_t, t, uncond.embeds)
            eps = eps_u + GUIDANCE * (eps_c - eps_u)
        else:
            if mode is RCFGMode.SELF:
                reference = x0  # Self-Negative: the residual points to the input latent
            else:
                if (
                    x0_negative is None
                ):  # Onetime-Negative: one negative prediction at tau_0 (eq. 9)
                    eps_u0 = _unet(bundle, x_t, t, uncond.embeds)
                    x0_negative = (x_t - b[0] * eps_u0) / a[0]
                reference = x0_negative
            eps_residual = (x_t - a[i] * reference) / b[i]  # eq. 7 / 10
            eps = DELTA * eps_residual + GUIDANCE * (eps_c - DELTA * eps_residual)  # eq. 8
        x0_hat = (
            float(c.c_out[i]) * (x_t - b[i] * eps) / a[i] + float(c.c_skip[i]) * x_t
        )  # LCM step
        if i + 1 < c.steps:
            x_t = a[i + 1] * x0_hat + b[i + 1] * noise[i + 1 : i + 2]
    return x0_hat


@pytest.mark.parametrize("rcfg", list(RCFGMode))
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_rcfg_matches_paper_transcription(
    tiny_bundle: ModelBundle, steps: int, rcfg: RCFGMode
) -> None:
    inputs = _inputs(3, 1)
    batched = _stream_batch(tiny_bundle, steps, 1, rcfg, batched=True)
    fillers = [torch.zeros_like(inputs[0])] * (steps - 1)
    outputs = [batched.step(x0, tiny_bundle.predict_noise) for x0 in inputs + fillers][steps - 1 :]
    for x0, output in zip(inputs, outputs, strict=True):
        expected = paper_reference(tiny_bundle, x0, batched.noise, batched.coefficients, rcfg)
        torch.testing.assert_close(output, expected, **TOLERANCE)


def test_guidance_changes_the_result(tiny_bundle: ModelBundle) -> None:
    """A check that the modes are not accidentally identical (guidance 1.7 must matter)."""
    x0 = _inputs(1, 1)[0]
    results = {}
    for rcfg in RCFGMode:
        batch = _stream_batch(tiny_bundle, 1, 1, rcfg, batched=True)
        results[rcfg] = batch.step(x0, tiny_bundle.predict_noise)
    values = list(results.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not torch.allclose(values[i], values[j], atol=1e-4)


def test_unet_rows_per_mode(tiny_bundle: ModelBundle) -> None:
    """Rows per UNet call: n*F for none/self, 2*n*F for full, n*F + F for initialize."""
    rows = {
        rcfg: _stream_batch(tiny_bundle, 3, 2, rcfg, batched=True).unet_rows for rcfg in RCFGMode
    }
    assert rows == {RCFGMode.NONE: 6, RCFGMode.SELF: 6, RCFGMode.FULL: 12, RCFGMode.INITIALIZE: 8}
