"""The Triton kernels, run on the CPU by Triton's interpreter, against the PyTorch references.

This gives kernel coverage in CI without a GPU. The interpreter is chosen when a kernel is
decorated, so the fixture imports fresh copies of the ``_triton_*`` modules with
``TRITON_INTERPRET=1`` set, and removes them (and the variable) afterwards. Skipped where
Triton is not installed, and on CUDA machines, whose GPU tests run the real kernels.

Outputs are poisoned before each launch so that an element the kernel fails to write shows.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import pytest
import torch
from kernels_testing import RCFG_MODES, fused_inputs, lora_rows_inputs, naive_lora_rows

from livediff.kernels import postprocess, preprocess, similarity, yuv
from livediff.kernels.fused_step import fused_step
from livediff.kernels.lora_rows import reference as lora_reference

MODULES = (
    "_triton_preprocess",
    "_triton_postprocess",
    "_triton_similarity",
    "_triton_fused_step",
    "_triton_lora_rows",
)


def _drop_modules() -> None:
    for name in MODULES:
        sys.modules.pop(f"livediff.kernels.{name}", None)


@pytest.fixture(scope="module")
def triton_cpu() -> Iterator[SimpleNamespace]:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU tests run the compiled kernels")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _drop_modules()
    try:
        loaded: dict[str, ModuleType] = {
            name: importlib.import_module(f"livediff.kernels.{name}") for name in MODULES
        }
        yield SimpleNamespace(
            **{name.removeprefix("_triton_"): module for name, module in loaded.items()}
        )
    finally:
        _drop_modules()
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def test_kernels_are_interpreted(triton_cpu: SimpleNamespace) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(triton_cpu.preprocess._preprocess_kernel, InterpretedFunction)


PRE_CASES = [
    ((37, 53), (0, 0, 37, 53), (16, 24)),
    ((37, 53), (3, 5, 30, 41), (40, 56)),
    ((37, 53), (3, 5, 30, 41), (30, 41)),
    ((9, 11), (4, 6, 1, 1), (3, 5)),
]


@pytest.mark.parametrize(("size", "crop", "out_size"), PRE_CASES)
@pytest.mark.parametrize("fmt", ["rgb", "i420", "nv12"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_preprocess(
    triton_cpu: SimpleNamespace,
    size: tuple[int, int],
    crop: tuple[int, int, int, int],
    out_size: tuple[int, int],
    fmt: str,
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(0)
    height, width = size
    ch, cw = yuv.chroma_size(height, width)
    kernels = triton_cpu.preprocess
    if fmt == "rgb":
        planes: tuple[torch.Tensor, ...] = (
            torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8, generator=gen),
        )
        expected = preprocess.rgb_to_model_input(planes[0], *out_size, crop, dtype)
        code = kernels.RGB
    else:
        y = torch.randint(0, 256, (2, height, width), dtype=torch.uint8, generator=gen)
        u, v = (
            torch.randint(0, 256, (2, ch, cw), dtype=torch.uint8, generator=gen) for _ in range(2)
        )
        expected = preprocess.i420_to_model_input(y, u, v, *out_size, crop, dtype)
        planes, code = (
            ((y, u, v), kernels.I420)
            if fmt == "i420"
            else ((y, torch.stack([u, v], -1).contiguous()), kernels.NV12)
        )
    out = torch.full((2, 3, *out_size), float("nan"), dtype=dtype)
    kernels.preprocess(code, planes, crop, out)
    # fp32: a few ulp apart (float32 weights, another summation order); fp16: 1 ulp at |x| <= 1.
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


@pytest.mark.parametrize(("height", "width"), [(8, 8), (5, 7), (1, 1), (2, 9), (9, 1), (33, 47)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_postprocess_is_bit_exact(
    triton_cpu: SimpleNamespace,
    height: int,
    width: int,
    dtype: torch.dtype,
    layout: torch.memory_format,
) -> None:
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(2, 3, height, width, generator=gen) * 2.4 - 1.2).to(dtype)
    images = images.contiguous(memory_format=layout)  # a decoder under the recipe: channels-last
    rgb = torch.full((2, height, width, 3), 7, dtype=torch.uint8)
    triton_cpu.postprocess.to_rgb(images, rgb)
    assert torch.equal(rgb, postprocess.model_output_to_rgb(images))
    packed = torch.full((2, yuv.i420_packed_length(height, width)), 7, dtype=torch.uint8)
    triton_cpu.postprocess.to_i420(images, packed)
    assert torch.equal(packed, postprocess.model_output_to_i420(images))


@pytest.mark.parametrize(
    ("dtype_a", "dtype_b", "shape"),
    [
        (torch.float32, torch.float32, (3, 40, 50)),
        (torch.float16, torch.float16, (5000,)),
        (torch.uint8, torch.uint8, (64, 64, 3)),
        (torch.uint8, torch.float32, (9, 9, 3)),
    ],
)
def test_similarity(
    triton_cpu: SimpleNamespace, dtype_a: torch.dtype, dtype_b: torch.dtype, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.rand(shape, generator=gen)
    other = (base + 0.3 * torch.rand(shape, generator=gen)).clamp(0, 1)

    def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else (x * 2 - 1).to(dtype)

    a, b = cast(base, dtype_a), cast(other, dtype_b)
    value = triton_cpu.similarity.cosine(a, b, similarity.NORM_EPS)
    assert value.shape == () and value.dtype == torch.float32
    assert abs(float(value) - float(similarity.frame_similarity(a, b))) < 1e-5


def test_similarity_limit_matches_kernel(triton_cpu: SimpleNamespace) -> None:
    kernels = triton_cpu.similarity
    assert similarity.TRITON_MAX_NUMEL == kernels.BLOCK * kernels.MAX_PARTS


@pytest.mark.parametrize("mode", RCFG_MODES)
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("with_noise", [True, False])
def test_fused_step(
    triton_cpu: SimpleNamespace, mode: str, frames: int, steps: int, with_noise: bool
) -> None:
    state = fused_inputs(mode, frames, steps, with_noise=with_noise, latent=(9, 7), seed=steps)
    kernel_state = {k: v.clone() if v is not None else None for k, v in state.items()}
    expected = fused_step(**state, rcfg=mode, frame_buffer_size=frames)
    out = torch.full_like(expected, float("nan"))
    s = kernel_state
    triton_cpu.fused_step.step(
        s["x_t"],
        s["eps"],
        s["stock"],
        s["noise"],
        s["coefficients"],
        s["guidance_scale"],
        s["delta"],
        out,
        mode,
        frames,
    )
    # Same float32 equations; stock divides by sqrt(1 - alpha_bar) >= 0.22: a few ulp more.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["x_t"], state["x_t"], rtol=1e-5, atol=1e-5)
    if state["stock"] is not None:
        torch.testing.assert_close(s["stock"], state["stock"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", RCFG_MODES)
def test_fused_step_half(triton_cpu: SimpleNamespace, mode: str) -> None:
    state = fused_inputs(mode, 2, 2, with_noise=True, latent=(9, 7), dtype=torch.float16)
    kernel_state = {k: v.clone() if v is not None else None for k, v in state.items()}
    expected = fused_step(**state, rcfg=mode, frame_buffer_size=2)
    out = torch.full_like(expected, float("nan"))
    s = kernel_state
    triton_cpu.fused_step.step(
        s["x_t"],
        s["eps"],
        s["stock"],
        s["noise"],
        s["coefficients"],
        s["guidance_scale"],
        s["delta"],
        out,
        mode,
        2,
    )
    # Both round once from float32; a 1-ulp flip of x_t feeds the stock through 1/b: 2 fp16 ulp.
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s["x_t"], state["x_t"], rtol=2e-3, atol=2e-3)
    if state["stock"] is not None:
        torch.testing.assert_close(s["stock"], state["stock"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rank", [4, 16, 40, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["fused", "two launches"])
def test_lora_rows(
    triton_cpu: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    rank: int,
    dtype: torch.dtype,
    path: str,
) -> None:
    limit = 1 << 30 if path == "fused" else 0  # which kernel the call's size picks
    monkeypatch.setattr(triton_cpu.lora_rows, "FUSED_MAX_OUTPUTS", limit)
    inputs = lora_rows_inputs(rank, tokens=37, width=70, features=90, dtype=dtype, seed=rank)
    expected = inputs["out"].clone()
    lora_reference(expected, **{k: v for k, v in inputs.items() if k != "out"})
    out = inputs["out"].clone()
    triton_cpu.lora_rows.lora_rows_add(
        out, *(inputs[k] for k in ("x", "a", "b", "indices", "scales"))
    )
    # Same rounding points; float32 sums in another order; fp16: 1 ulp of x·A or of out.
    tolerance = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    yardstick = naive_lora_rows(**inputs)
    torch.testing.assert_close(
        out.to(torch.float64), yardstick, rtol=4 * tolerance, atol=4 * tolerance
    )
    for row in (0, 5):  # no LoRA, scale 0: the kernel never writes them
        assert torch.equal(out[row], inputs["out"][row])
