"""GPU parity of every Triton kernel against its PyTorch reference, both on CUDA.

Kernels are launched on poisoned outputs (NaN for floats; two runs over 0x00 and 0xFF for
bytes) so that an element a kernel fails to write cannot pass. The public ops are also
checked to really take the Triton path (the launcher is wrapped to count calls), to refuse it
for non-contiguous input, to compile as one graph without recompiles, and to capture and
replay inside a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from kernels_testing import RCFG_MODES, fused_inputs

from livediff.kernels import fused_step, postprocess, preprocess, similarity, yuv
from livediff.kernels.status import kernels_status, registered_ops

pytestmark = pytest.mark.gpu
CUDA = "cuda"


@pytest.fixture(scope="module")
def kernels() -> Iterator[Any]:
    import importlib

    triton_modules = (
        "_triton_preprocess",
        "_triton_postprocess",
        "_triton_similarity",
        "_triton_fused_step",
    )
    loaded = {
        name.removeprefix("_triton_"): importlib.import_module(f"livediff.kernels.{name}")
        for name in triton_modules
    }
    yield type("Kernels", (), loaded)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(seed)


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls: list[int] = []
    original: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_status_reports_triton_for_every_op() -> None:
    status = kernels_status(CUDA)
    assert status["triton_version"] is not None and not status["triton_interpreter"]
    assert {name: entry["impl"] for name, entry in status["ops"].items()} == dict.fromkeys(
        registered_ops(), "triton"
    )


# ---------------------------------------------------------------------------- preprocess
PRE_CASES = [
    ((1080, 1920), (0, 420, 1080, 1080), (512, 512)),  # 1080p centre crop, downscale
    ((480, 640), (0, 80, 480, 480), (512, 512)),  # upscale
    ((512, 512), (0, 0, 512, 512), (512, 512)),  # no resize
    ((37, 53), (3, 5, 30, 41), (64, 80)),  # odd everything
]


def _yuv_planes(
    n: int, height: int, width: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = _gen(seed)
    ch, cw = yuv.chroma_size(height, width)
    y = torch.randint(0, 256, (n, height, width), dtype=torch.uint8, device=CUDA, generator=gen)
    u = torch.randint(0, 256, (n, ch, cw), dtype=torch.uint8, device=CUDA, generator=gen)
    v = torch.randint(0, 256, (n, ch, cw), dtype=torch.uint8, device=CUDA, generator=gen)
    return y, u, v


@pytest.mark.parametrize(("size", "crop", "out_size"), PRE_CASES)
@pytest.mark.parametrize("fmt", ["rgb", "i420", "nv12"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_preprocess_parity(
    kernels: Any,
    monkeypatch: pytest.MonkeyPatch,
    size: tuple[int, int],
    crop: tuple[int, int, int, int],
    out_size: tuple[int, int],
    fmt: str,
    dtype: torch.dtype,
) -> None:
    height, width = size
    if fmt == "rgb":
        frames = torch.randint(
            0, 256, (2, height, width, 3), dtype=torch.uint8, device=CUDA, generator=_gen(0)
        )
        planes: tuple[torch.Tensor, ...] = (frames,)
        expected = preprocess.reference_rgb(frames, crop, *out_size, dtype)
        code = kernels.preprocess.RGB
    else:
        y, u, v = _yuv_planes(2, height, width, seed=1)
        expected = preprocess.reference_i420(y, u, v, crop, *out_size, dtype)
        if fmt == "i420":
            planes, code = (y, u, v), kernels.preprocess.I420
        else:
            planes, code = (y, torch.stack([u, v], dim=-1).contiguous()), kernels.preprocess.NV12

    def public() -> torch.Tensor:
        if fmt == "rgb":
            return preprocess.rgb_to_model_input(planes[0], *out_size, crop, dtype)
        if fmt == "i420":
            return preprocess.i420_to_model_input(*planes, *out_size, crop, dtype)
        return preprocess.nv12_to_model_input(*planes, *out_size, crop, dtype)

    out = torch.full((2, 3, *out_size), float("nan"), dtype=dtype, device=CUDA)
    kernels.preprocess.preprocess(code, planes, crop, out)
    # fp32: float32 source coordinates and FMA contraction differ from the ATen kernel by ~1e-6 px,
    # i.e. < 1e-5 after scaling. Half types: that, plus one rounding that may land on the other
    # side (1 ulp: 2**-11 for fp16, 2**-8 for bf16, at |x| <= 1).
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    calls = _counting(monkeypatch, kernels.preprocess, "preprocess")
    assert torch.equal(public(), out) and calls == [1]


def test_preprocess_non_contiguous_runs_the_reference(
    kernels: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = torch.randint(
        0, 256, (1, 64, 64, 3), dtype=torch.uint8, device=CUDA, generator=_gen(2)
    )[:, ::2]
    calls = _counting(monkeypatch, kernels.preprocess, "preprocess")
    result = preprocess.rgb_to_model_input(frames, 16, 16, (0, 0, 32, 64), torch.float16)
    assert calls == []
    torch.testing.assert_close(
        result, preprocess.reference_rgb(frames.contiguous(), (0, 0, 32, 64), 16, 16, torch.float16)
    )


# ---------------------------------------------------------------------------- postprocess
@pytest.mark.parametrize("shape", [(1, 3, 512, 512), (4, 3, 64, 64), (2, 3, 33, 47), (1, 3, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_postprocess_is_bit_exact(
    kernels: Any,
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: torch.memory_format,
) -> None:
    images = (torch.rand(shape, device=CUDA, generator=_gen(3)) * 2.4 - 1.2).to(dtype)
    # Near-ties: (x + 1) * 127.5 within float rounding of k + 0.5, where some products round to
    # exactly k + 0.5 and must go to even like torch.round.
    ties = ((torch.arange(images[0, 0].numel(), device=CUDA) % 256).float() + 0.5) / 127.5 - 1.0
    images[0, 0] = ties.view_as(images[0, 0]).to(dtype)
    images = images.contiguous(memory_format=layout)  # TAESD under the recipe: channels-last
    n, _, height, width = shape
    expected_rgb = postprocess.reference_rgb(images)
    expected_i420 = postprocess.reference_i420(images)
    for poison in (0, 255):
        rgb = torch.full((n, height, width, 3), poison, dtype=torch.uint8, device=CUDA)
        kernels.postprocess.to_rgb(images, rgb)
        assert torch.equal(rgb, expected_rgb)
        packed = torch.full(
            (n, yuv.i420_packed_length(height, width)), poison, dtype=torch.uint8, device=CUDA
        )
        kernels.postprocess.to_i420(images, packed)
        assert torch.equal(packed, expected_i420)
    rgb_calls = _counting(monkeypatch, kernels.postprocess, "to_rgb")
    i420_calls = _counting(monkeypatch, kernels.postprocess, "to_i420")
    assert torch.equal(postprocess.model_output_to_rgb(images), expected_rgb)
    assert torch.equal(postprocess.model_output_to_i420(images), expected_i420)
    assert rgb_calls == [1] and i420_calls == [1]


# ---------------------------------------------------------------------------- similarity
@pytest.mark.parametrize(
    ("shape", "dtype_a", "dtype_b"),
    [
        ((512, 512, 3), torch.uint8, torch.uint8),
        ((1080, 1920, 3), torch.uint8, torch.uint8),
        ((1, 3, 512, 512), torch.float16, torch.float16),
        ((1, 3, 512, 512), torch.float32, torch.float32),
        ((64, 64, 3), torch.uint8, torch.float32),
        ((7,), torch.float32, torch.float32),
    ],
)
def test_similarity_parity(
    kernels: Any,
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    dtype_a: torch.dtype,
    dtype_b: torch.dtype,
) -> None:
    gen = _gen(4)
    base = torch.rand(shape, device=CUDA, generator=gen)
    other = (base + 0.1 * torch.rand(shape, device=CUDA, generator=gen)).clamp(0, 1)

    def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else (x * 2 - 1).to(dtype)

    a, b = cast(base, dtype_a), cast(other, dtype_b)
    expected = similarity.reference(a, b)
    calls = _counting(monkeypatch, kernels.similarity, "cosine")
    result = similarity.frame_similarity(a, b)
    assert calls == [1] and result.shape == () and result.dtype == torch.float32 and result.is_cuda
    # Both sum in float32, in different orders: relative error ~1e-6 for up to 6M terms.
    assert abs(float(result) - float(expected)) < 1e-5


# ---------------------------------------------------------------------------- fused step
@pytest.mark.parametrize("mode", RCFG_MODES)
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("with_noise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_step_parity(
    kernels: Any,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    frames: int,
    steps: int,
    with_noise: bool,
    dtype: torch.dtype,
) -> None:
    state = fused_inputs(
        mode,
        frames,
        steps,
        with_noise=with_noise,
        latent=(64, 64),
        dtype=dtype,
        device=CUDA,
        seed=steps,
    )
    kernel_state = {k: v.clone() if v is not None else None for k, v in state.items()}
    expected = torch.empty(frames, 4, 64, 64, dtype=dtype, device=CUDA)
    s = state
    fused_step.reference(
        s["x_t"],
        s["eps"],
        s["stock"],
        s["noise"],
        s["coefficients"],
        s["guidance_scale"],
        s["delta"],
        expected,
        mode,
        frames,
    )
    out = torch.full_like(expected, float("nan"))
    calls = _counting(monkeypatch, kernels.fused_step, "step")
    result = fused_step.fused_step(**kernel_state, rcfg=mode, frame_buffer_size=frames, out=out)
    assert calls == [1] and result is out
    # Both compute in float32 with IEEE division; FMA contraction leaves ~1 ulp. fp32: the stock
    # divides by sqrt(1 - alpha_bar) >= 0.22 → 1e-4. Half: one rounding each, a 1-ulp flip of
    # x_t feeds the stock through 1/b → 2 fp16 ulp.
    tight, loose = (1e-5, 1e-4) if dtype == torch.float32 else (2e-3, 1e-2)
    torch.testing.assert_close(out, expected, rtol=tight, atol=tight)
    torch.testing.assert_close(kernel_state["x_t"], state["x_t"], rtol=tight, atol=tight)
    if state["stock"] is not None:
        torch.testing.assert_close(kernel_state["stock"], state["stock"], rtol=loose, atol=loose)


# ---------------------------------------------------------------------------- compile / graphs
def _pipeline(
    frames: torch.Tensor, previous: torch.Tensor, state: dict[str, Any], eps: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    pixels = preprocess.rgb_to_model_input(frames, 512, 512, (0, 420, 1080, 1080), torch.float16)
    score = similarity.frame_similarity(pixels, previous)
    latents = fused_step.fused_step(
        state["x_t"], eps, state["stock"], state["noise"], state["coefficients"], state["guidance_scale"], state["delta"],
        rcfg="self", frame_buffer_size=1,
    )  # fmt: skip
    image = (
        latents[:, :3].repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).clamp(-1, 1)
    )  # exact ops only
    return (
        score,
        latents,
        postprocess.model_output_to_rgb(image),
        postprocess.model_output_to_i420(pixels),
    )


def _pipeline_inputs(seed: int) -> tuple[Any, ...]:
    frames = torch.randint(
        0, 256, (1, 1080, 1920, 3), dtype=torch.uint8, device=CUDA, generator=_gen(seed)
    )
    previous = torch.rand(1, 3, 512, 512, device=CUDA, generator=_gen(seed + 1)).half()
    state = fused_inputs(
        "self", 1, 2, with_noise=True, latent=(64, 64), dtype=torch.float16, device=CUDA, seed=seed
    )
    return frames, previous, state, state.pop("eps")


def test_compiled_pipeline_does_not_recompile() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            eager_inputs, compiled_inputs = _pipeline_inputs(seed), _pipeline_inputs(seed)
            expected = _pipeline(*eager_inputs)
            result = compiled(*compiled_inputs)
            # Only our ops and exact copies: compiled and eager run the same kernels on the same data.
            for a, b in zip(result, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            for key in ("x_t", "stock"):  # the in-place updates survive functionalization
                torch.testing.assert_close(
                    compiled_inputs[2][key], eager_inputs[2][key], rtol=0, atol=0
                )


def test_ops_capture_and_replay_in_a_cuda_graph() -> None:
    static = _pipeline_inputs(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _pipeline(*_pipeline_inputs(9))  # compiles every Triton kernel before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _pipeline(*static)
    for seed in (1, 2):
        fresh = _pipeline_inputs(seed)
        static[0].copy_(fresh[0])
        static[1].copy_(fresh[1])
        for key, value in fresh[2].items():
            if value is not None:
                static[2][key].copy_(value)
        static[3].copy_(fresh[3])
        graph.replay()
        expected = _pipeline(*fresh)
        for a, b in zip(outputs, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # same kernels, same inputs
        for key in ("x_t", "stock"):
            torch.testing.assert_close(static[2][key], fresh[2][key], rtol=0, atol=0)
