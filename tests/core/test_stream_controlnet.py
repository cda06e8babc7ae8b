"""A Stream with ControlNets: each frame denoised under its own control image, as diffusers does.

The reference is written out plainly, frame by frame, with no livediff code on the model path:
StreamDiffusion's equations (as in ``test_stream_batch.py``) around diffusers' own calls of
each ``ControlNetModel`` (``conditioning_scale`` per net, the residuals of several nets summed
in order, the same control image for the negative rows, as ``MultiControlNetModel`` and the
ControlNet img2img pipelines do), and the control images from OpenCV's Canny and the frame
itself. The Stream must give the same frames, with Stream Batch (a frame's control image
travels with its latent from step to step) and sequentially, alone and live-updated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pytest
import torch

from livediff.engine.config import GenerationMode, GenerationParams, RCFGMode, StreamConfig
from livediff.engine.stream import Stream
from livediff.exceptions import ParameterError
from livediff.kernels.preprocess import rgb_to_model_input
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import CannyParams, ControlNetSpec, ControlUse
from livediff.models.controlnet import LoadedControlNet
from livediff.models.controlnet_loading import load_controlnet

cv2 = pytest.importorskip("cv2")
from helpers.canny_reference import opencv_canny, scene  # noqa: E402  (after the cv2 skip)

SIZE = 128
CONFIG = StreamConfig(width=SIZE, height=SIZE)
BASE = GenerationParams(prompt="a red fox in snow", negative_prompt="blurry", strength=0.6)
CANNY = CannyParams(low=60, high=140, sigma=1.0)
# Latents: batched and per-frame calls sum in another order (float32, CPU); as test_stream_batch.
TOLERANCE = {"atol": 2e-4, "rtol": 2e-4}
# Random weights leave a ControlNet nearly blind to its image (a different image moves the
# latents ~1e-4, below the tolerance); a louder image embedding makes that ~0.05, so a wrong
# control image cannot pass.
IMAGE_GAIN = 300.0


@pytest.fixture(scope="module")
def nets(tiny_bundle: ModelBundle) -> tuple[LoadedControlNet, LoadedControlNet]:
    loaded = (
        load_controlnet(ControlNetSpec("random", name="edges", seed=1), tiny_bundle),
        load_controlnet(ControlNetSpec("random", name="tile", seed=2), tiny_bundle),
    )
    with torch.no_grad():
        for net in loaded:
            net.net.controlnet_cond_embedding.conv_out.weight.mul_(IMAGE_GAIN)
    return loaded


@dataclass
class Recording(ModelBundle):
    """The model, keeping every latent it decodes (the Stream's finished latents, in order)."""

    decoded: list[torch.Tensor] = field(default_factory=list)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.decoded.append(latents.detach().clone())
        return super().decode(latents)


def recording(bundle: ModelBundle) -> Recording:
    return Recording(**{f.name: getattr(bundle, f.name) for f in fields(ModelBundle)})


@pytest.fixture(scope="module")
def controlled(tiny_bundle: ModelBundle, nets: Sequence[LoadedControlNet]) -> ModelBundle:
    return tiny_bundle.with_controlnets(nets)


def frames(count: int) -> list[np.ndarray]:
    return [scene(seed, SIZE, SIZE) for seed in range(count)]


# ---------------------------------------------------------------- the reference, written out
@dataclass(frozen=True)
class Control:
    """One net's control image ``[1, 3, H, W]`` in [0, 1] and its scale, for one frame."""

    net: LoadedControlNet
    image: torch.Tensor
    scale: float


def canny_image(frame: np.ndarray, params: CannyParams = CANNY) -> torch.Tensor:
    edges = opencv_canny(frame, params.low, params.high, params.sigma)
    return torch.from_numpy(edges.astype(np.float32))[None, None].expand(1, 3, -1, -1)


def frame_image(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].to(torch.float32) / 255


def noise_prediction(
    bundle: ModelBundle, x: torch.Tensor, t: int, embeds: torch.Tensor, controls: Sequence[Control]
) -> torch.Tensor:
    """diffusers' ControlNet step: every net's residuals at its scale, summed, into the UNet."""
    rows = x.shape[0]
    timestep = torch.full((rows,), t, dtype=torch.long)
    down_total: list[torch.Tensor] | None = None
    mid_total: torch.Tensor | None = None
    for control in controls:
        down, mid = control.net.net(
            x,
            timestep,
            encoder_hidden_states=embeds,
            controlnet_cond=control.image.expand(rows, -1, -1, -1),
            conditioning_scale=control.scale,
            return_dict=False,
        )
        if down_total is None or mid_total is None:
            down_total, mid_total = list(down), mid
        else:
            down_total = [a + b for a, b in zip(down_total, down, strict=True)]
            mid_total = mid_total + mid
    return bundle.unet(
        x,
        timestep,
        encoder_hidden_states=embeds,
        down_block_additional_residuals=down_total,
        mid_block_additional_residual=mid_total,
    ).sample


def reference_frame(
    stream: Stream, frame: np.ndarray, controls: Sequence[Control], rcfg: RCFGMode
) -> torch.Tensor:
    """One frame through StreamDiffusion's steps (NONE: no guidance; FULL: classic CFG, eq. 5)."""
    bundle, batch = stream.bundle, stream.batch
    c = batch.coefficients
    a = [float(v) for v in c.alpha_sqrt]
    b = [float(v) for v in c.beta_sqrt]
    f = stream.config.frame_buffer_size
    noise = batch.noise
    cond = stream.prompts.encode(stream.params.prompt, stream.params.blend).embeds
    uncond = stream.prompts.encode_negative(BASE.negative_prompt).embeds
    with torch.inference_mode():
        pixels = rgb_to_model_input(
            torch.from_numpy(frame)[None], SIZE, SIZE, (0, 0, SIZE, SIZE), torch.float32
        )
        x0 = bundle.encode(pixels)
        x_t = a[0] * x0 + b[0] * noise[0:f]
        for i, t in enumerate(c.timesteps.tolist()):
            eps_c = noise_prediction(bundle, x_t, t, cond, controls)
            if rcfg is RCFGMode.FULL:
                eps_u = noise_prediction(bundle, x_t, t, uncond, controls)
                eps = eps_u + float(stream.params.guidance_scale) * (eps_c - eps_u)
            else:
                eps = eps_c
            x0_hat = float(c.c_out[i]) * (x_t - b[i] * eps) / a[i] + float(c.c_skip[i]) * x_t
            if i + 1 < c.steps:
                x_t = a[i + 1] * x0_hat + b[i + 1] * noise[(i + 1) * f : (i + 2) * f]
        return x0_hat


@dataclass
class Answers:
    """What a stream gave each input index: the finished latents it decoded, and the image."""

    latents: dict[int, torch.Tensor]
    images: dict[int, np.ndarray]


def run(
    stream: Stream,
    inputs: Sequence[np.ndarray],
    updates: dict[int, dict[str, Any]] | None = None,
) -> Answers:
    """Every input through ``stream`` (``updates[i]`` applied before input ``i``), then flush."""
    bundle = stream.bundle
    assert isinstance(bundle, Recording)
    start = len(bundle.decoded)
    first = stream.frames_in
    outputs = []
    for i, frame in enumerate(inputs):
        if updates and i in updates:
            stream.update(**updates[i])
        outputs += stream.process(frame)
    outputs += stream.flush()
    assert [out.index for out in outputs] == list(range(first, first + len(inputs)))
    decoded = bundle.decoded[start + stream.delay :]
    return Answers(
        {out.index: decoded[k] for k, out in enumerate(outputs)},
        {out.index: out.numpy() for out in outputs},
    )


def assert_latents_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def differs(actual: torch.Tensor, other: torch.Tensor) -> bool:
    return bool((actual - other).abs().max() > 50 * TOLERANCE["atol"])


USES = (
    ControlUse("edges", 1.5, "canny", CANNY),
    ControlUse("tile", 0.7, "passthrough"),
)


# ---------------------------------------------------------------- the oracle
@pytest.mark.parametrize("rcfg", [RCFGMode.NONE, RCFGMode.FULL])
@pytest.mark.parametrize("batched", [True, False], ids=["stream-batch", "sequential"])
def test_each_frame_is_denoised_under_its_own_control_images(
    controlled: ModelBundle, nets: Sequence[LoadedControlNet], batched: bool, rcfg: RCFGMode
) -> None:
    config = replace(CONFIG, rcfg=rcfg, use_denoising_batch=batched)
    params = BASE.updated(steps=2, guidance_scale=1.8, controlnets=USES)
    stream = Stream(recording(controlled), config, params)
    inputs = frames(4)
    answers = run(stream, inputs)
    for index, frame in enumerate(inputs):
        controls = [
            Control(nets[0], canny_image(frame), 1.5),
            Control(nets[1], frame_image(frame), 0.7),
        ]
        expected = reference_frame(stream, frame, controls, rcfg)
        assert_latents_equal(answers.latents[index], expected)
        # Another frame's control images give other latents: the check above can fail.
        other = inputs[(index + 1) % len(inputs)]
        swapped = [replace(controls[0], image=canny_image(other)), controls[1]]
        assert differs(expected, reference_frame(stream, frame, swapped, rcfg))


def test_a_frame_keeps_its_control_image_through_the_stream_batch_delay(
    controlled: ModelBundle, nets: Sequence[LoadedControlNet]
) -> None:
    """With 3 steps a frame's latent spends 3 calls in the buffer while newer frames arrive;
    its control image must be its own on every step, not the newest frame's."""
    params = BASE.updated(steps=3, controlnets=(ControlUse("tile", 1.2, "passthrough"),))
    stream = Stream(recording(controlled), CONFIG, params)
    inputs = frames(5)
    answers = run(stream, inputs)
    for index, frame in enumerate(inputs):
        own = [Control(nets[1], frame_image(frame), 1.2)]
        assert_latents_equal(
            answers.latents[index], reference_frame(stream, frame, own, RCFGMode.NONE)
        )


def test_scale_zero_and_no_use_give_the_model_without_controlnets(
    tiny_bundle: ModelBundle, controlled: ModelBundle
) -> None:
    inputs = frames(3)
    plain = run(Stream(recording(tiny_bundle), CONFIG, BASE.updated(steps=2)), inputs)
    off = BASE.updated(steps=2, controlnets=(ControlUse("edges", 0.0, "canny"),))
    for params in (off, BASE.updated(steps=2)):
        answers = run(Stream(recording(controlled), CONFIG, params), inputs)
        for index in plain.latents:
            torch.testing.assert_close(answers.latents[index], plain.latents[index], atol=0, rtol=0)
            np.testing.assert_array_equal(answers.images[index], plain.images[index])
    on = run(Stream(recording(controlled), CONFIG, off.updated(controlnets=("edges:0.5",))), inputs)
    assert differs(on.latents[0], plain.latents[0])


@pytest.mark.parametrize("batched", [True, False], ids=["stream-batch", "sequential"])
def test_previous_output_feeds_the_last_frame_out(
    controlled: ModelBundle, nets: Sequence[LoadedControlNet], batched: bool
) -> None:
    """TemporalNet's input: the output the session emitted last when the frame came in (the
    input frame itself before the first); with Stream Batch that is ``delay`` frames older."""
    config = replace(CONFIG, use_denoising_batch=batched)
    params = BASE.updated(steps=2, controlnets=(ControlUse("tile", 1.0, "previous_output"),))
    stream = Stream(recording(controlled), config, params)
    inputs = frames(4)
    answers = run(stream, inputs)
    for index, frame in enumerate(inputs):
        last = index - 1 - stream.delay
        previous = frame_image(answers.images[last] if last >= 0 else frame)
        expected = reference_frame(stream, frame, [Control(nets[1], previous, 1.0)], RCFGMode.NONE)
        assert_latents_equal(answers.latents[index], expected)


@pytest.mark.parametrize("batched", [True, False], ids=["stream-batch", "sequential"])
def test_live_updates_apply_from_the_next_frame_and_frames_in_flight_keep_theirs(
    controlled: ModelBundle, nets: Sequence[LoadedControlNet], batched: bool
) -> None:
    config = replace(CONFIG, use_denoising_batch=batched)
    stream = Stream(recording(controlled), config, BASE.updated(steps=2, controlnets=USES[:1]))
    inputs = frames(5)
    looser = CannyParams(low=20, high=60, sigma=0.0)
    updates = {
        2: {"controlnets": [{"controlnet": "edges", "scale": 0.9, "params": vars(looser)}]},
        3: {"controlnets": ["tile:0.4:passthrough"]},
        4: {"controlnets": []},
    }
    answers = run(stream, inputs, updates)
    controls = {
        0: [Control(nets[0], canny_image(inputs[0]), 1.5)],
        1: [Control(nets[0], canny_image(inputs[1]), 1.5)],  # in flight at the first update
        2: [Control(nets[0], canny_image(inputs[2], looser), 0.9)],
        3: [Control(nets[1], frame_image(inputs[3]), 0.4)],
        4: [],
    }
    for index, frame in enumerate(inputs):
        expected = reference_frame(stream, frame, controls[index], RCFGMode.NONE)
        assert_latents_equal(answers.latents[index], expected)


# ---------------------------------------------------------------- refusals
def refused(stream: Stream, match: str, **changes: Any) -> None:
    before = stream.params
    with pytest.raises(ParameterError, match=match):
        stream.update(**changes)
    assert stream.params == before  # nothing of a refused update applies


def test_bad_uses_are_refused_and_the_stream_goes_on(
    tiny_bundle: ModelBundle, controlled: ModelBundle, nets: Sequence[LoadedControlNet]
) -> None:
    stream = Stream(recording(controlled), CONFIG, BASE.updated(steps=1, controlnets=USES[:1]))
    refused(
        stream, "'nope' is not loaded on this server; loaded: edges, tile", controlnets=["nope"]
    )
    refused(stream, "depth preprocessor's network is not loaded", controlnets=["edges:1:depth"])
    refused(
        stream,
        r"scale=3 is out of range: expected a number in \[0, 2\]",
        controlnets=[{"controlnet": "edges", "scale": 3}],
    )
    refused(stream, "each ControlNet once", controlnets=["edges", "edges:0.5"])
    assert len(run(stream, frames(1)).latents) == 1  # still streaming, with the old uses
    with pytest.raises(ParameterError, match="has no ControlNet"):
        Stream(tiny_bundle, CONFIG, BASE.updated(controlnets=("edges",)))
    txt2img = replace(CONFIG, mode=GenerationMode.TXT2IMG)
    with pytest.raises(ParameterError, match="txt2img session has none: use previous_output"):
        Stream(controlled, txt2img, BASE.updated(controlnets=("edges:1:canny",)))
    assert Stream(controlled, txt2img, BASE.updated(controlnets=("tile:1:previous_output",)))


def test_a_known_net_refuses_a_preprocessor_it_was_not_trained_on(
    tiny_bundle: ModelBundle, nets: Sequence[LoadedControlNet]
) -> None:
    canny_net = replace(nets[0], name="canny", source="thibaud/controlnet-sd21-canny-diffusers")
    bundle = tiny_bundle.with_controlnets([canny_net])
    with pytest.raises(ParameterError, match="cannot use the passthrough preprocessor"):
        Stream(bundle, CONFIG, BASE.updated(controlnets=("canny:1:passthrough",)))
    stream = Stream(bundle, CONFIG, BASE.updated(controlnets=("canny",)))  # its own: canny
    assert stream.process(frames(1)[0])


def test_a_snapshot_restores_the_frames_in_flight(controlled: ModelBundle) -> None:
    """A graph captured mid-stream runs the step a few times (warm-up and capture); the
    Stream Batch's snapshot/restore around it must leave the frames in flight, latents and
    control images, exactly as they were (``CapturedStream`` relies on it)."""
    params = BASE.updated(steps=3, controlnets=USES)
    inputs = frames(6)
    plain, captured = (Stream(recording(controlled), CONFIG, params) for _ in range(2))
    for frame in inputs[:3]:
        plain.process(frame)
        captured.process(frame)
    saved = captured.batch.snapshot()
    batch = captured.batch
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for _ in range(3):  # what a capture's warm-up does to the buffers
            batch.push_control(torch.rand(1, 2, 3, SIZE, SIZE, generator=g))
            rows = batch.begin(torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g), None)
            batch.finish(torch.randn_like(rows.latents))
    after = batch.snapshot()
    assert any(not torch.equal(a, b) for a, b in zip(saved.buffers, after.buffers, strict=True))
    batch.restore(saved)
    assert batch.control_live == any(saved.live_blocks)
    want = [o for f in inputs[3:] for o in plain.process(f)] + plain.flush()
    got = [o for f in inputs[3:] for o in captured.process(f)] + captured.flush()
    assert [o.index for o in got] == [o.index for o in want] == [1, 2, 3, 4, 5]
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(got, want, strict=True))


def test_the_host_knows_which_blocks_in_flight_use_a_net(controlled: ModelBundle) -> None:
    """``control_live`` (what the scheduler reads with ``controlnet_rows = "apart"``: does the
    next call use a net?): a net switched on is live for the next frame; switched off, it
    stays live while a frame that entered with it is still in flight for the next call (the
    ``steps - 1`` blocks that stay), then not; no device read."""
    stream = Stream(controlled, CONFIG, BASE.updated(steps=3))
    batch = stream.batch
    inputs = frames(8)
    assert not batch.control_live
    stream.process(inputs[0])
    assert not batch.control_live
    stream.update(controlnets=USES)
    assert batch.control_live
    live = []
    for frame in inputs[1:3]:
        stream.process(frame)
        live.append(batch.control_live)
    stream.update(controlnets=())
    for frame in inputs[3:7]:
        stream.process(frame)
        live.append(batch.control_live)
    assert live == [True, True, True, False, False, False]
    stream.update(controlnets=USES)
    stream.process(inputs[7])
    stream.update(controlnets=())
    assert batch.control_live  # the frame that entered with the net is in flight
    batch.reset()
    assert not batch.control_live  # none is
