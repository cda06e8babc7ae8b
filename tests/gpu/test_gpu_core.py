"""The engine on CUDA in fp16: same algorithm as on CPU, the captured fast path, no recompiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from livediff.engine.backend_fit import make_stream
from livediff.engine.captured_stream import CapturedStream
from livediff.engine.config import GenerationMode, RCFGMode, StreamConfig
from livediff.engine.stream import Stream
from livediff.models.backends import Backend, prepare_backend
from livediff.models.bundle import ModelBundle
from livediff.models.graphed import GraphedBundle
from livediff.models.loading import ModelSpec, load_model
from livediff.models.unet_batch import UNetBatch

pytestmark = pytest.mark.gpu


def _frames(count: int, size: tuple[int, int] = (96, 128)) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    return [
        torch.from_numpy(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).cuda()
        for _ in range(count)
    ]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


@pytest.mark.parametrize("rcfg", list(RCFGMode))
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_batched_equals_sequential_fp16(
    cuda_tiny_bundle: ModelBundle, steps: int, rcfg: RCFGMode
) -> None:
    frames = _frames(5)
    outputs = {}
    for batched in (True, False):
        stream = Stream(
            cuda_tiny_bundle,
            StreamConfig(rcfg=rcfg, use_denoising_batch=batched),
            prompt="a boat",
            steps=steps,
            guidance_scale=1.6,
        )
        outputs[batched] = [o for f in frames for o in stream.process(f)] + stream.flush()
    assert [o.index for o in outputs[True]] == [o.index for o in outputs[False]] == list(range(5))
    for a, b in zip(outputs[True], outputs[False], strict=True):
        assert a.image.is_cuda and a.image.dtype == torch.uint8
        assert _max_diff(a.image, b.image) <= 3  # fp16 rounding differs between batch sizes


def test_cpu_and_cuda_agree(tiny_bundle: ModelBundle, cuda_tiny_bundle: ModelBundle) -> None:
    frame = _frames(1)[0]
    cpu = Stream(tiny_bundle, StreamConfig(), prompt="a boat", seed=3).process(frame.cpu())[0].image
    gpu = Stream(cuda_tiny_bundle, StreamConfig(), prompt="a boat", seed=3).process(frame)[0].image
    assert _max_diff(cpu, gpu.cpu()) <= 4  # fp32 CPU vs fp16 CUDA


@pytest.fixture(scope="module")
def compiled_tiny() -> ModelBundle:
    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
    return prepare_backend(bundle, Backend.COMPILE)


@pytest.mark.parametrize(
    ("steps", "rcfg"), [(1, RCFGMode.NONE), (2, RCFGMode.SELF), (2, RCFGMode.FULL)]
)
def test_captured_stream_matches_eager(
    cuda_tiny_bundle: ModelBundle, compiled_tiny: ModelBundle, steps: int, rcfg: RCFGMode
) -> None:
    frames = _frames(6)
    config = StreamConfig(rcfg=rcfg)
    eager = Stream(cuda_tiny_bundle, config, prompt="a boat", steps=steps, guidance_scale=1.4)
    captured = make_stream(
        compiled_tiny, Backend.COMPILE, config, prompt="a boat", steps=steps, guidance_scale=1.4
    )
    assert isinstance(captured, CapturedStream)
    expected = [o for f in frames for o in eager.process(f)]
    got = [o for f in frames for o in captured.process(f)]
    assert [o.index for o in got] == [o.index for o in expected]
    for a, b in zip(got, expected, strict=True):
        assert _max_diff(a.image, b.image) <= 3  # compiled kernels reassociate fp16 sums
    # A live update goes through the same graph (no recapture) and lands on the next frame.
    graphs = dict(captured._graphs)
    captured.update(prompt="a lighthouse", seed=9)
    eager.update(prompt="a lighthouse", seed=9)
    after = [o for f in frames for o in captured.process(f)]
    reference = [o for f in frames for o in eager.process(f)]
    assert captured._graphs == graphs
    assert all(_max_diff(a.image, b.image) <= 3 for a, b in zip(after, reference, strict=True))
    assert any(_max_diff(a.image, b.image) > 10 for a, b in zip(after, got, strict=True))


def test_captured_stream_takes_yuv_planes(
    cuda_tiny_bundle: ModelBundle, compiled_tiny: ModelBundle
) -> None:
    """I420 planes go into the captured step as they are (the conversion is in the graph)."""
    from livediff.engine.frames import YuvFrame
    from livediff.kernels.yuv import rgb_to_i420, split_i420

    def yuv(frame: torch.Tensor) -> YuvFrame:
        y, u, v = split_i420(rgb_to_i420(frame.cpu()[None]), *frame.shape[:2])
        return YuvFrame(y[0].clone(), u[0].clone(), v[0].clone())

    frames = [yuv(f) for f in _frames(4)]
    eager = Stream(cuda_tiny_bundle, StreamConfig(), prompt="a boat", steps=2)
    captured = make_stream(compiled_tiny, Backend.COMPILE, StreamConfig(), prompt="a boat", steps=2)
    expected = [o for f in frames for o in eager.process(f)]
    got = [o for f in frames for o in captured.process(f)]
    assert [o.index for o in got] == [o.index for o in expected] == [0, 1, 2]
    assert all(_max_diff(a.image, b.image) <= 3 for a, b in zip(got, expected, strict=True))
    assert any(key[2] for key in captured._graphs)  # an I420 graph was captured


def test_no_recompile_after_warm_up(compiled_tiny: ModelBundle) -> None:
    stream = make_stream(compiled_tiny, Backend.COMPILE, StreamConfig(), prompt="a boat", steps=2)
    frames = _frames(8)
    for frame in frames[:3]:
        stream.process(frame)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for frame in frames:
            stream.process(frame)
        stream.update(prompt="a castle", strength=0.8, guidance_scale=2.0)
        for frame in frames:
            stream.process(frame)


def test_txt2img_captured(compiled_tiny: ModelBundle) -> None:
    stream = make_stream(
        compiled_tiny,
        Backend.COMPILE,
        StreamConfig(mode=GenerationMode.TXT2IMG),
        prompt="stars",
        steps=2,
    )
    outputs = [o for _ in range(5) for o in stream.process()]
    assert [o.index for o in outputs] == [0, 1, 2, 3]
    assert not torch.equal(outputs[0].image, outputs[1].image)


def test_graphed_bundle_buckets(cuda_tiny_bundle: ModelBundle) -> None:
    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
    graphed = GraphedBundle.wrap(prepare_backend(bundle, Backend.COMPILE))
    graphed.setup_graphs(unet_buckets=(1, 2, 4), frame_buckets=(1, 2), latent_size=(16, 16))
    graphed.warm_up()
    for rows in (1, 3, 4):
        batch = UNetBatch(
            torch.randn(rows, 4, 16, 16, device="cuda", dtype=torch.float16),
            torch.randint(0, 999, (rows,), device="cuda"),
            torch.randn(rows, 77, 32, device="cuda", dtype=torch.float16),
        )
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = graphed.predict_noise(batch).clone()
        torch.testing.assert_close(got, cuda_tiny_bundle.predict_noise(batch), atol=2e-2, rtol=2e-2)


def test_sd_turbo_architecture_runs(tmp_path: object) -> None:
    bundle = load_model(ModelSpec(preset="sd-turbo", weights="random"), device="cuda", dtype="fp16")
    stream = Stream(bundle, StreamConfig(), prompt="a cat")
    frame = torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8, device="cuda")
    out = stream.process(frame)[0].image
    assert out.shape == (512, 512, 3) and out.dtype == torch.uint8


def test_graphed_bundle_runs_controlnets_per_row(cuda_tiny_bundle: ModelBundle) -> None:
    """The captured UNet call carries the control images and scales as static inputs too."""
    from livediff.models.control_uses import ControlNetSpec
    from livediff.models.controlnet_loading import load_controlnet

    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
    nets = [
        load_controlnet(ControlNetSpec("random", name=n, seed=k), bundle)
        for k, n in ((1, "a"), (2, "b"))
    ]
    eager = bundle.with_controlnets(nets)
    graphed = GraphedBundle.wrap(prepare_backend(eager, Backend.COMPILE))
    graphed.setup_graphs(unet_buckets=(2, 4), frame_buckets=(1, 2), latent_size=(16, 16))
    graphed.warm_up()
    for rows in (2, 3):
        half = {"device": "cuda", "dtype": torch.float16}
        batch = UNetBatch(
            torch.randn(rows, 4, 16, 16, **half),
            torch.randint(0, 999, (rows,), device="cuda"),
            torch.randn(rows, 77, 32, **half),
            control_images=torch.rand(rows, 2, 3, 128, 128, **half),
            control_scales=torch.tensor([[1.0, 0.0], [0.5, 1.5], [0.0, 0.0]][:rows], **half),
        )
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = graphed.predict_noise(batch).clone()
        torch.testing.assert_close(got, eager.predict_noise(batch), atol=2e-2, rtol=2e-2)


def test_graphed_bundle_runs_the_feature_bank_per_row() -> None:
    """Captured per-bucket UNet calls keep each row's bank: a graphed Stream with a bank gives
    the eager one's frames (fusion off: fp16 ties would pick other neighbours), without a
    recompile as the bank fills and frames are kept."""
    import copy
    from dataclasses import replace

    from livediff.engine.config import GenerationParams

    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")

    def banked() -> ModelBundle:
        # a VAE of its own too: the compile recipe compiles the VAE in place, and an eager
        # model sharing it ran compiled VAE calls that could recompile (an inference-mode
        # guard) under error_on_recompile, depending on which test ran first
        fresh = replace(bundle, unet=copy.deepcopy(bundle.unet), vae=copy.deepcopy(bundle.vae))
        return fresh.with_feature_bank(frames=2, rows=8)

    eager = banked()
    graphed = GraphedBundle.wrap(prepare_backend(banked(), Backend.COMPILE))
    graphed.setup_graphs(unet_buckets=(2, 4), frame_buckets=(1, 2), latent_size=(16, 16))
    graphed.warm_up()
    config = StreamConfig(width=128, height=128)
    params = GenerationParams(
        prompt="a fox", steps=2, feature_bank=2, bank_interval=1, feature_fusion=0.0
    )
    streams = [Stream(m, config, params) for m in (eager, graphed)]
    frames = _frames(5, (128, 128))
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [[o.image for f in frames for o in s.process(f)] for s in streams]
    assert len(outs[0]) == len(outs[1]) == 4
    for a, b in zip(*outs, strict=True):
        assert _max_diff(a, b) <= 8
    # calls where no row banks (a session with bank 0) replay graphs captured at start too
    unet_graphs = graphed._graphs["unet"]._graphs  # type: ignore[attr-defined]
    # buckets 2 and 4: without the bank, with it, and with it unmasked (the stream's bank of 2
    # fills the pool's 2 frames after two frames: the later calls leave the mask out)
    assert len(unet_graphs) == 6
    without = [Stream(m, config, params.updated(feature_bank=0)) for m in (eager, graphed)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [[o.image for f in frames for o in s.process(f)] for s in without]
    assert len(unet_graphs) == 6
    for a, b in zip(*outs, strict=True):
        assert _max_diff(a, b) <= 8


# 4096: the tiny UNet's layers (256 and 64 tokens) keep whole bank frames; 64: every layer
# keeps 2×2-pooled frames (merged frames are left out: fp16 ties in the matching would let the
# compiled and eager banks pick other tokens, as fusion's would)
@pytest.mark.parametrize("reduce_from", [4096, 64])
def test_captured_stream_keeps_its_feature_bank(reduce_from: int) -> None:
    """A compiled banked stream replays its whole step as one graph per bank state (filling,
    full) and gives the eager banked stream's frames as its bank fills, keeps frames and
    starts over on a new prompt; a session with bank 0 on the same model replays a graph
    without the bank (fusion off: fp16 ties would pick other neighbours)."""
    import copy
    from dataclasses import replace

    from livediff.engine.config import GenerationParams

    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")

    def banked() -> ModelBundle:
        # a VAE of its own too: the compile recipe compiles the VAE in place, and an eager
        # model sharing it ran compiled VAE calls that could recompile (an inference-mode
        # guard) under error_on_recompile, depending on which test ran first
        fresh = replace(bundle, unet=copy.deepcopy(bundle.unet), vae=copy.deepcopy(bundle.vae))
        return fresh.with_feature_bank(frames=2, rows=4, reduce_from=reduce_from)

    eager_model, compiled = banked(), prepare_backend(banked(), Backend.COMPILE)
    config = StreamConfig(width=128, height=128)
    params = GenerationParams(
        prompt="a fox", steps=2, feature_bank=2, bank_interval=1, feature_fusion=0.0
    )
    eager = Stream(eager_model, config, params)
    captured = make_stream(compiled, Backend.COMPILE, config, params)
    assert isinstance(captured, CapturedStream)
    base = _frames(1, (128, 128))[0].int()
    noise = _frames(6, (128, 128))  # a slowly changing scene: no scene cut starts the bank over
    frames = [(base + (n.int() - 128) // 16).clamp(0, 255).to(torch.uint8) for n in noise]

    def run(stream: Stream) -> list[torch.Tensor]:
        return [o.image.clone() for f in frames for o in stream.process(f)]

    for _round in range(2):  # the second round after a new prompt: both banks start over
        expected, got = run(eager), run(captured)
        assert len(got) == len(expected) >= 5
        for a, b in zip(got, expected, strict=True):
            assert _max_diff(a, b) <= 8
        keys = {key[-1] for key in captured._graphs}
        assert keys == {(True, False), (True, True)}  # filling (masked), full (unmasked)
        for stream in (eager, captured):
            stream.update(prompt="a lighthouse")
    plain = [Stream(eager_model, config, params.updated(feature_bank=0))]
    plain.append(make_stream(compiled, Backend.COMPILE, config, params.updated(feature_bank=0)))
    expected, got = run(plain[0]), run(plain[1])
    assert all(_max_diff(a, b) <= 8 for a, b in zip(got, expected, strict=True))
    assert {key[-1] for key in plain[1]._graphs} == {(False, False)}  # type: ignore[attr-defined]
    # the captured graphs kept the session's features: its slots' pool entries hold them
    from livediff.models.feature_bank import bank_processors

    pools = [pool for proc in bank_processors(compiled.unet) for pool in proc.pools()]
    assert pools and all(float(pool[2:].abs().amax()) > 0 for pool in pools)  # past slot 0
    assert {pool.shape[1] for pool in pools} == ({256, 64} if reduce_from > 256 else {64, 16})


def test_graphed_bundle_merges_a_lone_sessions_loras(tmp_path: Path) -> None:
    """A per-session LoRA library on captured per-bucket calls: a lone styled stream gives the
    eager one's frames while its LoRA goes from the per-row kernels to the merged weights,
    replaying graphs captured at start (with and without LoRA inputs), with no recompile."""
    import copy
    from dataclasses import replace

    from helpers.lora_testing import random_lora, save_peft
    from livediff.engine.config import GenerationParams
    from livediff.models.lora_library import LoraLibrary
    from livediff.models.lora_merge import MERGE_AFTER_CALLS
    from livediff.models.lora_store import LoraCapacity

    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
    ink = save_peft(random_lora(bundle.unet, 8, 5, strength=3.0), tmp_path / "ink.safetensors")

    def styled() -> ModelBundle:
        # A UNet and a VAE of its own: the recipe compiles the VAE in place, and the eager
        # stream's calls through a shared one recompiled it (dispatch keys; error_on_recompile).
        fresh = replace(bundle, unet=copy.deepcopy(bundle.unet), vae=copy.deepcopy(bundle.vae))
        library = LoraLibrary.attach(fresh.unet, LoraCapacity(max_loras=2, max_rank=16))
        library.load("ink", str(ink))
        return fresh.with_loras(library)

    eager = styled()
    graphed = GraphedBundle.wrap(prepare_backend(styled(), Backend.COMPILE))
    graphed.setup_graphs(unet_buckets=(1, 2), frame_buckets=(1,), latent_size=(16, 16))
    graphed.warm_up()
    unet_graphs = graphed._graphs["unet"]._graphs  # type: ignore[attr-defined]
    assert len(unet_graphs) == 4  # buckets 1 and 2, with and without the LoRA inputs
    config = StreamConfig(width=128, height=128)
    params = GenerationParams(prompt="a fox", steps=1, loras=["ink:0.9"])
    streams = [Stream(m, config, params) for m in (eager, graphed)]
    frames = _frames(MERGE_AFTER_CALLS + 3, (128, 128))
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [[o.image for f in frames for o in s.process(f)] for s in streams]
    assert len(unet_graphs) == 4
    assert graphed.loras is not None and graphed.loras.merge.merges == 1
    for a, b in zip(*outs, strict=True):
        assert _max_diff(a, b) <= 8
    plain = Stream(bundle, config, params.updated(loras=[]))
    unstyled = [o.image for f in frames for o in plain.process(f)]
    assert _max_diff(outs[1][-1], unstyled[-1]) > 8  # the LoRA shows: the check can fail
