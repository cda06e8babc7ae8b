"""GPU parity of the segmented LoRA kernel against its reference, both on CUDA, at UNet-like
shapes; it takes the Triton path, compiles without recompiling when rows switch LoRAs, and
replays in a CUDA graph where switching is writing the index and weight buffers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernels_testing import lora_rows_inputs, naive_lora_rows

from livediff.kernels import lora_rows as lora_module
from livediff.kernels._dispatch import FALLBACKS
from livediff.kernels.lora_rows import lora_rows

pytestmark = pytest.mark.gpu
CUDA = "cuda"
ARGS = ("x", "a", "b", "indices", "scales")


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from livediff.kernels import _triton_lora_rows

    calls: list[int] = []
    original: Callable[..., Any] = _triton_lora_rows.lora_rows_add

    def wrapper(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_triton_lora_rows, "lora_rows_add", wrapper)
    return calls


@pytest.mark.parametrize("rank", [4, 16, 48, 64, 128, 192])  # 48, 192: fused q/k/v pairs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("tokens", "width", "features"), [(4096, 320, 320), (64, 1280, 5120)])
def test_parity(
    monkeypatch: pytest.MonkeyPatch,
    rank: int,
    dtype: torch.dtype,
    tokens: int,
    width: int,
    features: int,
) -> None:
    inputs = lora_rows_inputs(
        rank, tokens=tokens, width=width, features=features, dtype=dtype, device=CUDA, seed=rank
    )
    expected = inputs["out"].clone()
    lora_module.reference(expected, *(inputs[k] for k in ARGS))
    calls = _counting(monkeypatch)
    out = lora_rows(*(inputs[k] for k in ARGS), out=inputs["out"].clone())
    assert calls == [1]
    # fp32: IEEE products, another summation order. Half: x·A rounds once to the dtype in both;
    # a 1-ulp flip there and the final rounding give a few ulp of |out| <= ~8.
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:
        yardstick = naive_lora_rows(**{k: v.cpu() for k, v in inputs.items()})
        torch.testing.assert_close(out.cpu().double(), yardstick, rtol=1e-4, atol=1e-4)
    for row in (0, 5):
        assert torch.equal(out[row], inputs["out"][row])


def test_non_contiguous_input_runs_the_reference_and_says_so() -> None:
    FALLBACKS.clear()
    inputs = lora_rows_inputs(8, device=CUDA)
    x = inputs["x"].transpose(0, 1).contiguous().transpose(0, 1)
    out = lora_rows(x, *(inputs[k] for k in ARGS[1:]))
    expected = naive_lora_rows(
        **{k: v.cpu() for k, v in inputs.items() if k != "out"},
        out=torch.zeros(out.shape, dtype=torch.float32),
    )
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    assert "not contiguous" in FALLBACKS.snapshot()[lora_module.OP]["reason"]
    FALLBACKS.clear()


class _LoraLinear(torch.nn.Module):
    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        a, b = inputs["a"], inputs["b"]
        self.base = torch.nn.Linear(a.shape[1], b.shape[2], device=CUDA, dtype=a.dtype)
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return lora_rows(x, self.a, self.b, indices, scales, out=self.base(x))


def test_compiled_layer_switches_loras_without_recompiling() -> None:
    torch._dynamo.reset()
    inputs = lora_rows_inputs(
        16, tokens=256, width=320, features=640, dtype=torch.float16, device=CUDA
    )
    layer = _LoraLinear(inputs).eval()
    compiled = torch.compile(layer, fullgraph=True)
    indices, scales = inputs["indices"].clone(), inputs["scales"].clone()
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for _ in range(3):
            indices.copy_(indices.roll(1, 0))
            scales.mul_(1.5)
            layer.a.mul_(0.9)
            result = compiled(inputs["x"], indices, scales)
            torch.testing.assert_close(
                result, layer(inputs["x"], indices, scales), rtol=2e-3, atol=2e-3
            )


def test_cuda_graph_replays_with_switched_rows_and_reloaded_weights() -> None:
    inputs = lora_rows_inputs(
        32, tokens=512, width=320, features=320, dtype=torch.float16, device=CUDA
    )
    layer = _LoraLinear(inputs).eval()
    x, indices, scales = inputs["x"], inputs["indices"].clone(), inputs["scales"].clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x, indices, scales)  # compiles the Triton kernels before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = layer(x, indices, scales)
        gen = torch.Generator(device=CUDA).manual_seed(7)
        for _ in range(3):
            indices.copy_(torch.randint(-1, 4, indices.shape, device=CUDA, generator=gen))
            scales.copy_(torch.rand(scales.shape, device=CUDA, generator=gen))
            layer.a[1].copy_(torch.randn(layer.a[1].shape, device=CUDA, generator=gen) * 0.05)
            graph.replay()
            torch.testing.assert_close(output, layer(x, indices, scales), rtol=0, atol=0)
